"""The Strategic Plan workbook: read its layout, write the request copies, attribute returned files.

Three jobs, kept apart:

* **Reading the layout** (:func:`read_master`, :func:`parse_workbook`): find the
  header row and the key ("Code") and fill ("Responsible") columns by name, in
  English or Spanish, and list the rows that carry a key. Title rows, strategic
  line banners and merged cells are expected, not errors.
* **Writing request copies** (:class:`RequestWorkbookFactory`): one copy of the
  master per delegation, with the fill column highlighted and a fingerprint
  embedded. The openpyxl work is done once; each copy is a fast byte-level
  rewrite of that base, so a campaign of a thousand delegations costs little.
* **Fingerprints** (:func:`make_fingerprint`, :func:`read_fingerprint`,
  :func:`verify_fingerprint`): a returned file names its campaign and
  delegation with an HMAC token, so it can be attributed even when it comes
  back from another address, renamed, or in a new thread. The reader treats
  the file as hostile: it never raises and bounds what it decompresses.
"""

from __future__ import annotations

import functools
import io
import os
import posixpath
import re
import struct
import unicodedata
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import IO, TYPE_CHECKING, NamedTuple, NoReturn, cast
from xml.parsers import expat

import python_calamine

from mailflow.cache import cached
from mailflow.errors import WorkbookError

if TYPE_CHECKING:
    import xml.etree.ElementTree as ET

__all__ = [
    "DEFAULT_FILL_NOTE",
    "FINGERPRINT_PROPERTY",
    "FINGERPRINT_SHEET",
    "HEADER_SYNONYMS",
    "Fingerprint",
    "MasterLayout",
    "PlanRow",
    "RequestWorkbookFactory",
    "cell_text",
    "check_columns",
    "find_column",
    "fingerprint_token",
    "make_fingerprint",
    "normalize_header",
    "parse_workbook",
    "read_fingerprint",
    "read_master",
    "verify_fingerprint",
]

HEADER_SCAN_ROWS = 30
LABEL_MAX_CHARS = 120
FINGERPRINT_PROPERTY = "mailflow_fingerprint"
FINGERPRINT_SHEET = "mailflow"
FINGERPRINT_SHEET_NOTE = "mailflow fingerprint — do not edit"
DEFAULT_FILL_NOTE = (
    "Write here the institution responsible for each action / Escriba aquí la institución responsable de cada acción"
)
# Caps on what read_fingerprint decompresses from an untrusted file. The parts
# it needs are tiny; only the shared strings table grows with the workbook.
SMALL_PART_LIMIT = 1 << 20
SHARED_STRINGS_LIMIT = 32 << 20

_FILL_COLOR = "FFF2CC"  # Excel's light yellow "input" tone
_FILL_BORDER_COLOR = "BF9000"
_ID_PATTERN = r"[A-Za-z0-9_.-]{1,64}"
_ID_RE = re.compile(_ID_PATTERN)
_FINGERPRINT_RE = re.compile(rf"({_ID_PATTERN})\|({_ID_PATTERN})\|([0-9a-f]{{32}})")
_TOKEN_CONTEXT = b"mailflow-fingerprint-v1"

_CONTENT_TYPES = "[Content_Types].xml"
_CUSTOM_PROPS = "docProps/custom.xml"
_REL_NS = "http://schemas.openxmlformats.org/officeDocument/2006/relationships"


# --------------------------------------------------------------------------
# Header names
# --------------------------------------------------------------------------

# Normalized canonical header -> normalized synonyms (see normalize_header).
# Small on purpose: each entry is a header seen in RCM tables, in English or
# Spanish. Groups must not overlap, or a name would match two columns.
HEADER_SYNONYMS: Mapping[str, frozenset[str]] = MappingProxyType(
    {
        "code": frozenset({"codigo", "cod", "no", "n", "nro", "num", "numero", "number", "ref", "action code"}),
        "responsible": frozenset(
            {
                "responsable",
                "responsables",
                "responsible institution",
                "responsible institutions",
                "institucion responsable",
                "instituciones responsables",
                "entidad responsable",
                "entidades responsables",
            }
        ),
        "action": frozenset({"accion", "acciones", "actions", "activity", "actividad", "actividades"}),
        "strategic line": frozenset({"linea estrategica", "lineas estrategicas", "strategic lines"}),
        "specific objective": frozenset({"objetivo especifico", "objetivos especificos", "specific objectives"}),
        "indicator": frozenset({"indicador", "indicadores", "indicators"}),
        "timeframe": frozenset({"plazo", "cronograma", "periodo", "time frame", "timeline"}),
        "observations": frozenset({"observaciones", "observacion", "observation", "comments", "comentarios"}),
    }
)


def _synonym_groups() -> dict[str, frozenset[str]]:
    groups: dict[str, frozenset[str]] = {}
    for canonical, synonyms in HEADER_SYNONYMS.items():
        group = synonyms | {canonical}
        for name in group:
            groups[name] = group
    return groups


_SYNONYM_GROUPS = _synonym_groups()


def _is_edge_char(char: str) -> bool:
    return char.isspace() or unicodedata.category(char)[0] in "PS"


def normalize_header(text: object) -> str:
    """Return the comparable form of a header: casefolded, without accents,
    whitespace collapsed, punctuation and symbols stripped at both ends.

    ``"  Código:"``, ``"CODIGO"`` and ``"código"`` all give ``"codigo"``;
    ``"Institución\\nresponsable (*)"`` gives ``"institucion responsable"``.
    """
    if text is None:
        return ""
    text = str(text)
    # Every returned workbook repeats the same few headers: remember them
    # (short texts only, so a sheet of long cells cannot fill the memory).
    return _normalize_short(text) if len(text) <= _NORMALIZE_CACHED_CHARS else _normalize(text)


_NORMALIZE_CACHED_CHARS = 200


