"""Reading returned workbooks: formats, moved and translated layouts, answers, and hostile files.

Workbooks are generated here (openpyxl, or zip packages written by hand when
the point is a malformed or hostile part); the .xls and .ods fixtures under
tests/fixtures/workbooks/ come from make_fixtures.py there. Files that would
crash python-calamine itself if a guard failed are read in a child process,
so a regression fails one test instead of killing the run."""

from __future__ import annotations

import copy
import io
import json
import random
import struct
import subprocess
import sys
import time
import tracemalloc
import zipfile
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import openpyxl
import pytest
from openpyxl.worksheet.worksheet import Worksheet

import mailflow.returns as returns_module
import mailflow.workbook as workbook_module
from mailflow.returns import (
    STATUS_IGNORED,
    STATUS_PARSED,
    STATUS_REJECTED,
    STATUS_UNREADABLE,
    ReturnLimits,
    ReturnReading,
    RowChange,
    is_answer,
    preflight,
    read_return,
    sniff_format,
)
from mailflow.sample import build_sample_plan
from mailflow.workbook import (
    MasterLayout,
    PlanRow,
    RequestWorkbookFactory,
    make_fingerprint,
    parse_workbook,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "workbooks"
SECRET = b"technical-secretariat-secret"
SAMPLE = build_sample_plan()
LAYOUT = parse_workbook(SAMPLE, "Code", "Responsible")
KEYS = tuple(f"{line}.{action}" for line in range(1, 6) for action in range(1, 9))
ROW_OF = {row.key: row.row for row in LAYOUT.rows}
FILL_COL = LAYOUT.fill_col  # 7 (G)
KEY_COL = LAYOUT.key_col  # 3 (C)
ALL_ANSWERED = {key: f"Institution {key}" for key in KEYS}
STATUSES = {STATUS_PARSED, STATUS_UNREADABLE, STATUS_REJECTED, STATUS_IGNORED}


def edit(
    data: bytes, change: Callable[[Worksheet], None] | None = None, *, answers: Mapping[str, object] = ALL_ANSWERED
) -> bytes:
    """The sample as a delegation returns it: ``answers`` written in the Responsible column, then ``change``."""
    book = openpyxl.load_workbook(io.BytesIO(data))
    sheet = book.active
    assert sheet is not None
    for key, value in answers.items():
        sheet.cell(row=ROW_OF[key], column=FILL_COL, value=value)
    if change is not None:
        change(sheet)
    buffer = io.BytesIO()
    book.save(buffer)
    return buffer.getvalue()


def read(data: bytes, name: str = "Plan.xlsx", layout: MasterLayout = LAYOUT, **limits: int) -> ReturnReading:
    return read_return(data, name, layout, "Code", "Responsible", ReturnLimits(**limits))


def zip_package(members: Mapping[str, bytes | str], *, compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return buffer.getvalue()


MAIN_NS = "http://schemas.openxmlformats.org/spreadsheetml/2006/main"
REL_NS = "http://schemas.openxmlformats.org/officeDocument/2006/relationships"
PKG_REL_NS = "http://schemas.openxmlformats.org/package/2006/relationships"


def xlsx_package(sheets: Sequence[tuple[str, str]], extra: Mapping[str, bytes | str] | None = None) -> bytes:
    """A minimal .xlsx written by hand: ``sheets`` as (name, sheetData inner XML or a whole part)."""
    content_types = (
        '<?xml version="1.0" encoding="UTF-8"?>'
        '<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
        '<Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
        '<Default Extension="xml" ContentType="application/xml"/>'
        '<Override PartName="/xl/workbook.xml" '
        'ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.sheet.main+xml"/></Types>'
    )
    root_rels = (
        f'<?xml version="1.0" encoding="UTF-8"?><Relationships xmlns="{PKG_REL_NS}">'
        f'<Relationship Id="rId1" Type="{REL_NS}/officeDocument" Target="xl/workbook.xml"/></Relationships>'
    )
    entries = "".join(
        f'<sheet name="{name}" sheetId="{index}" r:id="rId{index}"/>' for index, (name, _) in enumerate(sheets, 1)
    )
    workbook = (
        f'<?xml version="1.0" encoding="UTF-8"?><workbook xmlns="{MAIN_NS}" xmlns:r="{REL_NS}">'
        f"<sheets>{entries}</sheets></workbook>"
    )
    rels = "".join(
        f'<Relationship Id="rId{index}" Type="{REL_NS}/worksheet" Target="worksheets/sheet{index}.xml"/>'
        for index in range(1, len(sheets) + 1)
    )
    members: dict[str, bytes | str] = {
        "[Content_Types].xml": content_types,
        "_rels/.rels": root_rels,
        "xl/workbook.xml": workbook,
        "xl/_rels/workbook.xml.rels": f'<Relationships xmlns="{PKG_REL_NS}">{rels}</Relationships>',
    }
    for index, (_, body) in enumerate(sheets, 1):
        part = body if body.startswith("<?xml") else sheet_part(body)
        members[f"xl/worksheets/sheet{index}.xml"] = part
    members.update(extra or {})
    return zip_package(members)


def sheet_part(sheet_data: str, dimension: str | None = None) -> str:
    dim = f'<dimension ref="{dimension}"/>' if dimension else ""
    return (
        f'<?xml version="1.0" encoding="UTF-8"?><worksheet xmlns="{MAIN_NS}">{dim}'
        f"<sheetData>{sheet_data}</sheetData></worksheet>"
    )


def cell(ref: str, text: str) -> str:
    return f'<c r="{ref}" t="inlineStr"><is><t>{text}</t></is></c>'


def rows_xml(rows: Iterable[Sequence[str]]) -> str:
    out = []
    for number, values in enumerate(rows, 1):
        cells = "".join(cell(f"{chr(65 + col)}{number}", value) for col, value in enumerate(values) if value)
        out.append(f'<row r="{number}">{cells}</row>')
    return "".join(out)


def small_layout(keys: Sequence[str]) -> MasterLayout:
    """The layout of a two-column master (Code, Responsible) with ``keys`` from row 2."""
    rows = tuple(PlanRow(key=key, row=index, fill="", label="", values=(key, "")) for index, key in enumerate(keys, 2))
    return MasterLayout(sheet="Plan", header_row=1, key_col=1, fill_col=2, headers=("Code", "Responsible"), rows=rows)


# --------------------------------------------------------------------------
# Answers
# --------------------------------------------------------------------------


def test_sample_filled_completely() -> None:
    reading = read(edit(SAMPLE))
    assert (reading.status, reading.reason, reading.format) == (STATUS_PARSED, None, "xlsx")
    assert reading.answers == ALL_ANSWERED
    assert list(reading.answers) == list(KEYS)  # master order
    assert (reading.missing, reading.added, reading.deleted, reading.changed) == ((), (), (), ())
    assert reading.sheet == "Strategic Plan"


def test_partially_filled_lists_the_missing_keys_in_master_order() -> None:
    answers = {key: value for key, value in ALL_ANSWERED.items() if key not in ("4.1", "2.3", "5.8")}
    reading = read(edit(SAMPLE, answers=answers))
    assert reading.status == STATUS_PARSED
    assert reading.answers == answers
    assert reading.missing == ("2.3", "4.1", "5.8")


def test_an_untouched_copy_is_parsed_with_everything_missing() -> None:
    reading = read(SAMPLE)
    assert (reading.status, reading.answers, reading.missing) == (STATUS_PARSED, {}, KEYS)


def test_empty_whitespace_and_dash_answers_are_missing() -> None:
    answers = {"1.1": "", "1.2": "   ", "1.3": "-", "1.4": "—", "1.5": " – ", "1.6": "n/a", "1.7": "-DGME", "1.8": 0}
    reading = read(edit(SAMPLE, answers=answers))
    assert reading.answers == {"1.6": "n/a", "1.7": "-DGME", "1.8": "0"}
    assert reading.missing[:5] == ("1.1", "1.2", "1.3", "1.4", "1.5")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("", False), ("  \n", False), ("-", False), ("—", False), ("- -", False), ("n/a", True), ("MINREX", True)],
)
def test_is_answer(text: str, expected: bool) -> None:
    assert is_answer(text) is expected


