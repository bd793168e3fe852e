"""The consolidated plan: the master workbook with every delegation's answers beside it.

What the Secretariat hands on is the Strategic Plan with the Responsible
column completed by every country. :func:`consolidated_workbook` builds it
from the store, in two steps kept apart:

* **gathering** (:func:`gather`): per delegation of the campaign, in config
  order, its current answers, its standing (state, answered/total, last
  reply, overdue at ``now``) and the rows it added, deleted or changed outside
  the fill column. Reads the store, nothing else.
* **rendering** (:func:`render_consolidated`): bytes in, bytes out. The master
  is loaded from its bytes (the file on disk is only ever read), gains one
  column per delegation to the right of its last used column, and two sheets:
  a summary and the list of changes.

Every text that comes from outside (answers, institution names, cells of the
changes) is written as a string cell, never as a formula, whatever it starts
with (see :func:`excel_text`). :func:`write_consolidated` puts the bytes on
disk atomically and refuses to replace the master, the config or the store.
"""

from __future__ import annotations

import io
import os
import re
import secrets
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from copy import copy
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from mailflow import schedule
from mailflow.config import LANGUAGES, Campaign, Config
from mailflow.errors import MailflowError, UsageError, WorkbookError
from mailflow.store import DelegationState, RowChangeRow, Store
from mailflow.workbook import FINGERPRINT_PROPERTY, FINGERPRINT_SHEET, MasterLayout

__all__ = [
    "DELEGATION_COLUMN_WIDTH",
    "MAX_CELL_CHARS",
    "DelegationSummary",
    "consolidated_workbook",
    "excel_text",
    "gather",
    "looks_like_formula",
    "protected_paths",
    "render_consolidated",
    "write_consolidated",
]

DELEGATION_COLUMN_WIDTH = 28
MAX_CELL_CHARS = 32_767  # Excel's limit for the text of one cell
MAX_COLUMNS = 16_384  # Excel's last column, XFD
TIME_FORMAT = "%Y-%m-%d %H:%M"

# What makes a spreadsheet read a typed entry as a formula (or a DDE call):
# the ASCII signs and their full-width forms, which East Asian input methods
# turn into formulas too.
FORMULA_PREFIXES = frozenset("=+-@＝＋－＠")

_HEADER_COLOR = "D9E1F2"  # the header tone of the sample plan
_COMPLETE_COLOR = "E2EFDA"  # a pale green: this delegation answered every row
_BORDER_COLOR = "A6A6A6"
# openpyxl's own rule for characters XML 1.0 cannot carry; Excel writes them as _xHHHH_.
_ILLEGAL_RE = re.compile(r"[\000-\010\013\014\016-\037]")
# Text that already looks like one of Excel's _xHHHH_ escapes: its underscore is escaped in turn.
_ESCAPE_LOOKALIKE_RE = re.compile(r"_(x[0-9A-Fa-f]{4}_)")

_LABELS: Mapping[str, Mapping[str, str]] = {
    "es": {
        "summary": "Resumen",
        "changes": "Cambios",
        "id": "ID",
        "delegation": "Delegación",
        "state": "Estado",
        "answered": "Respondidas",
        "total": "Total",
        "last_reply": "Última respuesta",
        "overdue": "Vencida",
        "missing": "Pendientes",
        "changes_count": "Cambios fuera de la columna",
        "change": "Cambio",
        "column": "Columna",
        "before": "Antes",
        "after": "Después",
        "when": "Fecha",
        "key": "Clave",
        "yes": "sí",
        "no": "no",
        "added": "fila añadida",
        "deleted": "fila eliminada",
        "changed": "celda modificada",
        DelegationState.NOT_SENT: "no enviada",
        DelegationState.AWAITING: "en espera",
        DelegationState.PARTIAL: "parcial",
        DelegationState.COMPLETE: "completa",
    },
    "en": {
        "summary": "Summary",
        "changes": "Changes",
        "id": "ID",
        "delegation": "Delegation",
        "state": "State",
        "answered": "Answered",
        "total": "Total",
        "last_reply": "Last reply",
        "overdue": "Overdue",
        "missing": "Missing",
        "changes_count": "Changes outside the column",
        "change": "Change",
        "column": "Column",
        "before": "Before",
        "after": "After",
        "when": "When",
        "key": "Key",
        "yes": "yes",
        "no": "no",
        "added": "row added",
        "deleted": "row deleted",
        "changed": "cell changed",
        DelegationState.NOT_SENT: "not sent",
        DelegationState.AWAITING: "awaiting",
        DelegationState.PARTIAL: "partial",
        DelegationState.COMPLETE: "complete",
    },
}