def _normalize(text: str) -> str:
    folded = text.casefold()
    if folded.isascii():
        plain = folded
    else:
        decomposed = unicodedata.normalize("NFKD", folded)
        plain = "".join(char for char in decomposed if not unicodedata.combining(char))
    collapsed = " ".join(plain.split())
    start, end = 0, len(collapsed)
    while start < end and _is_edge_char(collapsed[start]):
        start += 1
    while end > start and _is_edge_char(collapsed[end - 1]):
        end -= 1
    return collapsed[start:end]


_normalize_short = functools.lru_cache(maxsize=4096)(_normalize)


def find_column(headers: Sequence[object], wanted: str) -> int | None:
    """Return the 0-based index of the header that names ``wanted``, or None.

    An exact match (after :func:`normalize_header`) wins; otherwise any header
    of the same synonym group matches, in either direction: asking for
    "Responsable" finds "Responsible" and asking for "Code" finds "Código".
    The leftmost match is returned."""
    target = normalize_header(wanted)
    if not target:
        return None
    normalized = [normalize_header(header) for header in headers]
    for index, name in enumerate(normalized):
        if name == target:
            return index
    group = _SYNONYM_GROUPS.get(target)
    if group is not None:
        for index, name in enumerate(normalized):
            if name in group:
                return index
    return None


def _same_column_name(first: str, second: str) -> bool:
    a, b = normalize_header(first), normalize_header(second)
    return a == b or (a in _SYNONYM_GROUPS and _SYNONYM_GROUPS[a] is _SYNONYM_GROUPS.get(b))


# --------------------------------------------------------------------------
# Reading the layout
# --------------------------------------------------------------------------


class PlanRow(NamedTuple):
    """One row of the plan that carries a key (an action)."""

    key: str
    """The key cell as text, e.g. ``"2.3"``."""
    row: int
    """1-based sheet row number."""
    fill: str
    """Current text of the fill column, ``""`` when empty."""
    label: str
    """Short human label: the cell right after the key column (the action)."""
    values: tuple[str, ...] = ()
    """Text of every column under a header, in header order (what a returned copy is compared with)."""


class MasterLayout:
    """Where the plan lives in a workbook and which rows it has.

    The rows are kept column by column, as a few tuples of strings and numbers
    (:attr:`keys`, :attr:`columns`, ...) rather than thousands of objects: a
    large plan then loads fast from the cache, and Python's cyclic garbage
    collector has next to nothing to visit (tuples of strings are not
    tracked). :attr:`rows` and :attr:`by_key` give the same rows as
    :class:`PlanRow` objects, built the first time they are asked for and
    never pickled (see :meth:`__reduce__`).

    Made from its rows, ``MasterLayout(sheet, header_row, key_col, fill_col,
    headers, rows)``, or column by column with :meth:`from_columns`. Frozen, and
    equal to another layout with the same fields (:data:`_LAYOUT_FIELDS`).

    A plain class rather than a dataclass, like the other values of the read
    path: importing :mod:`dataclasses` (it imports :mod:`inspect`) and making
    the classes cost a process that reads one return about 9 ms, an eighth
    of the read (``benchmarks/bench_returns.py``)."""

    sheet: str
    header_row: int
    """1-based row of the headers."""
    key_col: int
    """1-based column of the key."""
    fill_col: int
    """1-based column to be filled."""
    headers: tuple[str, ...]
    """Header texts as found, trailing empty cells dropped."""
    keys: tuple[str, ...]
    """The key of each row with a non-empty key, in sheet order."""
    row_numbers: tuple[int, ...]
    """Each row's 1-based sheet row."""
    fills: tuple[str, ...]
    """Each row's text in the fill column, ``""`` when empty."""
    labels: tuple[str, ...]
    """Each row's short human label (see :attr:`PlanRow.label`)."""
    columns: tuple[tuple[str, ...], ...]
    """Header by header, each row's text under it: ``columns[c][i]`` is ``rows[i].values[c]``, or ``""``
    where that row has fewer values."""
    widths: tuple[int, ...] | None
    """How many values each row has, or None when every row has ``len(columns)`` (as in any parsed layout)."""

    def __init__(
        self,
        sheet: str,
        header_row: int,
        key_col: int,
        fill_col: int,
        headers: tuple[str, ...],
        rows: Sequence[PlanRow],
    ) -> None:
        rows = tuple(rows)
        widths = tuple(len(row.values) for row in rows)
        width = max(widths, default=0)
        padding = ("",) * width
        made = MasterLayout.from_columns(
            sheet,
            header_row,
            key_col,
            fill_col,
            headers,
            tuple(row.key for row in rows),
            tuple(row.row for row in rows),
            tuple(row.fill for row in rows),
            tuple(row.label for row in rows),
            tuple(zip(*(row.values + padding[count:] for row, count in zip(rows, widths, strict=True)), strict=True))
            if rows
            else ((),) * width,
            None if all(count == width for count in widths) else widths,
        )
        # The fields are the columns just made; the rows are kept as given, not built again.
        self.__dict__.update(made.__dict__, rows=rows)

    @classmethod
    def from_columns(
        cls,
        sheet: str,
        header_row: int,
        key_col: int,
        fill_col: int,
        headers: tuple[str, ...],
        keys: tuple[str, ...],
        row_numbers: tuple[int, ...],
        fills: tuple[str, ...],
        labels: tuple[str, ...],
        columns: tuple[tuple[str, ...], ...],
        widths: tuple[int, ...] | None = None,
    ) -> MasterLayout:
        """The layout of rows given column by column: every tuple after ``headers`` has one entry per key."""
        per_row: list[tuple[object, ...]] = [row_numbers, fills, labels, *columns]
        if widths is not None:
            per_row.append(widths)
        if any(len(values) != len(keys) for values in per_row):
            raise ValueError("a MasterLayout needs one entry per key in every column")
        layout = cls.__new__(cls)
        # Frozen: the fields are set once, here, past __setattr__.
        layout.__dict__.update(
            sheet=sheet,
            header_row=header_row,
            key_col=key_col,
            fill_col=fill_col,
            headers=headers,
            keys=keys,
            row_numbers=row_numbers,
            fills=fills,
            labels=labels,
            columns=columns,
            widths=widths,
        )
        return layout

    def __reduce__(self) -> tuple[Callable[..., MasterLayout], tuple[object, ...]]:
        # Pickled (and so cached) column by column: never the rows, the index
        # or anything else worked out from the columns.
        return MasterLayout.from_columns, self._fields()

    def _fields(self) -> tuple[object, ...]:
        """The fields, in :meth:`from_columns`'s order."""
        return tuple(map(self.__dict__.__getitem__, _LAYOUT_FIELDS))

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        assert isinstance(other, MasterLayout)
        return self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={value!r}" for name, value in zip(_LAYOUT_FIELDS, self._fields(), strict=True))
        return f"{type(self).__name__}({shown})"

    def __setattr__(self, name: str, value: object) -> NoReturn:
        raise AttributeError(f"cannot assign to {name!r}: a MasterLayout is frozen")

    def __delattr__(self, name: str) -> NoReturn:
        raise AttributeError(f"cannot delete {name!r}: a MasterLayout is frozen")

    def column(self, index: int) -> tuple[str, ...]:
        """Each row's text under header ``index`` (0-based; ``""`` for every row beyond the columns)."""
        if index < len(self.columns):
            return self.columns[index]
        return ("",) * len(self.keys)

    @functools.cached_property
    def rows(self) -> tuple[PlanRow, ...]:
        """Rows with a non-empty key, in sheet order (built once from the columns)."""
        values: Iterable[tuple[str, ...]] = zip(*self.columns, strict=True) if self.columns else [()] * len(self.keys)
        if self.widths is not None:
            values = (row[:width] for row, width in zip(values, self.widths, strict=True))
        return tuple(map(PlanRow, self.keys, self.row_numbers, self.fills, self.labels, values))

    @functools.cached_property
    def by_key(self) -> dict[str, PlanRow]:
        """Each row by its key (worked out once; not to be changed)."""
        return {row.key: row for row in self.rows}

    @functools.cached_property
    def positions(self) -> dict[str, int]:
        """Each key's index in :attr:`keys` (worked out once; not to be changed)."""
        return {key: index for index, key in enumerate(self.keys)}