def test_answers_are_trimmed_but_keep_their_lines() -> None:
    reading = read(edit(SAMPLE, answers={"1.1": "  MINREX\nDGME  "}))
    assert reading.answers == {"1.1": "MINREX\nDGME"}


# --------------------------------------------------------------------------
# Where the delegation moved things
# --------------------------------------------------------------------------

SPANISH = {
    "Strategic line": "Línea estratégica",
    "Specific objective": "Objetivo específico",
    "Code": "Código",
    "Action": "Acción",
    "Indicator": "Indicador",
    "Timeframe": "Plazo",
    "Responsible": "Responsable",
    "Observations": "Observaciones",
}


def test_headers_translated_to_spanish() -> None:
    def translate(sheet: Worksheet) -> None:
        for header in sheet[LAYOUT.header_row]:
            header.value = SPANISH.get(str(header.value), header.value)

    reading = read(edit(SAMPLE, translate))
    assert reading.status == STATUS_PARSED
    assert reading.answers == ALL_ANSWERED
    assert reading.changed == ()  # "Acción" is compared with "Action", and nothing changed


def test_columns_reordered() -> None:
    source = openpyxl.load_workbook(io.BytesIO(edit(SAMPLE))).active
    assert source is not None
    order = [7, 3, 4, 1, 2, 8, 6, 5]  # Responsible first, Code second, ...
    book = openpyxl.Workbook()
    sheet = book.active
    assert sheet is not None
    for row in source.iter_rows(values_only=True):
        sheet.append([row[col - 1] for col in order])
    buffer = io.BytesIO()
    book.save(buffer)
    reading = read(buffer.getvalue())
    assert reading.status == STATUS_PARSED
    assert reading.answers == ALL_ANSWERED
    assert reading.changed == ()


def test_rows_inserted_above_the_header() -> None:
    def insert(sheet: Worksheet) -> None:
        sheet.insert_rows(1, 6)
        sheet["A1"] = "Ministerio de Relaciones Exteriores — respuesta de Honduras"
        sheet["A3"] = "Fecha: 21/10/2017"

    reading = read(edit(SAMPLE, insert))
    assert reading.answers == ALL_ANSWERED
    assert reading.added == reading.deleted == ()


def test_sheet_renamed_and_moved_to_second_position() -> None:
    def rename(sheet: Worksheet) -> None:
        sheet.title = "Plan de acción HN"
        book = sheet.parent
        notes = book.create_sheet("Instrucciones", 0)
        notes["A1"] = "Complete la columna Responsable"
        book.active = 0

    reading = read(edit(SAMPLE, rename))
    assert (reading.status, reading.sheet) == (STATUS_PARSED, "Plan de acción HN")
    assert reading.answers == ALL_ANSWERED


def test_a_hidden_sheet_is_read_when_no_visible_one_holds_the_plan() -> None:
    def hide(sheet: Worksheet) -> None:
        book = sheet.parent
        cover = book.create_sheet("Portada", 0)
        cover["A1"] = "Respuesta de Honduras"
        book.active = 0
        sheet.sheet_state = "hidden"

    reading = read(edit(SAMPLE, hide))
    assert (reading.status, reading.sheet) == (STATUS_PARSED, "Strategic Plan")
    assert reading.answers == ALL_ANSWERED


def test_a_merged_responsible_cell_counts_for_every_row_it_spans() -> None:
    answers = {key: value for key, value in ALL_ANSWERED.items() if key not in ("3.2", "3.3", "3.4")}
    answers["3.2"] = "Ministry of Foreign Affairs"

    def merge(sheet: Worksheet) -> None:
        sheet.merge_cells(start_row=ROW_OF["3.2"], end_row=ROW_OF["3.4"], start_column=FILL_COL, end_column=FILL_COL)

    reading = read(edit(SAMPLE, merge, answers=answers))
    assert [reading.answers[key] for key in ("3.1", "3.2", "3.3", "3.4", "3.5")] == [
        "Institution 3.1",
        "Ministry of Foreign Affairs",
        "Ministry of Foreign Affairs",
        "Ministry of Foreign Affairs",
        "Institution 3.5",
    ]
    assert reading.missing == ()


def test_keys_typed_as_numbers() -> None:
    def numbers(sheet: Worksheet) -> None:
        for key, row in ROW_OF.items():
            sheet.cell(row=row, column=KEY_COL, value=float(key))

    reading = read(edit(SAMPLE, numbers))
    assert reading.answers == ALL_ANSWERED


def test_keys_are_compared_as_written() -> None:
    layout = small_layout(["1.1", "1.10", "2"])
    data = xlsx_package(
        [
            (
                "Plan",
                rows_xml([("Code", "Responsible"), ("1.10", "Ten")])
                + '<row r="3"><c r="A3"><v>1.1</v></c>'
                + cell("B3", "One")
                + '</row><row r="4"><c r="A4"><v>2</v></c>'
                + cell("B4", "Two")
                + "</row>",
            )
        ]
    )
    reading = read(data, layout=layout)
    assert reading.answers == {"1.1": "One", "1.10": "Ten", "2": "Two"}


# --------------------------------------------------------------------------
# Rows added, deleted, changed
# --------------------------------------------------------------------------


def test_rows_added_deleted_and_changed_outside_the_fill_column() -> None:
    action_col = LAYOUT.headers.index("Action") + 1
    before = next(row for row in LAYOUT.rows if row.key == "1.2").values[action_col - 1]

    def change(sheet: Worksheet) -> None:
        sheet.cell(row=ROW_OF["1.2"], column=action_col, value="Adopt a single national protocol")
        sheet.cell(row=ROW_OF["1.3"], column=action_col, value="  " + str(sheet.cell(ROW_OF["1.3"], action_col).value))
        sheet.append([None, None, "6.1", "Train consular staff", None, "2018", "Cancillería"])
        sheet.delete_rows(ROW_OF["2.3"])

    answers = {key: value for key, value in ALL_ANSWERED.items() if key != "2.3"}
    reading = read(edit(SAMPLE, change, answers=answers))
    assert reading.status == STATUS_PARSED
    assert reading.answers == answers
    assert reading.missing == ("2.3",)
    assert reading.deleted == (RowChange("2.3", 0, "", next(r.label for r in LAYOUT.rows if r.key == "2.3"), ""),)
    [added] = reading.added
    assert (added.key, added.column, added.before) == ("6.1", "", "")
    assert "Train consular staff" in added.after and "Cancillería" in added.after
    assert added.row == max(ROW_OF.values())  # appended after the last row, one row was deleted above
    # Only the real change: re-spacing an action's text is not one.
    assert reading.changed == (RowChange("1.2", ROW_OF["1.2"], "Action", before, "Adopt a single national protocol"),)


