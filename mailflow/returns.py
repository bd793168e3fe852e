"""Reading a workbook a delegation sent back: is it safe to open, is it ours, what did they answer.

Pure code: bytes in, a :class:`ReturnReading` out. Nothing here raises on a bad
file; whatever is wrong becomes a status and a reason written for people
(what is wrong and what to do about it).

The file comes from outside and is read in two steps:

1. **Preflight** (:func:`preflight`), before any spreadsheet parser sees the
   bytes: the format by magic bytes, the size, the zip central directory
   (declared sizes and compression ratios: a decompression bomb is refused
   without decompressing anything), then every zip member decompressed as a
   stream under a cap (declared sizes can lie), XML parts checked for DTDs with
   defusedxml, and the cells each sheet would make counted. The counting
   matters: python-calamine builds each sheet as a dense rectangle from its
   first to its last cell, and a 2 KB file with one cell in A1 and one in
   XFD1048576 makes it ask for hundreds of gigabytes and abort the whole
   process, which no ``except`` can catch. The same goes for a huge shared
   strings count, an .xls ``DIMENSIONS`` record or far cell, and ODS
   row/column repeats. So each sheet's extent is bounded here first, the way
   calamine will compute it.
2. **Reading** (:func:`read_return`) with python-calamine (xlsx, xlsm, xls,
   ods; macros never run): the sheet and header row are searched for wherever
   the delegation moved them, headers may be translated or reordered, a merged
   answer counts for every row it spans, and rows added, deleted or changed
   outside the fill column are reported.
"""

from __future__ import annotations

import functools
import io
import itertools
import operator
import posixpath
import re
import struct
import zipfile
from collections.abc import Container, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, NamedTuple, NoReturn, cast
from xml.parsers import expat

import python_calamine
from zlib_ng import zlib_ng

from mailflow import collector, reasons
from mailflow.workbook import (
    FINGERPRINT_SHEET,
    LABEL_MAX_CHARS,
    Fingerprint,
    MasterLayout,
    _archive_fingerprint,
    _HeaderMatch,
    _parse_fingerprint,
    _safe_parser,
    _scan_headers,
    _spread_merged_fill,
    cell_text,
    find_column,
    normalize_header,
)

if TYPE_CHECKING:
    from mailflow.workbook import CellValue, Grid

__all__ = [
    "FORMAT_ENCRYPTED",
    "FORMAT_ODS",
    "FORMAT_UNKNOWN",
    "FORMAT_XLS",
    "FORMAT_XLSB",
    "FORMAT_XLSM",
    "FORMAT_XLSX",
    "HEADER_SEARCH_ROWS",
    "STATUS_IGNORED",
    "STATUS_PARSED",
    "STATUS_REJECTED",
    "STATUS_UNREADABLE",
    "WORKBOOK_EXTENSIONS",
    "ReturnLimits",
    "ReturnReading",
    "RowChange",
    "is_answer",
    "preflight",
    "read_return",
    "sniff_format",
]

STATUS_PARSED: Final = "parsed"
STATUS_UNREADABLE: Final = "unreadable"
STATUS_REJECTED: Final = "rejected"
STATUS_IGNORED: Final = "ignored"

FORMAT_XLSX: Final = "xlsx"
FORMAT_XLSM: Final = "xlsm"
FORMAT_XLS: Final = "xls"
FORMAT_ODS: Final = "ods"
FORMAT_XLSB: Final = "xlsb"  # recognised so the reason can say "save it as .xlsx"; not read
FORMAT_ENCRYPTED: Final = "encrypted"  # an OLE2 container holding an encrypted OOXML package
FORMAT_UNKNOWN: Final = "unknown"

# Names a person gives a spreadsheet. A file with one of these names that is
# not a readable spreadsheet is "unreadable" (the delegation meant to send
# the workbook); any other unknown file is "ignored" (a logo, a PDF).
WORKBOOK_EXTENSIONS: Final = frozenset(
    {".xlsx", ".xlsm", ".xltx", ".xltm", ".xls", ".xlt", ".xlsb", ".ods", ".ots", ".fods", ".csv"}
)
# The header row may sit below a title block the delegation added.
HEADER_SEARCH_ROWS: Final = 50

_ZIP_MAGIC = b"PK\x03\x04"
_EMPTY_ZIP_MAGIC = b"PK\x05\x06"
_OLE_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
_ODS_MIMETYPE = b"application/vnd.oasis.opendocument.spreadsheet"
_MB = 1 << 20
# Below this many declared bytes a member's compression ratio is not judged:
# small, very regular XML parts compress far beyond any sane ratio.
_RATIO_FLOOR = _MB
# Decompressed bytes handed on at a time, and compressed bytes fed at a time.
# Small enough for a chunk to be scanned while still in the CPU cache: with
# 1 MB chunks the preflight of a 5 MB sheet took 4 ms longer.
_CHUNK = 1 << 16
_INPUT_CHUNK = 1 << 14
_SMALL_PART = _MB  # cap when reading parts that are tiny in any real workbook
# Tag text kept across chunk boundaries by the fast cell scan; a longer run
# after a '<' is not something Excel, LibreOffice or Google write.
_MAX_CARRY = _MB
# calamine reserves an .xls sheet's DIMENSIONS rows x columns up front
# (virtual memory only). Allow the whole BIFF8 grid, refuse what is beyond.
_XLS_DIMENSIONS_LIMIT = 65536 * 256
_DASHES = frozenset("-‐‑‒–—―−")


# --------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------


class ReturnLimits(NamedTuple):
    """What a returned file may cost to read. Anything beyond is ``rejected``."""

    max_file_bytes: int = 20 * 1024 * 1024
    max_uncompressed_bytes: int = 200 * 1024 * 1024
    """Total declared (and actual) uncompressed size of the zip members."""
    max_compression_ratio: int = 100
    """Uncompressed / compressed, per member and overall, for members of more than 1 MB."""
    max_rows: int = 100_000
    """Rows of any one sheet (counted to its last non-empty cell)."""
    max_sheets: int = 200
    max_cells: int = 4_000_000
    """Cells of the rectangle calamine would build for a sheet (for .xls and .ods: all sheets together,
    as they are all built when the file is opened)."""


_DEFAULT_LIMITS = ReturnLimits()


class RowChange(NamedTuple):
    """A row the delegation added or deleted, or a cell it changed outside the fill column."""

    key: str
    row: int
    """1-based row in the returned sheet (0 when the row was deleted)."""
    column: str
    """Header of the changed column, as in the master ("" for added and deleted rows)."""
    before: str
    after: str


class ReturnReading(NamedTuple):
    """What a returned file holds, or why it could not be read."""

    status: str
    """``parsed``, ``unreadable``, ``rejected`` or ``ignored``."""
    reason: str | None
    """For people: what is wrong and what to do, in English. None when parsed."""
    answers: dict[str, str]
    """Master key -> answer, non-empty answers only, in master order (empty unless parsed)."""
    missing: tuple[str, ...] = ()
    """Master keys without an answer, in master order (empty unless parsed)."""
    added: tuple[RowChange, ...] = ()
    deleted: tuple[RowChange, ...] = ()
    changed: tuple[RowChange, ...] = ()
    fingerprint: Fingerprint | None = None
    sheet: str | None = None
    format: str = FORMAT_UNKNOWN
    """``xlsx``, ``xlsm``, ``xls``, ``ods``, or what :func:`sniff_format` said (``xlsb``, ``encrypted``,
    ``unknown``) when the file could not be read."""
    reason_code: str | None = None
    """The :mod:`mailflow.reasons` code of ``reason``: it is written in any language from it."""
    reason_params: Mapping[str, str] = {}  # read-only (a Mapping): one empty default serves all


def is_answer(text: str) -> bool:
    """True if ``text`` answers: not empty, not only whitespace, not only dashes ("-", "—").

    "n/a" and the like are answers: "not applicable" is something a delegation can mean."""
    stripped = text.strip()
    return bool(stripped) and not all(char in _DASHES or char.isspace() for char in stripped)


class _Verdict(Exception):
    """Stops reading a file: ``status`` and the reason (a :mod:`mailflow.reasons` code and its parameters)."""

    def __init__(self, status: str, code: str, params: Mapping[str, str]) -> None:
        self.status = status
        self.code = code
        self.params = dict(params)
        self.reason = reasons.explain(code, self.params)
        super().__init__(self.reason)
        self.format: str | None = None  # what preflight's sniff said, when the verdict is preflight's


