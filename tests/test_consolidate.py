"""The consolidated workbook: every delegation's answers beside the master, a summary, the changes.

A campaign is driven through the real intake on the local maildir twin (the
delegations return the request copies they received, filled with openpyxl);
the unit parts write answers straight into the store. Every workbook made is
read back twice: with openpyxl (what is stored) and with python-calamine (what
a reader that decodes Excel's escapes sees)."""

from __future__ import annotations

import email
import hashlib
import io
import mailbox
import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.policy import default
from pathlib import Path
from typing import Any

import openpyxl
import pytest
import python_calamine

from mailflow.config import Config, load_config
from mailflow.consolidate import (
    DELEGATION_COLUMN_WIDTH,
    MAX_CELL_CHARS,
    consolidated_workbook,
    excel_text,
    looks_like_formula,
    protected_paths,
    render_consolidated,
    write_consolidated,
)
from mailflow.engine import Engine
from mailflow.errors import MailflowError, UsageError
from mailflow.sample import build_sample_plan
from mailflow.store import DelegationState, Store
from mailflow.workbook import FINGERPRINT_SHEET, RequestWorkbookFactory, make_fingerprint, read_master
from tests.helpers import example_data, fill_workbook, local_engine, reply_to, workbook_of, write_config

CAMPAIGN = "responsible-2017"
OPENS = datetime(2017, 10, 18, 16, 0, tzinfo=UTC)
REPLIED = OPENS + timedelta(days=2, hours=1)  # Friday 2017-10-20 17:00 UTC, 11:00 in Costa Rica
AFTER_DEADLINE = datetime(2017, 10, 25, 12, 0, tzinfo=UTC)
CONTACTS = {
    "HN": "enlace@sre.example.hn",
    "CR": "enlace@pani.example.cr",
    "GT": "enlace@minex.example.gt",
    "MX": "enlace@sre.example.mx",
}
# Formula-shaped answers and DDE payloads: each must stay the literal text.
FORMULA_SHAPED = (
    "=1+1",
    "+57 300",
    "-",
    "@SUM(A1)",
    '=HYPERLINK("http://evil")',
    "=cmd|' /C calc'!A0",
    "@SUM(1+1)*cmd|' /C calc'!A0",
    "-2+3+cmd|' /C calc'!A0",
    "\t=1+1",
    " =1+1",
    "＝1+1",
)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def calamine_sheets(data: bytes) -> dict[str, list[list[Any]]]:
    with python_calamine.CalamineWorkbook.from_filelike(io.BytesIO(data)) as book:
        return {name: book.get_sheet_by_name(name).to_python(skip_empty_area=False) for name in book.sheet_names}


def edit_return(data: bytes, *, action: dict[str, str], added: tuple[str, str]) -> bytes:
    """What an eager delegation also does: rewrite an Action text, add an action of its own at the end."""
    book = openpyxl.load_workbook(io.BytesIO(data))
    sheet = book.worksheets[0]
    last = 0
    for row in sheet.iter_rows(min_row=4):
        key = row[2].value
        if key is None:
            continue
        last = row[0].row
        if str(key) in action:
            row[3].value = action[str(key)]
    sheet.cell(row=last + 1, column=3, value=added[0])
    sheet.cell(row=last + 1, column=4, value=added[1])
    out = io.BytesIO()
    book.save(out)
    return out.getvalue()


@dataclass
class Campaign:
    config: Config
    engine: Engine
    store: Store
    sent: dict[str, dict[str, str]]