_LAYOUT_FIELDS = (
    "sheet",
    "header_row",
    "key_col",
    "fill_col",
    "headers",
    "keys",
    "row_numbers",
    "fills",
    "labels",
    "columns",
    "widths",
)
"""What a :class:`MasterLayout` is made of, in :meth:`MasterLayout.from_columns`'s order: what two equal
layouts share, what its repr shows and what it is pickled as."""


if TYPE_CHECKING:
    # Only for the types: reading a sheet of text and numbers never imports datetime (see cell_text).
    from datetime import date, datetime, time, timedelta

    CellValue = int | float | str | bool | time | date | datetime | timedelta | None
    Grid = list[list[CellValue]]


def cell_text(value: CellValue) -> str:
    """Render a cell value as the text a person reads in it.

    Numbers lose a trailing ``.0`` and otherwise keep their shortest form, so a
    code typed as the number 1.1 reads ``"1.1"``. A code typed as the number
    2.10 was stored as 2.1 and cannot be told apart: only codes kept as text
    (as in the real plan) survive unchanged.

    This runs for every cell read, so text (most cells) is tested first."""
    if type(value) is str:
        return value.strip()
    if value is None:
        return ""
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return repr(value)
    if isinstance(value, int):
        return str(value)
    # Dates and times are rare in a plan: the module is imported for them alone (calamine made them).
    from datetime import date, time, timedelta

    if isinstance(value, date | time):  # a datetime is a date
        return value.isoformat()
    if isinstance(value, timedelta):
        return str(value)
    return str(value).strip()


def _label(value: CellValue) -> str:
    text = " ".join(cell_text(value).split())
    if len(text) > LABEL_MAX_CHARS:
        return text[: LABEL_MAX_CHARS - 1].rstrip() + "…"
    return text


def read_master(path: Path, key_column: str, fill_column: str, sheet: str | None = None) -> MasterLayout:
    """Read the layout of the workbook at ``path``.

    Raises :class:`WorkbookError` naming the file and what to do when the file
    is missing, is not an .xlsx workbook, lacks the sheet or the columns, has
    duplicate keys or has no keyed rows at all.

    A layout that took a while to read (a plan of thousands of actions) is
    kept between runs by :func:`mailflow.cache.cached`, keyed by the
    workbook's path, the column names and the sheet, and read again as soon as
    the file's size or modification time changes."""
    return cached(
        "master-layout",
        (_real_path(path), key_column, fill_column, sheet),
        [path, *_READER_FILES],
        lambda: parse_workbook(_read_bytes(path), key_column, fill_column, sheet, source=path.name),
        min_seconds=MASTER_CACHE_MIN_SECONDS,
        expect=MasterLayout,
    )


def _real_path(path: Path) -> str:
    try:
        return os.path.realpath(path)
    except (OSError, ValueError):  # a path the reading will refuse anyway
        return str(path)


# Below this, reading the master again costs less than keeping it.
MASTER_CACHE_MIN_SECONDS = 0.05
# What reads the master besides its own file: this module and calamine's
# compiled library. A new version of either (a changed size or time) reads
# every master again.
_READER_FILES = tuple(
    Path(file)
    for file in (__file__, getattr(getattr(python_calamine, "_python_calamine", None), "__file__", None))
    if file
)