# --------------------------------------------------------------------------
# Text that stays text
# --------------------------------------------------------------------------


def excel_text(value: str) -> str:
    """``value`` as it must be stored in a string cell so that Excel shows ``value``.

    * line breaks become ``\\n`` (an XML parser turns a bare CR into LF anyway,
      and LF is what Excel uses inside a cell);
    * text that looks like one of Excel's ``_xHHHH_`` escapes gets its
      underscore escaped (``_x005F_``), so Excel shows it literally;
    * control characters XML cannot carry are written as Excel writes them,
      ``_xHHHH_``, instead of making openpyxl refuse the whole workbook;
    * beyond Excel's 32,767 characters the text is cut, with an ellipsis.

    Readers that decode the escapes (Excel, LibreOffice, python-calamine) get
    the original text back; openpyxl shows the escapes as written."""
    if value.isprintable() and "_x" not in value and len(value) <= MAX_CELL_CHARS:
        return value  # the common case, checked at C speed
    text = value.replace("\r\n", "\n").replace("\r", "\n")
    text = _ESCAPE_LOOKALIKE_RE.sub(r"_x005F_\1", text)
    text = _ILLEGAL_RE.sub(lambda match: f"_x{ord(match.group()):04X}_", text)
    if len(text) > MAX_CELL_CHARS:
        text = text[: MAX_CELL_CHARS - 1] + "…"
    return text


def looks_like_formula(text: str) -> bool:
    """True when a person editing the cell could turn ``text`` into a formula.

    Such cells are stored as strings anyway; they also get Excel's "quote
    prefix" style, so that pressing F2 and Enter on them keeps them text."""
    if not text:
        return False
    return text[0] in "\t\r\n" or text.lstrip()[:1] in FORMULA_PREFIXES


def _put_text(cell: Any, value: str) -> None:
    """Write ``value`` into ``cell`` as a string cell, never a formula."""
    text = excel_text(value)
    # openpyxl makes a formula of any str starting with "=": the data type is
    # forced back to a string, so the file holds an inline string and no <f>.
    cell.value = text
    cell.data_type = "s"
    if looks_like_formula(text):
        cell.quotePrefix = True


# --------------------------------------------------------------------------
# Gathering
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class DelegationSummary:
    """One delegation of the campaign, as the consolidated workbook shows it."""

    id: str
    name: str
    state: DelegationState
    filled: int
    total: int
    missing: tuple[str, ...]
    last_reply_at: datetime | None
    overdue: bool | None
    """None when no instant was given to judge it."""
    answers: Mapping[str, str]
    """Current answer per key (keys the delegation never answered are absent)."""
    changes: tuple[RowChangeRow, ...]
    """Rows added or deleted and cells changed outside the fill column, latest record of each, in order."""


def gather(
    config: Config, store: Store, campaign: Campaign, layout: MasterLayout, *, now: datetime | None = None
) -> list[DelegationSummary]:
    """Every delegation of ``campaign``, in config order, with its answers, standing and changes."""
    answers = store.current_answers(campaign.id)
    states = store.states(campaign.id)
    keys = layout.keys
    out: list[DelegationSummary] = []
    for delegation in config.campaign_delegations(campaign):
        state = states.get(delegation.id)
        if state is None:  # nothing recorded yet: as `status` shows it
            standing, filled, total, missing, last_reply = DelegationState.NOT_SENT, 0, len(keys), keys, None
        else:
            standing, filled, total = state.state, state.filled, state.total
            missing, last_reply = state.missing, state.last_reply_at
        overdue = None
        if now is not None:
            overdue = standing is not DelegationState.COMPLETE and now >= schedule.deadline_end(campaign, delegation)
        out.append(
            DelegationSummary(
                id=delegation.id,
                name=delegation.name,
                state=standing,
                filled=filled,
                total=total,
                missing=tuple(missing),
                last_reply_at=last_reply,
                overdue=overdue,
                answers=answers.get(delegation.id, {}),
                changes=_latest_changes(store.row_changes(campaign.id, delegation.id)),
            )
        )
    return out