def _refuse(status: str, code: str, **params: str) -> NoReturn:
    raise _Verdict(status, code, params)


def _damaged(detail: str) -> NoReturn:
    _refuse(STATUS_UNREADABLE, reasons.DAMAGED, detail=detail)


def _size(count: int) -> str:
    if count >= _MB:
        return f"{count / _MB:,.0f} MB"
    return f"{count / 1024:,.0f} KB" if count >= 1024 else f"{count} bytes"


# --------------------------------------------------------------------------
# Format
# --------------------------------------------------------------------------


def _extension(filename: str) -> str:
    return posixpath.splitext(filename.strip().lower())[1]


def sniff_format(data: bytes, filename: str) -> str:
    """Return the format of ``data`` from its content (the name is not trusted).

    ``xlsx``, ``xlsm``, ``xlsb`` or ``ods`` for a zip package with the right
    parts, ``xls`` for an OLE2 file with a Workbook/Book stream, ``encrypted``
    for an OLE2 file holding an encrypted package (what Excel writes for a
    password-protected .xlsx), ``unknown`` otherwise. Cheap and never raises:
    only the zip central directory or the OLE2 directory is read."""
    del filename  # the content decides; the name only matters to preflight
    if data.startswith((_ZIP_MAGIC, _EMPTY_ZIP_MAGIC)):
        with _OpenZip(data) as opened:
            return _sniff(data, opened.archive)
    return _sniff(data, None)


def _sniff(data: bytes, archive: zipfile.ZipFile | None) -> str:
    """:func:`sniff_format`, given the zip package ``data`` opens as (None if it opens as none)."""
    try:
        if archive is not None:
            return _zip_format(archive)
        if data.startswith(_OLE_MAGIC):
            return _ole_format(data)
    except Exception:
        return FORMAT_UNKNOWN
    return FORMAT_UNKNOWN


class _OpenZip:
    """A zip package's directory, read once and shared by every step that needs it.

    ``archive`` is None when the bytes do not open as a zip package, with
    ``error`` saying why."""

    def __init__(self, data: bytes) -> None:
        self.archive: zipfile.ZipFile | None = None
        self.error: Exception | None = None
        try:
            self.archive = zipfile.ZipFile(io.BytesIO(data))
        except Exception as exc:
            self.error = exc

    def close(self) -> None:
        if self.archive is not None:
            self.archive.close()

    def __enter__(self) -> _OpenZip:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def _zip_format(archive: zipfile.ZipFile) -> str:
    names = {name.lower(): name for name in archive.namelist()}
    if "xl/workbook.xml" in names:
        if "xl/vbaproject.bin" in names:
            return FORMAT_XLSM
        types = names.get("[content_types].xml")
        if types is not None and b"macroenabled" in _read_small(archive, types).lower():
            return FORMAT_XLSM
        return FORMAT_XLSX
    if "xl/workbook.bin" in names:
        return FORMAT_XLSB
    if "mimetype" in names and _read_small(archive, names["mimetype"]).strip().startswith(_ODS_MIMETYPE):
        return FORMAT_ODS
    return FORMAT_UNKNOWN


def _read_small(archive: zipfile.ZipFile, name: str) -> bytes:
    with archive.open(name) as stream:
        return stream.read(_SMALL_PART)


def _open_ole(data: bytes) -> Any:
    """olefile's reader of an OLE2 container (imported here: only .xls and encrypted files need it)."""
    import olefile  # type: ignore[import-untyped]

    return olefile.OleFileIO(data)


def _ole_format(data: bytes) -> str:
    # olefile parses the directory properly (a scan for the UTF-16 stream
    # names would also find them in cell text); its errors mean "not a file
    # we know", never a crash.
    with _open_ole(data) as ole:
        streams = {"/".join(path).lower() for path in ole.listdir(streams=True, storages=False)}
    if "encryptedpackage" in streams or "encryptioninfo" in streams:
        return FORMAT_ENCRYPTED
    if "workbook" in streams or "book" in streams:
        return FORMAT_XLS
    return FORMAT_UNKNOWN


# --------------------------------------------------------------------------
# Preflight
# --------------------------------------------------------------------------


class _Inspection:
    """What preflight learnt that reading needs: the format, for ODS merged ranges by sheet, and for
    a zip package its directory (read once: the fingerprint is then read from the same directory)."""

    __slots__ = ("archive", "format", "ods_merges")

    def __init__(self, format: str) -> None:
        self.format = format
        self.ods_merges: dict[str, list[tuple[tuple[int, int], tuple[int, int]]]] = {}
        self.archive: zipfile.ZipFile | None = None

    def close(self) -> None:
        if self.archive is not None:
            self.archive.close()


def preflight(data: bytes, filename: str, limits: ReturnLimits) -> tuple[str, str | None]:
    """Decide whether ``data`` may be given to a spreadsheet parser: ``(status, reason)``.

    ``("parsed", None)`` means go ahead. Otherwise: ``ignored`` for a file that
    is not a spreadsheet and is not named like one; ``unreadable`` for a
    damaged, encrypted or unknown file named like a workbook; ``rejected`` for
    a file that is too large, a decompression bomb (declared or actual sizes),
    XML with entity declarations, or sheets too large to read. Memory stays
    bounded: zip members are decompressed as streams under caps and never
    held whole."""
    try:
        _inspect(data, filename, limits).close()
    except _Verdict as verdict:
        return verdict.status, verdict.reason
    except Exception as exc:
        return STATUS_UNREADABLE, _unexpected(exc).reason
    return STATUS_PARSED, None


def _unexpected(exc: BaseException) -> _Verdict:
    """The verdict on a file whose reading failed in a way nothing foresaw."""
    return _Verdict(STATUS_UNREADABLE, reasons.UNEXPECTED, {"error": f"{type(exc).__name__}: {exc}"})


def _inspect(data: bytes, filename: str, limits: ReturnLimits) -> _Inspection:
    """Preflight's checks; the result holds the zip directory open (close it). A verdict carries the format."""
    opened = _OpenZip(data) if data.startswith((_ZIP_MAGIC, _EMPTY_ZIP_MAGIC)) else None
    fmt = _sniff(data, opened.archive if opened is not None else None)
    try:
        return _inspect_format(data, filename, limits, fmt, opened)
    except BaseException as exc:
        if opened is not None:
            opened.close()
        if isinstance(exc, _Verdict):
            exc.format = fmt
        raise


def _inspect_format(data: bytes, filename: str, limits: ReturnLimits, fmt: str, opened: _OpenZip | None) -> _Inspection:
    named_workbook = _extension(filename) in WORKBOOK_EXTENSIONS
    if fmt == FORMAT_UNKNOWN and not named_workbook:
        # A logo, a PDF, a .docx: never opened, so never a danger.
        _refuse(STATUS_IGNORED, reasons.IGNORED, filename=filename)
    if len(data) > limits.max_file_bytes:
        _refuse(STATUS_REJECTED, reasons.TOO_LARGE, size=_size(len(data)), limit=_size(limits.max_file_bytes))
    if fmt == FORMAT_ENCRYPTED:
        _refuse(STATUS_UNREADABLE, reasons.PASSWORD)
    if opened is not None:
        # A bomb named like a workbook is refused as a bomb, whatever it holds.
        archive = _ZipScan(data, limits, opened)
        if fmt == FORMAT_UNKNOWN:
            _not_a_spreadsheet(filename)
        if fmt == FORMAT_XLSB:
            _refuse(STATUS_UNREADABLE, reasons.XLSB)
        inspection = archive.check(fmt)
        inspection.archive = opened.archive  # closed by the caller, with the inspection
        return inspection
    if fmt == FORMAT_XLS:
        _check_xls(data, limits)
        return _Inspection(fmt)
    _not_a_spreadsheet(filename)


def _not_a_spreadsheet(filename: str) -> NoReturn:
    _refuse(STATUS_UNREADABLE, reasons.NOT_A_SPREADSHEET, filename=filename)


_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")


class _Member(NamedTuple):
    info: zipfile.ZipInfo
    start: int
    """Offset of the compressed data in the file."""