def check_columns(path: Path, key_column: str, fill_column: str, sheet: str | None = None) -> list[str]:
    """Return the problems that would stop :func:`read_master`, one human sentence each.

    Empty when the workbook is usable: the configuration checker reports these
    next to its own problems instead of stopping at the first."""
    try:
        read_master(path, key_column, fill_column, sheet)
    except WorkbookError as exc:
        return str(exc).splitlines()
    return []


def parse_workbook(
    data: bytes, key_column: str, fill_column: str, sheet: str | None = None, *, source: str = "workbook"
) -> MasterLayout:
    """Read the layout of an .xlsx workbook given as bytes (``source`` names it in errors).

    The sheet is ``sheet`` if given, else the first visible worksheet whose
    first rows hold both headers. A cell of the fill column merged down over
    several rows counts for each of them, as a reader of the sheet sees it."""
    if _same_column_name(key_column, fill_column):
        raise WorkbookError(
            f"key_column {key_column!r} and fill_column {fill_column!r} name the same column; "
            "the key identifies each action and the fill column is where the answer goes"
        )
    _require_xlsx(data, source)
    # python-calamine rather than openpyxl: only cell values are needed, and it
    # reads them (with cached formula results, sheet visibility and merged
    # ranges) about ten times faster than openpyxl's read-only mode.
    try:
        with python_calamine.CalamineWorkbook.from_filelike(io.BytesIO(data)) as book:
            return _parse_book(book, key_column, fill_column, sheet, source)
    except python_calamine.CalamineError as exc:
        raise WorkbookError(
            f"{source} cannot be read as an .xlsx workbook ({exc}); open it in Excel and save it again as .xlsx"
        ) from exc


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise WorkbookError(f"workbook {path} not found; check the path in the configuration") from None
    except IsADirectoryError:
        raise WorkbookError(f"workbook {path} is a directory; give the path of the .xlsx file") from None
    except OSError as exc:
        raise WorkbookError(f"workbook {path} cannot be read: {exc.strerror or exc}") from exc


def _require_xlsx(data: bytes, source: str) -> None:
    message = (
        f"{source} is not an .xlsx workbook (xls/csv/encrypted?); "
        "save it from Excel as 'Excel Workbook (*.xlsx)' without a password"
    )
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = set(archive.namelist())
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError):
        raise WorkbookError(message) from None
    if _CONTENT_TYPES not in names or "xl/workbook.xml" not in names:
        raise WorkbookError(message)


class _HeaderMatch(NamedTuple):
    row: int
    """0-based row of the grid."""
    key: int | None
    fill: int | None
    texts: tuple[str, ...]

    @property
    def score(self) -> tuple[int, int]:
        found = (self.key is not None) + (self.fill is not None)
        return found, sum(1 for text in self.texts if text)


def _scan_headers(
    grid: Grid, key_column: str, fill_column: str, rows: int = HEADER_SCAN_ROWS
) -> tuple[_HeaderMatch | None, _HeaderMatch | None]:
    """Return (the header row, the best partial candidate) among the first ``rows`` rows."""
    best: _HeaderMatch | None = None
    for index, cells in enumerate(grid[:rows]):
        texts = tuple(cell_text(cell) for cell in cells)
        match = _HeaderMatch(index, find_column(texts, key_column), find_column(texts, fill_column), texts)
        if match.key is not None and match.fill is not None and match.key != match.fill:
            return match, match
        if best is None or match.score > best.score:
            best = match
    return None, best


def _parse_book(
    book: python_calamine.CalamineWorkbook, key_column: str, fill_column: str, sheet: str | None, source: str
) -> MasterLayout:
    worksheets = [meta for meta in book.sheets_metadata if meta.typ == python_calamine.SheetTypeEnum.WorkSheet]
    if sheet is not None:
        names = [meta.name for meta in worksheets]
        chosen = sheet if sheet in names else next((n for n in names if n.casefold() == sheet.casefold()), None)
        if chosen is None:
            listed = ", ".join(repr(name) for name in book.sheet_names) or "none"
            raise WorkbookError(f"workbook {source} has no sheet {sheet!r} (sheets: {listed})")
        candidates = [chosen]
    else:
        candidates = [meta.name for meta in worksheets if meta.visible == python_calamine.SheetVisibleEnum.Visible]
        if not candidates:
            raise WorkbookError(f"workbook {source} has no visible worksheet")

    best: tuple[str, _HeaderMatch] | None = None
    for name in candidates:
        # get_sheet_by_name parses the whole sheet: once per sheet, and the
        # rows are then converted only as far as needed.
        calamine_sheet = book.get_sheet_by_name(name)
        head = cast("Grid", calamine_sheet.to_python(skip_empty_area=False, nrows=HEADER_SCAN_ROWS))
        found, partial = _scan_headers(head, key_column, fill_column)
        if found is not None:
            return _layout(calamine_sheet, name, found, source)
        if partial is not None and (best is None or partial.score > best[1].score):
            best = (name, partial)
    raise WorkbookError(_missing_headers_message(source, key_column, fill_column, best))


def _missing_headers_message(
    source: str, key_column: str, fill_column: str, best: tuple[str, _HeaderMatch] | None
) -> str:
    missing = []
    if best is None or best[1].key is None:
        missing.append(f"no column {key_column!r} (key_column)")
    if best is None or best[1].fill is None:
        missing.append(f"no column {fill_column!r} (fill_column)")
    where = f" in the first {HEADER_SCAN_ROWS} rows"
    if best is None or not any(best[1].texts):
        return f"workbook {source} has {' and '.join(missing)}{where} (no headers found)"
    name, match = best
    seen = ", ".join(text for text in match.texts if text)
    return (
        f"workbook {source} has {' and '.join(missing)}{where} "
        f"(headers found on sheet {name!r}, row {match.row + 1}: {seen})"
    )