@pytest.fixture
def campaign(tmp_path: Path) -> Iterator[Campaign]:
    """Requests sent at opens; four delegations reply through the local inbox and the real intake."""
    engine, clock = local_engine(tmp_path, OPENS)
    config, store = engine.config, engine.store
    outbox = mailbox.Maildir(tmp_path / "out")
    messages = [email.message_from_bytes(outbox.get_bytes(key), policy=default) for key in outbox.iterkeys()]
    requests = {str(m["X-Mailflow-Delegation"]): m for m in messages}
    keys = engine.layout(config.campaign(CAMPAIGN)).keys
    sent = {
        "HN": {key: f"Secretaría de Relaciones Exteriores ({key})" for key in keys},
        "CR": {"1.1": "Patronato Nacional de la Infancia", "2.3": "Dirección General de Migración y Extranjería"},
        "GT": {"1.1": "Procuraduría General de la Nación", "1.2": "Instituto Guatemalteco de Migración"},
        "MX": {"1.1": "+52 55 3686 5100 (SRE)", "3.4": "Línea 1\nLínea 2"},
    }
    inbox = mailbox.Maildir(tmp_path / "in", create=True)
    for delegation, answers in sent.items():
        name, copy = workbook_of(requests[delegation])
        filled = fill_workbook(copy, answers)
        if delegation == "GT":
            filled = edit_return(filled, action={"1.2": "Acción reescrita por Guatemala"}, added=("9.9", "Nueva"))
        inbox.add(reply_to(requests[delegation], sender=CONTACTS[delegation], attachments=[(name, filled)]))
    clock.set(REPLIED)
    report = engine.tick()
    assert report.inbox is not None and report.inbox.by_outcome == {"applied": 4}
    yield Campaign(config, engine, store, sent)
    store.close()


def _consolidate(c: Campaign, **kwargs: Any) -> bytes:
    campaign = c.config.campaign(CAMPAIGN)
    return consolidated_workbook(c.config, c.store, campaign, c.engine.layout(campaign), **kwargs)


# --------------------------------------------------------------------------
# Through the real intake
# --------------------------------------------------------------------------


def test_every_delegation_answers_match_what_it_sent(campaign: Campaign) -> None:
    config = campaign.config
    layout = campaign.engine.layout(config.campaign(CAMPAIGN))
    master = config.campaign(CAMPAIGN).workbook
    before = sha256(master)
    data = _consolidate(campaign, now=REPLIED)
    assert sha256(master) == before  # the master is only read

    names = [d.name for d in config.campaign_delegations(config.campaign(CAMPAIGN))]
    first = len(layout.headers) + 1  # right of the last used column of the master
    book = openpyxl.load_workbook(io.BytesIO(data))
    assert book.sheetnames[0] == layout.sheet and book.active.title == layout.sheet
    sheet = book[layout.sheet]
    headers = [sheet.cell(layout.header_row, first + i).value for i in range(len(names))]
    assert headers == names
    assert sheet.cell(layout.header_row, first + len(names)).value is None
    assert sheet.freeze_panes == sheet.cell(layout.header_row + 1, layout.key_col + 1).coordinate
    letter = openpyxl.utils.get_column_letter(first)
    assert sheet.column_dimensions[letter].width == DELEGATION_COLUMN_WIDTH
    assert sheet[f"{letter}{layout.rows[0].row}"].alignment.wrap_text
    assert sheet.cell(layout.header_row, first).font.bold
    # Honduras answered every row: its header is tinted green, the others keep the header tone.
    tints = {name: sheet.cell(layout.header_row, first + i).fill.fgColor.rgb[-6:] for i, name in enumerate(names)}
    assert tints["Honduras"] == "E2EFDA" and tints["Costa Rica"] == tints["Belize"] == "D9E1F2"
    # The master's title rows and merged cells are kept.
    reference = openpyxl.load_workbook(master)[layout.sheet]
    assert sheet["A1"].value == reference["A1"].value
    assert {str(r) for r in reference.merged_cells.ranges} <= {str(r) for r in sheet.merged_cells.ranges}

    grid = calamine_sheets(data)[layout.sheet]
    for index, name in enumerate(names):
        delegation = config.campaign_delegations(config.campaign(CAMPAIGN))[index]
        sent = campaign.sent.get(delegation.id, {})
        column = first + index
        assert grid[layout.header_row - 1][column - 1] == name
        for row in layout.rows:
            expected = sent.get(row.key, "")
            assert grid[row.row - 1][column - 1] == expected, (delegation.id, row.key)
            stored = sheet.cell(row.row, column)
            assert (stored.value or "") == expected
            if expected:
                assert stored.data_type == "s"
            # The master's own fill column stays as it was: empty.
            assert grid[row.row - 1][layout.fill_col - 1] == ""