class _ZipScan:
    """A zip package checked member by member, without trusting what it declares.

    The constructor reads only the central directory and local headers and
    refuses bombs from the declared sizes; :meth:`check` then decompresses
    every member as a stream, counting what comes out."""

    def __init__(self, data: bytes, limits: ReturnLimits, opened: _OpenZip) -> None:
        self.data = data
        self.limits = limits
        if opened.archive is None:
            error = opened.error
            assert error is not None
            if isinstance(
                error, (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError, NotImplementedError)
            ):
                _damaged(f"not a valid zip package: {error}")
            raise error
        infos = opened.archive.infolist()
        # Python and the zip reader inside calamine both look for the end
        # record from the end of the file; with a second one hidden in the
        # tail they could disagree on which members the file has.
        tail = max(0, len(data) - (1 << 16) - 22)
        if data.count(b"PK\x05\x06", tail) > 1 or data.count(b"PK\x06\x06", tail) > 1:
            _damaged("it has two zip directories")
        self._check_declared(infos)
        self.members = self._locate(infos)
        self._decompressed: dict[str, bytes] = {}
        self._by_lower_name: dict[str, _Member] | None = None
        self._targets: list[tuple[bytes | None, bytes, _Member]] | None = None

    def _check_declared(self, infos: Sequence[zipfile.ZipInfo]) -> None:
        limits = self.limits
        names = [info.filename for info in infos]
        if len(set(names)) != len(names):
            _damaged("two parts of the package have the same name")
        total = sum(info.file_size for info in infos)
        if total > limits.max_uncompressed_bytes:
            _refuse(STATUS_REJECTED, reasons.BOMB_TOTAL, size=_size(total), limit=_size(limits.max_uncompressed_bytes))
        if total > _RATIO_FLOOR and total > limits.max_compression_ratio * max(len(self.data), 1):
            _refuse(
                STATUS_REJECTED,
                reasons.BOMB_RATIO,
                ratio=f"{total // max(len(self.data), 1):,}",
                limit=str(limits.max_compression_ratio),
            )
        for info in infos:
            if info.file_size > _RATIO_FLOOR and info.file_size > limits.max_compression_ratio * max(
                info.compress_size, 1
            ):
                _refuse(
                    STATUS_REJECTED,
                    reasons.BOMB_PART_RATIO,
                    part=info.filename,
                    ratio=f"{info.file_size // max(info.compress_size, 1):,}",
                    limit=str(limits.max_compression_ratio),
                )

    def _locate(self, infos: Sequence[zipfile.ZipInfo]) -> list[_Member]:
        members: list[_Member] = []
        end_of_previous = 0
        for info in sorted(infos, key=lambda item: item.header_offset):
            if info.flag_bits & 0x1:
                _refuse(STATUS_UNREADABLE, reasons.PASSWORD)
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                _damaged(f"part {info.filename} uses an unusual compression method")
            offset = info.header_offset
            if offset < end_of_previous:
                # Overlapping members are how the densest zip bombs are built.
                _damaged("parts of the package overlap")
            header = self.data[offset : offset + _LOCAL_HEADER.size]
            if len(header) < _LOCAL_HEADER.size:
                _damaged("the package is truncated")
            fields = _LOCAL_HEADER.unpack(header)
            if fields[0] != 0x04034B50:
                _damaged(f"part {info.filename} has no local header")
            name_length, extra_length = fields[9], fields[10]
            start = offset + _LOCAL_HEADER.size + name_length + extra_length
            end = start + info.compress_size
            if end > len(self.data):
                _damaged("the package is truncated")
            raw_name = self.data[offset + _LOCAL_HEADER.size : offset + _LOCAL_HEADER.size + name_length]
            if raw_name.decode("utf-8" if info.flag_bits & 0x800 else "cp437", "replace") != info.orig_filename:
                _damaged(f"part {info.filename} is named differently in the package directory")
            members.append(_Member(info, start))
            end_of_previous = end
        return members

    def stream(self, member: _Member) -> Iterator[bytes]:
        """Yield the decompressed bytes of ``member`` in chunks of at most 64 KB.

        Refuses (as a bomb) the member as soon as it yields more than it
        declared, and as damaged when it yields less or its CRC is wrong."""
        info = member.info
        compressed = memoryview(self.data)[member.start : member.start + info.compress_size]
        produced = 0
        crc = 0
        for chunk in self._raw_chunks(info, compressed):
            produced += len(chunk)
            if produced > info.file_size:
                _refuse(STATUS_REJECTED, reasons.BOMB_PART_BEYOND, part=info.filename)
            crc = zlib_ng.crc32(chunk, crc)
            yield chunk
        if produced != info.file_size or crc != info.CRC:
            _damaged(f"part {info.filename} does not match its checksum")

    @staticmethod
    def _raw_chunks(info: zipfile.ZipInfo, compressed: memoryview) -> Iterator[bytes]:
        if info.compress_type == zipfile.ZIP_STORED:
            for position in range(0, len(compressed), _CHUNK):
                yield bytes(compressed[position : position + _CHUNK])
            return
        # zlib-ng: the same stream and checks as zlib, in a third of the time (5.4 -> 1.9 ms for
        # a 10,000-row sheet, checksum included).
        inflater = zlib_ng.decompressobj(-zlib_ng.MAX_WBITS)
        position = 0
        pending = b""
        try:
            while True:
                if not pending:
                    if position >= len(compressed) or inflater.eof:
                        break
                    pending = bytes(compressed[position : position + _INPUT_CHUNK])
                    position += _INPUT_CHUNK
                # max_length bounds what one call can produce, so a single
                # compressed chunk cannot expand to gigabytes in memory.
                out = inflater.decompress(pending, _CHUNK)
                pending = inflater.unconsumed_tail
                if out:
                    yield out
                if inflater.eof:
                    break
            tail = inflater.flush()
        except zlib_ng.error as exc:  # type: ignore[misc]  # a class: its stub calls it an instance
            _damaged(f"part {info.filename} cannot be decompressed: {exc}")
        if tail:
            yield tail
        if not inflater.eof:
            _damaged(f"part {info.filename} is truncated")

    # -- per format --------------------------------------------------------

    def check(self, fmt: str) -> _Inspection:
        """Decompress, under the caps, every member a reader may open, and check what calamine will parse.

        In a standard .xlsx package the members no reader opens (document properties, the theme,
        comments and their drawings, images, printer settings) are left compressed: their declared
        sizes were checked, and what they hold can do nothing. Any other package is checked whole."""
        inspection = _Inspection(fmt)
        xlsx = fmt in (FORMAT_XLSX, FORMAT_XLSM)
        sheets = self._worksheet_parts() if xlsx else set()
        opened = self._parts_opened() if xlsx else None
        # Parts read as sheets and nothing else need no shared-strings check (1.7 ms of the 10 ms a
        # 10,000-row sheet took); with the package laid out otherwise, every part gets every check.
        sheets_only = sheets - self._shared_strings_parts() if opened is not None else set()
        for member in self.members:
            name = member.info.filename
            if opened is not None and name.lower() not in opened:
                continue
            is_xml = name.lower().endswith((".xml", ".rels", ".vml")) or name in sheets
            if fmt == FORMAT_ODS and name == "content.xml":
                inspection.ods_merges = _scan_ods(self.stream(member), self.limits)
            elif fmt in (FORMAT_XLSX, FORMAT_XLSM) and is_xml:
                self._check_xlsx_part(member, strings=name not in sheets_only)
            elif is_xml:
                _drain(_check_prolog(self._content(member), name))
            else:
                _drain(self._content(member))
        return inspection

    def _content(self, member: _Member) -> Iterator[bytes]:
        """The decompressed bytes of ``member``: those :meth:`_small` already checked, else :meth:`stream`."""
        kept = self._decompressed.get(member.info.filename)
        if kept is None:
            return self.stream(member)
        return iter((kept,) if kept else ())

    def _worksheet_parts(self) -> set[str]:
        """The members the workbook's sheets point at, resolved as leniently as any reader would.

        calamine reads a sheet from whatever part its relationship names,
        whatever the extension: those parts are checked as sheets even when
        not named .xml. Relationships to other parts (a vbaProject.bin) are not."""
        lowered = self._lowered()
        workbook = lowered.get("xl/workbook.xml")
        if workbook is None:
            return set()
        sheet_ids = {
            match[1]
            for tag in _SHEET_TAG.findall(self._small(workbook))
            if (match := _ID_ATTRIBUTE.search(tag)) is not None
        }
        return {
            member.info.filename
            for identifier, kind, member in self._workbook_targets()
            if identifier in sheet_ids or kind.endswith(_SHEET_TYPES)
        }

    def _shared_strings_parts(self) -> set[str]:
        """The members a reader may take the shared strings from: ``xl/sharedStrings.xml`` (calamine's
        fixed name, any case) and whatever a relationship of the workbook names as shared strings."""
        # Every member so named: a package may hold the name twice, in two cases.
        found = {member.info.filename for member in self.members if member.info.filename.lower() == _SHARED_STRINGS}
        found |= {
            member.info.filename
            for _, kind, member in self._workbook_targets()
            if kind.lower().endswith(b"/sharedstrings")
        }
        return found

    def _parts_opened(self) -> set[str] | None:
        """Lower-cased names of the members a reader may open, or None to check every member.

        calamine finds the workbook through ``_rels/.rels``, then reads the
        workbook, its relationships and what they point at (sheets, shared
        strings, styles), and fixed names for the last two; mailflow itself
        reads the content types and the document's custom properties. The
        answer is None unless the package is laid out as every spreadsheet
        program writes it (the workbook at ``xl/workbook.xml``)."""
        lowered = self._lowered()
        root = lowered.get("_rels/.rels")
        if root is None or "xl/workbook.xml" not in lowered or "xl/_rels/workbook.xml.rels" not in lowered:
            return None
        documents = [
            (_attribute(tag, b"Target") or b"").decode("utf-8", "replace").lstrip("/").lower()
            for tag in _RELATIONSHIP_TAG.findall(self._small(root))
            if (_attribute(tag, b"Type") or b"").endswith(b"/officeDocument")
        ]
        if documents != ["xl/workbook.xml"]:
            return None
        opened = {name for name in lowered if name.endswith(".rels")}
        opened |= {"[content_types].xml", "docprops/custom.xml", "xl/workbook.xml"}
        opened |= {"xl/styles.xml", _SHARED_STRINGS}
        opened |= {
            member.info.filename.lower()
            for _, kind, member in self._workbook_targets()
            if not kind.endswith(_UNOPENED_TYPES)
        }
        return opened

    def _lowered(self) -> dict[str, _Member]:
        if self._by_lower_name is None:
            self._by_lower_name = {member.info.filename.lower(): member for member in self.members}
        return self._by_lower_name

    def _workbook_targets(self) -> list[tuple[bytes | None, bytes, _Member]]:
        """(Id, Type, member) of each relationship of the workbook, its target resolved leniently."""
        if self._targets is None:
            self._targets = self._resolve_workbook_targets()
        return self._targets

    def _resolve_workbook_targets(self) -> list[tuple[bytes | None, bytes, _Member]]:
        rels = self._lowered().get("xl/_rels/workbook.xml.rels")
        if rels is None:
            return []
        lowered = self._lowered()
        found: list[tuple[bytes | None, bytes, _Member]] = []
        for tag in _RELATIONSHIP_TAG.findall(self._small(rels)):
            identifier, target, kind = (_attribute(tag, name) for name in (b"Id", b"Target", b"Type"))
            if target is None:
                continue
            text = target.decode("utf-8", "replace")
            for candidate in (text.lstrip("/"), f"xl/{text}", posixpath.normpath(f"xl/{text}")):
                member = lowered.get(candidate.lower())
                if member is not None:
                    found.append((identifier, kind or b"", member))
        return found

    def _small(self, member: _Member) -> bytes:
        """A part that is small in any real workbook, checked, at most 4 MB of it."""
        kept: list[bytes] = []
        size = 0
        whole = True
        for chunk in _check_prolog(self.stream(member), member.info.filename):
            if size < 4 * _SMALL_PART:
                kept.append(chunk)
                size += len(chunk)
            else:
                whole = False
        data = b"".join(kept)
        if whole:
            # Streamed to the end: sizes and CRC are checked. The member-by-member
            # check then reuses these bytes instead of decompressing them again.
            self._decompressed[member.info.filename] = data
        return data

    def _check_xlsx_part(self, member: _Member, *, strings: bool) -> None:
        """Check an XML part's cells, and unless ``strings`` is False its shared-strings count."""
        name = member.info.filename
        if _fast_cells_ok(_check_prolog(self._content(member), name), self.limits, strings=strings):
            return
        # Something unusual (wide sheet, cells without references, another
        # encoding): count the cells exactly as calamine places them.
        rows, cols = _xlsx_extent(_check_prolog(self._content(member), name), name, self.limits)
        _check_extent(rows, cols, self.limits)