def _layout(
    calamine_sheet: python_calamine.CalamineSheet, name: str, header: _HeaderMatch, source: str
) -> MasterLayout:
    assert header.key is not None and header.fill is not None
    key_index, fill_index = header.key, header.fill
    grid = cast("Grid", calamine_sheet.to_python(skip_empty_area=False))
    _spread_merged_fill(grid, calamine_sheet.merged_cell_ranges or [], fill_index)

    headers = list(header.texts)
    while headers and not headers[-1]:
        headers.pop()
    # Both columns have a header, so both are within ``headers``.
    width = len(headers)
    padding = ("",) * width
    table: list[tuple[str, ...]] = []
    numbers: list[int] = []
    labels: list[str] = []
    for index in range(header.row + 1, len(grid)):
        cells = grid[index]
        if key_index >= len(cells) or not cell_text(cells[key_index]):
            continue
        values = tuple(map(cell_text, cells[:width]))
        if len(values) < width:
            values += padding[len(values) :]
        table.append(values)
        numbers.append(index + 1)
        labels.append(_label(cells[key_index + 1]) if key_index + 1 < len(cells) else "")

    key_header = header.texts[key_index]
    if not table:
        raise WorkbookError(
            f"workbook {source} has no rows with a value in column {key_header!r} below the headers "
            f"(sheet {name!r}, row {header.row + 1}); give every action its code"
        )
    # A plan repeats its texts down the rows (a line's name, an indicator, a
    # timeframe): one string per distinct text makes the cached layout a
    # fifth of the size, and quicker to load.
    shared: dict[str, str] = {}
    columns = tuple(tuple(map(shared.setdefault, column, column)) for column in zip(*table, strict=True))
    keys = columns[key_index]
    if len(set(keys)) < len(keys):
        _duplicate_keys(keys, numbers, source, key_header, name)
    return MasterLayout.from_columns(
        sheet=name,
        header_row=header.row + 1,
        key_col=key_index + 1,
        fill_col=fill_index + 1,
        headers=tuple(headers),
        keys=keys,
        row_numbers=tuple(numbers),
        fills=columns[fill_index],
        labels=tuple(map(shared.setdefault, labels, labels)),
        columns=columns,
    )


def _duplicate_keys(keys: Sequence[str], numbers: Sequence[int], source: str, key_header: str, name: str) -> NoReturn:
    seen: dict[str, list[int]] = {}
    for key, number in zip(keys, numbers, strict=True):
        seen.setdefault(key, []).append(number)
    duplicates = {key: rows for key, rows in seen.items() if len(rows) > 1}
    listed = "; ".join(f"{key} (rows {', '.join(map(str, rows))})" for key, rows in duplicates.items())
    raise WorkbookError(
        f"workbook {source} has duplicate keys in column {key_header!r} on sheet {name!r}: {listed}; "
        "every action needs its own code"
    )


def _spread_merged_fill(grid: Grid, ranges: Sequence[tuple[tuple[int, int], tuple[int, int]]], column: int) -> None:
    """Copy the value of a merged range that starts in ``column`` to the rows below it.

    A delegation that merges the Responsible cells of three actions means the
    same institution for the three; calamine only reports the top-left cell."""
    for (first_row, first_col), (last_row, _last_col) in ranges:
        if first_col != column or first_row >= len(grid):
            continue
        top = grid[first_row]
        value = top[column] if column < len(top) else None
        for index in range(first_row + 1, min(last_row, len(grid) - 1) + 1):
            cells = grid[index]
            if column < len(cells) and cell_text(cells[column]) == "":
                cells[column] = value


# --------------------------------------------------------------------------
# Fingerprints
# --------------------------------------------------------------------------


class Fingerprint(NamedTuple):
    """Which campaign and delegation a request copy was made for, with its HMAC token."""

    campaign: str
    delegation: str
    token: str

    @property
    def text(self) -> str:
        """The embedded form, ``campaign|delegation|token``."""
        return f"{self.campaign}|{self.delegation}|{self.token}"


def _check_ids(campaign: str, delegation: str) -> None:
    for what, value in (("campaign", campaign), ("delegation", delegation)):
        if not _ID_RE.fullmatch(value):
            raise ValueError(f"{what} id {value!r} must be 1-64 characters among A-Z a-z 0-9 _ . -")


def fingerprint_token(secret: bytes, campaign: str, delegation: str) -> str:
    """Return the token binding ``campaign`` and ``delegation`` to ``secret``:
    the first 32 hex digits of an HMAC-SHA256."""
    if not secret:
        raise ValueError("the fingerprint secret is empty")
    _check_ids(campaign, delegation)
    # Imported here, as in verify_fingerprint: reading a workbook needs neither
    # (hashlib loads OpenSSL, ~2 ms of a command that only reads).
    import hashlib
    import hmac

    message = b"|".join((_TOKEN_CONTEXT, campaign.encode("ascii"), delegation.encode("ascii")))
    return hmac.new(secret, message, hashlib.sha256).hexdigest()[:32]


def make_fingerprint(secret: bytes, campaign: str, delegation: str) -> Fingerprint:
    """Return the fingerprint to embed in ``delegation``'s copy for ``campaign``."""
    return Fingerprint(campaign, delegation, fingerprint_token(secret, campaign, delegation))


def verify_fingerprint(fp: Fingerprint, secret: bytes) -> bool:
    """True if ``fp``'s token was made with ``secret`` for its campaign and delegation."""
    import hmac  # here: see fingerprint_token

    try:
        expected = fingerprint_token(secret, fp.campaign, fp.delegation)
    except ValueError:
        return False
    return hmac.compare_digest(expected, fp.token)


def _parse_fingerprint(text: str | None) -> Fingerprint | None:
    if text is None:
        return None
    match = _FINGERPRINT_RE.fullmatch(text.strip())
    if match is None:
        return None
    return Fingerprint(match[1], match[2], match[3])