def test_summary_rows_match_the_states(campaign: Campaign) -> None:
    data = _consolidate(campaign, now=REPLIED)
    statuses = {d.id: d for d in campaign.engine.status(REPLIED, CAMPAIGN)[0].delegations}
    book = openpyxl.load_workbook(io.BytesIO(data))
    sheet = book["Resumen"]  # the secretariat of the example writes Spanish
    assert sheet.freeze_panes == "A2" and sheet.auto_filter.ref == f"A1:I{len(statuses) + 1}"
    header = [cell.value for cell in sheet[1]]
    assert header[:7] == ["ID", "Delegación", "Estado", "Respondidas", "Total", "Última respuesta", "Vencida"]
    states = {"not_sent": "no enviada", "awaiting": "en espera", "partial": "parcial", "complete": "completa"}
    rows = list(sheet.iter_rows(min_row=2, values_only=True))
    assert [row[0] for row in rows] == list(statuses)
    for row in rows:
        status = statuses[str(row[0])]
        assert row[1] == status.name
        assert row[2] == states[status.state.value]
        assert (row[3], row[4]) == (status.filled, status.total)
        assert row[6] == "no"  # before the deadline
        if status.id in campaign.sent:
            assert row[5] == "2017-10-20 11:00"  # 17:00 UTC, secretariat time (Costa Rica)
        else:
            assert row[5] is None
    assert statuses["HN"].state is DelegationState.COMPLETE
    by_id = {row[0]: row for row in rows}
    assert by_id["HN"][2] == "completa" and by_id["CR"][2] == "parcial" and by_id["CA"][2] == "en espera"
    assert by_id["CR"][3] == 2 and "1.2" in str(by_id["CR"][8])
    assert by_id["GT"][7] == 2  # one row added, one Action changed


def test_changes_sheet_lists_an_added_row_and_a_changed_action(campaign: Campaign) -> None:
    data = _consolidate(campaign)
    rows = calamine_sheets(data)["Cambios"]
    assert rows[0] == ["ID", "Delegación", "Code", "Cambio", "Columna", "Antes", "Después", "Fecha"]
    body = {(row[0], row[2], row[3]): row for row in rows[1:]}
    assert set(body) == {("GT", "9.9", "fila añadida"), ("GT", "1.2", "celda modificada")}
    changed = body[("GT", "1.2", "celda modificada")]
    layout = campaign.engine.layout(campaign.config.campaign(CAMPAIGN))
    original = next(row for row in layout.rows if row.key == "1.2").values[3]
    assert changed[1] == "Guatemala" and changed[4] == "Action"
    assert changed[5] == original and changed[6] == "Acción reescrita por Guatemala"
    assert changed[7] == "2017-10-20 11:00"
    assert "Nueva" in body[("GT", "9.9", "fila añadida")][6]


def test_english_summary_and_overdue_after_the_deadline(campaign: Campaign) -> None:
    data = _consolidate(campaign, language="en", now=AFTER_DEADLINE)
    sheets = calamine_sheets(data)
    assert list(sheets)[1:] == ["Summary", "Changes"]
    summary = {row[0]: row for row in sheets["Summary"][1:]}
    assert sheets["Summary"][0][6] == "Overdue"
    assert summary["HN"][2] == "complete" and summary["HN"][6] == "no"
    assert summary["CR"][2] == "partial" and summary["CR"][6] == "yes"
    assert summary["CA"][2] == "awaiting" and summary["CA"][6] == "yes"
    assert sheets["Changes"][1][3] in ("row added", "cell changed")
    # Without an instant, overdue is not judged.
    undated = calamine_sheets(_consolidate(campaign, language="en"))["Summary"]
    assert {row[6] for row in undated[1:]} == {""}
    with pytest.raises(UsageError, match="language 'fr'"):
        _consolidate(campaign, language="fr")