_SHEET_TAG = re.compile(rb"<(?:[A-Za-z_][\w.\-]*:)?sheet\s[^>]*>")
_ID_ATTRIBUTE = re.compile(rb'\s(?:[A-Za-z_][\w.\-]*:)?id\s*=\s*["\']([^"\']*)["\']')
_RELATIONSHIP_TAG = re.compile(rb"<(?:[A-Za-z_][\w.\-]*:)?Relationship\s[^>]*>")
_SHARED_STRINGS = "xl/sharedstrings.xml"  # where calamine reads them from, in any case
_SHEET_TYPES = (b"/worksheet", b"/chartsheet", b"/dialogsheet", b"/macrosheet")
# Workbook relationships whose parts calamine never opens (tests/test_returns.py proves it part by part).
_UNOPENED_TYPES = (b"/theme",)


@functools.lru_cache(maxsize=16)
def _attribute_pattern(name: bytes) -> re.Pattern[bytes]:
    return re.compile(rb"\s" + name + rb'\s*=\s*["\']([^"\']*)["\']')


def _attribute(tag: bytes, name: bytes) -> bytes | None:
    match = _attribute_pattern(name).search(tag)
    return None if match is None else match[1]


def _drain(chunks: Iterator[bytes]) -> None:
    for _chunk in chunks:
        pass


# -- XML prolog: DTDs and entities --------------------------------------------


class _RootReached(Exception):
    """The first element started: the prolog, where a DTD would be, is over."""


class _StopAtRoot:
    """ElementTree parser target that stops at the root element."""

    def start(self, tag: str, attrib: Mapping[str, str]) -> None:
        raise _RootReached

    def end(self, tag: str) -> None:
        pass

    def data(self, text: str) -> None:
        pass

    def close(self) -> None:
        return None


def _check_prolog(chunks: Iterator[bytes], name: str) -> Iterator[bytes]:
    """Pass ``chunks`` through, refusing the part if its prolog declares a DTD (entities).

    A DTD can only appear before the root element, so defusedxml parses the
    prolog and stops at the first element: a billion-laughs or external entity
    declaration is refused, and the cost does not grow with the part. A part
    whose first chunk plainly starts with its root element (what every
    spreadsheet program writes) has no room for a DTD and needs no parser."""
    parser: Any = None
    refused: type[Exception] = _RootReached  # replaced by defusedxml's refusal when it parses
    first = True
    for chunk in chunks:
        if first:
            first = False
            if not _plain_prolog(chunk):
                parser, refused = _prolog_parser()
        if parser is not None:
            try:
                parser.feed(chunk)
            except _RootReached:
                parser = None
            except refused:
                _refuse(STATUS_REJECTED, reasons.ENTITIES, part=name)
            except Exception:
                parser = None  # not well-formed: the spreadsheet reader will say so
        yield chunk


def _prolog_parser() -> tuple[Any, type[Exception]]:
    """defusedxml's parser stopping at the root element, and the exception it refuses a DTD with.

    Imported here: the parts spreadsheet programs write never need it."""
    import defusedxml.ElementTree as defused_et  # type: ignore[import-untyped]
    from defusedxml import DefusedXmlException

    return defused_et.XMLParser(target=_StopAtRoot(), forbid_dtd=True), DefusedXmlException


# An optional UTF-8 byte order mark, an optional XML declaration, whitespace,
# then the root element's start tag: nothing else can come before the root.
_PLAIN_PROLOG = re.compile(rb"\A(?:\xef\xbb\xbf)?(?:<\?xml(\s[^<>?]*)?\?>)?[ \t\r\n]*<[A-Za-z_]")
_DECLARED_ENCODING = re.compile(rb"\sencoding\s*=\s*[\"']([^\"']*)[\"']")


def _plain_prolog(chunk: bytes) -> bool:
    """True if ``chunk`` is UTF-8 and goes straight from the XML declaration (if any) to the root element."""
    match = _PLAIN_PROLOG.match(chunk)
    if match is None:
        return False
    declaration = match[1]
    if declaration is None or b"encoding" not in declaration:
        return True
    encoding = _DECLARED_ENCODING.search(declaration)
    # Another encoding could give the same bytes another meaning: let the parser decide.
    return encoding is not None and encoding[1].lower() in (b"utf-8", b"utf8")


# -- xlsx sheets: where calamine will put each cell ---------------------------