def read_fingerprint(data: bytes) -> Fingerprint | None:
    """Return the fingerprint embedded in the .xlsx ``data``, or None.

    Looks first at the custom document property, then at cell A2 of the hidden
    "mailflow" sheet (what remains if a program drops custom properties). The
    token is not checked here: see :func:`verify_fingerprint`. Never raises."""
    # The file comes from outside: whatever is wrong with it (bad zip, broken
    # XML, a refused DTD, a bad CRC) means "no fingerprint here", never a crash
    # of the loop reading the mailbox. Each place is tried on its own, so a
    # damaged property part does not hide the hidden sheet.
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except Exception:
        return None
    with archive:
        return _archive_fingerprint(archive)


def _archive_fingerprint(archive: zipfile.ZipFile) -> Fingerprint | None:
    """:func:`read_fingerprint` on a zip package already open (what a caller that opened it passes)."""
    for find in (_fingerprint_from_properties, _fingerprint_from_sheet):
        try:
            found = find(archive)
        except Exception:
            found = None
        if found is not None:
            return found
    return None


def _read_member(archive: zipfile.ZipFile, name: str, limit: int = SMALL_PART_LIMIT) -> bytes | None:
    try:
        info = archive.getinfo(name)
    except KeyError:
        return None
    if info.file_size > limit:
        return None
    with archive.open(info) as stream:
        raw = stream.read(limit + 1)
    return raw if len(raw) <= limit else None


class _ForbiddenXml(ValueError):
    """The XML declares a DTD: refused, as entities are the usual XML attacks."""


def _forbid(*_args: object) -> NoReturn:
    raise _ForbiddenXml("DTD and entity declarations are not accepted")


def _qualified(name: str) -> str:
    uri, sep, local = name.rpartition(" ")
    return f"{{{uri}}}{local}" if sep else name


def _safe_parser() -> expat.XMLParserType:
    # pyexpat with the DTD handlers refusing: no entity can be declared, so no
    # entity expansion and no external fetch, without needing defusedxml.
    parser = expat.ParserCreate(namespace_separator=" ")
    parser.StartDoctypeDeclHandler = _forbid
    parser.EntityDeclHandler = _forbid
    parser.ExternalEntityRefHandler = _forbid
    parser.buffer_text = True
    return parser


def _parse_xml(raw: bytes) -> ET.Element:
    """Parse a small, untrusted XML document into an ElementTree element."""
    # Imported here: only the fallback to the hidden sheet needs a tree.
    import xml.etree.ElementTree as ET

    builder = ET.TreeBuilder()
    parser = _safe_parser()

    def start(name: str, attributes: dict[str, str]) -> None:
        builder.start(_qualified(name), {_qualified(key): value for key, value in attributes.items()})

    def end(name: str) -> None:
        builder.end(_qualified(name))

    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = builder.data
    parser.Parse(raw, True)
    return builder.close()


def _local(tag: str) -> str:
    return tag.rpartition("}")[2]


def _fingerprint_from_properties(archive: zipfile.ZipFile) -> Fingerprint | None:
    raw = _read_member(archive, _CUSTOM_PROPS)
    if raw is None:
        return None
    scan = _PropertyScan(FINGERPRINT_PROPERTY)
    parser = _safe_parser()
    parser.StartElementHandler = scan.start
    parser.EndElementHandler = scan.end
    parser.CharacterDataHandler = scan.data
    parser.Parse(raw, True)  # the whole part: a malformed one gives no fingerprint
    if scan.text is None:
        return None
    return _parse_fingerprint("".join(scan.text) or None)


class _PropertyScan:
    """Expat handlers reading the text of the first child of the first ``<property name="wanted">``.

    The text is what ElementTree calls the child's ``text``: up to its first
    sub-element. ``text`` stays None when there is no such property or it
    has no child."""

    def __init__(self, wanted: str) -> None:
        self.wanted = wanted
        self.depth = 0
        self.found: int | None = None  # depth of the property, while inside it
        self.done = False  # the property was found and has ended, or its first child started
        self.text: list[str] | None = None
        self.reading = False

    def start(self, name: str, attributes: dict[str, str]) -> None:
        self.depth += 1
        self.reading = False
        if self.done:
            return
        if self.found is None:
            if _local(_qualified(name)) == "property" and attributes.get("name") == self.wanted:
                self.found = self.depth
        elif self.depth == self.found + 1:
            self.text = []
            self.reading = True
            self.done = True

    def end(self, _name: str) -> None:
        if self.depth == self.found:
            self.done = True
        self.depth -= 1
        self.reading = False

    def data(self, text: str) -> None:
        if self.reading:
            assert self.text is not None
            self.text.append(text)


def _fingerprint_from_sheet(archive: zipfile.ZipFile) -> Fingerprint | None:
    workbook = _read_member(archive, "xl/workbook.xml")
    rels = _read_member(archive, "xl/_rels/workbook.xml.rels")
    if workbook is None or rels is None:
        return None
    rel_id = next(
        (
            element.get(f"{{{_REL_NS}}}id")
            for element in _parse_xml(workbook).iter()
            if _local(element.tag) == "sheet" and element.get("name") == FINGERPRINT_SHEET
        ),
        None,
    )
    if rel_id is None:
        return None
    target = next(
        (
            element.get("Target")
            for element in _parse_xml(rels).iter()
            if _local(element.tag) == "Relationship" and element.get("Id") == rel_id
        ),
        None,
    )
    if not target:
        return None
    part = target.lstrip("/") if target.startswith("/") else posixpath.normpath(posixpath.join("xl", target))
    sheet = _read_member(archive, part)
    if sheet is None:
        return None
    for cell in _parse_xml(sheet).iter():
        if _local(cell.tag) != "c" or cell.get("r") != "A2":
            continue
        kind = cell.get("t")
        if kind == "inlineStr":
            return _parse_fingerprint("".join(t.text or "" for t in cell.iter() if _local(t.tag) == "t"))
        value = next((v.text for v in cell if _local(v.tag) == "v"), None)
        if kind == "str":
            return _parse_fingerprint(value)
        if kind == "s" and value is not None and value.strip().isdigit():
            return _parse_fingerprint(_shared_string(archive, int(value)))
        return None
    return None