def _latest_changes(rows: Sequence[RowChangeRow]) -> tuple[RowChangeRow, ...]:
    """One line per distinct change: a change every reply repeats is listed once, with its latest time."""
    latest: dict[tuple[str, str, str, str, str], RowChangeRow] = {}
    for row in rows:
        identity = (row.key, row.change, row.column, row.before, row.after)
        latest.pop(identity, None)  # re-inserted: dict order follows the latest record
        latest[identity] = row
    return tuple(latest.values())


# --------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------


def consolidated_workbook(
    config: Config,
    store: Store,
    campaign: Campaign,
    layout: MasterLayout,
    *,
    language: str | None = None,
    now: datetime | None = None,
) -> bytes:
    """The .xlsx bytes of ``campaign``'s master with every delegation's current answers, a summary and the changes.

    ``language`` (es | en) names the added sheets and their headers; by
    default the secretariat's. ``now`` decides the overdue column (left empty
    without it) and stamps the file's "modified" property. The master file is
    read, never written."""
    chosen = language or config.secretariat.language
    if chosen not in LANGUAGES:
        raise UsageError(f"language {chosen!r} is not one of {', '.join(LANGUAGES)}")
    try:
        master = campaign.workbook.read_bytes()
    except OSError as exc:
        raise WorkbookError(
            f"the master workbook {campaign.workbook} of campaign {campaign.id} cannot be read: {exc.strerror or exc}"
        ) from exc
    delegations = gather(config, store, campaign, layout, now=now)
    return render_consolidated(
        master,
        layout,
        delegations,
        language=chosen,
        tz=config.secretariat.tz,
        now=now,
        source=campaign.workbook.name,
    )


def render_consolidated(
    master: bytes,
    layout: MasterLayout,
    delegations: Sequence[DelegationSummary],
    *,
    language: str,
    tz: ZoneInfo,
    now: datetime | None = None,
    source: str = "master workbook",
) -> bytes:
    """Pure: the consolidated workbook made from the master's bytes and the gathered delegations.

    Times are shown in ``tz`` (the secretariat's), as text."""
    from openpyxl import load_workbook

    labels = _LABELS[language]
    try:
        book = load_workbook(io.BytesIO(master))
    except Exception as exc:  # openpyxl signals a malformed file with many exception types
        raise WorkbookError(f"{source} cannot be opened to consolidate: {type(exc).__name__}: {exc}") from exc
    if layout.sheet not in book.sheetnames:
        raise WorkbookError(f"workbook {source} has no sheet {layout.sheet!r}; read its layout again")
    _drop_fingerprint(book)
    sheet = book[layout.sheet]
    book.active = book.sheetnames.index(layout.sheet)

    _answer_columns(sheet, layout, delegations, source)
    _summary_sheet(book.create_sheet(_free_title(book, labels["summary"])), delegations, labels, tz)
    key_header = layout.headers[layout.key_col - 1] if layout.key_col <= len(layout.headers) else labels["key"]
    _changes_sheet(book.create_sheet(_free_title(book, labels["changes"])), delegations, labels, tz, key_header)

    if now is not None:
        book.properties.modified = now.astimezone(UTC).replace(tzinfo=None)
    return _save(book)


def _drop_fingerprint(book: Any) -> None:
    """A master made from a returned copy may carry a fingerprint: the consolidated plan belongs to no delegation."""
    if FINGERPRINT_SHEET in book.sheetnames:
        del book[FINGERPRINT_SHEET]
    properties = book.custom_doc_props
    properties.props = [prop for prop in properties.props if prop.name != FINGERPRINT_PROPERTY]