@functools.lru_cache(maxsize=8)
def _loose_cell(digits: int, prefixed: bool) -> re.Pattern[bytes]:
    # A <c> tag that does NOT begin with r="<one letter><up to `digits`
    # digits>": anything else (wider, taller, no reference, odd spacing) sends
    # the part to the exact count. Unprefixed and prefixed tags are two
    # patterns because a literal "<c" is searched far faster than an optional
    # prefix at every "<" (4 ms against 15 ms for a 10,000-row sheet).
    prefix = rb"<[A-Za-z_][\w.\-]*:c" if prefixed else rb"<c"
    return re.compile(prefix + rb'(?! r="[A-Z][0-9]{1,%d}"[\s/>])[\s/>]' % digits)


_PREFIXED_HINT = re.compile(rb":c[\s/>]")
_SST_HINT = re.compile(rb"sst[\s/>]")
_SST_TAG = re.compile(rb"<(?:[A-Za-z_][\w.\-]*:)?sst(?=[\s/>])[^>]*>")


_ASCII_XML = re.compile(rb'\A(?:\xef\xbb\xbf)?\s*<(?:\?xml(?:[^>]*?encoding\s*=\s*["\']([^"\']*)["\'])?)?')


def _fast_digits(limits: ReturnLimits) -> int:
    """Row digits for which a one-letter-column sheet stays within the limits (0: no fast path)."""
    digits = 7
    while digits and (10**digits - 1 > limits.max_rows or 26 * (10**digits - 1) > limits.max_cells):
        digits -= 1
    return digits


def _fast_cells_ok(chunks: Iterator[bytes], limits: ReturnLimits, *, strings: bool) -> bool:
    """True if every cell of the part is referenced within columns A-Z and the row limit (and, unless
    ``strings`` is False, a shared-strings table in it declares a count within the limits).

    This is what Excel, LibreOffice, Google Sheets and openpyxl write for a
    plan like ours (``<c r="G12" ...>``), and it bounds the sheet without
    parsing it: one regular expression over the decompressed bytes. Stops
    reading at the first cell it cannot vouch for (the caller then counts
    exactly, from a fresh stream)."""
    digits = _fast_digits(limits)
    if digits == 0:
        return False
    carry = b""
    previous: bytes | None = None
    for chunk in chunks:
        if previous is None:
            declaration = _ASCII_XML.match(chunk)
            if declaration is None or (
                declaration[1] is not None and declaration[1].lower() not in (b"utf-8", b"utf8")
            ):
                return False  # not UTF-8: the byte patterns would not see its tags
        else:
            # A chunk with another after it: the text from its last "<" on may
            # be a tag cut in two, carried over to the next chunk.
            buffer = carry + previous if carry else previous
            cut = buffer.rfind(b"<")
            body, carry = (buffer, b"") if cut < 0 else (buffer[:cut], buffer[cut:])
            if len(carry) > _MAX_CARRY or not _fast_body_ok(body, digits, limits, strings):
                return False
        previous = chunk
    if previous is not None:
        carry = carry + previous if carry else previous
    return _fast_body_ok(carry, digits, limits, strings)


def _fast_body_ok(body: bytes, digits: int, limits: ReturnLimits, strings: bool) -> bool:
    if _loose_cell(digits, False).search(body) is not None:
        return False
    if _PREFIXED_HINT.search(body) is not None and _loose_cell(digits, True).search(body) is not None:
        return False
    if strings and _SST_HINT.search(body) is not None:
        for tag in _SST_TAG.findall(body):
            _check_shared_strings_count(tag, limits)
    return True


_CELL_REF = re.compile(r"([A-Za-z]{0,7})([0-9]{1,10})")


def _column_number(letters: str) -> int:
    number = 0
    for char in letters.upper():
        number = number * 26 + (ord(char) - 64)
    return number


class _XlsxCells:
    """Expat handlers placing cells the way calamine's xlsx reader does.

    A ``<row r>`` sets the row, ``</row>`` moves to the next one; a ``<c r>``
    is placed where its reference says, a ``<c>`` without one right after the
    previous cell. Only cells with content count (calamine drops empty ones);
    a cell whose reference cannot be read is refused."""

    def __init__(self, limits: ReturnLimits) -> None:
        self.limits = limits
        self.row = 0
        self.col = 0
        self.cell: tuple[int, int] | None = None
        self.has_content = False
        self.max_row = -1
        self.max_col = -1

    def start(self, name: str, attributes: dict[str, str]) -> None:
        local = name.rpartition(" ")[2]
        if self.cell is not None:
            self.has_content = True
        if local == "row":
            reference = attributes.get("r")
            if reference is not None:
                if not reference.strip().isdigit():
                    raise ValueError(f"row reference {reference[:20]!r}")
                self.row = int(reference) - 1
        elif local == "c":
            reference = attributes.get("r")
            if reference is not None:
                match = _CELL_REF.fullmatch(reference.strip())
                if match is None:
                    raise ValueError(f"cell reference {reference[:20]!r}")
                self.col = max(_column_number(match[1]) - 1, 0)
                self.cell = (int(match[2]) - 1, self.col)
            else:
                self.cell = (self.row, self.col)
            self.col += 1
            self.has_content = False
        elif local == "sst" and "uniqueCount" in attributes:
            _check_unique_count(attributes["uniqueCount"], self.limits)

    def end(self, name: str) -> None:
        local = name.rpartition(" ")[2]
        if local == "row":
            self.row += 1
            self.col = 0
        elif local == "c" and self.cell is not None:
            if self.has_content:
                self.max_row = max(self.max_row, self.cell[0])
                self.max_col = max(self.max_col, self.cell[1])
            self.cell = None


def _xlsx_extent(chunks: Iterator[bytes], name: str, limits: ReturnLimits) -> tuple[int, int]:
    """(rows, columns) of the rectangle calamine will build from the part's cells."""
    cells = _XlsxCells(limits)
    parser = _safe_parser()
    parser.StartElementHandler = cells.start
    parser.EndElementHandler = cells.end
    try:
        for chunk in chunks:
            parser.Parse(chunk, False)
        parser.Parse(b"", True)
    except (expat.ExpatError, ValueError) as exc:
        _damaged(f"part {name} is not a readable sheet: {exc}")
    return cells.max_row + 1, cells.max_col + 1


def _check_extent(rows: int, cols: int, limits: ReturnLimits) -> None:
    if rows > limits.max_rows:
        _refuse(STATUS_REJECTED, reasons.TOO_MANY_ROWS, rows=f"{rows:,}", limit=f"{limits.max_rows:,}")
    if rows * cols > limits.max_cells:
        _too_many_cells(limits)


def _too_many_cells(limits: ReturnLimits) -> NoReturn:
    _refuse(STATUS_REJECTED, reasons.TOO_MANY_CELLS, limit=f"{limits.max_cells:,}")


_UNIQUE_COUNT = re.compile(rb'\suniqueCount\s*=\s*["\']([^"\']*)["\']')


def _check_shared_strings_count(tag: bytes, limits: ReturnLimits) -> None:
    # calamine reserves uniqueCount strings before reading one: a crafted
    # count of two billion aborts the process.
    match = _UNIQUE_COUNT.search(tag)
    if match is not None:
        _check_unique_count(match[1].decode("ascii", "replace"), limits)


def _check_unique_count(value: str, limits: ReturnLimits) -> None:
    if not value.strip().isdigit() or int(value) > limits.max_cells:
        _damaged("its shared strings table declares an impossible number of strings")


# -- ods: rows and cells with repeats ------------------------------------------

_ODS_VALUE_ATTRIBUTES = frozenset(
    {"value", "string-value", "date-value", "time-value", "boolean-value", "value-type", "formula"}
)


class _OdsTable:
    def __init__(self, name: str) -> None:
        self.name = name
        self.row = 0  # absolute row of the next <table-row>, repeats included
        self.first: int | None = None  # first row with content
        self.end = 0  # row after the last row with content (with its repeats)
        self.width = 0
        self.row_repeat = 1
        self.col = 0
        self.row_width = 0
        self.merges: list[tuple[tuple[int, int], tuple[int, int]]] = []

    @property
    def cells(self) -> int:
        return 0 if self.first is None else (self.end - self.first) * self.width


def _repeat(attributes: Mapping[str, str], local_name: str) -> int:
    for key, value in attributes.items():
        if key.rpartition(" ")[2] == local_name:
            try:
                return max(int(value), 1)
            except ValueError:
                raise ValueError(f"{local_name} {value[:20]!r}") from None
    return 1


