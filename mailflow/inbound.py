"""Take one received email apart: what kind it is, what it refers to, who sent it, what it carries.

Pure code: bytes in, data out. No I/O, no clock, and :func:`parse_message` never raises on
malformed input: mail from the outside is hostile by default, and one odd message must never
stop the inbox from being read. Whatever was odd but survivable is listed in
:attr:`Message.problems`.

The MIME tree is walked by a small splitter of our own rather than by :mod:`email.parser`:
the standard parser recurses once per nesting level (a message with 1,000 nested
``message/rfc822`` parts raises :class:`RecursionError`) and always reads every part. Ours
works on offsets into the raw bytes, stops after :attr:`Limits.max_parts` parts and
:attr:`Limits.max_depth` levels, and decodes only the parts it needs. The standard library
still does what it does well and safely: addresses (:func:`email.utils.getaddresses`) and
dates (:func:`email.utils.parsedate_to_datetime`), on header values capped in length.

What is decided here, for the engine (:mod:`mailflow.engine`) to act on:

* the kind: ``reply``, ``auto_reply`` (RFC 3834 and its many dialects) or ``bounce``
  (RFC 3464 delivery reports, and the common non-standard ones); whether a message is
  ``unrelated`` is decided by attribution, which needs the store;
* the references a reply carries (``Message-ID``, ``In-Reply-To``, ``References``), and for a
  bounce those of the returned original, so a bounce is matched to the delegation it concerns;
* what the receiving server's ``Authentication-Results`` says of the sender;
* every attachment in the tree, and the new text of the reply with its quoted history removed,
  from which answers written in the body are read (:func:`body_answers`).
"""

from __future__ import annotations

import binascii
import codecs
import re
import unicodedata
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import getaddresses, parsedate_to_datetime
from html import unescape
from html.parser import HTMLParser
from urllib.parse import unquote_to_bytes

KIND_REPLY = "reply"
KIND_AUTO_REPLY = "auto_reply"
KIND_BOUNCE = "bounce"
KIND_UNRELATED = "unrelated"
"""Kinds of received message. ``unrelated`` is never set here: attribution decides it."""

WORKBOOK_EXTENSIONS = (".xlsx", ".xlsm", ".xls", ".ods", ".xlsb")  # .xlsb is recognised to be refused clearly
WORKBOOK_CONTENT_TYPES = frozenset(
    {
        "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
        "application/vnd.ms-excel.sheet.macroenabled.12",
        "application/vnd.ms-excel.sheet.binary.macroenabled.12",
        "application/vnd.ms-excel",
        "application/vnd.oasis.opendocument.spreadsheet",
        "application/msexcel",
        "application/x-msexcel",
        "application/x-ms-excel",
        "application/x-excel",
        "application/excel",
        "application/x-dos_ms_excel",
        "application/xls",
        "application/x-xls",
    }
)
"""Content types of the formats the workbook reader accepts (``.xlsb`` is not one of them)."""

# Ceilings that protect the parser itself, whatever Limits says.
_DEPTH_CEILING = 64  # the walk recurses once per level: keep far below Python's recursion limit
_MAX_HEADER_LINES = 5000  # header lines read per entity; the rest of an absurd block is skipped
_MAX_HEADER_VALUE = 64 * 1024  # characters kept of one header value (a 1 MB line is cut)
_MAX_STRUCTURED_VALUE = 8 * 1024  # characters of an address, date or parameter header handed to a parser
_MAX_IDS = 1000  # message ids kept from one References header
_MAX_PROBLEMS = 100
_MAX_BODY_BYTES = 2 * 1024 * 1024  # of text parts read for the body text, all parts together
_MAX_HTML_CHARS = 1024 * 1024  # of HTML converted to text for the body
_MAX_REPORT_BYTES = 1024 * 1024  # of a delivery-status part, returned headers or bounce text
_MAX_FAILURES = 500
_MAX_BOUNDARY = 1000
_MAX_FILENAME = 255
_MAX_SUBJECT = 1000
_MAX_DIAGNOSTIC = 500


@dataclass(frozen=True)
class Limits:
    """How much of a message is read. Larger parts and deeper trees are cut, and the cut is reported."""

    max_message_bytes: int = 40 * 1024 * 1024
    max_attachment_bytes: int = 20 * 1024 * 1024
    """Larger attachments are reported with ``data=b""`` and ``too_large=True``."""
    max_parts: int = 1000
    """MIME entities walked at most (multiparts, leaves and attached messages all count)."""
    max_depth: int = 20
    """Nesting depth of multiparts and attached messages (never more than 64, whatever is asked)."""


@dataclass(frozen=True)
class Attachment:
    """One file found anywhere in the MIME tree, forwarded messages included."""

    filename: str
    """Decoded (RFC 2231 and RFC 2047), without path components or control characters; "" if none."""
    content_type: str
    """As declared, lower case (``application/octet-stream`` stays so even for ``plan.xlsx``)."""
    data: bytes
    """The decoded payload; ``b""`` when :attr:`too_large`."""
    size: int
    """Decoded size; when too large, the size estimated from the encoded part."""
    too_large: bool
    path: str
    """Where it sits in the tree, IMAP-style (``"2"``, ``"2.1.3"``): two files of the same name differ here."""
    is_workbook: bool
    """By extension (``.xlsx .xlsm .xls .ods``) or a spreadsheet content type."""


@dataclass(frozen=True)
class Failure:
    """One recipient a delivery report says could not be reached."""

    recipient: str
    """Lower-cased address: the Original-Recipient when the report gives it, else the Final-Recipient."""
    status: str
    """Enhanced status code, ``"5.1.1"``."""
    permanent: bool
    """True for a failed delivery with a 5.x.x status; False when delayed or 4.x.x."""
    diagnostic: str
    """The Diagnostic-Code text (without its ``smtp;`` type), trimmed to one line."""


@dataclass(frozen=True)
class AuthVerdict:
    """What the receiving server's topmost ``Authentication-Results`` header says of the sender."""

    present: bool
    failing: tuple[str, ...]
    """Methods reporting failure for the From domain, in the order ``dmarc``, ``spf``, ``dkim``."""
    summary: str
    """One line for people: ``"dmarc=fail spf=softfail dkim=none"``; "" when no header was there."""


@dataclass(frozen=True)
class Message:
    """One received email, taken apart. See the module docstring for what each part is used for."""

    message_id: str | None
    in_reply_to: tuple[str, ...]
    references: tuple[str, ...]
    subject: str
    from_address: str | None
    """Lower-cased addr-spec; never the display name."""
    from_name: str
    date: datetime | None
    """Aware; None when absent or unreadable. A ``-0000`` zone is read as UTC."""
    kind: str
    """``reply``, ``auto_reply`` or ``bounce``."""
    kind_reason: str
    failures: tuple[Failure, ...]
    original_message_id: str | None
    """Bounces: the Message-ID of the returned original."""
    original_references: tuple[str, ...]
    """Bounces: In-Reply-To then References of the returned original."""
    original_recipients: tuple[str, ...]
    """Bounces: the To addresses of the returned original, lower-cased."""
    auth: AuthVerdict
    attachments: tuple[Attachment, ...]
    body_text: str
    """The new text of the message (plain, or HTML converted), quoted history removed."""
    problems: tuple[str, ...]


# ==========================================================================
# Small helpers: problems, text cleaning, charsets, transfer encodings
# ==========================================================================


class _Problems:
    """What was odd but survivable; deduplicated and capped, in the order found."""

    def __init__(self) -> None:
        self._items: list[str] = []
        self._seen: set[str] = set()

    def add(self, text: str) -> None:
        if text in self._seen:
            return
        self._seen.add(text)
        if len(self._items) < _MAX_PROBLEMS:
            self._items.append(text)
        elif len(self._items) == _MAX_PROBLEMS:
            self._items.append("more problems not listed")

    def items(self) -> tuple[str, ...]:
        return tuple(self._items)


_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")
_SPACES_RE = re.compile(r"\s+")


def _one_line(text: str, limit: int = _MAX_SUBJECT) -> str:
    """Control characters and line breaks to single spaces, trimmed, cut at ``limit``."""
    return _SPACES_RE.sub(" ", _CONTROL_RE.sub(" ", text[: limit * 2])).strip()[:limit]


def _quote_for_problem(text: str, limit: int = 60) -> str:
    short = _one_line(text, limit)
    return short if len(text) <= limit else short + "…"


_CHARSET_ALIASES = {
    "iso-8859-8-i": "iso-8859-8",
    "iso-8859-6-i": "iso-8859-6",
    "x-mac-roman": "mac_roman",
    "macintosh": "mac_roman",
    "x-sjis": "shift_jis",
    "unicode-1-1-utf-8": "utf-8",
    "x-user-defined": "latin-1",
}
_PLAIN_CHARSETS = frozenset({"", "us-ascii", "ascii", "unknown-8bit"})  # nothing (usable) declared