def _last_used_column(sheet: Any, layout: MasterLayout) -> int:
    """The rightmost column holding a value or a merged range (cells only formatted do not count)."""
    last = max(len(layout.headers), layout.key_col, layout.fill_col)
    # The cell dictionary, not iter_rows: iterating would create every empty cell of the used range.
    for cell in sheet._cells.values():
        if cell.column > last and cell.value is not None:
            last = cell.column
    for merged in sheet.merged_cells.ranges:
        last = max(last, merged.max_col)
    return int(last)


def _answer_columns(sheet: Any, layout: MasterLayout, delegations: Sequence[DelegationSummary], source: str) -> None:
    from openpyxl.styles import Alignment, Border, Font, PatternFill, Side
    from openpyxl.utils import get_column_letter

    first = _last_used_column(sheet, layout) + 1
    if first + len(delegations) - 1 > MAX_COLUMNS:
        raise WorkbookError(
            f"{source}: {len(delegations)} delegation columns after column {first - 1} exceed Excel's "
            f"{MAX_COLUMNS} columns"
        )
    side = Side(style="thin", color=_BORDER_COLOR)
    border = Border(left=side, right=side, top=side, bottom=side)
    header_row = layout.header_row
    # One cell is styled through openpyxl's API; the others copy its style
    # array, which costs a fraction of restyling 200,000 cells one by one.
    answer_style: Any = None
    header_styles: dict[bool, Any] = {}
    for offset, delegation in enumerate(delegations):
        column = first + offset
        sheet.column_dimensions[get_column_letter(column)].width = DELEGATION_COLUMN_WIDTH
        complete = delegation.state is DelegationState.COMPLETE
        header = sheet.cell(row=header_row, column=column)
        if complete in header_styles:
            header._style = copy(header_styles[complete])
        else:
            header.font = Font(bold=True)
            header.fill = PatternFill("solid", fgColor=_COMPLETE_COLOR if complete else _HEADER_COLOR)
            header.border = border
            header.alignment = Alignment(wrap_text=True, vertical="center", horizontal="center")
            header_styles[complete] = copy(header._style)
        _put_text(header, delegation.name)
        answers = delegation.answers
        for row in layout.rows:
            cell = sheet.cell(row=row.row, column=column)
            if answer_style is None:
                cell.border = border
                cell.alignment = Alignment(wrap_text=True, vertical="top")
                answer_style = copy(cell._style)
            else:
                cell._style = copy(answer_style)
            value = answers.get(row.key)
            if value:
                _put_text(cell, value)
    sheet.freeze_panes = sheet.cell(row=header_row + 1, column=layout.key_col + 1).coordinate


def _local_time(moment: datetime | None, tz: ZoneInfo) -> str:
    return moment.astimezone(tz).strftime(TIME_FORMAT) if moment else ""


def _summary_sheet(
    sheet: Any, delegations: Sequence[DelegationSummary], labels: Mapping[str, str], tz: ZoneInfo
) -> None:
    columns = (
        (labels["id"], 10, False),
        (labels["delegation"], 32, True),
        (labels["state"], 14, False),
        (labels["answered"], 13, False),
        (labels["total"], 9, False),
        (labels["last_reply"], 18, False),
        (labels["overdue"], 10, False),
        (labels["changes_count"], 16, False),
        # Up to every key of the plan: on one line, or a plan of 200 actions would make rows metres tall.
        (labels["missing"], 60, False),
    )
    rows: list[tuple[str | int, ...]] = []
    for d in delegations:
        overdue = "" if d.overdue is None else labels["yes" if d.overdue else "no"]
        rows.append(
            (
                d.id,
                d.name,
                labels[d.state],
                d.filled,
                d.total,
                _local_time(d.last_reply_at, tz),
                overdue,
                len(d.changes),
                ", ".join(d.missing),
            )
        )
    _table(sheet, columns, rows)