class _Found(Exception):
    """Stops the shared-strings scan once the wanted entry is read."""


class _SharedStringScan:
    """Expat handlers collecting the text of entry ``wanted`` of a shared strings table."""

    def __init__(self, wanted: int) -> None:
        self.wanted = wanted
        self.index = -1
        self.in_text = False
        self.phonetic = 0
        self.pieces: list[str] = []

    def start(self, name: str, _attributes: dict[str, str]) -> None:
        local = _local(_qualified(name))
        if local == "si":
            self.index += 1
        elif self.index == self.wanted:
            if local in ("rPh", "phoneticPr"):
                self.phonetic += 1  # phonetic guides are not part of the text
            elif local == "t" and not self.phonetic:
                self.in_text = True

    def end(self, name: str) -> None:
        local = _local(_qualified(name))
        if local == "si" and self.index == self.wanted:
            raise _Found
        if local in ("rPh", "phoneticPr") and self.phonetic:
            self.phonetic -= 1
        elif local == "t":
            self.in_text = False

    def data(self, text: str) -> None:
        if self.in_text:
            self.pieces.append(text)


def _shared_string(archive: zipfile.ZipFile, wanted: int) -> str | None:
    """Return entry ``wanted`` of the shared strings table, streaming it.

    The table can be large, so it is parsed incrementally, capped in size and
    abandoned as soon as the entry is read."""
    try:
        info = archive.getinfo("xl/sharedStrings.xml")
    except KeyError:
        return None
    if info.file_size > SHARED_STRINGS_LIMIT:
        return None
    scan = _SharedStringScan(wanted)
    parser = _safe_parser()
    parser.StartElementHandler = scan.start
    parser.EndElementHandler = scan.end
    parser.CharacterDataHandler = scan.data
    read = 0
    with archive.open(info) as stream:
        try:
            for chunk in _chunks(stream):
                read += len(chunk)
                if read > SHARED_STRINGS_LIMIT:
                    return None
                parser.Parse(chunk, False)
            parser.Parse(b"", True)
        except _Found:
            return "".join(scan.pieces)
    return None


def _chunks(stream: IO[bytes], size: int = 1 << 16) -> Iterator[bytes]:
    while chunk := stream.read(size):
        yield chunk


# --------------------------------------------------------------------------
# Request copies
# --------------------------------------------------------------------------

_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")
_CENTRAL_HEADER = struct.Struct("<IHHHHHHIIIHHHHHII")
_END_RECORD = struct.Struct("<IHHHHIIH")
_ZIP_VERSION = 20  # deflate, no zip64
_ZIP_LIMIT = 0xFFFFFFFF


def _raw_deflate() -> zlib._Compress:
    return zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)


class _Member(NamedTuple):
    """One zip entry of the base copy, ready to be written again.

    Static entries keep their compressed bytes. An entry holding the
    placeholder keeps a deflate stream paused just before it (``head`` is
    what it emitted so far), so each copy only compresses the fingerprint and
    what follows it."""

    name: bytes
    flags: int
    dos_time: int
    dos_date: int
    external_attr: int
    create_system: int
    compressed: bytes = b""
    crc: int = 0
    size: int = 0
    head: bytes = b""
    paused: zlib._Compress | None = None
    tail: tuple[bytes, ...] = ()

    def render(self, value: bytes) -> tuple[bytes, int, int]:
        """Return (compressed data, CRC-32, uncompressed size) with ``value`` in place of the placeholder."""
        if self.paused is None:
            return self.compressed, self.crc, self.size
        stream = self.paused.copy()
        out = [self.head]
        crc, size = self.crc, self.size
        for part in self.tail:
            for piece in (value, part):
                out.append(stream.compress(piece))
                crc = zlib.crc32(piece, crc)
                size += len(piece)
        out.append(stream.flush())
        return b"".join(out), crc, size