def _codec(charset: str | None) -> tuple[str | None, bool]:
    """``(codec name, declared_ok)``. None when nothing usable is declared; declared_ok False when it is bad."""
    name = (charset or "").strip().strip("\"'").lower()
    if name in _PLAIN_CHARSETS:
        return None, True
    name = _CHARSET_ALIASES.get(name, name)
    try:
        info = codecs.lookup(name)
    except (LookupError, ValueError, TypeError):
        return None, False
    # bytes.decode refuses non-text codecs (base64, zlib, rot13...) anyway; refuse them here first.
    if not getattr(info, "_is_text_encoding", True):
        return None, False
    return info.name, True


def _decode_bytes(data: bytes, charset: str | None, problems: _Problems | None = None, what: str = "text") -> str:
    """Decode ``data`` in its declared charset; unknown or undeclared: UTF-8 if valid, else Windows-1252."""
    name, declared_ok = _codec(charset)
    if name == "utf-8":
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            declared_ok = False  # "utf-8" on Latin-1 text is common enough to be worth the fallback
    elif name is not None:
        try:
            return data.decode(name, errors="replace")
        except Exception:  # some codecs (idna) accept only strict errors and raise on bad input
            declared_ok = False
    try:
        text = data.decode("utf-8")
        fallback = "utf-8"
    except UnicodeDecodeError:
        text = data.decode("cp1252", errors="replace")
        fallback = "windows-1252"
    if not declared_ok and problems is not None:
        problems.add(f"bad charset {_quote_for_problem(str(charset), 40)} in {what} decoded as {fallback}")
    return text