def _changes_sheet(
    sheet: Any,
    delegations: Sequence[DelegationSummary],
    labels: Mapping[str, str],
    tz: ZoneInfo,
    key_header: str,
) -> None:
    columns = (
        (labels["id"], 10, False),
        (labels["delegation"], 28, True),
        (key_header or labels["key"], 10, False),
        (labels["change"], 16, False),
        (labels["column"], 22, True),
        (labels["before"], 40, True),
        (labels["after"], 40, True),
        (labels["when"], 18, False),
    )
    rows = [
        (
            d.id,
            d.name,
            change.key,
            labels.get(change.change, change.change),
            change.column,
            change.before,
            change.after,
            _local_time(change.recorded_at, tz),
        )
        for d in delegations
        for change in d.changes
    ]
    _table(sheet, columns, rows)


def _table(sheet: Any, columns: Sequence[tuple[str, int, bool]], rows: Iterable[Sequence[str | int]]) -> None:
    """A plain table: bold tinted header frozen under it, widths, top-aligned text (wrapped where asked), autofilter."""
    from openpyxl.styles import Alignment, Font, PatternFill
    from openpyxl.utils import get_column_letter

    for index, (title, width, _wrap) in enumerate(columns, start=1):
        cell = sheet.cell(row=1, column=index)
        _put_text(cell, title)
        cell.font = Font(bold=True)
        cell.fill = PatternFill("solid", fgColor=_HEADER_COLOR)
        cell.alignment = Alignment(wrap_text=True, vertical="center")
        sheet.column_dimensions[get_column_letter(index)].width = width
    alignments = [Alignment(wrap_text=wrap, vertical="top") for _title, _width, wrap in columns]
    count = 0
    for count, values in enumerate(rows, start=1):
        for index, value in enumerate(values, start=1):
            cell = sheet.cell(row=count + 1, column=index)
            if isinstance(value, int):
                cell.value = value
            elif value:
                _put_text(cell, value)
            cell.alignment = alignments[index - 1]
    sheet.freeze_panes = "A2"
    sheet.auto_filter.ref = f"A1:{get_column_letter(len(columns))}{count + 1}"


def _free_title(book: Any, wanted: str) -> str:
    """``wanted``, or ``wanted (2)``… when the master already has a sheet of that name (Excel ignores case)."""
    taken = {name.casefold() for name in book.sheetnames}
    title, number = wanted, 1
    while title.casefold() in taken:
        number += 1
        title = f"{wanted} ({number})"
    return title


def _save(book: Any) -> bytes:
    # The writer Workbook.save wraps, without its stamping "modified" from the
    # system clock: the caller's ``now`` (or the master's value) stays.
    from openpyxl.writer.excel import ExcelWriter

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, allowZip64=True) as archive:
        ExcelWriter(book, archive).write_data()
    return buffer.getvalue()


# --------------------------------------------------------------------------
# Writing the file
# --------------------------------------------------------------------------


def protected_paths(config: Config) -> dict[Path, str]:
    """The files an output must never replace, each with what it is: masters, the config, the store."""
    out: dict[Path, str] = {}
    for campaign in config.campaigns:
        out.setdefault(campaign.workbook, f"the master workbook of campaign {campaign.id}")
    out.setdefault(config.path, "the configuration file")
    for suffix in ("", "-wal", "-shm", "-journal"):
        out.setdefault(config.store.with_name(config.store.name + suffix), "the tracking store")
    return out


def _same_file(first: Path, second: Path) -> bool:
    if first.resolve() == second.resolve():
        return True
    try:
        return os.path.samefile(first, second)  # hard links
    except OSError:
        return False


def write_consolidated(path: Path, data: bytes, *, config: Config) -> None:
    """Write ``data`` to ``path`` atomically (a temporary file beside it, then a rename).

    Refuses, with a :class:`MailflowError` saying so, to write over a
    campaign's master workbook, the configuration file or the store."""
    for kept, what in protected_paths(config).items():
        if _same_file(path, kept):
            raise MailflowError(f"{path} is {what}; mailflow never writes over it: choose another output path")
    if path.is_dir():
        raise MailflowError(f"{path} is a folder; give the path of the .xlsx file to write")
    folder = path.parent
    if not folder.is_dir():
        raise MailflowError(f"cannot write {path}: the folder {folder} does not exist")
    temporary = folder / f".{path.name}.{secrets.token_hex(6)}.tmp"
    try:
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(descriptor, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise MailflowError(f"cannot write {path}: {exc.strerror or exc}") from exc