def _spy_on_plan_order(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """What each call of ``_in_plan_order`` answered (whether the column-by-column comparison was taken)."""
    answered: list[bool] = []
    real = returns_module._in_plan_order

    def spy(row_keys: Sequence[str], layout: MasterLayout) -> bool:
        answered.append(real(row_keys, layout))
        return answered[-1]

    monkeypatch.setattr(returns_module, "_in_plan_order", spy)
    return answered


def test_a_return_in_plan_order_reads_the_same_column_by_column_as_row_by_row(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def change(sheet: Worksheet) -> None:
        action = sheet.cell(row=ROW_OF["2.1"], column=4)
        action.value = f"  {action.value}\n"  # whitespace only: not a change
        sheet.cell(row=ROW_OF["1.2"], column=4, value="Another action")
        sheet.cell(row=ROW_OF["3.3"], column=6, value=2024)  # a number where the master has text
        sheet.cell(row=ROW_OF["4.4"], column=8, value="A note")
        sheet.cell(row=ROW_OF["4.4"], column=5, value="Another indicator")
        sheet.cell(row=ROW_OF["5.5"], column=KEY_COL, value=" 5.5 ")  # still the plan's key

    answers: dict[str, object] = {**ALL_ANSWERED, "1.1": "—", "1.3": "  ", "2.2": "- -", "3.1": "n/a", "4.1": 12}
    del answers["5.1"]
    data = edit(SAMPLE, change, answers=answers)
    in_order = _spy_on_plan_order(monkeypatch)
    by_column = read(data)
    monkeypatch.setattr(returns_module, "_in_plan_order", lambda row_keys, layout: False)
    by_row = read(data)
    assert in_order == [True]
    assert by_column == by_row
    assert list(by_column.answers) == [key for key in KEYS if key not in ("1.1", "1.3", "2.2", "5.1")]
    assert by_column.answers["4.1"] == "12" and by_column.missing == ("1.1", "1.3", "2.2", "5.1")
    assert [(c.key, c.column, c.after) for c in by_column.changed] == [
        ("1.2", "Action", "Another action"),
        ("3.3", "Timeframe", "2024"),
        ("4.4", "Indicator", "Another indicator"),
        ("4.4", "Observations", "A note"),
    ]
    assert not by_column.added and not by_column.deleted


def test_column_by_column_and_row_by_row_agree_on_random_returns_in_plan_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    headers = ("Line", "Code", "Action", "Responsible", "Note")
    keys = tuple(f"{line}.{action}" for line in range(1, 5) for action in range(1, 6))
    rows = tuple(
        PlanRow(
            key, number, "", f"Action {key}", (f"Line {key[0]}", key, f"Action {key}", "", "x" if number % 3 else "")
        )
        for number, key in enumerate(keys, 2)
    )
    layout = MasterLayout("Plan", 1, 2, 4, headers, rows)
    generator = random.Random(20170)
    odd_values: list[object] = [None, "", "  ", "-", "—", "n/a", 0, 1.5, 2.0, True, " padded ", "Other"]
    cases: list[returns_module._Plan] = []
    for _ in range(300):
        grid: list[list[object]] = [list(headers)]
        for row in rows:
            if generator.random() < 0.1:
                grid.append([generator.choice(odd_values), None, "banner", None, None])  # a row without a key
            cells: list[object] = list(row.values)
            cells[3] = generator.choice([f"Institution {row.key}", *odd_values])
            for column in (0, 2, 4):
                if generator.random() < 0.15:
                    cells[column] = generator.choice([*odd_values, f" {cells[column]} ", f"{cells[column]}\n"])
            if generator.random() < 0.1:
                cells[1] = f" {row.key} "
            grid.append(cells[: generator.choice([5, 5, 5, 4])])  # calamine's rows can be short
        header = workbook_module._HeaderMatch(0, 1, 3, headers)
        cases.append(returns_module._Plan("Plan", grid, (generator.randrange(3), 0), header))  # type: ignore[arg-type]

    def readings() -> list[ReturnReading]:
        return [returns_module._compare(copy.deepcopy(case), layout, "xlsx", None) for case in cases]

    taken = _spy_on_plan_order(monkeypatch)
    by_column = readings()
    monkeypatch.setattr(returns_module, "_in_plan_order", lambda row_keys, layout: False)
    assert by_column == readings()
    assert all(taken) and len(taken) == len(cases)
    assert sum(bool(reading.changed) for reading in by_column) > 100


def test_a_changed_translated_column_is_named_as_in_the_master() -> None:
    def change(sheet: Worksheet) -> None:
        for header in sheet[LAYOUT.header_row]:
            header.value = SPANISH.get(str(header.value), header.value)
        sheet.cell(row=ROW_OF["5.1"], column=LAYOUT.headers.index("Timeframe") + 1, value="2019")

    [changed] = read(edit(SAMPLE, change)).changed
    assert (changed.key, changed.column, changed.after) == ("5.1", "Timeframe", "2019")


def test_cells_without_references_are_placed_by_counting() -> None:
    # Some writers leave out r="A1": rows and cells then follow one another.
    # Such a sheet takes the exact count instead of the fast scan.
    def bare(text: str) -> str:
        return f'<c t="inlineStr"><is><t>{text}</t></is></c>'

    pairs = (("Code", "Responsible"), ("1.1", "DGME"), ("1.2", "INM"))
    body = "".join(f"<row>{bare(code)}{bare(answer)}</row>" for code, answer in pairs)
    reading = read(xlsx_package([("Plan", body)]), layout=small_layout(["1.1", "1.2"]))
    assert (reading.status, reading.answers) == (STATUS_PARSED, {"1.1": "DGME", "1.2": "INM"})


def test_a_wide_sheet_is_counted_exactly_and_read() -> None:
    body = rows_xml([("Code", "Responsible"), ("1.1", "DGME")]) + f'<row r="3">{cell("AB3", "nota al margen")}</row>'
    reading = read(xlsx_package([("Plan", body)]), layout=small_layout(["1.1"]))
    assert (reading.status, reading.answers) == (STATUS_PARSED, {"1.1": "DGME"})


def test_a_sheet_with_the_headers_but_other_codes_is_not_ours() -> None:
    data = xlsx_package([("Plan", rows_xml([("Code", "Responsible"), ("A", "x"), ("B", "y")]))])
    reading = read(data)
    assert reading.status == STATUS_REJECTED
    assert reading.reason is not None and reading.reason.startswith("it is not the campaign's workbook")
    assert "'A'" not in reading.reason and "A, B" in reading.reason


def test_a_workbook_without_the_columns_is_not_ours() -> None:
    data = xlsx_package([("Budget", rows_xml([("Item", "Amount"), ("Travel", "100")]))])
    reading = read(data)
    assert reading.status == STATUS_REJECTED
    assert reading.reason is not None
    assert reading.reason.startswith("it is not the campaign's workbook: no column 'Code' and no column 'Responsible'")
    assert "please" in reading.reason


# --------------------------------------------------------------------------
# Formats
# --------------------------------------------------------------------------


def with_vba(data: bytes) -> bytes:
    """``data`` made an .xlsm: a vbaProject.bin part, its relationship and the macro-enabled content type."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as source, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            content = source.read(info)
            if info.filename == "[Content_Types].xml":
                content = content.replace(b"sheet.main+xml", b"sheet.macroEnabled.main+xml").replace(
                    b"</Types>",
                    b'<Default Extension="bin" ContentType="application/vnd.ms-office.vbaProject"/></Types>',
                )
            elif info.filename == "xl/_rels/workbook.xml.rels":
                content = content.replace(
                    b"</Relationships>",
                    b'<Relationship Id="rIdVba" '
                    b'Type="http://schemas.microsoft.com/office/2006/relationships/vbaProject" '
                    b'Target="vbaProject.bin"/></Relationships>',
                )
            target.writestr(info.filename, content)
        # Not a real VBA project: bytes that must never be parsed as a sheet nor run.
        target.writestr(
            "xl/vbaProject.bin", b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(range(256)) * 64 + b"<c r='XFD1'>"
        )
    return out.getvalue()


def test_xlsm_is_read_and_its_macros_left_alone() -> None:
    data = with_vba(edit(SAMPLE))
    assert sniff_format(data, "Plan.xlsm") == "xlsm"
    reading = read(data, "Plan.xlsm")
    assert (reading.status, reading.format) == (STATUS_PARSED, "xlsm")
    assert reading.answers == ALL_ANSWERED


def test_xls_fixture() -> None:
    data = (FIXTURES / "plan.xls").read_bytes()
    assert sniff_format(data, "plan.xls") == "xls"
    reading = read(data, "plan.xls")
    assert (reading.status, reading.format, reading.sheet) == (STATUS_PARSED, "xls", "Strategic Plan")
    assert reading.answers["2.1"] == reading.answers["2.2"] == reading.answers["2.3"] == "Ministry of Foreign Affairs"
    assert reading.answers["2.4"] == "Institution 2.4"
    assert (reading.missing, reading.changed, reading.added, reading.deleted) == ((), (), (), ())
    # The hidden "mailflow" sheet survives a conversion to .xls.
    assert reading.fingerprint == make_fingerprint(SECRET, "responsible-2017", "HN")


def test_xls_bytes_named_xlsx_are_read_as_xls() -> None:
    reading = read((FIXTURES / "plan.xls").read_bytes(), "Plan.xlsx")
    assert (reading.status, reading.format, len(reading.answers)) == (STATUS_PARSED, "xls", 40)


def test_ods_fixture_with_spanish_headers_and_merged_cells() -> None:
    data = (FIXTURES / "plan.ods").read_bytes()
    assert sniff_format(data, "plan.ods") == "ods"
    reading = read(data, "plan.ods")
    assert (reading.status, reading.format, reading.sheet) == (STATUS_PARSED, "ods", "Plan Estratégico")
    # calamine reports no merged ranges for ODS: they come from content.xml.
    assert {reading.answers[key] for key in ("3.1", "3.2", "3.3")} == {"Ministerio de Relaciones Exteriores"}
    assert reading.answers["3.4"] == "Institution 3.4"
    assert (reading.missing, reading.changed) == ((), ())
    assert reading.fingerprint == make_fingerprint(SECRET, "responsible-2017", "HN")


def test_fingerprint_found_in_a_returned_request_copy(tmp_path: Path) -> None:
    master = tmp_path / "plan.xlsx"
    master.write_bytes(SAMPLE)
    fingerprint = make_fingerprint(SECRET, "responsible-2017", "HN")
    copy = RequestWorkbookFactory(master, LAYOUT).build(fingerprint)
    reading = read(edit(copy), "Plan - Honduras.xlsx")
    assert reading.status == STATUS_PARSED
    assert reading.fingerprint == fingerprint
    assert reading.answers == ALL_ANSWERED
    assert reading.sheet == "Strategic Plan"  # never the hidden fingerprint sheet


def _replace_member(data: bytes, name: str, content: bytes, *, declared: int | None = None) -> bytes:
    """``data`` with member ``name`` holding ``content``; its directory entries then claim ``declared`` bytes."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as source, zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            target.writestr(info.filename, content if info.filename == name else source.read(info.filename))
    out = bytearray(buffer.getvalue())
    if declared is not None:
        with zipfile.ZipFile(io.BytesIO(bytes(out))) as rebuilt:
            struct.pack_into("<I", out, rebuilt.getinfo(name).header_offset + 22, declared)
        position = struct.unpack_from("<I", out, len(out) - 22 + 16)[0]  # start of the central directory
        while out[position : position + 4] == b"PK\x01\x02":
            name_length, extra_length, comment_length = struct.unpack_from("<HHH", out, position + 28)
            if out[position + 46 : position + 46 + name_length] == name.encode():
                struct.pack_into("<I", out, position + 24, declared)
            position += 46 + name_length + extra_length + comment_length
    return bytes(out)


def test_parts_no_reader_opens_are_left_compressed_and_nothing_in_them_changes_the_reading(tmp_path: Path) -> None:
    """Preflight skips the members calamine never opens; this shows, part by part, that it never does.

    Each skipped member of a returned request copy (document properties, theme, the fill column's
    comment and its drawing, an image, printer settings) is replaced by garbage, by an entity bomb
    and by a decompression bomb that lies about its size: the reading stays the same. A calamine that
    started opening one of them would fail here."""
    from mailflow.returns import _OpenZip, _ZipScan

    master = tmp_path / "plan.xlsx"
    master.write_bytes(SAMPLE)
    fingerprint = make_fingerprint(SECRET, "responsible-2017", "HN")
    returned = edit(RequestWorkbookFactory(master, LAYOUT).build(fingerprint))
    for extra in ("xl/media/image1.png", "xl/printerSettings/printerSettings1.bin"):
        with zipfile.ZipFile(io.BytesIO(returned)) as archive:
            members = {info.filename: archive.read(info.filename) for info in archive.infolist()}
        members[extra] = b"\x89PNG\r\n\x1a\n" + bytes(200)
        returned = zip_package(members)
    expected = read(returned)
    assert expected.status == STATUS_PARSED and expected.answers == ALL_ANSWERED
    assert expected.fingerprint == fingerprint
    with _OpenZip(returned) as opened:
        scan = _ZipScan(returned, ReturnLimits(), opened)
        checked = scan._parts_opened()
        assert checked is not None
        skipped = sorted(m.info.filename for m in scan.members if m.info.filename.lower() not in checked)
    assert {
        "docProps/app.xml",
        "docProps/core.xml",
        "xl/theme/theme1.xml",
        "xl/media/image1.png",
        "xl/printerSettings/printerSettings1.bin",
    } <= set(skipped)
    assert any(name.startswith("xl/comments") for name in skipped)
    assert any(name.endswith(".vml") for name in skipped)
    laughs = b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;">]><x>&b;</x>'
    for name in skipped:
        for poisoned in (
            _replace_member(returned, name, b"\x00\xff not what it claims"),
            _replace_member(returned, name, laughs),
            _replace_member(returned, name, bytes(20 * 1024 * 1024), declared=100),
        ):
            reading = read(poisoned)
            assert (reading.status, reading.answers, reading.fingerprint) == (
                STATUS_PARSED,
                expected.answers,
                fingerprint,
            ), name
    # A member every reader opens is still checked: the same lying bomb in the sheet is refused.
    refused = read(_replace_member(returned, "xl/worksheets/sheet1.xml", bytes(20 * 1024 * 1024), declared=100))
    assert refused.status == STATUS_REJECTED and "decompression bomb" in (refused.reason or "")


def test_the_shared_strings_count_is_checked_where_a_reader_may_take_the_strings_from() -> None:
    """Sheets alone skip the shared-strings check; calamine's fixed name (any case) and any part a
    workbook relationship calls shared strings keep it, even when they are sheets too."""
    from mailflow.returns import _OpenZip, _ZipScan

    huge = f'<?xml version="1.0"?><sst xmlns="{MAIN_NS}" uniqueCount="2000000000"><si><t>x</t></si></sst>'
    plan = ("Plan", rows_xml([("Code", "Responsible"), ("1.1", "DGM")]))
    strings_rel = f'<Relationship Id="rId9" Type="{REL_NS}/sharedStrings" Target="%s"/>'

    def with_rels(*relationships: str) -> str:
        return f'<Relationships xmlns="{PKG_REL_NS}">{"".join(relationships)}</Relationships>'

    sheet_rel = f'<Relationship Id="rId1" Type="{REL_NS}/worksheet" Target="worksheets/sheet1.xml"/>'
    packages = {
        "fixed name": (xlsx_package([plan], {"xl/sharedStrings.xml": huge}), {"xl/sharedStrings.xml"}),
        "named by a relationship": (
            xlsx_package(
                [plan], {"xl/_rels/workbook.xml.rels": with_rels(sheet_rel, strings_rel % "t.xml"), "xl/t.xml": huge}
            ),
            {"xl/t.xml"},
        ),
        "a sheet named by a relationship": (
            xlsx_package(
                [("Plan", huge)],
                {"xl/_rels/workbook.xml.rels": with_rels(sheet_rel, strings_rel % "worksheets/sheet1.xml")},
            ),
            {"xl/worksheets/sheet1.xml"},
        ),
    }
    for label, (data, expected) in packages.items():
        with _OpenZip(data) as opened:
            assert _ZipScan(data, ReturnLimits(), opened)._shared_strings_parts() == expected, label
        refused = read(data)
        assert refused.status == STATUS_UNREADABLE, label
        assert "impossible number of strings" in (refused.reason or ""), label
    # A table in a part that is only a sheet is no table to a reader: that sheet is read, not refused.
    only_a_sheet = xlsx_package([("Plan", plan[1]), ("Notes", huge)])
    with _OpenZip(only_a_sheet) as opened:
        assert _ZipScan(only_a_sheet, ReturnLimits(), opened)._shared_strings_parts() == set()
    assert read(only_a_sheet).status == STATUS_PARSED


def test_a_package_laid_out_unusually_is_checked_whole() -> None:
    """With the workbook somewhere else than xl/workbook.xml, preflight does not guess what is opened."""
    from mailflow.returns import _OpenZip, _ZipScan

    data = edit(SAMPLE)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        members = {info.filename: archive.read(info.filename) for info in archive.infolist()}
    members["_rels/.rels"] = members["_rels/.rels"].replace(b"xl/workbook.xml", b"xl/other.xml")
    unusual = zip_package(members)
    with _OpenZip(unusual) as opened:
        assert _ZipScan(unusual, ReturnLimits(), opened)._parts_opened() is None
    bomb = _replace_member(unusual, "docProps/app.xml", bytes(20 * 1024 * 1024), declared=100)
    assert read(bomb).status == STATUS_REJECTED


# --------------------------------------------------------------------------
# Not workbooks, damaged and encrypted files
# --------------------------------------------------------------------------


def ole_file(streams: Mapping[str, bytes]) -> bytes:
    """A minimal OLE2 (compound file, version 3) holding ``streams``, each stored in regular sectors."""
    sector = 512
    end, free, fat_sector, no_stream = 0xFFFFFFFE, 0xFFFFFFFF, 0xFFFFFFFD, 0xFFFFFFFF
    padded = {name: data.ljust(max(4096, -(-len(data) // sector) * sector), b"\0") for name, data in streams.items()}
    fat = [fat_sector, end]  # sector 0: the FAT, sector 1: the directory
    starts = {}
    for name, data in padded.items():
        count = len(data) // sector
        starts[name] = len(fat)
        fat.extend(range(len(fat) + 1, len(fat) + count))
        fat.append(end)
    assert len(fat) <= 128
    fat += [free] * (128 - len(fat))

    def entry(name: str, kind: int, start: int, size: int, child: int = no_stream, right: int = no_stream) -> bytes:
        encoded = (name + "\0").encode("utf-16-le")
        return (
            encoded.ljust(64, b"\0")
            + struct.pack("<HBB", len(encoded), kind, 1)
            + struct.pack("<III", no_stream, right, child)
            + bytes(16 + 4 + 16)
            + struct.pack("<IQ", start, size)
        )

    names = list(padded)
    directory = entry("Root Entry", 5, end, 0, child=1)
    for index, name in enumerate(names):
        right = index + 2 if index + 1 < len(names) else no_stream
        directory += entry(name, 2, starts[name], len(streams[name]), right=right)
    directory = directory.ljust(-(-len(directory) // sector) * sector, b"\0")
    assert len(directory) == sector, "one directory sector is enough for three streams"
    header = (
        b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
        + bytes(16)
        + struct.pack("<HHHHH", 0x3E, 3, 0xFFFE, 9, 6)
        + bytes(6)
        + struct.pack("<IIIIIIIII", 0, 1, 1, 0, 4096, end, 0, end, 0)
        + struct.pack("<I", 0)
        + struct.pack("<108I", *([free] * 108))
    )
    assert len(header) == sector
    return header + struct.pack("<128I", *fat) + directory + b"".join(padded.values())


def test_an_encrypted_workbook_named_xlsx_is_password_protected() -> None:
    data = ole_file({"EncryptionInfo": b"\x04\x00\x04\x00" + bytes(200), "EncryptedPackage": bytes(5000)})
    assert sniff_format(data, "Plan.xlsx") == "encrypted"
    reading = read(data, "Plan.xlsx")
    assert reading.status == STATUS_UNREADABLE
    assert reading.reason == "the file is password-protected; please send it without a password"


def test_an_ole_file_that_is_not_a_workbook() -> None:
    data = ole_file({"WordDocument": bytes(5000)})
    assert sniff_format(data, "Plan.xlsx") == "unknown"
    assert read(data, "Plan.xlsx").status == STATUS_UNREADABLE
    assert read(data, "Carta.doc").status == STATUS_IGNORED


def test_an_ole_file_with_two_workbook_streams_is_refused() -> None:
    # calamine and olefile could each pick another one: one could hide what the other reads.
    data = ole_file({"Workbook": bytes(5000), "Workbook\0x": bytes(5000)})
    assert sniff_format(data, "Plan.xls") == "xls"
    reading = read(data, "Plan.xls")
    assert reading.status == STATUS_UNREADABLE
    assert reading.reason is not None and "two workbook streams" in reading.reason


def test_a_zip_with_a_second_end_record_is_refused() -> None:
    data = edit(SAMPLE)
    hidden = zip_package({"xl/media/note.bin": b"PK\x05\x06" + bytes(18)}, compression=zipfile.ZIP_STORED)
    with zipfile.ZipFile(io.BytesIO(hidden)) as source:
        smuggled = source.read("xl/media/note.bin")
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as original, zipfile.ZipFile(out, "w") as target:
        for info in original.infolist():
            target.writestr(info, original.read(info))
        target.writestr("xl/media/note.bin", smuggled)
    assert read(out.getvalue()).status == STATUS_UNREADABLE


def test_random_bytes_named_xlsx_are_unreadable() -> None:
    reading = read(random.Random(7).randbytes(5000), "Plan HN.xlsx")
    assert reading.status == STATUS_UNREADABLE
    assert reading.reason == (
        "the file named Plan HN.xlsx is not a spreadsheet (it is damaged or in another format); "
        "please send the workbook saved as .xlsx"
    )


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("Oficio.pdf", b"%PDF-1.7\n1 0 obj << /Type /Catalog >> endobj\n%%EOF\n"),
        ("logo.png", b"\x89PNG\r\n\x1a\n" + bytes(100)),
        ("Carta.docx", zip_package({"word/document.xml": "<w:document/>"})),
        ("firma.p7s", b"0\x82\x05\x00"),
    ],
)
def test_files_that_are_not_workbooks_are_ignored(name: str, data: bytes) -> None:
    reading = read(data, name)
    assert (reading.status, reading.format) == (STATUS_IGNORED, "unknown")
    assert preflight(data, name, ReturnLimits())[0] == STATUS_IGNORED


def test_xlsb_is_named_with_what_to_do() -> None:
    data = zip_package({"[Content_Types].xml": "<Types/>", "xl/workbook.bin": b"\x83\x01\x00"})
    reading = read(data, "Plan.xlsb")
    assert (reading.status, reading.format) == (STATUS_UNREADABLE, "xlsb")
    assert reading.reason is not None and "save it as 'Excel Workbook (*.xlsx)'" in reading.reason


def test_too_large() -> None:
    reading = read(edit(SAMPLE), max_file_bytes=1000)
    assert reading.status == STATUS_REJECTED
    assert reading.reason is not None and reading.reason.startswith("the file is too large")


def test_corruption_never_raises() -> None:
    data = edit(SAMPLE)
    rng = random.Random(20171018)
    seen = set()
    for _ in range(60):
        damaged = bytearray(data)
        for _ in range(rng.randint(1, 20)):
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        reading = read(
            bytes(damaged[: rng.randint(len(data) // 2, len(data))]) if rng.random() < 0.2 else bytes(damaged)
        )
        assert reading.status in STATUSES
        seen.add(reading.status)
    assert STATUS_UNREADABLE in seen


# --------------------------------------------------------------------------
# Hostile files
# --------------------------------------------------------------------------

XLSX_HEAD = {
    "[Content_Types].xml": '<?xml version="1.0"?><Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types"/>',
    "xl/workbook.xml": f'<?xml version="1.0"?><workbook xmlns="{MAIN_NS}"><sheets/></workbook>',
}


def zero_member(name: str, size: int) -> tuple[zipfile.ZipInfo, bytes, int]:
    """(info, raw deflate data, CRC) for ``size`` zero bytes, compressed as a stream (never held whole)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    zeros = bytes(1 << 20)
    parts, crc = [], 0
    for _ in range(size >> 20):
        parts.append(compressor.compress(zeros))
        crc = zlib.crc32(zeros, crc)
    parts.append(compressor.flush())
    info = zipfile.ZipInfo(name, (2017, 10, 21, 0, 0, 0))
    info.compress_type = zipfile.ZIP_DEFLATED
    return info, b"".join(parts), crc


def raw_zip(members: Sequence[tuple[str, bytes, int, int, int]]) -> bytes:
    """A zip written field by field: (name, deflated data, CRC, declared size, compression method)."""
    out, central = bytearray(), bytearray()
    for name, data, crc, size, method in members:
        encoded = name.encode()
        offset = len(out)
        out += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0x4B55, crc, len(data), size, len(encoded), 0)
        out += encoded + data
        central += struct.pack(
            "<IHHHHHHIIIHHHHHII",
            0x02014B50,
            20,
            20,
            0,
            method,
            0,
            0x4B55,
            crc,
            len(data),
            size,
            len(encoded),
            0,
            0,
            0,
            0,
            0,
            offset,
        )
        central += encoded
    start = len(out)
    out += central + struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members), len(central), start, 0)
    return bytes(out)


def deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


def xlsx_raw(extra: Sequence[tuple[str, bytes, int, int, int]]) -> bytes:
    head = [
        (name, deflate(text.encode()), zlib.crc32(text.encode()), len(text.encode()), 8)
        for name, text in XLSX_HEAD.items()
    ]
    return raw_zip([*head, *extra])


@pytest.fixture(scope="module")
def gigabyte_of_zeros() -> tuple[bytes, int]:
    _, data, crc = zero_member("xl/worksheets/sheet1.xml", 1 << 30)
    return data, crc


def measured(function: Callable[[], Any]) -> tuple[Any, float, int]:
    """(result, seconds, peak bytes allocated by Python) of ``function()``."""
    tracemalloc.start()
    try:
        began = time.perf_counter()
        result = function()
        elapsed = time.perf_counter() - began
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return result, elapsed, peak


def test_decompression_bomb_is_rejected_quickly_in_bounded_memory(gigabyte_of_zeros: tuple[bytes, int]) -> None:
    data, crc = gigabyte_of_zeros
    bomb = xlsx_raw([("xl/worksheets/sheet1.xml", data, crc, 1 << 30, 8)])
    assert len(bomb) < 2 << 20  # a file of about 1 MB ...
    reading, elapsed, peak = measured(lambda: read(bomb, "Plan.xlsx"))
    assert reading.status == STATUS_REJECTED
    assert reading.reason is not None and "decompression bomb" in reading.reason and "1,024 MB" in reading.reason
    assert elapsed < 1.0
    assert peak < 100 << 20  # ... read without allocating anything near its gigabyte


def test_a_member_larger_than_it_declares_is_rejected_while_streaming(gigabyte_of_zeros: tuple[bytes, int]) -> None:
    data, crc = gigabyte_of_zeros
    liar = xlsx_raw([("xl/worksheets/sheet1.xml", data, crc, 1000, 8)])  # declares 1000 bytes
    assert preflight(liar, "Plan.xlsx", ReturnLimits())[0] == STATUS_REJECTED
    reading, elapsed, peak = measured(lambda: read(liar, "Plan.xlsx"))
    assert reading.status == STATUS_REJECTED
    assert reading.reason is not None and "expands beyond the size it declares" in reading.reason
    assert elapsed < 1.0
    assert peak < 20 << 20


def test_a_high_compression_ratio_is_rejected() -> None:
    _, data, crc = zero_member("xl/worksheets/sheet1.xml", 50 << 20)
    reading = read(xlsx_raw([("xl/worksheets/sheet1.xml", data, crc, 50 << 20, 8)]))
    assert reading.status == STATUS_REJECTED
    assert reading.reason is not None and "times when opened" in reading.reason


def test_overlapping_members_are_refused() -> None:
    text = sheet_part(rows_xml([("Code", "Responsible")])).encode()
    packed = deflate(text)
    data = bytearray(xlsx_raw([("xl/worksheets/sheet1.xml", packed, zlib.crc32(text), len(text), 8)]))
    # Point the last central directory entry at the first local header.
    central = data.rfind(b"PK\x01\x02")
    struct.pack_into("<I", data, central + 42, 0)
    assert read(bytes(data)).status == STATUS_UNREADABLE


BILLION_LAUGHS = (
    '<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
    '<!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">'
    '<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">'
    '<!ENTITY lol9 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">]>'
    f'<sst xmlns="{MAIN_NS}" count="1" uniqueCount="1"><si><t>&lol9;</t></si></sst>'
)
EXTERNAL_ENTITY = (
    '<?xml version="1.0"?><!DOCTYPE sst [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>'
    f'<sst xmlns="{MAIN_NS}" count="1" uniqueCount="1"><si><t>&xxe;</t></si></sst>'
)


@pytest.mark.parametrize("shared_strings", [BILLION_LAUGHS, EXTERNAL_ENTITY])
def test_entity_declarations_are_rejected(shared_strings: str) -> None:
    data = xlsx_package(
        [("Plan", rows_xml([("Code", "Responsible"), ("1.1", "x")]))],
        extra={"xl/sharedStrings.xml": shared_strings},
    )
    reading = read(data)
    assert reading.status == STATUS_REJECTED
    assert reading.reason == (
        "the file contains XML entity declarations (unsafe, in xl/sharedStrings.xml); please re-save it from Excel"
    )


@pytest.mark.parametrize(
    "prolog",
    [
        '<?xml version="1.0" encoding="ISO-8859-1"?>',  # another encoding: the parser decides
        '\ufeff<?xml version="1.0" encoding="UTF-8"?>',
        '<?xml version="1.0"?><?page layout?>',
        "<!-- Excel -->",
        "",
    ],
)
def test_a_dtd_is_found_after_any_prolog(prolog: str) -> None:
    part = prolog + BILLION_LAUGHS.split("?>", 1)[1]
    data = xlsx_package(
        [("Plan", rows_xml([("Code", "Responsible")]))], extra={"xl/sharedStrings.xml": part.encode("utf-8")}
    )
    assert read(data).status == STATUS_REJECTED


@pytest.mark.parametrize(
    ("start", "plain"),
    [
        (b'<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\r\n<worksheet xmlns="x">', True),
        (b"\xef\xbb\xbf<?xml version='1.0' encoding='utf8'?><sst>", True),
        (b"<Relationships xmlns='x'>", True),
        (b'<?xml version="1.0"?>\n<x:workbook>', True),
        (b'<?xml version="1.0"?><!DOCTYPE sst>', False),
        (b'<?xml version="1.0" encoding="UTF-16"?><sst>', False),
        (b"\xff\xfe<\x00s\x00", False),  # UTF-16 with its byte order mark
        (b'<?xml version="1.0"?><!-- a comment --><sst>', False),
        (b' <?xml version="1.0"?><sst>', False),
        (b'<?xml version="1.0"?>', False),  # the root element in a later chunk
        (b"", False),
    ],
)
def test_only_a_prolog_with_no_room_for_a_dtd_skips_the_parser(start: bytes, plain: bool) -> None:
    from mailflow.returns import _plain_prolog

    assert _plain_prolog(start) is plain


def test_the_zip_directory_is_read_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    master = tmp_path / "plan.xlsx"
    master.write_bytes(SAMPLE)
    fingerprint = make_fingerprint(SECRET, "responsible-2017", "HN")
    data = edit(RequestWorkbookFactory(master, LAYOUT).build(fingerprint))
    opened: list[int] = []

    class CountingZipFile(zipfile.ZipFile):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            opened.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(zipfile, "ZipFile", CountingZipFile)
    reading = read(data)
    assert reading.status == STATUS_PARSED and reading.fingerprint == fingerprint
    assert reading.answers == ALL_ANSWERED
    assert len(opened) == 1  # format, preflight and fingerprint share it
    opened.clear()
    assert preflight(data, "Plan.xlsx", ReturnLimits()) == (STATUS_PARSED, None)
    assert len(opened) == 1


def test_a_refused_file_keeps_the_format_preflight_found() -> None:
    bomb = zip_package({"[Content_Types].xml": "<Types/>", "xl/workbook.bin": b"\0" * (50 << 20)})
    reading = read(bomb, "Plan.xlsb")
    assert (reading.status, reading.format) == (STATUS_REJECTED, "xlsb")
    reading = read(zip_package({"xl/workbook.bin": b"x"}), "Plan.xlsb")
    assert (reading.status, reading.format) == (STATUS_UNREADABLE, "xlsb")


def test_a_dtd_after_a_long_prolog_is_still_found() -> None:
    part = '<?xml version="1.0"?>' + "<!-- padding -->" * 200_000 + BILLION_LAUGHS.split("?>", 1)[1]
    data = xlsx_package([("Plan", rows_xml([("Code", "Responsible")]))], extra={"xl/sharedStrings.xml": part})
    assert read(data).status == STATUS_REJECTED


def test_a_lying_dimension_does_not_hide_rows() -> None:
    count = 50_000
    body = rows_xml([("Code", "Responsible")]) + "".join(
        f'<row r="{n}">{cell(f"A{n}", f"k{n}")}{cell(f"B{n}", f"Institution {n}")}</row>' for n in range(2, count + 2)
    )
    data = xlsx_package([("Plan", sheet_part(body, dimension="A1:A1"))])
    layout = small_layout([f"k{n}" for n in range(2, count + 2)])
    reading = read(data, layout=layout)
    assert reading.status == STATUS_PARSED
    assert len(reading.answers) == count and reading.missing == ()
    assert reading.answers[f"k{count + 1}"] == f"Institution {count + 1}"
    # ... and max_rows still applies to what is really there.
    limited = read(data, layout=layout, max_rows=10_000)
    assert limited.status == STATUS_REJECTED
    assert limited.reason is not None and "50,001 rows (the limit is 10,000)" in limited.reason


def many_sheets(count: int) -> bytes:
    sheets = [(f"Hoja {n}", rows_xml([("nota", str(n))])) for n in range(1, count)]
    sheets.append(("Plan", rows_xml([("Code", "Responsible"), ("1.1", "DGME")])))
    return xlsx_package(sheets)


def test_too_many_sheets() -> None:
    data = many_sheets(300)
    layout = small_layout(["1.1"])
    reading = read(data, layout=layout)
    assert reading.status == STATUS_REJECTED
    assert reading.reason is not None and "300 sheets (the limit is 200)" in reading.reason
    allowed = read(data, layout=layout, max_sheets=300)
    assert (allowed.status, allowed.sheet, allowed.answers) == (STATUS_PARSED, "Plan", {"1.1": "DGME"})


def test_sheets_beyond_the_limit_in_ods_are_refused_before_calamine() -> None:
    tables = "".join(f'<table:table table:name="T{n}"><table:table-row/></table:table>' for n in range(5))
    data = ods(tables)
    assert preflight(data, "plan.ods", ReturnLimits(max_sheets=4))[0] == STATUS_REJECTED


def ods(tables: str) -> bytes:
    content = (
        '<?xml version="1.0" encoding="UTF-8"?>'
        '<office:document-content xmlns:office="urn:oasis:names:tc:opendocument:xmlns:office:1.0" '
        'xmlns:table="urn:oasis:names:tc:opendocument:xmlns:table:1.0" '
        'xmlns:text="urn:oasis:names:tc:opendocument:xmlns:text:1.0">'
        f"<office:body><office:spreadsheet>{tables}</office:spreadsheet></office:body></office:document-content>"
    )
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("mimetype", "application/vnd.oasis.opendocument.spreadsheet")
        archive.writestr("content.xml", content, zipfile.ZIP_DEFLATED)
    return buffer.getvalue()


def ods_cell(text: str, attributes: str = "") -> str:
    return f'<table:table-cell office:value-type="string"{attributes}><text:p>{text}</text:p></table:table-cell>'


def patched_xls(change: Callable[[bytearray, int, int], bool]) -> bytes:
    """The .xls fixture with its first BIFF record for which ``change(stream, offset, type)`` is true patched.

    The Workbook stream of the fixture is found in the file by its BOF record
    (it is stored contiguously), so the patch is made in place."""
    data = bytearray((FIXTURES / "plan.xls").read_bytes())
    start = data.find(b"\x09\x08\x10\x00\x00\x06\x05\x00")  # BOF, BIFF8, workbook globals
    assert start > 0
    position = start
    while position + 4 <= len(data):
        kind, length = struct.unpack_from("<HH", data, position)
        if change(data, position, kind):
            return bytes(data)
        position += 4 + length
    raise AssertionError("record not found")


def far_xls_cell(data: bytearray, offset: int, kind: int) -> bool:
    if kind != 0x00FD:  # LABELSST
        return False
    struct.pack_into("<HH", data, offset + 4, 0xFFFF, 0xFFFF)
    return True


def huge_xls_dimensions(data: bytearray, offset: int, kind: int) -> bool:
    if kind != 0x0200:
        return False
    struct.pack_into("<IIHH", data, offset + 4, 0, 0xFFFFFFFF, 0, 0xFFFF)
    return True


def hostile_files() -> dict[str, tuple[str, bytes]]:
    """Files that make python-calamine 0.9 (calamine 0.37) abort the process or exhaust memory unless refused first."""
    shared = f'<sst xmlns="{MAIN_NS}" count="1" uniqueCount="2000000000"><si><t>x</t></si></sst>'
    table = f'<?xml version="1.0"?>{shared}'

    def with_a_sheet_at(target: str, members: Mapping[str, str]) -> bytes:
        """The plan, and a second sheet (the hostile table) that the workbook finds at xl/``target``."""
        rels = (
            f'<Relationships xmlns="{PKG_REL_NS}">'
            f'<Relationship Id="rId1" Type="{REL_NS}/worksheet" Target="worksheets/sheet1.xml"/>'
            f'<Relationship Id="rId2" Type="{REL_NS}/worksheet" Target="{target}"/></Relationships>'
        )
        sheets = [("Plan", rows_xml([("Code",)])), ("Strings", table)]
        return xlsx_package(sheets, extra={"xl/_rels/workbook.xml.rels": rels, **members})

    return {
        "far cell": (
            "Plan.xlsx",
            xlsx_package(
                [("Plan", f'<row r="1">{cell("A1", "Code")}</row><row r="1048576">{cell("XFD1048576", "x")}</row>')]
            ),
        ),
        # Rows and cells without references: placed by counting, as calamine does.
        "rows without references": (
            "Plan.xlsx",
            xlsx_package([("Plan", "".join(f"<row><c><v>{n}</v></c></row>" for n in range(150_000)))]),
        ),
        "wide rows": (
            "Plan.xlsx",
            xlsx_package([("Plan", "".join(f'<row r="{n}">{cell(f"XFD{n}", "x")}</row>' for n in range(1, 400)))]),
        ),
        "shared strings count": (
            "Plan.xlsx",
            xlsx_package([("Plan", rows_xml([("Code",)]))], extra={"xl/sharedStrings.xml": shared}),
        ),
        # calamine finds the shared strings by their name in any case.
        "shared strings count, name in capitals": (
            "Plan.xlsx",
            xlsx_package([("Plan", rows_xml([("Code",)]))], extra={"XL/SHAREDSTRINGS.XML": shared}),
        ),
        # Two tables, the name in two cases, the hostile one also a sheet: calamine reads it.
        "shared strings count, the name twice": (
            "Plan.xlsx",
            with_a_sheet_at(
                "SharedStrings.xml",
                {
                    "xl/sharedStrings.xml": f'<sst xmlns="{MAIN_NS}" count="1" uniqueCount="1"><si><t>x</t></si></sst>',
                    "xl/SharedStrings.xml": table,
                },
            ),
        ),
        # The table is also a sheet of the workbook: sheets need no shared-strings check, this one does.
        "shared strings count in a part also read as a sheet": (
            "Plan.xlsx",
            with_a_sheet_at("sharedStrings.xml", {"xl/sharedStrings.xml": table}),
        ),
        "xls far cell": ("plan.xls", patched_xls(far_xls_cell)),
        "xls dimensions": ("plan.xls", patched_xls(huge_xls_dimensions)),
        "ods repeats": (
            "plan.ods",
            ods(
                '<table:table table:name="P"><table:table-row table:number-rows-repeated="1048576">'
                + ods_cell("x", ' table:number-columns-repeated="16384"')
                + "</table:table-row></table:table>"
            ),
        ),
        "ods far cell": (
            "plan.ods",
            ods(
                '<table:table table:name="P"><table:table-row table:number-rows-repeated="1048000"><table:table-cell/>'
                '</table:table-row><table:table-row><table:table-cell table:number-columns-repeated="16000"/>'
                f"{ods_cell('x')}"
                "</table:table-row></table:table>"
            ),
        ),
    }


CHILD = """
import json, sys
from pathlib import Path
from mailflow.returns import read_return
from mailflow.workbook import MasterLayout, PlanRow
layout = MasterLayout("Plan", 1, 1, 2, ("Code", "Responsible"), (PlanRow("1.1", 2, "", "", ("1.1", "")),))
out = {}
for path in sorted(Path(sys.argv[1]).iterdir()):
    name = path.name.split("__", 1)[1]
    reading = read_return(path.read_bytes(), name, layout, "Code", "Responsible")
    out[path.name] = [reading.status, reading.reason]
print(json.dumps(out))
"""


def test_files_that_would_crash_calamine_are_refused_before_it(tmp_path: Path) -> None:
    files = hostile_files()
    for index, (label, (name, data)) in enumerate(files.items()):
        (tmp_path / f"{index:02d} {label}__{name}").write_bytes(data)
    # A child process: if a guard regresses, calamine aborts it, not the test run.
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path)], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(done.stdout)
    assert len(results) == len(files)
    for label, (status, reason) in results.items():
        assert status in (STATUS_REJECTED, STATUS_UNREADABLE), (label, status, reason)
        assert reason and "please" in reason, label