def test_the_master_file_is_never_written_over(campaign: Campaign, tmp_path: Path) -> None:
    config = campaign.config
    master = config.campaign(CAMPAIGN).workbook
    before = sha256(master)
    data = _consolidate(campaign)
    with pytest.raises(MailflowError, match="master workbook of campaign responsible-2017"):
        write_consolidated(master, data, config=config)
    # Spelled another way, through a symbolic link, or a hard link: still the master.
    odd = master.parent / ".." / master.parent.name / master.name
    with pytest.raises(MailflowError, match="never writes over it"):
        write_consolidated(odd, data, config=config)
    link = tmp_path / "plan-link.xlsx"
    link.symlink_to(master)
    with pytest.raises(MailflowError, match="master workbook"):
        write_consolidated(link, data, config=config)
    hard = tmp_path / "plan-hard.xlsx"
    try:
        os.link(master, hard)
    except OSError:
        pass  # another file system: nothing to check
    else:
        with pytest.raises(MailflowError, match="master workbook"):
            write_consolidated(hard, data, config=config)
    for kept in (config.path, config.store):
        with pytest.raises(MailflowError, match="never writes over it"):
            write_consolidated(kept, data, config=config)
    assert sha256(master) == before
    assert set(protected_paths(config)) >= {master, config.path, config.store}


def test_write_consolidated_replaces_atomically(campaign: Campaign, tmp_path: Path) -> None:
    data = _consolidate(campaign)
    out = tmp_path / "reports" / "plan-consolidado.xlsx"
    with pytest.raises(MailflowError, match="does not exist"):
        write_consolidated(out, data, config=campaign.config)
    out.parent.mkdir()
    out.write_bytes(b"an older consolidation")
    write_consolidated(out, data, config=campaign.config)
    assert out.read_bytes() == data
    assert sorted(p.name for p in out.parent.iterdir()) == ["plan-consolidado.xlsx"]  # no temporary left
    with pytest.raises(MailflowError, match="is a folder"):
        write_consolidated(out.parent, data, config=campaign.config)


# --------------------------------------------------------------------------
# Answers written straight into the store
# --------------------------------------------------------------------------


@pytest.fixture
def bare(tmp_path: Path) -> Iterator[tuple[Config, Store]]:
    data = example_data()
    data["store"] = str(tmp_path / "store.db")
    config = load_config(write_config(tmp_path, data))
    store = Store.open(config.store)
    yield config, store
    store.close()


def _inbound(store: Store) -> int:
    return store.add_inbound(
        folder="INBOX",
        uidvalidity=1,
        uid=1,
        message_id="<reply@example.hn>",
        sha256="0" * 64,
        size=0,
        received_at=REPLIED,
        from_address="enlace@sre.example.hn",
        subject="RE: plan",
        kind="reply",
        campaign=CAMPAIGN,
        delegation="HN",
        evidence="test",
        trusted=True,
        outcome="applied",
        reason=None,
        raw=b"",
    )


def test_formula_shaped_answers_stay_text(bare: tuple[Config, Store]) -> None:
    config, store = bare
    campaign = config.campaign(CAMPAIGN)
    layout = read_master(campaign.workbook, campaign.key_column, campaign.fill_column)
    answers = dict(zip(layout.keys, FORMULA_SHAPED, strict=False))
    plain_key = layout.keys[len(FORMULA_SHAPED)]
    answers[plain_key] = "Ministerio de Salud"
    store.set_answers(
        CAMPAIGN, "HN", answers, source="workbook", inbound_id=_inbound(store), attachment_id=None, at=REPLIED
    )
    # An institution name shaped like a formula, and a change carrying one, are outside text too.
    store.add_row_change(
        CAMPAIGN, "HN", 1, key="=2+2", change="added", column="", before="", after="@SUM(1+1)", at=REPLIED
    )
    evil = {"BZ": "=cmd|' /C calc'!A0"}
    config = _renamed(config, evil)
    data = consolidated_workbook(config, store, campaign, layout)

    first = len(layout.headers) + 1
    column = first + [d.id for d in config.campaign_delegations(campaign)].index("HN")
    rows = {row.key: row.row for row in layout.rows}
    book = openpyxl.load_workbook(io.BytesIO(data))
    sheet = book[layout.sheet]
    grid = calamine_sheets(data)
    for key, value in answers.items():
        cell = sheet.cell(rows[key], column)
        assert cell.data_type == "s" and cell.value == value, key
        assert cell.quotePrefix == (key != plain_key), key  # F2 + Enter in Excel keeps it text
        assert grid[layout.sheet][rows[key] - 1][column - 1] == value
    name = sheet.cell(layout.header_row, first)
    assert name.value == evil["BZ"] and name.data_type == "s"
    assert book["Resumen"]["B2"].value == evil["BZ"] and book["Resumen"]["B2"].data_type == "s"
    change = next(row for row in book["Cambios"].iter_rows(min_row=2) if row[0].value == "HN")
    assert change[2].value == "=2+2" and change[2].data_type == "s"
    assert change[6].value == "@SUM(1+1)" and change[6].data_type == "s"
    assert grid["Cambios"][1][2] == "=2+2"
    # Not one formula anywhere in the file.
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for part in archive.namelist():
            if part.startswith("xl/worksheets/"):
                assert b"<f>" not in archive.read(part) and b"<f " not in archive.read(part), part
        assert "xl/calcChain.xml" not in archive.namelist()