class _OdsCells:
    """Expat handlers sizing each table of content.xml as calamine will materialise it.

    calamine repeats a cell ``number-columns-repeated`` times and a row
    ``number-rows-repeated`` times when they have content, and keeps empty
    rows between rows with content: the rectangle is counted the same way.
    Merged ranges (``number-rows-spanned``) are collected on the way, since
    calamine does not report them for ODS."""

    def __init__(self, limits: ReturnLimits) -> None:
        self.limits = limits
        self.tables: list[_OdsTable] = []
        self.open: list[_OdsTable] = []
        self.cells = 0

    def start(self, name: str, attributes: dict[str, str]) -> None:
        local = name.rpartition(" ")[2]
        if local == "table":
            table_name = next((v for k, v in attributes.items() if k.rpartition(" ")[2] == "name"), "")
            table = _OdsTable(table_name)
            self.tables.append(table)
            self.open.append(table)
            if len(self.tables) > self.limits.max_sheets:
                _too_many_sheets(len(self.tables), self.limits)
            return
        if not self.open:
            return
        table = self.open[-1]
        if local == "table-row":
            table.row_repeat = _repeat(attributes, "number-rows-repeated")
            table.col = 0
            table.row_width = 0
        elif local in ("table-cell", "covered-table-cell"):
            repeat = _repeat(attributes, "number-columns-repeated")
            if any(key.rpartition(" ")[2] in _ODS_VALUE_ATTRIBUTES for key in attributes):
                table.row_width = table.col + repeat
            rows_spanned = _repeat(attributes, "number-rows-spanned")
            cols_spanned = _repeat(attributes, "number-columns-spanned")
            if rows_spanned > 1 or cols_spanned > 1:
                start = (table.row, table.col)
                table.merges.append((start, (table.row + rows_spanned - 1, table.col + cols_spanned - 1)))
            table.col += repeat

    def end(self, name: str) -> None:
        local = name.rpartition(" ")[2]
        if not self.open:
            return
        table = self.open[-1]
        if local == "table-row":
            if table.row_width:
                if table.first is None:
                    table.first = table.row
                table.end = table.row + table.row_repeat
                table.width = max(table.width, table.row_width)
                _check_extent(table.end, table.width, self.limits)
                if self.cells + table.cells > self.limits.max_cells:
                    _too_many_cells(self.limits)
            table.row += table.row_repeat
        elif local == "table":
            self.open.pop()
            self.cells += table.cells


Ranges = list[tuple[tuple[int, int], tuple[int, int]]]


def _scan_ods(chunks: Iterator[bytes], limits: ReturnLimits) -> dict[str, Ranges]:
    """Bound content.xml as calamine will read it; return the merged ranges of each table."""
    cells = _OdsCells(limits)
    parser = _safe_parser()
    parser.StartElementHandler = cells.start
    parser.EndElementHandler = cells.end
    try:
        for chunk in _check_prolog(chunks, "content.xml"):
            parser.Parse(chunk, False)
        parser.Parse(b"", True)
    except (expat.ExpatError, ValueError) as exc:
        _damaged(f"its content is not readable: {exc}")
    return {table.name: table.merges for table in cells.tables if table.merges}


def _too_many_sheets(count: int, limits: ReturnLimits) -> NoReturn:
    _refuse(STATUS_REJECTED, reasons.TOO_MANY_SHEETS, count=f"{count:,}", limit=f"{limits.max_sheets:,}")


# -- xls: BIFF records ----------------------------------------------------------

# Records calamine turns into cells, with (row, column) as their first fields.
_BIFF_CELLS = frozenset(
    {0x0001, 0x0002, 0x0003, 0x0004, 0x0005, 0x0006, 0x007E, 0x00D6, 0x00FD, 0x0201, 0x0203, 0x0204, 0x0205}
    | {0x0206, 0x0207, 0x027E, 0x0406}
)
_BIFF_MULTI = frozenset({0x00BD, 0x00BE})  # MULRK, MULBLANK: row, first column, ..., last column
_BIFF_EOF = 0x000A
_BIFF_BOUNDSHEET = 0x0085
_BIFF_FILEPASS = 0x002F
_BIFF_DIMENSIONS = 0x0200
_RECORD = struct.Struct("<HH")
_U16X2 = struct.Struct("<HH")


def _records(stream: bytes, position: int) -> Iterator[tuple[int, memoryview]]:
    """Yield (type, data) of BIFF records from ``position`` until the stream ends."""
    view = memoryview(stream)
    size = len(stream)
    while position + 4 <= size:
        kind, length = _RECORD.unpack_from(stream, position)
        start = position + 4
        if start + length > size:
            return
        yield kind, view[start : start + length]
        position = start + length