def _split_base(base: bytes, placeholder: bytes) -> tuple[_Member, ...]:
    """Cut the base copy into members, content types first, placeholder parts paused."""
    members: list[_Member] = []
    placed = set()
    with zipfile.ZipFile(io.BytesIO(base)) as archive:
        infos = sorted(archive.infolist(), key=lambda info: info.filename != _CONTENT_TYPES)
        for info in infos:
            data = archive.read(info)
            if len(data) > _ZIP_LIMIT // 2:
                raise WorkbookError(f"workbook part {info.filename} is too large for a request copy")
            name = info.filename.encode("utf-8")
            year, month, day, hour, minute, second = info.date_time
            member = _Member(
                name=name,
                flags=0 if name.isascii() else 0x800,  # bit 11: the name is UTF-8
                dos_time=(hour << 11) | (minute << 5) | (second // 2),
                dos_date=((year - 1980) << 9) | (month << 5) | day,
                external_attr=info.external_attr,
                create_system=info.create_system,
            )
            stream = _raw_deflate()
            if placeholder in data:
                placed.add(info.filename)
                first, *rest = data.split(placeholder)
                head = stream.compress(first)
                member = member._replace(
                    crc=zlib.crc32(first), size=len(first), head=head, paused=stream, tail=tuple(rest)
                )
            else:
                compressed = stream.compress(data) + stream.flush()
                member = member._replace(compressed=compressed, crc=zlib.crc32(data), size=len(data))
            members.append(member)
    if _CUSTOM_PROPS not in placed or len(placed) < 2:
        raise RuntimeError(f"fingerprint placeholder not found where expected (found in: {sorted(placed)})")
    return tuple(members)


class RequestWorkbookFactory:
    """Makes each delegation's copy of the master workbook.

    The openpyxl work happens once, in the constructor: load the master (which
    is only ever read), highlight the fill column, add the hidden "mailflow"
    sheet and the custom property with a placeholder, save. :meth:`build` then
    only swaps the placeholder for a fingerprint at the zip level, which takes
    a fraction of a millisecond however large the workbook."""

    def __init__(self, master_path: Path, layout: MasterLayout, *, note: str = DEFAULT_FILL_NOTE) -> None:
        def make_base() -> tuple[str, bytes]:
            data = _read_bytes(master_path)
            _require_xlsx(data, master_path.name)
            placeholder = f"mailflow-placeholder-{os.urandom(16).hex()}"
            return placeholder, _base_copy(data, layout, note, placeholder, master_path.name)

        # The openpyxl pass costs ~0.4 s on a large master: keep its result between runs (tick from cron).
        import hashlib  # here: see fingerprint_token

        layout_digest = hashlib.sha256(repr(layout).encode("utf-8", "surrogatepass")).hexdigest()
        self._placeholder, base = cached(
            "request-copy",
            (str(master_path.resolve()), note, layout_digest),
            [master_path],
            make_base,
            expect=tuple,
        )
        self._members = _split_base(base, self._placeholder.encode("ascii"))
        self._sheet = layout.sheet

    def build(self, fingerprint: Fingerprint) -> bytes:
        """Return the .xlsx bytes of the copy carrying ``fingerprint``."""
        text = fingerprint.text
        # Ids and token are plain ASCII without XML specials, so they go into
        # the XML parts as is; anything else is a caller error.
        if not _FINGERPRINT_RE.fullmatch(text):
            raise ValueError(f"fingerprint {text!r} is not campaign|delegation|token with ids in A-Z a-z 0-9 _ . -")
        value = text.encode("ascii")
        out = bytearray()
        central = bytearray()
        for member in self._members:
            compressed, crc, size = member.render(value)
            offset = len(out)
            out += _LOCAL_HEADER.pack(
                0x04034B50,
                _ZIP_VERSION,
                member.flags,
                zipfile.ZIP_DEFLATED,
                member.dos_time,
                member.dos_date,
                crc,
                len(compressed),
                size,
                len(member.name),
                0,
            )
            out += member.name
            out += compressed
            central += _CENTRAL_HEADER.pack(
                0x02014B50,
                (member.create_system << 8) | _ZIP_VERSION,
                _ZIP_VERSION,
                member.flags,
                zipfile.ZIP_DEFLATED,
                member.dos_time,
                member.dos_date,
                crc,
                len(compressed),
                size,
                len(member.name),
                0,
                0,
                0,
                0,
                member.external_attr,
                offset,
            )
            central += member.name
        start = len(out)
        if start + len(central) > _ZIP_LIMIT or len(self._members) > 0xFFFF:
            raise WorkbookError("request copy too large for a plain zip archive")
        out += central
        out += _END_RECORD.pack(0x06054B50, 0, 0, len(self._members), len(self._members), len(central), start, 0)
        return bytes(out)


def _base_copy(data: bytes, layout: MasterLayout, note: str, placeholder: str, source: str) -> bytes:
    """Return the master with the fill column highlighted and the placeholder fingerprint embedded."""
    # Imported here: openpyxl (and copy, for its styles) is only needed to make request
    # copies, and importing it costs more than reading a returned workbook.
    from copy import copy

    from openpyxl import load_workbook
    from openpyxl.comments import Comment
    from openpyxl.packaging.custom import StringProperty
    from openpyxl.styles import Border, PatternFill, Protection, Side

    try:
        book = load_workbook(io.BytesIO(data))
    except Exception as exc:
        # openpyxl signals a malformed file with many exception types.
        raise WorkbookError(f"{source} cannot be opened to make request copies: {type(exc).__name__}: {exc}") from exc
    if layout.sheet not in book.sheetnames:
        raise WorkbookError(f"workbook {source} has no sheet {layout.sheet!r}; read its layout again")
    sheet = book[layout.sheet]

    fill = PatternFill("solid", fgColor=_FILL_COLOR)
    side = Side(style="thin", color=_FILL_BORDER_COLOR)
    border = Border(left=side, right=side, top=side, bottom=side)
    header = sheet.cell(row=layout.header_row, column=layout.fill_col)
    font = copy(header.font)
    font.bold = True
    header.font = font
    header.fill = fill
    comment = Comment(note, "mailflow")
    comment.width = 320
    comment.height = 90
    header.comment = comment
    for number in layout.row_numbers:
        cell = sheet.cell(row=number, column=layout.fill_col)
        cell.fill = fill
        cell.border = border
        cell.protection = Protection(locked=False)
        alignment = copy(cell.alignment)
        alignment.wrap_text = True
        cell.alignment = alignment

    # A master made from a returned copy already carries these: replace them.
    if FINGERPRINT_SHEET in book.sheetnames:
        del book[FINGERPRINT_SHEET]
    hidden = book.create_sheet(FINGERPRINT_SHEET)
    hidden.sheet_state = "veryHidden"
    hidden["A1"] = FINGERPRINT_SHEET_NOTE
    hidden["A2"] = placeholder
    hidden.protection.sheet = True
    properties = book.custom_doc_props
    properties.props = [prop for prop in properties.props if prop.name != FINGERPRINT_PROPERTY]
    properties.append(StringProperty(name=FINGERPRINT_PROPERTY, value=placeholder))

    buffer = io.BytesIO()
    book.save(buffer)
    return buffer.getvalue()