def _renamed(config: Config, names: dict[str, str]) -> Config:
    from dataclasses import replace

    delegations = tuple(replace(d, name=names.get(d.id, d.name)) for d in config.delegations)
    return replace(config, delegations=delegations)


def test_excel_text_keeps_what_readers_show() -> None:
    assert excel_text("Ministerio de Salud") == "Ministerio de Salud"
    assert excel_text("a\r\nb\rc") == "a\nb\nc"
    assert excel_text("a\x0bb") == "a_x000B_b"
    assert excel_text("_x0041_") == "_x005F_x0041_"
    long = excel_text("x" * (MAX_CELL_CHARS + 10))
    assert len(long) == MAX_CELL_CHARS and long.endswith("…")
    for value in FORMULA_SHAPED + ("\rx", "\nx"):
        assert looks_like_formula(excel_text(value)) or value.startswith("\r"), value
    assert looks_like_formula("\r=1") and not looks_like_formula("Ministerio") and not looks_like_formula("")

    # What calamine (like Excel) reads back is the original text.
    from mailflow.consolidate import _put_text

    values = ["_x0041_", "a\x0bb\x01", "x\ry", "\t=1", "tab\tinside", "ñandú ⚖️"]
    book = openpyxl.Workbook()
    for index, value in enumerate(values, start=1):
        _put_text(book.active.cell(index, 1), value)
    out = io.BytesIO()
    book.save(out)
    read = [row[0] for row in calamine_sheets(out.getvalue())[book.active.title]]
    assert read == ["_x0041_", "a\x0bb\x01", "x\ny", "\t=1", "tab\tinside", "ñandú ⚖️"]


def test_a_master_with_a_fingerprint_and_a_summary_sheet_of_its_own(tmp_path: Path) -> None:
    """A master saved from a request copy: its fingerprint is dropped, its own "Resumen" sheet kept."""
    plan = tmp_path / "plan.xlsx"
    plan.write_bytes(build_sample_plan())
    layout = read_master(plan, "Code", "Responsible")
    copy = RequestWorkbookFactory(plan, layout).build(make_fingerprint(b"secret", CAMPAIGN, "HN"))
    book = openpyxl.load_workbook(io.BytesIO(copy))
    book.create_sheet("resumen")["A1"] = "notes of the secretariat"
    out = io.BytesIO()
    book.save(out)
    from zoneinfo import ZoneInfo

    data = render_consolidated(out.getvalue(), layout, [], language="es", tz=ZoneInfo("America/Costa_Rica"))
    result = openpyxl.load_workbook(io.BytesIO(data))
    assert FINGERPRINT_SHEET not in result.sheetnames
    assert result.sheetnames == [layout.sheet, "resumen", "Resumen (2)", "Cambios"]
    assert result["resumen"]["A1"].value == "notes of the secretariat"
    assert all(prop.name != "mailflow_fingerprint" for prop in result.custom_doc_props.props)