def _check_xls(data: bytes, limits: ReturnLimits) -> None:
    """Bound what calamine builds from an .xls, which it reads whole when opening it."""
    try:
        with _open_ole(data) as ole:
            _check_ole_directory(data, ole)
            name = "Workbook" if ole.exists("Workbook") else "Book"
            stream = ole.openstream(name).read(limits.max_file_bytes + 1)
    except _Verdict:
        raise
    except Exception as exc:
        _damaged(f"its OLE2 container cannot be read: {exc}")
    sheets: list[int] = []
    for kind, record in _records(stream, 0):
        if kind == _BIFF_EOF:
            break
        if kind == _BIFF_FILEPASS and len(record) >= 2 and bytes(record[:2]) != b"\0\0":
            _refuse(STATUS_UNREADABLE, reasons.PASSWORD)
        if kind == _BIFF_BOUNDSHEET and len(record) >= 6:
            sheets.append(struct.unpack_from("<I", record)[0])
    if len(sheets) > limits.max_sheets:
        _too_many_sheets(len(sheets), limits)
    total = 0
    walked = 0
    for position in sheets:
        if position > len(stream):
            _damaged("a sheet starts beyond the end of the workbook")
        max_row = max_col = -1
        for kind, record in _records(stream, position):
            walked += 4 + len(record)
            if walked > 4 * len(stream) + 4096:
                # Sheets pointing into each other: calamine would build each.
                _damaged("its sheets overlap")
            if kind == _BIFF_EOF:
                break
            if kind in _BIFF_CELLS and len(record) >= 4:
                row, col = _U16X2.unpack_from(record)
            elif kind in _BIFF_MULTI and len(record) >= 6:
                row, first = _U16X2.unpack_from(record)
                last = struct.unpack_from("<H", record, len(record) - 2)[0]
                col = max(first + (len(record) - 6) // 2, last)
            elif kind == _BIFF_DIMENSIONS:
                _check_xls_dimensions(record)
                continue
            else:
                continue
            max_row, max_col = max(max_row, row), max(max_col, col)
        rows, cols = max_row + 1, max_col + 1
        _check_extent(rows, cols, limits)
        total += rows * cols
        if total > limits.max_cells:
            _too_many_cells(limits)


def _check_ole_directory(data: bytes, ole: Any) -> None:
    """Refuse a container in which calamine could find another Workbook stream than olefile did.

    calamine takes the first directory entry whose name (read up to its first
    NUL) is "Workbook", else "Book", reachable or not, and reads streams under
    4096 bytes from the mini stream; olefile follows the directory tree, the
    name length field and the header's cutoff. For a well-formed file these
    agree; a file crafted to make them disagree is not well-formed."""
    if struct.unpack_from("<I", data, 0x38)[0] != 4096:
        _damaged("its OLE2 header is unusual")
    version = struct.unpack_from("<H", data, 0x1A)[0]
    directory = ole.directory_fp
    directory.seek(0)
    raw = directory.read()
    seen: dict[str, int] = {}
    for offset in range(0, len(raw) - 127, 128):
        name = raw[offset : offset + 64].decode("utf-16-le", "replace").split("\0", 1)[0]
        if name in ("Workbook", "Book"):
            seen[name] = seen.get(name, 0) + 1
            if version == 3 and raw[offset + 124 : offset + 128] != b"\0\0\0\0":
                _damaged("its OLE2 directory is unusual")
    if any(count > 1 for count in seen.values()):
        _damaged("it holds two workbook streams")


def _check_xls_dimensions(record: memoryview) -> None:
    # calamine reserves (last - first + 1) rows x columns, in u32 arithmetic.
    if len(record) == 10:
        first_row, last_row, first_col, last_col = struct.unpack_from("<HHHH", record)
    elif len(record) == 14:
        first_row, last_row, first_col, last_col = struct.unpack_from("<IIHH", record)
    else:
        return  # calamine refuses the record itself
    if last_row >= 1 and last_col >= 1:
        end_row, end_col = last_row - 1, last_col - 1
    else:
        end_row, end_col = first_row, first_col
    rows = ((end_row - first_row) & 0xFFFFFFFF) + 1
    cols = ((end_col - first_col) & 0xFFFFFFFF) + 1
    if rows * cols > _XLS_DIMENSIONS_LIMIT:
        _damaged("a sheet declares impossible dimensions")


# --------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------


def read_return(
    data: bytes,
    filename: str,
    layout: MasterLayout,
    key_column: str,
    fill_column: str,
    limits: ReturnLimits = _DEFAULT_LIMITS,
) -> ReturnReading:
    """Read the answers in a returned workbook, comparing it with the master's ``layout``.

    Never raises for anything in ``data``: a file that cannot or may not be
    read gives a reading with that status and a reason for people."""
    fmt = FORMAT_UNKNOWN
    try:
        inspection = _inspect(data, filename, limits)
        fmt = inspection.format
        try:
            # The sheet's rows (a list per row) and what is compared with them
            # form no cycles: no collection pass over them while they are built.
            with collector.paused():
                return _read(data, inspection, layout, key_column, fill_column, limits)
        finally:
            inspection.close()
    except _Verdict as verdict:
        if fmt == FORMAT_UNKNOWN:
            fmt = verdict.format if verdict.format is not None else sniff_format(data, filename)
        return _refused(verdict, fmt)
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as exc:
        # A Rust panic inside calamine surfaces as pyo3's PanicException,
        # which derives from BaseException: it is still just a bad file.
        return _refused(_unexpected(exc), fmt)


def _refused(verdict: _Verdict, fmt: str) -> ReturnReading:
    return ReturnReading(
        status=verdict.status,
        reason=verdict.reason,
        answers={},
        format=fmt,
        reason_code=verdict.code,
        reason_params=verdict.params,
    )


def _read(
    data: bytes, inspection: _Inspection, layout: MasterLayout, key_column: str, fill_column: str, limits: ReturnLimits
) -> ReturnReading:
    fmt = inspection.format
    try:
        book = python_calamine.CalamineWorkbook.from_filelike(io.BytesIO(data))
    except python_calamine.PasswordError:
        _refuse(STATUS_UNREADABLE, reasons.PASSWORD)
    except python_calamine.CalamineError as exc:
        raise _unexpected(exc) from exc
    with book:
        metadata = book.sheets_metadata
        if len(metadata) > limits.max_sheets:
            _too_many_sheets(len(metadata), limits)
        found = _find_plan(book, metadata, inspection, key_column, fill_column, layout)
        fingerprint = None
        if fmt in (FORMAT_XLSX, FORMAT_XLSM) and inspection.archive is not None:
            fingerprint = _archive_fingerprint(inspection.archive)
        if fingerprint is None and any(meta.name == FINGERPRINT_SHEET for meta in metadata):
            fingerprint = _sheet_fingerprint(book)
    return _compare(found, layout, fmt, fingerprint)


class _Plan(NamedTuple):
    """The sheet holding the plan, as read."""

    sheet: str
    grid: Grid
    origin: tuple[int, int]
    """Absolute (row, column) of ``grid[0][0]``, 0-based."""
    header: _HeaderMatch


def _visibility_order(metadata: Sequence[python_calamine.SheetMetadata]) -> list[str]:
    """Worksheet names, visible ones first, then hidden, then very hidden (the fingerprint sheet left out)."""
    visible = python_calamine.SheetVisibleEnum.Visible
    hidden = python_calamine.SheetVisibleEnum.Hidden
    sheets = [
        meta
        for meta in metadata
        if meta.typ == python_calamine.SheetTypeEnum.WorkSheet and meta.name != FINGERPRINT_SHEET
    ]

    def rank(meta: python_calamine.SheetMetadata) -> int:
        # SheetVisibleEnum values are not hashable: rank them by comparison.
        return 0 if meta.visible == visible else 1 if meta.visible == hidden else 2

    return [meta.name for meta in sorted(sheets, key=rank)]


def _find_plan(
    book: python_calamine.CalamineWorkbook,
    metadata: Sequence[python_calamine.SheetMetadata],
    inspection: _Inspection,
    key_column: str,
    fill_column: str,
    layout: MasterLayout,
) -> _Plan:
    """The first sheet (visible ones first) whose first rows hold both headers and whose keys are the plan's."""
    master_keys = layout.positions  # the plan's keys, as a dict worked out once per layout
    best_partial: tuple[str, _HeaderMatch] | None = None
    unrelated: tuple[str, str, list[str]] | None = None
    for name in _visibility_order(metadata):
        sheet = book.get_sheet_by_name(name)
        start = sheet.start
        if start is None:
            continue
        # skip_empty_area=True: rows and columns before the first cell are
        # not materialised (a lone cell far down would otherwise cost a list
        # per empty row); positions are made absolute with ``start``.
        head = cast("Grid", sheet.to_python(skip_empty_area=True, nrows=HEADER_SEARCH_ROWS))
        header, partial = _scan_headers(head, key_column, fill_column, HEADER_SEARCH_ROWS)
        if header is None:
            if partial is not None and (best_partial is None or partial.score > best_partial[1].score):
                best_partial = (name, partial)
            continue
        grid = cast("Grid", sheet.to_python(skip_empty_area=True))
        ranges = sheet.merged_cell_ranges
        if ranges is None:
            ranges = inspection.ods_merges.get(name, [])
        assert header.fill is not None
        _spread_merged_fill(grid, _relative(ranges, start), header.fill)
        plan = _Plan(name, grid, start, header)
        if not master_keys or _has_key(plan, master_keys):
            return plan
        if unrelated is None:
            unrelated = (name, header.texts[header.key or 0], _sample_keys(plan))
    if unrelated is not None:
        _, column, examples = unrelated
        _refuse(
            STATUS_REJECTED,
            reasons.NOT_OURS_CODES,
            column=column,
            shown=", ".join(examples),
            wanted=", ".join(layout.keys[:3]),
        )
    _not_ours(key_column, fill_column, best_partial)


def _not_ours(key_column: str, fill_column: str, best: tuple[str, _HeaderMatch] | None) -> NoReturn:
    seen = ", ".join(text for text in best[1].texts if text)[:200] if best is not None else ""
    _refuse(
        STATUS_REJECTED,
        reasons.NOT_OURS_COLUMNS,
        key_column=key_column,
        fill_column=fill_column,
        no_key="yes" if best is None or best[1].key is None else "",
        no_fill="yes" if best is None or best[1].fill is None else "",
        rows=str(HEADER_SEARCH_ROWS),
        sheet=best[0] if best is not None else "",
        seen=seen,
    )


def _relative(
    ranges: Sequence[tuple[tuple[int, int], tuple[int, int]]], origin: tuple[int, int]
) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    top, left = origin
    return [
        ((first_row - top, first_col - left), (last_row - top, last_col - left))
        for (first_row, first_col), (last_row, last_col) in ranges
        if first_row >= top and first_col >= left
    ]


def _cell(cells: Sequence[CellValue], index: int) -> str:
    return cell_text(cells[index]) if index < len(cells) else ""


def _has_key(plan: _Plan, keys: Container[str]) -> bool:
    key = plan.header.key
    assert key is not None
    return any(_cell(cells, key) in keys for cells in plan.grid[plan.header.row + 1 :])


def _sample_keys(plan: _Plan) -> list[str]:
    key = plan.header.key
    assert key is not None
    found = (text for cells in plan.grid[plan.header.row + 1 :] if (text := _cell(cells, key)))
    return [text for text, _ in zip(found, range(3), strict=False)]


def _sheet_fingerprint(book: python_calamine.CalamineWorkbook) -> Fingerprint | None:
    """The fingerprint in cell A2 of the hidden "mailflow" sheet (what an .xls or .ods copy keeps)."""
    sheet = book.get_sheet_by_name(FINGERPRINT_SHEET)
    if sheet.start is None or sheet.start[1] != 0:
        return None
    rows = sheet.to_python(skip_empty_area=True, nrows=4)
    index = 1 - sheet.start[0]
    if not 0 <= index < len(rows) or not rows[index]:
        return None
    return _parse_fingerprint(cell_text(rows[index][0]))


def _column_pairs(layout: MasterLayout, headers: Sequence[str], key: int, fill: int) -> list[tuple[int, int, str]]:
    """(master index, returned index, master header) of every other master column found in the return.

    Exact header names are matched first, then translations, so "Action"
    finds "Acción" but never a column another master header named exactly."""
    skip = {layout.key_col - 1, layout.fill_col - 1}
    used = {key, fill}
    wanted = [
        (index, header) for index, header in enumerate(layout.headers) if index not in skip and normalize_header(header)
    ]
    normalized = [normalize_header(header) for header in headers]
    pairs: dict[int, tuple[int, int, str]] = {}
    for index, header in wanted:
        target = normalize_header(header)
        exact = next((i for i, name in enumerate(normalized) if name == target and i not in used), None)
        if exact is not None:
            pairs[index] = (index, exact, header)
            used.add(exact)
    for index, header in wanted:
        if index in pairs:
            continue
        available = [text if i not in used else "" for i, text in enumerate(headers)]
        found = find_column(available, header)
        if found is not None:
            pairs[index] = (index, found, header)
            used.add(found)
    return [pairs[index] for index, _ in wanted if index in pairs]


def _summary(cells: Sequence[CellValue], skip: int) -> str:
    text = " · ".join(t for i, cell in enumerate(cells) if i != skip and (t := " ".join(cell_text(cell).split())))
    if len(text) > LABEL_MAX_CHARS:
        return text[: LABEL_MAX_CHARS - 1].rstrip() + "…"
    return text


def _compare(plan: _Plan, layout: MasterLayout, fmt: str, fingerprint: Fingerprint | None) -> ReturnReading:
    header = plan.header
    key, fill = header.key, header.fill
    assert key is not None and fill is not None
    first = header.row + 1
    top = plan.origin[0] + first + 1  # 1-based sheet row of the first row below the headers
    rows = plan.grid[first:]
    pairs = _column_pairs(layout, header.texts, key, fill)
    # Rows from calamine are all as wide as the sheet; pad any that is not,
    # so that what follows indexes without checks (it runs for every row).
    width = max(key, fill, *(returned for _, returned, _ in pairs)) + 1
    if rows and min(map(len, rows)) < width:
        for cells in rows:
            if len(cells) < width:
                cells.extend([""] * (width - len(cells)))
    row_keys = _texts(map(operator.itemgetter(key), rows))
    keys = layout.keys
    master_columns = {index: layout.column(index) for index, _, _ in pairs}
    if _in_plan_order(row_keys, layout):
        answers, changed = _compare_in_order(rows, row_keys, top, layout, pairs, master_columns, fill)
        added: list[RowChange] = []
        deleted: tuple[RowChange, ...] = ()
    else:
        answers, added, deleted, changed = _compare_row_by_row(
            rows, row_keys, top, layout, pairs, master_columns, key, fill
        )
    return ReturnReading(
        status=STATUS_PARSED,
        reason=None,
        answers=answers,
        missing=tuple(itertools.filterfalse(answers.__contains__, keys)),
        added=tuple(added),
        deleted=deleted,
        changed=tuple(changed),
        fingerprint=fingerprint,
        sheet=plan.sheet,
        format=fmt,
    )


def _answered(text: str) -> bool:
    """:func:`is_answer` for a cell's text (already stripped), with the usual case decided at once."""
    return bool(text) and (text[0] not in _DASHES or is_answer(text))


def _texts(values: Iterable[CellValue]) -> list[str]:
    """:func:`cell_text` of each value; when all are text (as in nearly every column), stripped by
    ``str.strip`` itself, with no Python call per cell."""
    values = list(values)
    if set(map(type, values)) <= _TEXT_ONLY:
        return list(map(str.strip, values))  # type: ignore[arg-type]  # all str, as just checked
    return list(map(cell_text, values))


_TEXT_ONLY = frozenset({str})


def _answers(keys: Sequence[str], texts: Sequence[str]) -> dict[str, str]:
    """Key by key, each text (stripped) that answers (:func:`_answered`), in the order of ``keys``.

    Empty texts are dropped without a Python call per row; only when some text starts with a dash
    are those looked at one by one."""
    found = dict(filter(operator.itemgetter(1), zip(keys, texts, strict=True)))
    if _DASHES.isdisjoint(map(operator.itemgetter(0), found.values())):
        return found
    return {key: text for key, text in found.items() if _answered(text)}


def _in_plan_order(row_keys: Sequence[str], layout: MasterLayout) -> bool:
    """True for the usual return: the keyed rows are the plan's rows, each once, in the plan's order."""
    return len(layout.positions) == len(layout.keys) and tuple(filter(None, row_keys)) == layout.keys


def _compare_in_order(
    rows: Grid,
    row_keys: list[str],
    top: int,
    layout: MasterLayout,
    pairs: list[tuple[int, int, str]],
    master_columns: Mapping[int, tuple[str, ...]],
    fill: int,
) -> tuple[dict[str, str], list[RowChange]]:
    """What :func:`_compare_row_by_row` finds when the keyed rows are the plan's rows in order, column by column:
    (answers, cells changed).

    Each compared column is one tuple compared with the master's column: only
    the rows of a column that differs are looked at one by one."""
    offsets = list(itertools.compress(range(len(rows)), row_keys))
    keyed = list(map(rows.__getitem__, offsets))
    keys = layout.keys
    texts = _texts(map(operator.itemgetter(fill), keyed))
    # In master order, as the row-by-row walk gives them.
    answers = _answers(keys, texts)
    differing: set[int] = set()
    for master_index, returned_index, _ in pairs:
        returned = tuple(map(operator.itemgetter(returned_index), keyed))
        master = master_columns[master_index]
        if returned != master:
            differing.update(itertools.compress(range(len(keyed)), map(operator.ne, returned, master)))
    changed: list[RowChange] = []
    for at in sorted(differing):
        changed += _changes(keys[at], top + offsets[at], keyed[at], at, pairs, master_columns)
    return answers, changed


def _compare_row_by_row(
    rows: Grid,
    row_keys: list[str],
    top: int,
    layout: MasterLayout,
    pairs: list[tuple[int, int, str]],
    master_columns: Mapping[int, tuple[str, ...]],
    key: int,
    fill: int,
) -> tuple[dict[str, str], list[RowChange], tuple[RowChange, ...], list[RowChange]]:
    """(answers in master order, rows added, rows deleted, cells changed), walking the rows in order."""
    # One C-level comparison per row finds the (rare) rows with a change;
    # only those are compared cell by cell. The key closes both tuples so
    # that they are tuples even with one compared column.
    returned_cells = operator.itemgetter(*(returned for _, returned, _ in pairs), key)
    # The master's side of that comparison: the same cells of each master
    # row, taken from its columns ("" beyond a row's values, as before).
    master_keys = layout.column(layout.key_col - 1)
    master_cells = list(zip(*(master_columns[index] for index, _, _ in pairs), master_keys, strict=True))
    position = layout.positions.get
    found: dict[str, str] = {}
    seen: set[str] = set()
    added: list[RowChange] = []
    changed: list[RowChange] = []
    for offset, (cells, row_key) in enumerate(zip(rows, row_keys, strict=True)):
        if not row_key:
            continue
        at = position(row_key)
        if at is None:
            added.append(RowChange(row_key, top + offset, "", "", _summary(cells, key)))
            continue
        answer = cell_text(cells[fill])
        answered = _answered(answer)
        if row_key in seen:
            # The same action twice (a copied row): the first answer given wins.
            if answered and row_key not in found:
                found[row_key] = answer
            continue
        seen.add(row_key)
        if answered:
            found[row_key] = answer
        if returned_cells(cells) != master_cells[at]:
            changed += _changes(row_key, top + offset, cells, at, pairs, master_columns)
    keys = layout.keys
    answers = {plan_key: found[plan_key] for plan_key in keys if plan_key in found}
    deleted = tuple(
        RowChange(plan_key, 0, "", label, "")
        for plan_key, label in zip(keys, layout.labels, strict=True)
        if plan_key not in seen
    )
    return answers, added, deleted, changed


def _changes(
    row_key: str,
    row: int,
    cells: Sequence[CellValue],
    at: int,
    pairs: list[tuple[int, int, str]],
    master_columns: Mapping[int, tuple[str, ...]],
) -> list[RowChange]:
    """The compared cells of returned row ``cells`` whose text is not master row ``at``'s (whitespace aside)."""
    changes: list[RowChange] = []
    for master_index, returned_index, column in pairs:
        before = master_columns[master_index][at]
        raw = cells[returned_index]
        if raw == before:
            continue
        after = cell_text(raw)
        if after.split() != before.split():
            changes.append(RowChange(row_key, row, column, before, after))
    return changes