def _header_text(raw: bytes) -> str:
    """Raw header bytes to text: UTF-8 when valid (as SMTPUTF8 and many sloppy mailers send), else Latin-1."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


_B64_JUNK_RE = re.compile(rb"[^A-Za-z0-9+/]")


def _b64decode(data: bytes) -> bytes:
    """Lenient base64: ignores line breaks and junk, tolerates missing or extra padding."""
    try:
        return binascii.a2b_base64(data)
    except (binascii.Error, ValueError):
        pass
    clean = _B64_JUNK_RE.sub(b"", data)
    remainder = len(clean) % 4
    if remainder == 1:
        clean = clean[:-1]
    elif remainder:
        clean += b"=" * (4 - remainder)
    try:
        return binascii.a2b_base64(clean)
    except (binascii.Error, ValueError):
        return b""


def _decode_transfer(data: bytes, cte: str) -> bytes:
    if cte == "base64":
        return _b64decode(data)
    if cte == "quoted-printable":
        try:
            return binascii.a2b_qp(data)
        except (binascii.Error, ValueError):
            return data
    return data  # 7bit, 8bit, binary, and anything unknown: as it is


def _decoded_size_estimate(buf: bytes, start: int, end: int, cte: str) -> int:
    """The decoded size of ``buf[start:end]`` without decoding it: exact for well-formed base64."""
    if cte != "base64":
        return end - start  # quoted-printable only ever shrinks
    line_breaks = buf.count(b"\n", start, end) + buf.count(b"\r", start, end)
    tail = buf[max(start, end - 8) : end].rstrip(b"\r\n \t")
    padding = min(2, len(tail) - len(tail.rstrip(b"=")))
    return max(0, (end - start - line_breaks) * 3 // 4 - padding)


# RFC 2047 encoded words; the text may hold spaces (sloppy encoders), never "?".
_ENCODED_WORD_RE = re.compile(r"=\?([^?\s]{1,80})\?([bBqQ])\?([^?]*)\?=")


def _decode_words(value: str, problems: _Problems | None = None) -> str:
    """Decode RFC 2047 encoded words anywhere in ``value`` (also inside quotes, as many mailers put them).

    Adjacent words in the same charset are joined before decoding, so a character split across
    two words (common with UTF-8) comes out whole; whitespace between encoded words is dropped.
    """
    if "=?" not in value:
        return value
    out: list[str] = []
    pending_charset: str | None = None
    pending = bytearray()

    def flush() -> None:
        nonlocal pending_charset
        if pending_charset is not None:
            out.append(_decode_bytes(bytes(pending), pending_charset, problems, "a header"))
        pending_charset = None
        pending.clear()

    pos = 0
    for match in _ENCODED_WORD_RE.finditer(value):
        between = value[pos : match.start()]
        if not (pending_charset is not None and not between.strip()):
            flush()
            out.append(between)
        charset = match.group(1).split("*", 1)[0].lower()
        text = match.group(3)
        if match.group(2) in "bB":
            chunk = _b64decode(text.encode("ascii", errors="ignore"))
        else:
            chunk = binascii.a2b_qp(text.replace("_", " ").encode("utf-8", errors="replace"))
        if charset != pending_charset:
            flush()
            pending_charset = charset
        pending.extend(chunk)
        pos = match.end()
    flush()
    out.append(value[pos:])
    return "".join(out)


# ==========================================================================
# Headers
# ==========================================================================

_HEADER_NAME_RE = re.compile(rb"^[\x21-\x39\x3b-\x7e]+$")
_BLANK_LINE_RE = re.compile(rb"\r?\n\r?\n")


class _Headers:
    """The header fields of one entity, in order, names as written; values unfolded, undecoded."""

    def __init__(self, fields: list[tuple[str, str]]) -> None:
        self.fields = fields
        self._index: dict[str, list[str]] = {}
        for name, value in fields:
            self._index.setdefault(name.lower(), []).append(value)

    def get(self, name: str) -> str | None:
        values = self._index.get(name.lower())
        return values[0] if values else None

    def get_all(self, name: str) -> list[str]:
        return list(self._index.get(name.lower(), ()))

    def has(self, name: str) -> bool:
        return name.lower() in self._index

    def __bool__(self) -> bool:
        return bool(self.fields)


def _read_headers(buf: bytes, start: int, end: int, problems: _Problems) -> tuple[_Headers, int]:
    """Parse the header block of the entity in ``buf[start:end]``; returns the headers and where the body starts.

    Folded lines are unfolded (line breaks removed, the leading white space kept). A line that is
    neither a header nor a continuation ends the block, as the standard parser does, and the body
    starts there. A first line ``From ...`` (an mbox separator) is skipped.
    """
    if start >= end:
        return _Headers([]), end
    if buf.startswith(b"\r\n", start, end):
        return _Headers([]), start + 2
    if buf.startswith(b"\n", start, end):
        return _Headers([]), start + 1
    blank = _BLANK_LINE_RE.search(buf, start, end)
    if blank is None:
        head_end, body_start = end, end
    else:
        # The block keeps the line break that ends its last line; the blank line itself is skipped.
        head_end = blank.start() + (2 if buf.startswith(b"\r\n", blank.start()) else 1)
        body_start = blank.end()
    fields: list[tuple[str, list[bytes]]] = []
    pos = start
    lines = 0
    while pos < head_end:
        newline = buf.find(b"\n", pos, head_end)
        line_end = head_end if newline < 0 else newline + 1
        line = buf[pos:line_end].rstrip(b"\r\n")
        lines += 1
        if lines > _MAX_HEADER_LINES:
            problems.add(f"more than {_MAX_HEADER_LINES} header lines: the rest were skipped")
            break
        if line[:1] in (b" ", b"\t"):
            if fields:
                fields[-1][1].append(line)
            pos = line_end
            continue
        colon = line.find(b":")
        raw_name = line[:colon].rstrip(b" \t") if colon > 0 else b""
        if colon <= 0 or not _HEADER_NAME_RE.match(raw_name):
            if pos == start and line.startswith(b"From "):
                pos = line_end
                continue
            problems.add("a line in the headers is not a header: the body was taken to start there")
            body_start = pos
            break
        fields.append((raw_name.decode("ascii"), [line[colon + 1 :]]))
        pos = line_end
    out: list[tuple[str, str]] = []
    for name, chunks in fields:
        size = sum(len(chunk) for chunk in chunks)
        if size > _MAX_HEADER_VALUE:
            problems.add(f"header {name[:40]} is {size} bytes long: only the first {_MAX_HEADER_VALUE} were read")
            kept: list[bytes] = []
            total = 0
            for chunk in chunks:
                kept.append(chunk[: _MAX_HEADER_VALUE - total])
                total += len(kept[-1])
                if total >= _MAX_HEADER_VALUE:
                    break
            chunks = kept
        value = _header_text(b"".join(chunks)).strip()
        if "\x00" in value:
            problems.add(f"NUL bytes in header {name[:40]} removed")
            value = value.replace("\x00", "")
        out.append((name, value))
    return _Headers(out), body_start


# -- parameters (Content-Type, Content-Disposition) -------------------------

_PARAM_RE = re.compile(r';\s*([^\s=;"]+)\s*(?:=\s*("(?:[^"\\]|\\.)*"?|[^;]*))?')
_CONTINUATION_RE = re.compile(r"^(?P<base>[^*]+)\*(?:(?P<index>\d{1,3})(?P<encoded>\*)?)?$")
_MIME_TYPE_RE = re.compile(r"^[a-z0-9!#$&^_.+-]+/[a-z0-9!#$&^_.+-]+$")


def _unquote(value: str) -> str:
    value = value.strip()
    if value.startswith('"'):
        value = value[1:-1] if len(value) > 1 and value.endswith('"') else value[1:]
        # What email.utils.unquote does: only \\ and \" are quoted pairs, so a Windows path survives.
        return value.replace("\\\\", "\\").replace('\\"', '"')
    return value


def _parse_params(value: str, problems: _Problems) -> tuple[str, dict[str, str]]:
    """``"text/plain; charset=utf-8"`` -> ``("text/plain", {"charset": "utf-8"})``, RFC 2231 decoded.

    Linear in the length of the value (the standard library's parameter splitting is not).
    Names are lower-cased. An extended value (``name*``, ``name*0*``...) wins over a plain one.
    """
    if len(value) > _MAX_STRUCTURED_VALUE:
        value = value[:_MAX_STRUCTURED_VALUE]
    semicolon = value.find(";")
    main = (value if semicolon < 0 else value[:semicolon]).strip().lower()
    plain: dict[str, str] = {}
    pieces: dict[str, dict[int, tuple[str, bool]]] = {}
    if semicolon >= 0:
        for match in _PARAM_RE.finditer(value, semicolon):
            name = match.group(1).lower()
            raw = match.group(2) or ""
            extended = _CONTINUATION_RE.match(name)
            if extended is None:
                plain.setdefault(name, _unquote(raw))
                continue
            index = extended.group("index")
            encoded = index is None or extended.group("encoded") is not None
            pieces.setdefault(extended.group("base"), {}).setdefault(int(index or 0), (_unquote(raw), encoded))
    params = dict(plain)
    for base, parts in pieces.items():
        params[base] = _join_rfc2231(parts, problems)
    return main, params


def _join_rfc2231(parts: dict[int, tuple[str, bool]], problems: _Problems) -> str:
    charset: str | None = None
    data = bytearray()
    for position, index in enumerate(sorted(parts)):
        text, encoded = parts[index]
        if encoded:
            if position == 0 and text.count("'") >= 2:
                charset, _language, text = text.split("'", 2)
            data.extend(unquote_to_bytes(text))
        else:
            data.extend(text.encode("utf-8"))
    return _decode_bytes(bytes(data), charset or "utf-8", problems, "a parameter")


# ==========================================================================
# The MIME tree
# ==========================================================================

_MULTIPART = "multipart/"
_EMBEDDED_TYPES = frozenset({"message/rfc822", "message/global"})
_RETURNED_HEADER_TYPES = frozenset({"text/rfc822-headers", "message/global-headers", "text/rfc822-header"})
_DELIVERY_STATUS_TYPES = frozenset({"message/delivery-status", "message/global-delivery-status"})
_REPORT_PART_TYPES = (
    _EMBEDDED_TYPES
    | _RETURNED_HEADER_TYPES
    | _DELIVERY_STATUS_TYPES
    | {
        "message/disposition-notification",
        "message/global-disposition-notification",
        "message/feedback-report",
    }
)


@dataclass
class _Entity:
    """One node of the MIME tree: headers, and the body as offsets into ``buf``."""

    headers: _Headers
    content_type: str
    params: dict[str, str]
    disposition: str
    disposition_params: dict[str, str]
    cte: str
    buf: bytes
    body_start: int
    body_end: int
    path: str
    children: list[_Entity] = field(default_factory=list)
    cut: bool = False
    """The body runs into the point where an oversized message was cut."""

    def body(self) -> bytes:
        return self.buf[self.body_start : self.body_end]

    @property
    def is_multipart(self) -> bool:
        return self.content_type.startswith(_MULTIPART)

    def filename(self, problems: _Problems) -> str:
        raw = self.disposition_params.get("filename") or self.params.get("name") or ""
        return _clean_filename(_decode_words(raw, problems))


_PATH_SEPARATORS_RE = re.compile(r"[\\/]")


def _clean_filename(name: str) -> str:
    """Keep the last path component; drop control and invisible format characters (RLO spoofing)."""
    name = "".join(ch for ch in name if unicodedata.category(ch) not in ("Cc", "Cf", "Zl", "Zp"))
    name = _PATH_SEPARATORS_RE.split(name)[-1].strip()
    if name in (".", ".."):
        return ""
    if len(name) > _MAX_FILENAME:
        stem, dot, extension = name.rpartition(".")
        if dot and 0 < len(extension) <= 10:
            name = stem[: _MAX_FILENAME - len(extension) - 1] + "." + extension
        else:
            name = name[:_MAX_FILENAME]
    return name


class _TreeBuilder:
    """Builds the MIME tree of one message within the limits; counts parts and reports cuts."""

    def __init__(self, limits: Limits, problems: _Problems, cut_buffer: bytes | None) -> None:
        self.max_parts = max(1, limits.max_parts)
        self.max_depth = max(0, min(limits.max_depth, _DEPTH_CEILING))
        self.problems = problems
        self.cut_buffer = cut_buffer
        self.count = 0
        self.stopped = False

    def entity(
        self, buf: bytes, start: int, end: int, path: str, depth: int, is_message: bool, default_type: str
    ) -> _Entity | None:
        """The entity in ``buf[start:end]``. ``path`` is the IMAP part number ("" for the whole message)."""
        if self.count >= self.max_parts:
            if not self.stopped:
                self.problems.add(f"truncated at {self.max_parts} parts: the rest of the message was not read")
                self.stopped = True
            return None
        self.count += 1
        headers, body_start = _read_headers(buf, start, end, self.problems)
        content_type, params = self._content_type(headers, default_type)
        disposition, disposition_params = _parse_params(headers.get("Content-Disposition") or "", self.problems)
        cte = (headers.get("Content-Transfer-Encoding") or "").strip().lower().split(" ", 1)[0]
        own_path = path
        if is_message and not content_type.startswith(_MULTIPART):
            own_path = f"{path}.1" if path else "1"  # a message's single body is its part 1
        node = _Entity(
            headers=headers,
            content_type=content_type,
            params=params,
            disposition=disposition,
            disposition_params=disposition_params,
            cte=cte,
            buf=buf,
            body_start=body_start,
            body_end=end,
            path=own_path,
            cut=buf is self.cut_buffer and end == len(buf),
        )
        if content_type.startswith(_MULTIPART):
            self._multipart(node, path, depth)
        elif content_type in _EMBEDDED_TYPES:
            self._embedded(node, path, depth)
        return node

    def _content_type(self, headers: _Headers, default_type: str) -> tuple[str, dict[str, str]]:
        raw = headers.get("Content-Type")
        if raw is None:
            return default_type, {}
        content_type, params = _parse_params(raw, self.problems)
        if not _MIME_TYPE_RE.match(content_type):
            self.problems.add(f"invalid Content-Type {_quote_for_problem(raw, 40)} read as text/plain")
            return "text/plain", params
        return content_type, params

    def _too_deep(self, depth: int) -> bool:
        if depth >= self.max_depth:
            self.problems.add(f"nested deeper than {self.max_depth} levels: the deeper parts were not read")
            return True
        return False

    def _embedded(self, node: _Entity, path: str, depth: int) -> None:
        if self._too_deep(depth):
            return
        buf, start, end = node.buf, node.body_start, node.body_end
        if node.cte in ("base64", "quoted-printable"):
            buf = _decode_transfer(buf[start:end], node.cte)  # non-compliant but seen: an encoded message
            start, end = 0, len(buf)
        child = self.entity(buf, start, end, path or "1", depth + 1, is_message=True, default_type="text/plain")
        if child is not None:
            node.children.append(child)

    def _multipart(self, node: _Entity, path: str, depth: int) -> None:
        if self._too_deep(depth):
            return
        boundary = node.params.get("boundary", "")
        if not boundary or len(boundary) > _MAX_BOUNDARY:
            guessed = _guess_boundary(node.buf, node.body_start, node.body_end)
            if guessed is None:
                self.problems.add(f"{node.content_type} without a boundary read as text")
                node.content_type = "text/plain"
                return
            self.problems.add(f"missing boundary in {node.content_type}: guessed from the body")
            boundary = guessed
        default_type = "message/rfc822" if node.content_type == "multipart/digest" else "text/plain"
        number = 0
        for start, end in self._split(node, boundary.encode("utf-8", errors="replace")):
            number += 1
            child_path = f"{path}.{number}" if path else str(number)
            child = self.entity(node.buf, start, end, child_path, depth + 1, False, default_type)
            if child is None:
                break
            node.children.append(child)
        if number == 0:
            self.problems.add(f"no parts found in {node.content_type}: read as text")
            node.content_type = "text/plain"

    def _split(self, node: _Entity, boundary: bytes) -> Iterator[tuple[int, int]]:
        """The (start, end) of each part between delimiter lines; lazy, so a cut stops the scan."""
        buf = node.buf
        current: int | None = None
        for delimiter_start, delimiter_end, closing in _delimiters(buf, node.body_start, node.body_end, boundary):
            if current is not None:
                yield current, _before_line_break(buf, current, delimiter_start)
            if closing:
                return
            current = delimiter_end
        if current is not None:
            self.problems.add("missing closing boundary")
            yield current, node.body_end


_LINE_BREAKS = (0x0A, 0x0D)
_BLANKS = (0x20, 0x09)


def _delimiters(buf: bytes, start: int, end: int, boundary: bytes) -> Iterator[tuple[int, int, bool]]:
    """Each delimiter line of ``boundary`` in ``buf[start:end]``: (its start, where the next line starts, closing).

    A delimiter is ``--boundary`` at the start of a line (the buffer's start counts), optionally
    ``--`` (the closing one), optional blanks, then a line break or the end. The boundary is found
    as a literal: every message has its own, so a regular expression per boundary would be
    compiled anew for each message."""
    marker = b"--" + boundary
    position = start
    while True:
        found = buf.find(marker, position, end)
        if found < 0:
            return
        position = found + 1
        if found > 0 and buf[found - 1] not in _LINE_BREAKS:
            continue
        cursor = found + len(marker)
        closing = buf.startswith(b"--", cursor, end)
        if closing:
            cursor += 2
        while cursor < end and buf[cursor] in _BLANKS:
            cursor += 1
        if cursor < end:
            if buf[cursor] not in _LINE_BREAKS:
                continue
            cursor += 2 if buf.startswith(b"\r\n", cursor, end) else 1
        yield found, cursor, closing
        position = cursor


def _before_line_break(buf: bytes, start: int, end: int) -> int:
    """The line break before a delimiter belongs to the delimiter (RFC 2046 section 5.1.1)."""
    if end - start >= 2 and buf[end - 2 : end] == b"\r\n":
        return end - 2
    if end - start >= 1 and buf[end - 1 : end] in (b"\n", b"\r"):
        return end - 1
    return end


_GUESS_BOUNDARY_RE = re.compile(rb"(?<![^\r\n])--([\x21-\x7e][\x20-\x7e]{0,198}?)[ \t]*\r?\n")


def _guess_boundary(buf: bytes, start: int, end: int) -> str | None:
    """A multipart that lost its boundary parameter: the first delimiter-looking line of the body."""
    match = _GUESS_BOUNDARY_RE.search(buf, start, min(end, start + 8192))
    if match is None:
        return None
    return match.group(1).decode("ascii", errors="replace").removesuffix("--")


def _walk(node: _Entity) -> Iterator[_Entity]:
    """Every entity, depth first in document order (the tree is at most 64 levels deep)."""
    stack = [node]
    while stack:
        current = stack.pop()
        yield current
        stack.extend(reversed(current.children))


# ==========================================================================
# Attachments and body text
# ==========================================================================


def _is_body_text(node: _Entity, problems: _Problems) -> bool:
    return (
        node.content_type in ("text/plain", "text/html")
        and node.disposition != "attachment"
        and not node.filename(problems)
    )


def _is_workbook(filename: str, content_type: str) -> bool:
    return filename.lower().endswith(WORKBOOK_EXTENSIONS) or content_type in WORKBOOK_CONTENT_TYPES


def _attachments(root: _Entity, limits: Limits, problems: _Problems) -> list[Attachment]:
    found: list[Attachment] = []
    stack = [root]
    while stack:
        node = stack.pop()
        if node.is_multipart:
            children = node.children
            if node.content_type == "multipart/report":
                # The returned original and the machine-readable report are not the sender's files.
                children = [child for child in children if child.content_type not in _REPORT_PART_TYPES]
            stack.extend(reversed(children))
            continue
        if node.content_type in _EMBEDDED_TYPES:
            stack.extend(reversed(node.children))  # a forwarded message: its files count too
            continue
        if _is_body_text(node, problems):
            continue
        found.append(_attachment(node, limits, problems))
    return found


def _attachment(node: _Entity, limits: Limits, problems: _Problems) -> Attachment:
    filename = node.filename(problems)
    where = f"attachment {filename!r}" if filename else f"attachment at part {node.path}"
    estimate = _decoded_size_estimate(node.buf, node.body_start, node.body_end, node.cte)
    if node.cut:
        problems.add(f"{where} was cut with the message")
        return _oversized(node, filename, estimate)
    # Stray spaces make the estimate high: near the limit, decode and measure rather than refuse.
    if estimate > limits.max_attachment_bytes * 1.05 + 1024:
        problems.add(f"{where} is larger than {limits.max_attachment_bytes} bytes: not read")
        return _oversized(node, filename, estimate)
    data = _decode_transfer(node.body(), node.cte)
    if len(data) > limits.max_attachment_bytes:
        problems.add(f"{where} is larger than {limits.max_attachment_bytes} bytes: not read")
        return _oversized(node, filename, len(data))
    return Attachment(
        filename=filename,
        content_type=node.content_type,
        data=data,
        size=len(data),
        too_large=False,
        path=node.path,
        is_workbook=_is_workbook(filename, node.content_type),
    )


def _oversized(node: _Entity, filename: str, size: int) -> Attachment:
    return Attachment(
        filename=filename,
        content_type=node.content_type,
        data=b"",
        size=size,
        too_large=True,
        path=node.path,
        is_workbook=_is_workbook(filename, node.content_type),
    )


def _text_of_part(node: _Entity, problems: _Problems, limit: int = _MAX_BODY_BYTES) -> str:
    raw = node.buf[node.body_start : min(node.body_end, node.body_start + limit * 2)]
    data = _decode_transfer(raw, node.cte)
    if len(data) > limit:
        problems.add(f"text of part {node.path} longer than {limit} bytes: the rest was not read")
        data = data[:limit]
    text = _decode_bytes(data, node.params.get("charset"), problems, f"part {node.path}")
    return text.replace("\x00", "")


@dataclass(frozen=True)
class _Text:
    text: str
    plain: bool  # from a text/plain part (False: converted from HTML)


class _Budget:
    """How many more bytes of text parts the body may read: many small parts add up too."""

    def __init__(self, left: int) -> None:
        self.left = left


def _body_of(
    node: _Entity, problems: _Problems, budget: _Budget, depth: int = 0, want_html: bool = True
) -> _Text | None:
    """The readable text of ``node``: in an alternative, the plain version if any; in a mix, all texts joined."""
    if depth > _DEPTH_CEILING:
        return None
    if node.content_type in _EMBEDDED_TYPES:
        return None  # a forwarded message is history, not what the sender wrote
    if not node.is_multipart:
        if not _is_body_text(node, problems) or (node.content_type == "text/html" and not want_html):
            return None
        if budget.left <= 0:
            problems.add(f"body text beyond {_MAX_BODY_BYTES} bytes was not read")
            return None
        budget.left -= node.body_end - node.body_start
        text = _text_of_part(node, problems)
        if node.content_type == "text/html":
            if len(text) > _MAX_HTML_CHARS:
                problems.add(f"HTML of part {node.path} longer than {_MAX_HTML_CHARS} characters: the rest was skipped")
                text = text[:_MAX_HTML_CHARS]
            return _Text(html_to_text(text), plain=False)
        return _Text(text, plain=True)
    if node.content_type == "multipart/alternative":
        # The plain version first; HTML is converted only when there is no plain one.
        for html in (False, True) if want_html else (False,):
            for child in node.children:
                found = _body_of(child, problems, budget, depth + 1, want_html=html)
                if found is not None:
                    return found
        return None
    texts = [t for t in (_body_of(c, problems, budget, depth + 1, want_html) for c in node.children) if t is not None]
    if not texts:
        return None
    return _Text("\n".join(t.text.rstrip("\n") for t in texts), plain=any(t.plain for t in texts))


# ==========================================================================
# Message ids, addresses, dates
# ==========================================================================

_ANGLE_ID_RE = re.compile(r"<([^<>]{1,998})>")
_ANGLE_ADDRESS_RE = re.compile(r"<([^<>@\s]{1,256}@[^<>@\s]{1,256})>")
_WHITESPACE_RE = re.compile(r"[\s\x00-\x1f\x7f]+")


def _message_ids(value: str | None) -> list[str]:
    """Every ``<id>`` in a header value, whitespace removed; a bare ``id@host`` is accepted alone."""
    if not value:
        return []
    if "=?" in value:
        # Some mail libraries (Python's email among them) RFC 2047-encode a long id: read it back.
        value = _decode_words(value[:_MAX_STRUCTURED_VALUE])
    ids = [f"<{inner}>" for inner in (_WHITESPACE_RE.sub("", m.group(1)) for m in _ANGLE_ID_RE.finditer(value))]
    ids = [i for i in ids if i != "<>"]
    if not ids:
        bare = _WHITESPACE_RE.sub("", value)
        if "@" in bare and "<" not in bare and ">" not in bare and len(bare) <= 998:
            ids = [f"<{bare}>"]
    if len(ids) > _MAX_IDS:
        ids = ids[: _MAX_IDS // 10] + ids[-(_MAX_IDS - _MAX_IDS // 10) :]  # the thread's root and its latest
    return ids


def _unique(items: Sequence[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def _addresses(value: str | None) -> list[tuple[str, str]]:
    """``[(display name, addr-spec)]`` of an address header; names decoded, addresses lower-cased."""
    if not value:
        return []
    value = _CONTROL_RE.sub(" ", value[:_MAX_STRUCTURED_VALUE])
    try:
        pairs = getaddresses([value])
    except Exception:  # the address parser has had its share of edge cases; never let one through
        return []
    out: list[tuple[str, str]] = []
    for name, address in pairs:
        address = address.strip().strip("<>").lower()
        if address:
            out.append((_one_line(_decode_words(name), 200), address))
    return out


def _parse_date(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        parsed = parsedate_to_datetime(_one_line(value, 200))
    except Exception:  # ValueError, TypeError, OverflowError: all mean "no usable date"
        return None
    if parsed.tzinfo is None or parsed.utcoffset() is None:
        parsed = parsed.replace(tzinfo=UTC)  # "-0000": zone unknown, the instant is given in UTC
    return parsed


def _domain(address: str | None) -> str | None:
    if not address or "@" not in address:
        return None
    domain = address.rsplit("@", 1)[1].strip().strip(".>").lower()
    return domain or None


# ==========================================================================
# Authentication-Results (RFC 8601)
# ==========================================================================

_AR_SEGMENT_RE = re.compile(r'(?:"(?:[^"\\]|\\.)*"?|[^;"])+')
_AR_RESULT_RE = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9_-]*)(?:/\d+)?\s*=\s*([A-Za-z0-9_-]+)")
_AR_PROPERTY_RE = re.compile(r'([A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)?)\s*=\s*("(?:[^"\\]|\\.)*"?|[^\s;"]*)')
_AR_METHODS = ("dmarc", "spf", "dkim")
_MAX_AR_CHARS = 16 * 1024


def _strip_comments(text: str) -> str:
    """Remove RFC 5322 comments (nested parentheses, outside quoted strings); they may hold ``;`` and ``=``."""
    out: list[str] = []
    depth = 0
    quoted = False
    escaped = False
    for char in text:
        if escaped:
            escaped = False
            if depth == 0:
                out.append(char)
            continue
        if char == "\\":
            escaped = True
            if depth == 0:
                out.append(char)
            continue
        if depth == 0 and char == '"':
            quoted = not quoted
            out.append(char)
        elif quoted:
            out.append(char)
        elif char == "(":
            depth += 1
        elif char == ")" and depth:
            depth -= 1
            if depth == 0:
                out.append(" ")
        elif depth == 0:
            out.append(char)
    return "".join(out)


@dataclass(frozen=True)
class _AuthResult:
    method: str
    result: str
    properties: dict[str, str]


def _auth_results(value: str) -> list[_AuthResult]:
    results: list[_AuthResult] = []
    for segment in _AR_SEGMENT_RE.findall(_strip_comments(_CONTROL_RE.sub(" ", value[:_MAX_AR_CHARS]))):
        head = _AR_RESULT_RE.match(segment)
        if head is None:
            continue  # the authserv-id (and its version), or "none"
        properties: dict[str, str] = {}
        for prop in _AR_PROPERTY_RE.finditer(segment, head.end()):
            properties.setdefault(prop.group(1).lower(), _unquote(prop.group(2)))
        results.append(_AuthResult(head.group(1).lower(), head.group(2).lower(), properties))
    return results


def _aligned(domain: str | None, from_domain: str) -> bool:
    """``domain`` is the From domain or one of its parents (``example.hn`` for ``sre.example.hn``)."""
    if not domain:
        return False
    domain = domain.strip().strip(".").lower()
    return bool(domain) and (from_domain == domain or from_domain.endswith("." + domain))


def parse_authentication_results(values: Sequence[str], from_domain: str | None) -> AuthVerdict:
    """Read the topmost ``Authentication-Results`` header: the one our own receiving server added.

    Headers below it were written by servers the message passed through before ours, and anyone
    can write those, so they are never read. Both the RFC 8601 form (Gmail: ``mx.google.com;
    dkim=pass header.i=@x.org; spf=pass (...) smtp.mailfrom=...; dmarc=pass (...) header.from=x.org``)
    and Microsoft 365's (no authserv-id, ``compauth=...``) are understood; comments are removed first.

    What fails, for the From domain:

    * ``dmarc=fail`` (DMARC is by definition about the From domain);
    * ``spf=fail`` or ``softfail``, only when ``smtp.mailfrom``'s domain is the From domain (SPF of some
      other envelope domain says nothing of the sender);
    * ``dkim=fail`` for a signature of the From domain or a parent of it, unless another signature
      of such a domain passed (keys are rotated; one good signature is enough).

    ``none``, ``neutral``, ``policy``, ``temperror`` and ``permerror`` are not failures.
    """
    if not values:
        return AuthVerdict(present=False, failing=(), summary="")
    results = _auth_results(values[0])
    domain = (from_domain or "").strip().strip(".").lower()
    failing: list[str] = []
    by_method = {method: [r for r in results if r.method == method] for method in _AR_METHODS}
    if any(r.result == "fail" for r in by_method["dmarc"]) or (
        # The server judged another From domain than the one read here: a From built to be read two ways.
        domain
        and any(
            (r.properties.get("header.from") or domain).strip().strip(".").lower() != domain for r in by_method["dmarc"]
        )
    ):
        failing.append("dmarc")
    if domain:
        if any(
            r.result in ("fail", "softfail") and _domain_of_mailfrom(r.properties.get("smtp.mailfrom")) == domain
            for r in by_method["spf"]
        ):
            failing.append("spf")
        aligned = [r for r in by_method["dkim"] if _aligned(_dkim_domain(r), domain)]
        if any(r.result == "fail" for r in aligned) and not any(r.result == "pass" for r in aligned):
            failing.append("dkim")
    summary = " ".join(
        f"{method}={','.join(dict.fromkeys(r.result for r in found))}" for method, found in by_method.items() if found
    )
    return AuthVerdict(present=True, failing=tuple(failing), summary=summary or "no dmarc, spf or dkim result")


def _domain_of_mailfrom(value: str | None) -> str | None:
    if not value:
        return None
    value = value.strip().strip("<>")
    return (value.rsplit("@", 1)[-1]).strip().strip(".").lower() or None


def _dkim_domain(result: _AuthResult) -> str | None:
    d = result.properties.get("header.d")
    if d and d.lower() != "none":
        return d
    i = result.properties.get("header.i")
    if i:
        return i.rsplit("@", 1)[-1]
    return None


# ==========================================================================
# Quoted history and answers in the body
# ==========================================================================

# The attribution line that heads quoted history, by its first word (English, Spanish, French, Portuguese).
_ATTRIBUTION_RES = {
    "on": re.compile(r"^\s*On\b.{0,400}\bwrote\s*:\s*$", re.IGNORECASE | re.DOTALL),
    "el": re.compile(r"^\s*El\b.{0,400}\bescribi[óo]\s*:\s*$", re.IGNORECASE | re.DOTALL),
    "le": re.compile(r"^\s*Le\b.{0,400}\ba [ée]crit\s*:\s*$", re.IGNORECASE | re.DOTALL),
    "em": re.compile(r"^\s*Em\b.{0,400}\bescreveu\s*:\s*$", re.IGNORECASE | re.DOTALL),
}
_ATTRIBUTION_START_RE = re.compile(r"^\s*(On|El|Le|Em)\b", re.IGNORECASE)
_SEPARATOR_RE = re.compile(
    r"^\s*-{2,}\s*(Original Message|Mensaje original|Message d'origine|Mensagem original|Forwarded message"
    r"|Mensaje reenviado|Message transf[ée]r[ée])\s*-{2,}\s*$"
    r"|^\s*(Begin forwarded message|Inicio del mensaje reenviado|Comienzo del mensaje reenviado)\s*:\s*$",
    re.IGNORECASE,
)
_UNDERSCORES_RE = re.compile(r"^\s*_{10,}\s*$")
_FROM_LINE_RE = re.compile(r"^\s*\*?\s*(From|De|Von)\s*:\s*\*?\s*\S", re.IGNORECASE)
_SENT_LINE_RE = re.compile(r"^\s*\*?\s*(Sent|Date|Enviado el|Enviado|Fecha|Envoy[ée]|Gesendet)\s*:", re.IGNORECASE)


def _is_attribution(lines: list[str], index: int) -> bool:
    line = lines[index]
    start = _ATTRIBUTION_START_RE.match(line) if len(line) <= 600 else None
    if start is None:
        return False
    pattern = _ATTRIBUTION_RES[start.group(1).lower()]
    joined = line
    for extra in range(3):  # mail clients wrap a long "On ..., X <x@y> wrote:" over up to three lines
        if extra:
            if index + extra >= len(lines):
                break
            joined = f"{joined} {lines[index + extra].strip()}"
        if joined.rstrip().endswith(":") and pattern.match(joined):
            return True
    return False


def _is_header_block(lines: list[str], index: int) -> bool:
    """Outlook's ``From: / Sent:`` (``De: / Enviado el:``) block that heads the message replied to."""
    if not _FROM_LINE_RE.match(lines[index]):
        return False
    return any(_SENT_LINE_RE.match(line) for line in lines[index + 1 : index + 5])


def strip_quoted(text: str) -> str:
    """Keep only what the sender wrote above the quoted history.

    The text is cut at the first attribution line (``On Mon, 23 Oct 2017, X wrote:``, ``El lun.,
    23 oct. 2017 ... escribió:``, Apple Mail's ``On 23 Oct 2017, at 10:00, X <x@y> wrote:``, even
    when wrapped), at ``-----Original Message-----`` / ``-----Mensaje original-----`` and forwarded-message
    separators, at Outlook's ``From:/Sent:`` or ``De:/Enviado el:`` block and at a line of
    underscores followed by one. Lines starting with ``>`` are dropped wherever they are.
    """
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    kept: list[str] = []
    for index, line in enumerate(lines):
        if _SEPARATOR_RE.match(line) or _is_attribution(lines, index) or _is_header_block(lines, index):
            break
        if _UNDERSCORES_RE.match(line):
            following = [candidate for candidate in lines[index + 1 : index + 4] if candidate.strip()]
            if following and _FROM_LINE_RE.match(following[0]):
                break
        if line.lstrip().startswith(">"):
            continue
        kept.append(line.rstrip())
    return "\n".join(kept).strip("\n")


BODY_ANSWER_RE: re.Pattern[str] = re.compile(
    r"^[ \t]*(?:[-*•·▪–][ \t]*)?"
    r"(?:(?:acci[oó]n|action|actividad|activity|c[oó]digo|code)[ \t]*(?:n[°º.o][ \t]*)?)?"
    r"(?P<key>\d{1,4}(?:\.\d{1,4}){1,3})(?!\d)"
    r"[ \t]*(?:[:)=\-–—]|\.(?=[ \t]))"
    r"[ \t]*(?P<value>[^\n]*?)[ \t]*$",
    re.IGNORECASE | re.MULTILINE,
)
"""One answer written in a body line: ``1.1: X``, ``2.3 - X``, ``2.3 – X``, ``- 4.1: X``, ``* 4.1) X``,
``Acción 1.2: X``, ``Action 1.2: X``, ``1.2. X``."""

_NOT_AN_ANSWER = frozenset({"", "-"})


def body_answers(text: str, keys: Collection[str]) -> dict[str, str]:
    """Answers written in the body, one per line, for the given keys only (compared as written).

    Empty, whitespace-only and ``-`` values are not answers. When a key appears twice, the last wins.
    Give it the new text of a reply (:attr:`Message.body_text`), not the quoted history.
    """
    wanted = set(keys)
    answers: dict[str, str] = {}
    normalized = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    for match in BODY_ANSWER_RE.finditer(normalized):
        key = match.group("key")
        if key not in wanted:
            continue
        value = match.group("value").strip()
        if value in _NOT_AN_ANSWER:
            continue
        answers[key] = value
    return answers


# ==========================================================================
# HTML to text
# ==========================================================================

_BLOCK_TAGS = frozenset(
    {
        "address", "article", "aside", "blockquote", "br", "dd", "div", "dl", "dt", "fieldset", "figcaption",
        "figure", "footer", "form", "h1", "h2", "h3", "h4", "h5", "h6", "header", "hr", "li", "main", "nav",
        "ol", "p", "pre", "section", "table", "tbody", "tfoot", "thead", "tr", "ul",
    }
)  # fmt: skip
_PARAGRAPH_TAGS = frozenset({"p", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "table", "ul", "ol", "pre", "hr"})
_CELL_TAGS = frozenset({"td", "th"})
_HIDDEN_TAGS = frozenset({"script", "style", "head", "title", "template", "noscript"})
_MARKED_SECTION_RE = re.compile(r"<!\[[^<>]*>")
_UNCLOSED_TAG_RE = re.compile(r"<(?![^<>]*>)")
_TAG_RE = re.compile(r"<[^<>]*>")


def _defuse_html(html: str) -> str:
    """Neutralise constructs that make :class:`HTMLParser` slow (quadratic) or raise.

    Comments are removed (an unclosed one runs to the end, as in browsers), marked sections
    (``<![if mso]>``) too, and a ``<`` that no ``>`` closes before the next ``<`` becomes text.
    Each step scans forward only: linear time.
    """
    out: list[str] = []
    pos = 0
    while True:
        start = html.find("<!--", pos)
        if start < 0:
            out.append(html[pos:])
            break
        out.append(html[pos:start])
        end = html.find("-->", start + 4)
        if end < 0:
            break
        pos = end + 3
    text = _MARKED_SECTION_RE.sub("", "".join(out))
    return _UNCLOSED_TAG_RE.sub("&lt;", text)


class _TextExtractor(HTMLParser):
    """Collects text lines; each remembers how deep in ``<blockquote>`` it started."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.lines: list[tuple[int, str]] = []  # (blockquote depth, text)
        self.current: list[str] = []
        self.current_quote = 0
        self.hidden = 0
        self.quote = 0
        self.pre = 0

    def line_break(self, hard: bool = False) -> None:
        """End the current line; a soft break (a block boundary) never makes an empty line, ``<br>`` does."""
        text = "".join(self.current)
        if hard or text.strip():
            self.lines.append((self.current_quote, text))
        self.current = []
        self.current_quote = self.quote

    def paragraph_break(self) -> None:
        self.line_break()
        if self.lines and self.lines[-1][1].strip():
            self.lines.append((self.quote, ""))

    def block(self, tag: str) -> None:
        if tag in _PARAGRAPH_TAGS:
            self.paragraph_break()
        else:
            self.line_break()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _HIDDEN_TAGS:
            self.hidden += 1
        elif tag == "br":
            self.line_break(hard=True)
        elif tag in _BLOCK_TAGS:
            self.block(tag)
            if tag == "blockquote":
                self.quote += 1
                self.current_quote = self.quote
            elif tag == "pre":
                self.pre += 1
            elif tag == "li":
                self.current.append("- ")
        elif tag in _CELL_TAGS:
            self.current.append(" ")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "br":
            self.line_break(hard=True)
        elif tag in _BLOCK_TAGS:
            self.block(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in _HIDDEN_TAGS:
            self.hidden = max(0, self.hidden - 1)
        elif tag in _BLOCK_TAGS and tag != "br":
            self.block(tag)
            if tag == "blockquote":
                self.quote = max(0, self.quote - 1)
                self.current_quote = self.quote
            elif tag == "pre":
                self.pre = max(0, self.pre - 1)

    def handle_data(self, data: str) -> None:
        if self.hidden:
            return
        if not self.current:
            self.current_quote = self.quote
        if self.pre:
            for index, part in enumerate(data.split("\n")):
                if index:
                    self.line_break(hard=True)
                self.current.append(part)
        else:
            self.current.append(_SPACES_RE.sub(" ", data))

    def text(self) -> str:
        self.line_break()
        out: list[str] = []
        for quote, line in self.lines:
            line = _SPACES_RE.sub(" ", line.replace("\xa0", " ")).strip()
            if not line:
                if out and out[-1]:
                    out.append("")
                continue
            out.append(("> " * quote) + line)
        return "\n".join(out).strip("\n")


def html_to_text(html: str) -> str:
    """Readable text of an HTML body: scripts and styles dropped, blocks on their own lines, entities unescaped.

    Text inside ``<blockquote>`` (how Gmail, Apple Mail and Thunderbird quote) comes out with
    ``> `` in front, so :func:`strip_quoted` drops it. Uses :mod:`html.parser` on input made safe
    for it first; should it still fail, tags are simply stripped.
    """
    safe = _defuse_html(html)
    parser = _TextExtractor()
    try:
        parser.feed(safe)
        parser.close()
        return parser.text()
    except Exception:  # html.parser asserts on some malformed declarations
        text = unescape(_TAG_RE.sub(" ", safe))
        return "\n".join(_SPACES_RE.sub(" ", line).strip() for line in text.splitlines()).strip()


# ==========================================================================
# Kinds: bounces and automatic replies
# ==========================================================================

_DAEMON_LOCALPARTS = frozenset({"mailer-daemon", "postmaster", "mail-daemon", "mailerdaemon", "mdaemon"})
_DAEMON_NAMES_RE = re.compile(r"mail delivery (system|subsystem|service)|mailer.daemon", re.IGNORECASE)
_BOUNCE_SUBJECT_RE = re.compile(
    r"undeliver|undelivered mail|returned mail|returned to sender|delivery status notification"
    r"|delivery (has )?fail|failure notice|mail delivery failed|delivery failure|could not be delivered"
    r"|mail system error|delivery (notification|report)|delayed mail|delivery delayed|warning: could not send"
    r"|no se puede entregar|no se pudo entregar|no entregad|error en la entrega|notificaci[oó]n de estado de entrega"
    r"|mensaje devuelto|correo devuelto|non remis|non d[ée]livr|unzustellbar",
    re.IGNORECASE,
)
_DELAY_WORDS_RE = re.compile(r"delay|retras|demor|warning|will retry|still trying", re.IGNORECASE)
_REPLY_PREFIX_RE = re.compile(
    r"^\s*(?:(?:re|fw|fwd|rv|reenv|aw|wg|tr|r|sv|vs|antw)\s*(?:\[\d+\])?\s*:\s*)+", re.IGNORECASE
)
_AUTO_SUBJECT_RE = re.compile(
    r"^(?:automatic reply|auto[- ]?reply|auto[- ]?response|autoreply|out of (the )?office|respuesta autom[aá]tica"
    r"|fuera de la oficina|fuera de oficina|ausente\b|ausencia\b|r[ée]ponse automatique|absence\b"
    r"|abwesenheitsnotiz|resposta autom[aá]tica|vacation reply)",
    re.IGNORECASE,
)
_AUTO_PRECEDENCE = frozenset({"auto_reply", "bulk", "junk"})


@dataclass(frozen=True)
class _Kind:
    kind: str
    reason: str


def _auto_by_headers(headers: _Headers) -> str | None:
    """The header that marks the message automatic (RFC 3834 and its dialects), as a reason; None if none."""
    auto = headers.get("Auto-Submitted")
    if auto is not None:
        keyword = _strip_comments(auto[:_MAX_STRUCTURED_VALUE]).split(";", 1)[0].strip().lower()
        if keyword and keyword != "no":
            return f"Auto-Submitted: {_one_line(auto, 60)}"
    for name in ("X-Autoreply", "X-Autorespond", "X-Autoresponder"):
        value = headers.get(name)
        if value is not None:
            return f"{name}: {_one_line(value, 60)}".rstrip(": ")
    precedence = headers.get("Precedence")
    if precedence is not None and precedence.strip().lower() in _AUTO_PRECEDENCE:
        return f"Precedence: {precedence.strip().lower()}"
    return_path = headers.get("Return-Path")
    if return_path is not None and _WHITESPACE_RE.sub("", return_path) in ("<>", ""):
        return "Return-Path: <> (empty)"
    return None


def _auto_by_subject(subject: str) -> str | None:
    bare = _REPLY_PREFIX_RE.sub("", subject)
    if _AUTO_SUBJECT_RE.match(bare):
        return f"subject {_quote_for_problem(subject, 80)!r}"
    return None


def _is_daemon(from_address: str | None, from_name: str) -> bool:
    if from_address:
        local = from_address.split("@", 1)[0]
        if local in _DAEMON_LOCALPARTS:
            return True
    return bool(_DAEMON_NAMES_RE.search(from_name))


# -- RFC 3464 delivery-status ------------------------------------------------

_STATUS_RE = re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")
_SMTP_CODE_RE = re.compile(r"\b([45])\d\d\b")


def _status_blocks(text: str) -> list[dict[str, str]]:
    """The field blocks of a delivery-status body: per-message fields first, then one per recipient."""
    blocks: list[dict[str, str]] = []
    current: dict[str, str] = {}
    last: str | None = None
    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        if not line.strip():
            if current:
                blocks.append(current)
            current, last = {}, None
            continue
        if line[:1] in (" ", "\t") and last is not None:
            current[last] = f"{current[last]} {line.strip()}"
            continue
        name, colon, value = line.partition(":")
        if not colon:
            continue
        last = name.strip().lower()
        current.setdefault(last, value.strip())
    if current:
        blocks.append(current)
    return blocks


def _typed_address(value: str) -> str:
    """``rfc822; User@Example.org`` -> ``user@example.org``."""
    address = value.split(";", 1)[1] if ";" in value else value
    return _one_line(address, 320).strip("<> ").lower()


def _status_code(text: str) -> str | None:
    match = _STATUS_RE.search(text)
    return f"{match.group(1)}.{match.group(2)}.{match.group(3)}" if match else None


def _diagnostic(value: str) -> str:
    value = _one_line(value, _MAX_DIAGNOSTIC * 2)
    kind, semicolon, rest = value.partition(";")
    if semicolon and re.fullmatch(r"\s*[A-Za-z][A-Za-z0-9-]*\s*", kind):
        value = rest.strip()  # "smtp; 550 ..." -> "550 ..."
    return value[:_MAX_DIAGNOSTIC]


def _delivery_failures(text: str) -> tuple[list[Failure], int]:
    """The failed and delayed recipients of a delivery-status body, and how many recipients it reports on."""
    failures: list[Failure] = []
    recipients = 0
    for block in _status_blocks(text)[: _MAX_FAILURES * 2]:
        recipient_field = block.get("original-recipient") or block.get("final-recipient")
        if not recipient_field:
            continue
        recipients += 1
        recipient = _typed_address(recipient_field)
        if not recipient and block.get("final-recipient"):
            recipient = _typed_address(block["final-recipient"])
        action = block.get("action", "").strip().lower()
        if action and action not in ("failed", "delayed"):
            continue  # delivered, relayed, expanded: not a failure
        status = _status_code(block.get("status", "")) or _status_code(block.get("diagnostic-code", ""))
        if status is None:
            status = "4.0.0" if action == "delayed" else "5.0.0"
        failures.append(
            Failure(
                recipient=recipient,
                status=status,
                permanent=action != "delayed" and status.startswith("5"),
                diagnostic=_diagnostic(block.get("diagnostic-code", "")),
            )
        )
        if len(failures) >= _MAX_FAILURES:
            break
    return failures, recipients


# -- non-standard bounces -----------------------------------------------------

_ADDRESS_RE = re.compile(r"[A-Za-z0-9._%+'=-]{1,64}@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63}){1,8}")
_RETURNED_COPY_RE = re.compile(
    r"^(?:[ \t]*[-=_]{2,}[ \t]*(?:this is a copy of|below this line|original message|message headers follow"
    r"|undelivered message|returned message|copia del mensaje|mensaje original)"
    r"|[ \t]*original message follows"
    r"|(?:Received|Return-Path|Message-ID|DKIM-Signature|MIME-Version|Content-Type)[ \t]*:)",
    re.IGNORECASE | re.MULTILINE,
)
_TEXT_HEADER_RE = re.compile(
    r"^(Message-ID|In-Reply-To|References|To)[ \t]*:[ \t]*(.*(?:\r?\n[ \t]+.*){0,50})", re.IGNORECASE | re.MULTILINE
)


def _text_failures(text: str, subject: str, exclude: set[str]) -> list[Failure]:
    """Failed addresses of a bounce written for people only: each with the status found near it."""
    copy = _RETURNED_COPY_RE.search(text)
    head = text[: copy.start()] if copy else text
    found: dict[str, int] = {}
    for match in _ADDRESS_RE.finditer(head):
        address = match.group(0).strip(".").lower()
        local = address.split("@", 1)[0]
        if address in exclude or local in _DAEMON_LOCALPARTS or address in found:
            continue
        found[address] = match.end()
        if len(found) >= _MAX_FAILURES:
            break
    failures: list[Failure] = []
    positions = sorted(found.values())
    for address, end in found.items():
        later = [p for p in positions if p > end]
        window = head[end : min(end + 600, later[0] if later else len(head))]
        status = _status_code(window)
        diagnostic_line = ""
        if status is None:
            code = _SMTP_CODE_RE.search(window)
            if code is not None:
                status = f"{code.group(1)}.0.0"
        for line in window.splitlines():
            if _STATUS_RE.search(line) or _SMTP_CODE_RE.search(line):
                diagnostic_line = line
                break
        if status is None:
            status = "4.0.0" if _DELAY_WORDS_RE.search(subject) else "5.0.0"
        if not diagnostic_line:
            diagnostic_line = next((line for line in window.splitlines() if line.strip(" :<>")), "")
        failures.append(
            Failure(
                recipient=address,
                status=status,
                permanent=status.startswith("5"),
                diagnostic=_one_line(diagnostic_line.strip(" :"), _MAX_DIAGNOSTIC),
            )
        )
    return failures


@dataclass(frozen=True)
class _Original:
    message_id: str | None = None
    references: tuple[str, ...] = ()
    recipients: tuple[str, ...] = ()


def _original_from_headers(headers: _Headers) -> _Original:
    ids = _message_ids(headers.get("Message-ID"))
    references = _message_ids(headers.get("In-Reply-To")) + _message_ids(headers.get("References"))
    recipients = [address for _name, address in _addresses(headers.get("To"))]
    return _Original(ids[0] if ids else None, _unique(references), _unique(recipients))


def _original_from_text(text: str) -> _Original:
    fields: dict[str, str] = {}
    for match in _TEXT_HEADER_RE.finditer(text):
        fields.setdefault(match.group(1).lower(), _SPACES_RE.sub(" ", match.group(2)))
    if "message-id" not in fields:
        return _Original()
    ids = _message_ids(fields.get("message-id"))
    references = _message_ids(fields.get("in-reply-to")) + _message_ids(fields.get("references"))
    recipients = [address for _name, address in _addresses(fields.get("to"))]
    return _Original(ids[0] if ids else None, _unique(references), _unique(recipients))


def _returned_original(root: _Entity, problems: _Problems) -> _Original | None:
    """The returned original's headers, from a message/rfc822 or text/rfc822-headers part."""
    for node in _walk(root):
        if node is root:
            continue
        if node.content_type in _EMBEDDED_TYPES and node.children:
            return _original_from_headers(node.children[0].headers)
        if node.content_type in _RETURNED_HEADER_TYPES:
            data = _decode_transfer(node.buf[node.body_start : node.body_start + _MAX_REPORT_BYTES], node.cte)
            headers, _ = _read_headers(data, 0, len(data), problems)
            return _original_from_headers(headers)
    return None


# ==========================================================================
# parse_message
# ==========================================================================


def parse_message(raw: bytes, limits: Limits = Limits()) -> Message:
    """Take one received email apart. Never raises on malformed input; oddities go to ``problems``."""
    problems = _Problems()
    try:
        return _parse(bytes(raw), limits, problems)
    except RecursionError:  # pragma: no cover - the walk is bounded; this is the last line of defence
        problems.add("internal error: RecursionError")
    except Exception as exc:  # pragma: no cover - same: a bug must cost one message, not the inbox
        problems.add(f"internal error: {type(exc).__name__}: {_quote_for_problem(str(exc), 120)}")
    return Message(
        message_id=None,
        in_reply_to=(),
        references=(),
        subject="",
        from_address=None,
        from_name="",
        date=None,
        kind=KIND_REPLY,
        kind_reason="could not be taken apart",
        failures=(),
        original_message_id=None,
        original_references=(),
        original_recipients=(),
        auth=AuthVerdict(present=False, failing=(), summary=""),
        attachments=(),
        body_text="",
        problems=problems.items(),
    )


def _parse(raw: bytes, limits: Limits, problems: _Problems) -> Message:
    if not raw.strip():
        problems.add("empty message")
    cut_buffer: bytes | None = None
    if len(raw) > limits.max_message_bytes:
        problems.add(f"message of {len(raw)} bytes cut at {limits.max_message_bytes}")
        raw = raw[: max(0, limits.max_message_bytes)]
        cut_buffer = raw
    builder = _TreeBuilder(limits, problems, cut_buffer)
    root = builder.entity(raw, 0, len(raw), "", 0, is_message=True, default_type="text/plain")
    if root is None:  # max_parts below 1 is clamped to 1, so this cannot happen; typed for mypy
        root = _Entity(_Headers([]), "text/plain", {}, "", {}, "", raw, 0, 0, "1")
    headers = root.headers
    if not headers and raw.strip():
        problems.add("no headers")

    message_ids = _message_ids(headers.get("Message-ID"))
    subject = _one_line(_decode_words(headers.get("Subject") or "", problems))
    from_values = headers.get_all("From")
    if len(from_values) > 1:
        problems.add(f"{len(from_values)} From headers: the first was used")
    senders = _addresses(from_values[0] if from_values else None)
    from_name, from_address = senders[0] if senders else ("", None)
    angle = _ANGLE_ADDRESS_RE.findall(from_values[0]) if from_values else []
    if len(from_values) > 1 or len(senders) > 1 or len(angle) > 1:
        # Several authors, or a display name holding an address: a reader could take either one.
        problems.add("the From header names several addresses: the sender cannot be told, it is not trusted")
        from_address = None
    elif len(angle) == 1 and from_address != angle[0].strip().lower():
        # What mail clients show and DMARC checks is the address in angle brackets.
        from_address = angle[0].strip().lower()
    if from_address is not None and "@" not in from_address:
        problems.add(f"From address {_quote_for_problem(from_address, 60)!r} has no domain")
    date = _parse_date(headers.get("Date"))
    if headers.get("Date") and date is None:
        problems.add(f"unreadable Date {_quote_for_problem(headers.get('Date') or '', 60)!r}")

    attachments = _attachments(root, limits, problems)
    body = _body_of(root, problems, _Budget(_MAX_BODY_BYTES))
    full_text = body.text if body is not None else ""

    kind = _classify(root, headers, subject, from_address, from_name)
    failures: list[Failure] = []
    original = _Original()
    if kind.kind == KIND_BOUNCE:
        details = _bounce_details(root, full_text, subject, from_address, headers, problems)
        failures, original = details.failures, details.original
        if details.only_successes:
            kind = _Kind(KIND_AUTO_REPLY, f"{kind.reason}: every recipient was reached (not a failure)")

    auth = parse_authentication_results(headers.get_all("Authentication-Results"), _domain(from_address))
    return Message(
        message_id=message_ids[0] if message_ids else None,
        in_reply_to=_unique(_message_ids(headers.get("In-Reply-To"))),
        references=_unique(_message_ids(headers.get("References"))),
        subject=subject,
        from_address=from_address,
        from_name=from_name,
        date=date,
        kind=kind.kind,
        kind_reason=kind.reason,
        failures=tuple(failures),
        original_message_id=original.message_id,
        original_references=original.references,
        original_recipients=original.recipients,
        auth=auth,
        attachments=tuple(attachments),
        body_text=strip_quoted(full_text),
        problems=problems.items(),
    )


def _report_type(root: _Entity) -> str | None:
    """``delivery-status`` / ``disposition-notification`` for a report, else None."""
    if root.content_type != "multipart/report":
        return None
    declared = root.params.get("report-type", "").strip().lower()
    if declared:
        return declared
    child_types = {child.content_type for child in root.children}
    if child_types & _DELIVERY_STATUS_TYPES:
        return "delivery-status"
    if child_types & {"message/disposition-notification", "message/global-disposition-notification"}:
        return "disposition-notification"
    return None


def _classify(root: _Entity, headers: _Headers, subject: str, from_address: str | None, from_name: str) -> _Kind:
    report = _report_type(root)
    if report in ("delivery-status", "global-delivery-status"):
        return _Kind(KIND_BOUNCE, f"multipart/report {report}")
    if report in ("disposition-notification", "global-disposition-notification"):
        return _Kind(KIND_AUTO_REPLY, f"multipart/report {report} (a read receipt)")
    empty_return_path = (headers.get("Return-Path") or "x").strip() in ("<>", "")
    daemon = _is_daemon(from_address, from_name)
    if (daemon or empty_return_path) and _BOUNCE_SUBJECT_RE.search(subject):
        sender = from_address or "an empty Return-Path"
        return _Kind(KIND_BOUNCE, f"from {sender}, subject {_quote_for_problem(subject, 80)!r}")
    by_headers = _auto_by_headers(headers)
    if by_headers is not None:
        return _Kind(KIND_AUTO_REPLY, by_headers)
    by_subject = _auto_by_subject(subject)
    if by_subject is not None:
        return _Kind(KIND_AUTO_REPLY, by_subject)
    if daemon:
        return _Kind(KIND_AUTO_REPLY, f"sent by the mail system ({from_address or from_name})")
    return _Kind(KIND_REPLY, "no automatic-reply or delivery-report marker")


@dataclass(frozen=True)
class _BounceDetails:
    failures: list[Failure]
    original: _Original
    only_successes: bool
    """A delivery report on recipients that were all reached (delivered, relayed, expanded)."""


def _bounce_details(
    root: _Entity, text: str, subject: str, from_address: str | None, headers: _Headers, problems: _Problems
) -> _BounceDetails:
    """Failed recipients from the machine-readable report, else from the text written for people."""
    failures: list[Failure] = []
    recipients = 0
    status_part = next((c for c in root.children if c.content_type in _DELIVERY_STATUS_TYPES), None)
    if status_part is not None:
        data = _decode_transfer(status_part.body()[: _MAX_REPORT_BYTES * 2], status_part.cte)
        status_text = _decode_bytes(data[:_MAX_REPORT_BYTES], "utf-8", problems, "delivery-status")
        failures, recipients = _delivery_failures(status_text)
    elif root.content_type == "multipart/report":
        problems.add("delivery report without a message/delivery-status part")
    original = _returned_original(root, problems) or _original_from_text(text[:_MAX_REPORT_BYTES])
    if not recipients:
        exclude = {address for _n, address in _addresses(headers.get("To"))}
        if from_address:
            exclude.add(from_address)
        failures = _text_failures(text[:_MAX_REPORT_BYTES], subject, exclude)
        if not failures:
            problems.add("bounce without a recognisable failed address")
    return _BounceDetails(failures, original, only_successes=recipients > 0 and not failures)
