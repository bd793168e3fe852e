"""Workbook layout, request copies and fingerprints.

Test workbooks are generated here with openpyxl; the only binary fixture is the
shipped sample plan."""

from __future__ import annotations

import datetime
import hashlib
import io
import os
import pickle
import random
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator, Sequence
from datetime import date
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any
from xml.etree import ElementTree

import openpyxl
import pytest
import python_calamine
from openpyxl.packaging.custom import StringProperty

import mailflow.workbook as workbook_module
from mailflow.errors import WorkbookError
from mailflow.sample import build_sample_plan
from mailflow.workbook import (
    FINGERPRINT_PROPERTY,
    FINGERPRINT_SHEET,
    HEADER_SYNONYMS,
    Fingerprint,
    MasterLayout,
    PlanRow,
    RequestWorkbookFactory,
    cell_text,
    check_columns,
    find_column,
    fingerprint_token,
    make_fingerprint,
    normalize_header,
    parse_workbook,
    read_fingerprint,
    read_master,
    verify_fingerprint,
)

if TYPE_CHECKING:
    from mailflow.workbook import CellValue

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_PLAN = ROOT / "templates" / "workbooks" / "strategic-plan-2017-2022.xlsx"
SECRET = b"technical-secretariat-secret"
SAMPLE_KEYS = tuple(f"{line}.{action}" for line in range(1, 6) for action in range(1, 9))

Cell = str | int | float | None


def make_workbook(
    path: Path,
    headers: Sequence[Cell],
    rows: Sequence[Sequence[Cell]],
    *,
    title_rows: Sequence[Sequence[Cell]] = (),
    sheet: str = "Plan",
    before: Sequence[tuple[str, Sequence[Sequence[Cell]]]] = (),
) -> Path:
    """Write a workbook: optional sheets ``before`` the plan, then title rows, headers and rows."""
    book = openpyxl.Workbook()
    book.remove(book.active)
    for name, content in before:
        extra = book.create_sheet(name)
        for values in content:
            extra.append(list(values))
    plan = book.create_sheet(sheet)
    for values in (*title_rows, headers, *rows):
        plan.append(list(values))
    book.save(path)
    return path


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Each test its own layout cache: nothing read from or left in the user's cache folder."""
    folder = tmp_path / "mailflow-cache"
    monkeypatch.setenv("MAILFLOW_CACHE", str(folder))
    yield folder


@pytest.fixture
def layout() -> MasterLayout:
    return read_master(SAMPLE_PLAN, "Code", "Responsible")


@pytest.fixture
def factory(layout: MasterLayout) -> RequestWorkbookFactory:
    return RequestWorkbookFactory(SAMPLE_PLAN, layout)


# --------------------------------------------------------------------------
# Header names
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Código", "codigo"),
        ("  CÓDIGO: ", "codigo"),
        ("Responsable", "responsable"),
        ("Institución\n   responsable (*)", "institucion responsable"),
        ("  Strategic   line ", "strategic line"),
        ("Nº", "no"),
        ("N°", "n"),
        ("Observaciones.", "observaciones"),
        ("¿Plazo?", "plazo"),
        (None, ""),
        (1.5, "1.5"),
    ],
)
def test_normalize_header(raw: object, expected: str) -> None:
    assert normalize_header(raw) == expected


def test_synonym_table_is_normalized_and_unambiguous() -> None:
    seen: set[str] = set()
    for canonical, synonyms in HEADER_SYNONYMS.items():
        group = synonyms | {canonical}
        assert all(normalize_header(name) == name for name in group)
        assert not seen & group
        seen |= group


def test_find_column_prefers_the_exact_header() -> None:
    headers = ["Código", "Action", "Code", "Responsable"]
    assert find_column(headers, "code") == 2
    assert find_column(headers, "CÓDIGO") == 0


@pytest.mark.parametrize(
    ("headers", "wanted", "expected"),
    [
        (["Código", "Acción", "Responsable"], "Code", 0),
        (["Code", "Action", "Responsible"], "Código", 0),
        (["Code", "Action", "Responsible"], "Responsable", 2),
        (["Código", "Acción", "Institución responsable"], "Responsible", 2),
        (["N°", "Acción", "Responsables"], "Code", 0),
        (["Code", "Action", "  RESPONSIBLE  "], "responsible", 2),
        (["Code", "Action"], "Responsible", None),
        (["Code", None, 3], "Responsible", None),
        (["Code", "Action"], "", None),
        (["Code", "Action"], "Unknown header", None),
    ],
)
def test_find_column(headers: list[object], wanted: str, expected: int | None) -> None:
    assert find_column(headers, wanted) == expected


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (1.1, "1.1"),
        (2.0, "2"),
        (3, "3"),
        ("2.10", "2.10"),
        (" 4.2 ", "4.2"),
        (None, ""),
        (True, "TRUE"),
        (False, "FALSE"),
        (1e20, "1e+20"),
        (datetime.datetime(2017, 5, 1, 9, 30), "2017-05-01T09:30:00"),
        (datetime.date(2017, 5, 1), "2017-05-01"),
        (datetime.time(9, 30), "09:30:00"),
        (datetime.timedelta(hours=36), "1 day, 12:00:00"),
    ],
)
def test_cell_text(value: CellValue, text: str) -> None:
    assert cell_text(value) == text


def test_a_sheet_of_text_and_numbers_is_read_without_importing_datetime(tmp_path: Path) -> None:
    """Dates are rare in a plan: reading a return (here or in the reader process) imports datetime only for
    one, and never dataclasses."""
    data = build_sample_plan(actions_per_line=(3, 3))
    (tmp_path / "plan.xlsx").write_bytes(data)
    (tmp_path / "layout.pickle").write_bytes(pickle.dumps(parse_workbook(data, "Code", "Responsible")))
    code = (
        "import pickle, sys\n"
        "from pathlib import Path\n"
        "import mailflow.reader  # what the reader process imports\n"
        "from mailflow.returns import read_return\n"
        "base = Path(sys.argv[1])\n"
        "layout = pickle.loads((base / 'layout.pickle').read_bytes())\n"
        "reading = read_return((base / 'plan.xlsx').read_bytes(), 'plan.xlsx', layout, 'Code', 'Responsible')\n"
        "print(reading.status, len(reading.missing), 'datetime' in sys.modules, 'dataclasses' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.split() == ["parsed", "6", "False", "False"]


# --------------------------------------------------------------------------
# Reading the layout
# --------------------------------------------------------------------------


def test_read_master_on_the_shipped_sample(layout: MasterLayout) -> None:
    assert layout.sheet == "Strategic Plan"
    assert (layout.header_row, layout.key_col, layout.fill_col) == (3, 3, 7)
    assert layout.headers[layout.key_col - 1] == "Code"
    assert layout.headers[layout.fill_col - 1] == "Responsible"
    assert len(layout.rows) == 40
    assert layout.keys == SAMPLE_KEYS
    assert all(row.fill == "" for row in layout.rows)
    assert layout.rows[0].row == 5  # row 4 is the banner of strategic line 1
    assert layout.rows[0].label.startswith("Adopt or update national protocols")
    assert all(0 < len(row.label) <= 120 for row in layout.rows)


def test_spanish_names_find_the_english_headers() -> None:
    layout = read_master(SAMPLE_PLAN, "Código", "Responsable")
    assert (layout.key_col, layout.fill_col, len(layout.rows)) == (3, 7, 40)


def test_spanish_headers_numeric_keys_title_rows_and_a_first_sheet(tmp_path: Path) -> None:
    path = make_workbook(
        tmp_path / "plan.xlsx",
        ["Línea estratégica", "Código", "Acción", "Institución responsable", "Observaciones"],
        [
            ["Línea 1: Protección", None, None, None, None],
            [None, 1.1, "Adoptar protocolos", "Patronato Nacional de la Infancia", None],
            [None, 1.2, "Capacitar personal consular", None, None],
            [None, 2, "Mapear rutas de referencia", " DGME ", None],
            [None, "2.10", "Intercambiar datos", None, None],
        ],
        title_rows=[["Plan Estratégico 2017-2022"], [None]],
        before=[("Instrucciones", [["Complete la columna Responsable"], ["Gracias"]])],
    )
    layout = read_master(path, "Code", "Responsible")
    assert layout.sheet == "Plan"
    assert (layout.header_row, layout.key_col, layout.fill_col) == (3, 2, 4)
    assert layout.keys == ("1.1", "1.2", "2", "2.10")
    assert [row.row for row in layout.rows] == [5, 6, 7, 8]
    assert [row.fill for row in layout.rows] == ["Patronato Nacional de la Infancia", "", "DGME", ""]
    assert layout.rows[0].label == "Adoptar protocolos"
    assert layout.headers == ("Línea estratégica", "Código", "Acción", "Institución responsable", "Observaciones")


def test_named_sheet(tmp_path: Path) -> None:
    path = make_workbook(
        tmp_path / "plan.xlsx",
        ["Code", "Action", "Responsible"],
        [["1.1", "Do", None]],
        sheet="Second",
        before=[("First", [["Code", "Action", "Responsible"], ["9.9", "Other", None]])],
    )
    assert read_master(path, "Code", "Responsible").keys == ("9.9",)
    assert read_master(path, "Code", "Responsible", sheet="Second").keys == ("1.1",)


def test_hidden_sheets_are_skipped_unless_named(tmp_path: Path) -> None:
    path = make_workbook(
        tmp_path / "plan.xlsx",
        ["Code", "Action", "Responsible"],
        [["1.1", "Do", None]],
        before=[("Old", [["Code", "Action", "Responsible"], ["9.9", "Other", None]])],
    )
    book = openpyxl.load_workbook(path)
    book["Old"].sheet_state = "hidden"
    book.save(path)
    assert read_master(path, "Code", "Responsible").keys == ("1.1",)
    assert read_master(path, "Code", "Responsible", sheet="Old").keys == ("9.9",)


def test_unknown_sheet_lists_the_sheets(tmp_path: Path) -> None:
    path = make_workbook(tmp_path / "plan.xlsx", ["Code", "Responsible"], [["1.1", None]])
    with pytest.raises(WorkbookError, match=r"plan\.xlsx has no sheet 'Plan 2017' \(sheets: 'Plan'\)"):
        read_master(path, "Code", "Responsible", sheet="Plan 2017")


def test_missing_fill_column_lists_the_headers_found(tmp_path: Path) -> None:
    path = make_workbook(
        tmp_path / "plan.xlsx", ["Code", "Action", "Indicator"], [["1.1", "Do", None]], title_rows=[["Title"]]
    )
    with pytest.raises(WorkbookError) as raised:
        read_master(path, "Code", "Responsable")
    message = str(raised.value)
    assert "plan.xlsx has no column 'Responsable' (fill_column)" in message
    assert "key_column" not in message
    assert "row 2: Code, Action, Indicator" in message
    assert check_columns(path, "Code", "Responsable") == [message]


def test_missing_both_columns(tmp_path: Path) -> None:
    path = make_workbook(tmp_path / "plan.xlsx", ["Id", "Action"], [["1.1", "Do"]])
    message = check_columns(path, "Code", "Responsible")[0]
    assert "no column 'Code' (key_column) and no column 'Responsible' (fill_column)" in message
    assert "Id, Action" in message


def test_empty_sheet_says_no_headers_found(tmp_path: Path) -> None:
    path = make_workbook(tmp_path / "plan.xlsx", [], [])
    with pytest.raises(WorkbookError, match="no headers found"):
        read_master(path, "Code", "Responsible")


def test_duplicate_keys_are_listed(tmp_path: Path) -> None:
    path = make_workbook(
        tmp_path / "plan.xlsx",
        ["Code", "Action", "Responsible"],
        [["1.1", "a", None], ["1.2", "b", None], [1.1, "c", None], ["1.2", "d", None], ["1.3", "e", None]],
    )
    with pytest.raises(WorkbookError, match=r"duplicate keys .*1\.1 \(rows 2, 4\); 1\.2 \(rows 3, 5\)"):
        read_master(path, "Code", "Responsible")


def test_no_keyed_rows(tmp_path: Path) -> None:
    path = make_workbook(tmp_path / "plan.xlsx", ["Code", "Action", "Responsible"], [[None, "a", None]])
    with pytest.raises(WorkbookError, match="no rows with a value in column 'Code'"):
        read_master(path, "Code", "Responsible")


def test_key_and_fill_naming_the_same_column(tmp_path: Path) -> None:
    path = make_workbook(tmp_path / "plan.xlsx", ["Code", "Responsible"], [["1.1", None]])
    with pytest.raises(WorkbookError, match="name the same column"):
        read_master(path, "Responsable", "Responsible")


@pytest.mark.parametrize(
    "content",
    [
        b"Code;Action;Responsible\n1.1;Do;\n",
        b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(512),  # OLE2: .xls, or an encrypted .xlsx
        b"",
    ],
)
def test_not_an_xlsx(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "plan.xlsx"
    path.write_bytes(content)
    with pytest.raises(WorkbookError, match=r"plan\.xlsx is not an \.xlsx workbook \(xls/csv/encrypted\?\)"):
        read_master(path, "Code", "Responsible")


def test_a_zip_that_is_not_a_workbook(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("mimetype", "application/vnd.oasis.opendocument.spreadsheet")
    with pytest.raises(WorkbookError, match=r"not an \.xlsx workbook"):
        parse_workbook(buffer.getvalue(), "Code", "Responsible", source="plan.ods")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(WorkbookError, match=r"workbook .*nowhere\.xlsx not found"):
        read_master(tmp_path / "nowhere.xlsx", "Code", "Responsible")
    assert len(check_columns(tmp_path / "nowhere.xlsx", "Code", "Responsible")) == 1


def test_check_columns_is_empty_when_fine() -> None:
    assert check_columns(SAMPLE_PLAN, "Código", "Responsable") == []


def test_fill_merged_down_counts_for_every_row(tmp_path: Path) -> None:
    path = make_workbook(
        tmp_path / "plan.xlsx",
        ["Code", "Action", "Responsible"],
        [["1.1", "a", "Ministry of Foreign Affairs"], ["1.2", "b", None], ["1.3", "c", None], ["1.4", "d", "DGME"]],
    )
    book = openpyxl.load_workbook(path)
    book["Plan"].merge_cells("C2:C4")
    book.save(path)
    layout = read_master(path, "Code", "Responsible")
    assert [row.fill for row in layout.rows] == ["Ministry of Foreign Affairs"] * 3 + ["DGME"]


def test_long_labels_are_shortened(tmp_path: Path) -> None:
    path = make_workbook(tmp_path / "plan.xlsx", ["Code", "Action", "Responsible"], [["1.1", "word " * 100, None]])
    label = read_master(path, "Code", "Responsible").rows[0].label
    assert len(label) == 120
    assert label.endswith("…")


def test_each_sheet_is_parsed_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = make_workbook(
        tmp_path / "plan.xlsx",
        ["Code", "Action", "Responsible"],
        [["1.1", "Do", None], ["1.2", "Do more", "DGME"]],
        before=[("Notes", [["Read me first"]])],
    )
    parsed: list[str] = []
    real = python_calamine.CalamineWorkbook.from_filelike

    class CountingBook:
        def __init__(self, book: Any) -> None:
            self.book = book

        def __enter__(self) -> CountingBook:
            self.book.__enter__()
            return self

        def __exit__(self, *exc: object) -> None:
            self.book.__exit__(*exc)

        def get_sheet_by_name(self, name: str) -> Any:
            parsed.append(name)
            return self.book.get_sheet_by_name(name)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.book, name)

    class Calamine:
        """python_calamine, as workbook.py sees it, with books that count the sheets they parse."""

        CalamineWorkbook = SimpleNamespace(from_filelike=lambda stream: CountingBook(real(stream)))

        def __getattr__(self, name: str) -> Any:
            return getattr(python_calamine, name)

    monkeypatch.setattr(workbook_module, "python_calamine", Calamine())
    layout = read_master(path, "Code", "Responsible")
    assert layout.keys == ("1.1", "1.2") and [row.fill for row in layout.rows] == ["", "DGME"]
    assert parsed == ["Notes", "Plan"]  # the header search and the rows share one parse of "Plan"


def varied_workbook(path: Path) -> Path:
    """A plan with what a layout can hold: numbers, dates, merged answers, blanks, long labels, accents."""
    make_workbook(
        path,
        ["Línea", "Código", "Acción", "Responsable", "Plazo", None, "Observaciones", None],
        [
            ["Línea 1", None, None, None, None],
            [None, 1.1, "Adoptar protocolos " * 10, "Patronato Nacional", date(2018, 6, 30)],
            [None, 1.2, "Capacitar", None, 2018],
            [None, "1.10", "  Mapear rutas  ", " DGME ", None, None, True],
            [None, 2, None, None, 2.5],
        ],
        title_rows=[["Plan Estratégico"], []],
    )
    book = openpyxl.load_workbook(path)
    book["Plan"].merge_cells("D5:D6")
    book.save(path)
    return path


def test_a_slow_master_is_kept_between_runs_identical_to_a_fresh_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _private_cache: Path
) -> None:
    monkeypatch.setattr(workbook_module, "MASTER_CACHE_MIN_SECONDS", 0.0)
    path = varied_workbook(tmp_path / "plan.xlsx")
    first = read_master(path, "Código", "Responsable")
    [entry] = _private_cache.iterdir()
    assert entry.name.startswith("master-layout-")

    calls: list[str] = []
    real_parse = workbook_module.parse_workbook

    def counting_parse(*args: Any, **kwargs: Any) -> MasterLayout:
        calls.append("parsed")
        return real_parse(*args, **kwargs)

    monkeypatch.setattr(workbook_module, "parse_workbook", counting_parse)
    kept = read_master(path, "Código", "Responsable")
    assert calls == []
    monkeypatch.setenv("MAILFLOW_CACHE", "off")
    fresh = read_master(path, "Código", "Responsable")
    assert calls == ["parsed"]
    # Identical: equal, same types all the way down, same pickle.
    assert kept == fresh == first and kept is not first
    assert repr(kept) == repr(fresh)
    assert type(kept) is MasterLayout and all(type(row) is PlanRow for row in kept.rows)
    assert all(type(value) is str for row in kept.rows for value in (row.key, row.fill, row.label, *row.values))
    assert pickle.dumps(kept) == pickle.dumps(fresh)
    assert [row.fill for row in kept.rows] == ["Patronato Nacional", "Patronato Nacional", "DGME", ""]
    assert kept.rows[0].values[4] == "2018-06-30"


def test_a_layout_keeps_its_rows_by_column_and_builds_the_same_rows_from_them(tmp_path: Path) -> None:
    parsed = read_master(varied_workbook(tmp_path / "plan.xlsx"), "Código", "Responsable")
    assert "rows" not in vars(parsed)  # built the first time they are asked for
    rows = parsed.rows
    assert len(rows) == len(parsed.keys) == 4 and parsed.widths is None
    for index, row in enumerate(rows):
        values = tuple(column[index] for column in parsed.columns)
        assert row == PlanRow(
            parsed.keys[index], parsed.row_numbers[index], parsed.fills[index], parsed.labels[index], values
        )
        assert (row.key, row.fill) == (values[parsed.key_col - 1], values[parsed.fill_col - 1])
    assert parsed.rows is rows
    assert parsed.by_key == {row.key: row for row in rows}
    assert parsed.positions == {row.key: index for index, row in enumerate(rows)}
    # Made from those rows, the layout is the same one.
    made = MasterLayout(parsed.sheet, parsed.header_row, parsed.key_col, parsed.fill_col, parsed.headers, rows)
    assert made == parsed and hash(made) == hash(parsed) and repr(made) == repr(parsed)
    assert made.rows is rows
    with pytest.raises(AttributeError, match="frozen"):
        made.sheet = "Other"  # type: ignore[misc]
    with pytest.raises(AttributeError, match="frozen"):
        del made.keys  # type: ignore[misc]
    assert made.sheet == parsed.sheet and made.keys == parsed.keys


def test_a_parsed_layout_holds_one_string_per_distinct_text() -> None:
    layout = parse_workbook(build_sample_plan(actions_per_line=(20,) * 10), "Code", "Responsible")
    texts = [*layout.labels, *(text for column in layout.columns for text in column)]
    assert len({id(text) for text in texts}) == len(set(texts)) < len(texts) / 4
    assert pickle.loads(pickle.dumps(layout)) == layout


def test_a_layout_made_from_uneven_rows_gives_them_back_as_they_were() -> None:
    rows = (
        PlanRow("1", 2, "a", "One", ("1", "a", "x")),
        PlanRow("2", 3, "", "Two", ("2",)),
        PlanRow("3", 4, "", "Three"),
    )
    layout = MasterLayout("Plan", 1, 1, 2, ("Code", "Responsible", "Note"), rows)
    assert layout.widths == (3, 1, 0)
    assert layout.columns == (("1", "2", ""), ("a", "", ""), ("x", "", ""))
    assert layout.column(1) == ("a", "", "") and layout.column(7) == ("", "", "")
    restored = pickle.loads(pickle.dumps(layout))
    assert restored == layout and restored.rows == rows and restored.rows is not rows
    empty = MasterLayout("Plan", 1, 1, 2, ("Code", "Responsible"), ())
    assert pickle.loads(pickle.dumps(empty)).rows == () and empty.column(0) == ()
    with pytest.raises(ValueError, match="one entry per key"):
        MasterLayout.from_columns("Plan", 1, 1, 2, ("Code",), ("1", "2"), (2, 3), ("", ""), ("", ""), (("1",),))


def test_a_pickled_layout_holds_its_columns_and_nothing_worked_out_from_them() -> None:
    layout = read_master(SAMPLE_PLAN, "Code", "Responsible")
    data = pickle.dumps(layout, protocol=pickle.HIGHEST_PROTOCOL)
    assert b"PlanRow" not in data
    assert (len(layout.rows), len(layout.by_key), len(layout.positions)) == (40, 40, 40)
    assert pickle.dumps(layout, protocol=pickle.HIGHEST_PROTOCOL) == data
    restored = pickle.loads(data)
    assert not {"rows", "by_key", "positions"} & vars(restored).keys()
    assert restored == layout and restored.rows == layout.rows and restored.by_key == layout.by_key


def test_the_kept_layout_follows_the_workbook_columns_and_sheet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _private_cache: Path
) -> None:
    monkeypatch.setattr(workbook_module, "MASTER_CACHE_MIN_SECONDS", 0.0)
    path = make_workbook(
        tmp_path / "plan.xlsx",
        ["Code", "Action", "Responsible", "Observations"],
        [["1.1", "Do", None, None]],
        before=[("Old", [["Code", "Action", "Responsible"], ["9.9", "Other", None]])],
    )
    assert read_master(path, "Code", "Responsible").keys == ("9.9",)
    assert read_master(path, "Code", "Responsible", sheet="Plan").keys == ("1.1",)
    assert read_master(path, "Code", "Observations", sheet="Plan").fill_col == 4
    assert len(list(_private_cache.iterdir())) == 3
    # The workbook is edited and saved again: read again, even within the same second.
    make_workbook(path, ["Code", "Action", "Responsible"], [["7.7", "New", None]], sheet="Old")
    os.utime(path, ns=(1, 1))
    assert read_master(path, "Code", "Responsible").keys == ("7.7",)
    with pytest.raises(WorkbookError, match="no sheet 'Plan'"):
        read_master(path, "Code", "Responsible", sheet="Plan")
    path.unlink()
    with pytest.raises(WorkbookError, match="not found"):
        read_master(path, "Code", "Responsible")


def test_a_master_read_quickly_leaves_no_file(_private_cache: Path) -> None:
    copy = _private_cache.parent / "plan.xlsx"
    shutil.copy(SAMPLE_PLAN, copy)
    for _ in range(2):
        assert read_master(copy, "Code", "Responsible").keys == SAMPLE_KEYS
    assert not _private_cache.exists()


def test_long_and_ascii_headers_normalize_like_the_rest() -> None:
    long_header = "Institución responsable " * 20
    assert normalize_header(long_header) == " ".join(["institucion responsable"] * 20)
    assert normalize_header("  Responsible (*) ") == normalize_header("RESPONSIBLE") == "responsible"
    assert normalize_header(1.5) == "1.5"


# --------------------------------------------------------------------------
# Fingerprints
# --------------------------------------------------------------------------


def test_fingerprint_token_is_a_stable_hmac() -> None:
    token = fingerprint_token(SECRET, "plan-2017", "HN")
    assert token == fingerprint_token(SECRET, "plan-2017", "HN")
    assert len(token) == 32
    assert int(token, 16) >= 0
    assert token != fingerprint_token(SECRET, "plan-2017", "GT")
    assert token != fingerprint_token(SECRET, "plan-2018", "HN")
    assert token != fingerprint_token(b"other", "plan-2017", "HN")


def test_verify_fingerprint() -> None:
    fp = make_fingerprint(SECRET, "plan-2017", "HN")
    assert fp == Fingerprint("plan-2017", "HN", fp.token)
    assert verify_fingerprint(fp, SECRET)
    assert not verify_fingerprint(fp, b"another secret")
    assert not verify_fingerprint(Fingerprint("plan-2017", "GT", fp.token), SECRET)
    tampered = "0" if fp.token[0] != "0" else "1"
    assert not verify_fingerprint(Fingerprint("plan-2017", "HN", tampered + fp.token[1:]), SECRET)
    assert not verify_fingerprint(Fingerprint("plan|2017", "HN", fp.token), SECRET)
    assert not verify_fingerprint(fp, b"")


@pytest.mark.parametrize(("campaign", "delegation"), [("plan 2017", "HN"), ("plan", "H|N"), ("", "HN"), ("p", "é")])
def test_fingerprints_refuse_ids_outside_the_safe_alphabet(campaign: str, delegation: str) -> None:
    with pytest.raises(ValueError):
        make_fingerprint(SECRET, campaign, delegation)


def test_build_then_read_then_verify(factory: RequestWorkbookFactory) -> None:
    fp = make_fingerprint(SECRET, "plan-2017", "costa-rica")
    data = factory.build(fp)
    found = read_fingerprint(data)
    assert found == fp
    assert found is not None and verify_fingerprint(found, SECRET)
    assert not verify_fingerprint(found, b"another secret")


def test_copies_differ_only_by_their_fingerprint(factory: RequestWorkbookFactory) -> None:
    first = factory.build(make_fingerprint(SECRET, "plan-2017", "HN"))
    assert factory.build(make_fingerprint(SECRET, "plan-2017", "HN")) == first
    second = factory.build(make_fingerprint(SECRET, "plan-2017", "GT"))
    with zipfile.ZipFile(io.BytesIO(first)) as a, zipfile.ZipFile(io.BytesIO(second)) as b:
        assert a.namelist() == b.namelist()
        changed = {name for name in a.namelist() if a.read(name) != b.read(name)}
    assert changed == {"docProps/custom.xml", "xl/worksheets/sheet2.xml"}


def test_built_copy_is_a_sound_zip(factory: RequestWorkbookFactory) -> None:
    data = factory.build(make_fingerprint(SECRET, "plan-2017", "HN"))
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert archive.testzip() is None
        assert archive.namelist()[0] == "[Content_Types].xml"
        assert all(info.compress_type == zipfile.ZIP_DEFLATED for info in archive.infolist())
        assert b"mailflow-placeholder" not in b"".join(archive.read(name) for name in archive.namelist())


def test_built_copy_opens_in_openpyxl_with_the_fill_column_highlighted(
    factory: RequestWorkbookFactory, layout: MasterLayout
) -> None:
    data = factory.build(make_fingerprint(SECRET, "plan-2017", "HN"))
    book = openpyxl.load_workbook(io.BytesIO(data))
    assert book.sheetnames == ["Strategic Plan", FINGERPRINT_SHEET]
    hidden = book[FINGERPRINT_SHEET]
    assert hidden.sheet_state == "veryHidden"
    assert hidden["A1"].value == "mailflow fingerprint — do not edit"
    assert hidden["A2"].value == f"plan-2017|HN|{fingerprint_token(SECRET, 'plan-2017', 'HN')}"
    assert [prop.name for prop in book.custom_doc_props.props] == [FINGERPRINT_PROPERTY]
    sheet = book["Strategic Plan"]
    header = sheet.cell(row=layout.header_row, column=layout.fill_col)
    assert header.value == "Responsible"
    assert header.font.bold
    assert header.fill.fgColor.rgb.endswith("FFF2CC")
    assert header.comment is not None and "Escriba aquí la institución responsable" in header.comment.text
    for row in layout.rows:
        cell = sheet.cell(row=row.row, column=layout.fill_col)
        assert cell.fill.fgColor.rgb.endswith("FFF2CC")
        assert cell.border.left.style == "thin"
        assert cell.protection.locked is False
    # Merged cells and widths of the master are kept.
    assert "A1:H1" in {str(cell_range) for cell_range in sheet.merged_cells.ranges}
    assert sheet.column_dimensions["D"].width == 60


def test_built_copy_opens_in_calamine_with_the_same_rows(factory: RequestWorkbookFactory, layout: MasterLayout) -> None:
    data = factory.build(make_fingerprint(SECRET, "plan-2017", "HN"))
    book = python_calamine.CalamineWorkbook.from_filelike(io.BytesIO(data))
    visibility = {meta.name: meta.visible for meta in book.sheets_metadata}
    assert visibility[FINGERPRINT_SHEET] == python_calamine.SheetVisibleEnum.VeryHidden
    copy = parse_workbook(data, "Code", "Responsible", source="copy.xlsx")
    assert copy == layout


def test_building_leaves_the_master_untouched(tmp_path: Path, _private_cache: Path) -> None:
    master = tmp_path / "plan.xlsx"
    master.write_bytes(SAMPLE_PLAN.read_bytes())
    before = hashlib.sha256(master.read_bytes()).hexdigest()
    factory = RequestWorkbookFactory(master, read_master(master, "Code", "Responsible"))
    for delegation in ("HN", "GT", "SV"):
        factory.build(make_fingerprint(SECRET, "plan-2017", delegation))
    assert hashlib.sha256(master.read_bytes()).hexdigest() == before
    # Nothing beside the master; this test's cache folder (also in tmp_path)
    # gets the base copy only when openpyxl took 50 ms or more.
    assert sorted(path.name for path in tmp_path.iterdir() if path != _private_cache) == ["plan.xlsx"]


def test_a_returned_copy_can_serve_as_master(tmp_path: Path, factory: RequestWorkbookFactory) -> None:
    returned = tmp_path / "returned.xlsx"
    returned.write_bytes(factory.build(make_fingerprint(SECRET, "plan-2017", "HN")))
    again = RequestWorkbookFactory(returned, read_master(returned, "Code", "Responsible"))
    fp = make_fingerprint(SECRET, "plan-2018", "GT")
    book = openpyxl.load_workbook(io.BytesIO(again.build(fp)))
    assert book.sheetnames.count(FINGERPRINT_SHEET) == 1
    assert [prop.value for prop in book.custom_doc_props.props] == [fp.text]


def test_build_refuses_a_fingerprint_that_would_need_escaping(factory: RequestWorkbookFactory) -> None:
    with pytest.raises(ValueError):
        factory.build(Fingerprint("plan", "<HN>", "0" * 32))


def test_factory_reports_a_missing_master(tmp_path: Path, layout: MasterLayout) -> None:
    with pytest.raises(WorkbookError, match="not found"):
        RequestWorkbookFactory(tmp_path / "gone.xlsx", layout)


def test_build_is_fast_on_a_larger_workbook(tmp_path: Path) -> None:
    master = tmp_path / "big.xlsx"
    master.write_bytes(build_sample_plan(actions_per_line=[8] * 150))
    assert master.stat().st_size > 40_000
    factory = RequestWorkbookFactory(master, read_master(master, "Code", "Responsible"))
    fingerprints = [make_fingerprint(SECRET, "plan", f"d{index}") for index in range(200)]
    started = time.perf_counter()
    for fp in fingerprints:
        factory.build(fp)
    per_copy = (time.perf_counter() - started) / len(fingerprints)
    # Re-running openpyxl per copy would cost hundreds of milliseconds.
    assert per_copy < 0.01


# --------------------------------------------------------------------------
# Reading fingerprints from returned files
# --------------------------------------------------------------------------


def resave(data: bytes, *, drop_properties: bool = False) -> bytes:
    """Open and save with openpyxl, as a delegation saving the file would."""
    book = openpyxl.load_workbook(io.BytesIO(data))
    book["Strategic Plan"]["G5"] = "Ministerio de Relaciones Exteriores"
    if drop_properties:
        book.custom_doc_props.props = []
    buffer = io.BytesIO()
    book.save(buffer)
    return buffer.getvalue()


def test_fingerprint_survives_a_resave(factory: RequestWorkbookFactory) -> None:
    fp = make_fingerprint(SECRET, "plan-2017", "HN")
    resaved = resave(factory.build(fp))
    with zipfile.ZipFile(io.BytesIO(resaved)) as archive:
        assert "docProps/custom.xml" in archive.namelist()  # openpyxl 3.1 keeps custom properties
    assert read_fingerprint(resaved) == fp
    layout = parse_workbook(resaved, "Code", "Responsible")
    assert layout.rows[0].fill == "Ministerio de Relaciones Exteriores"


def test_hidden_sheet_is_the_fallback(factory: RequestWorkbookFactory) -> None:
    fp = make_fingerprint(SECRET, "plan-2017", "HN")
    resaved = resave(factory.build(fp), drop_properties=True)
    with zipfile.ZipFile(io.BytesIO(resaved)) as archive:
        assert "docProps/custom.xml" not in archive.namelist()
    assert read_fingerprint(resaved) == fp


def replace_member(data: bytes, name: str, content: bytes | None) -> bytes:
    """Return ``data`` with member ``name`` replaced (or removed when ``content`` is None)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as source, zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            if info.filename != name:
                target.writestr(info.filename, source.read(info))
        if content is not None:
            target.writestr(name, content)
    return buffer.getvalue()


PROPERTY_FP = f"plan-2017|HN|{'0' * 32}"
PROPERTIES_NS = (
    'xmlns="http://schemas.openxmlformats.org/officeDocument/2006/custom-properties" '
    'xmlns:vt="http://schemas.openxmlformats.org/officeDocument/2006/docPropsVTypes"'
)


@pytest.mark.parametrize(
    "body",
    [
        f'<property name="mailflow_fingerprint"><vt:lpwstr>{PROPERTY_FP}</vt:lpwstr></property>',
        f'<property name="other"><vt:lpwstr>x</vt:lpwstr></property><property name="mailflow_fingerprint">'
        f"<vt:lpwstr> {PROPERTY_FP}\n</vt:lpwstr></property>",
        '<property name="mailflow_fingerprint"/>',
        f'<property name="mailflow_fingerprint"/><property name="x"><vt:lpwstr>{PROPERTY_FP}</vt:lpwstr></property>',
        f'<property name="mailflow_fingerprint"><vt:lpwstr/></property><property name="mailflow_fingerprint">'
        f"<vt:lpwstr>{PROPERTY_FP}</vt:lpwstr></property>",
        f'<property name="mailflow_fingerprint"><vt:lpwstr>{PROPERTY_FP}<b/>tail</vt:lpwstr></property>',
        f'<property name="mailflow_fingerprint"><vt:lpwstr>{PROPERTY_FP[:9]}<!-- c -->{PROPERTY_FP[9:]}</vt:lpwstr>'
        "</property>",
        f'<property name="mailflow_fingerprint"><a><vt:lpwstr>{PROPERTY_FP}</vt:lpwstr></a></property>',
        f'<property vt:name="mailflow_fingerprint"><vt:lpwstr>{PROPERTY_FP}</vt:lpwstr></property>',
        f'<group><property name="mailflow_fingerprint"><vt:lpwstr>{PROPERTY_FP}</vt:lpwstr></property></group>',
        f'<property name="mailflow_fingerprint"><vt:lpwstr>{PROPERTY_FP}</vt:lpwstr></property><broken>',
    ],
)
def test_the_property_is_read_as_an_element_tree_reads_it(body: str) -> None:
    raw = f"<Properties {PROPERTIES_NS}>{body}</Properties>".encode()
    expected: Fingerprint | None
    try:  # how the property was read before: a whole ElementTree, then its first match
        root = ElementTree.fromstring(raw)
        prop = next(
            (
                e
                for e in root.iter()
                if e.tag.rpartition("}")[2] == "property" and e.get("name") == FINGERPRINT_PROPERTY
            ),
            None,
        )
        child = next(iter(prop), None) if prop is not None else None
        expected = workbook_module._parse_fingerprint(child.text) if child is not None else None
    except ElementTree.ParseError:
        expected = None
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("docProps/custom.xml", raw)
    with zipfile.ZipFile(buffer) as archive:
        try:
            found = workbook_module._fingerprint_from_properties(archive)
        except Exception:
            found = None  # what _archive_fingerprint makes of an error
    assert found == expected


def test_malformed_property_falls_back_to_the_sheet(factory: RequestWorkbookFactory) -> None:
    fp = make_fingerprint(SECRET, "plan-2017", "HN")
    data = factory.build(fp)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        custom = archive.read("docProps/custom.xml")
    broken = replace_member(data, "docProps/custom.xml", custom.replace(fp.text.encode(), b"not|a fingerprint"))
    assert read_fingerprint(broken) == fp


def shared_string_workbook(a2: str) -> bytes:
    """A minimal workbook as Excel saves it: the hidden sheet's cells are shared strings."""
    main = "http://schemas.openxmlformats.org/spreadsheetml/2006/main"
    rel = "http://schemas.openxmlformats.org/officeDocument/2006/relationships"
    parts = {
        "[Content_Types].xml": '<?xml version="1.0"?><Types/>',
        "xl/workbook.xml": (
            f'<workbook xmlns="{main}" xmlns:r="{rel}"><sheets>'
            '<sheet name="Plan" sheetId="1" r:id="rId1"/>'
            '<sheet name="mailflow" sheetId="2" state="veryHidden" r:id="rId7"/>'
            "</sheets></workbook>"
        ),
        "xl/_rels/workbook.xml.rels": (
            '<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">'
            '<Relationship Id="rId1" Type="worksheet" Target="worksheets/sheet1.xml"/>'
            '<Relationship Id="rId7" Type="worksheet" Target="/xl/worksheets/sheet9.xml"/>'
            "</Relationships>"
        ),
        "xl/worksheets/sheet9.xml": (
            f'<worksheet xmlns="{main}"><sheetData>'
            '<row r="1"><c r="A1" t="s"><v>0</v></c></row>'
            '<row r="2"><c r="A2" t="s"><v>2</v></c></row>'
            "</sheetData></worksheet>"
        ),
        "xl/sharedStrings.xml": (
            f'<sst xmlns="{main}" count="3" uniqueCount="3">'
            "<si><t>mailflow fingerprint — do not edit</t></si>"
            "<si><t>Code</t></si>"
            f"<si><r><t>{a2[:5]}</t></r><r><t>{a2[5:]}</t></r><rPh sb='0' eb='1'><t>ignored</t></rPh></si>"
            "</sst>"
        ),
    }
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, text in parts.items():
            archive.writestr(name, text.encode("utf-8"))
    return buffer.getvalue()


def test_fingerprint_in_a_shared_string() -> None:
    fp = make_fingerprint(SECRET, "plan-2017", "HN")
    assert read_fingerprint(shared_string_workbook(fp.text)) == fp
    assert read_fingerprint(shared_string_workbook("plan-2017|HN|tooshort")) is None


def empty_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w"):
        pass
    return buffer.getvalue()


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"garbage",
        b"PK\x03\x04" + b"\x00" * 100,
        random.Random(20171023).randbytes(4096),
        empty_zip(),
        build_sample_plan(actions_per_line=[2]),  # a workbook without a fingerprint
    ],
    ids=["empty", "text", "truncated-zip", "random", "empty-zip", "plain-workbook"],
)
def test_no_fingerprint_in_garbage(data: bytes) -> None:
    assert read_fingerprint(data) is None


def test_random_corruption_never_raises(factory: RequestWorkbookFactory) -> None:
    data = bytearray(factory.build(make_fingerprint(SECRET, "plan-2017", "HN")))
    rng = random.Random(7)
    for _ in range(200):
        mutated = bytearray(data)
        for _ in range(rng.randint(1, 20)):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        found = read_fingerprint(bytes(mutated))
        assert found is None or isinstance(found, Fingerprint)


def test_entity_declarations_are_refused(factory: RequestWorkbookFactory) -> None:
    fp = make_fingerprint(SECRET, "plan-2017", "HN")
    laughs = (
        b'<?xml version="1.0"?><!DOCTYPE p [<!ENTITY a "' + fp.text.encode() + b'">]>'
        b'<Properties xmlns="http://schemas.openxmlformats.org/officeDocument/2006/custom-properties" '
        b'xmlns:vt="http://schemas.openxmlformats.org/officeDocument/2006/docPropsVTypes">'
        b'<property fmtid="{D5CDD505-2E9C-101B-9397-08002B2CF9AE}" pid="2" name="mailflow_fingerprint">'
        b"<vt:lpwstr>&a;</vt:lpwstr></property></Properties>"
    )
    no_sheet = replace_member(factory.build(fp), "xl/workbook.xml", b"<workbook/>")
    assert read_fingerprint(no_sheet) == fp
    assert read_fingerprint(replace_member(no_sheet, "docProps/custom.xml", laughs)) is None


def test_oversized_parts_are_not_read(factory: RequestWorkbookFactory) -> None:
    fp = make_fingerprint(SECRET, "plan-2017", "HN")
    data = replace_member(factory.build(fp), "xl/workbook.xml", b"<workbook/>")
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        custom = archive.read("docProps/custom.xml")
    padded = custom.replace(b"<Properties", b"<!--" + b" " * (1 << 20) + b"--><Properties", 1)
    assert read_fingerprint(replace_member(data, "docProps/custom.xml", padded)) is None


def test_a_copied_property_is_found_but_does_not_verify(factory: RequestWorkbookFactory) -> None:
    book = openpyxl.load_workbook(io.BytesIO(build_sample_plan(actions_per_line=[1])))
    forged = Fingerprint("plan-2017", "HN", "0" * 32)
    book.custom_doc_props.append(StringProperty(name=FINGERPRINT_PROPERTY, value=forged.text))
    buffer = io.BytesIO()
    book.save(buffer)
    found = read_fingerprint(buffer.getvalue())
    assert found == forged
    assert not verify_fingerprint(found, SECRET)


def test_broken_property_part_does_not_hide_the_sheet(factory: RequestWorkbookFactory) -> None:
    fp = make_fingerprint(SECRET, "plan-2017", "HN")
    data = replace_member(factory.build(fp), "docProps/custom.xml", b"<Properties><property name=")
    assert read_fingerprint(data) == fp


def test_the_request_copy_base_is_kept_between_runs_until_the_master_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mailflow.workbook as workbook_module
    from mailflow.sample import write_sample_plan

    monkeypatch.setenv("MAILFLOW_CACHE", str(tmp_path / "cache"))
    master = tmp_path / "plan.xlsx"
    write_sample_plan(master, actions_per_line=(100, 100, 100, 100))
    layout = read_master(master, "Code", "Responsible")
    calls: list[int] = []
    real = workbook_module._base_copy

    def counting(*args: object, **kwargs: object) -> bytes:
        calls.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(workbook_module, "_base_copy", counting)
    secret = b"k" * 32
    first = RequestWorkbookFactory(master, layout).build(make_fingerprint(secret, "c", "HN"))
    second = RequestWorkbookFactory(master, layout).build(make_fingerprint(secret, "c", "HN"))
    assert len(calls) == 1 and first == second
    assert read_fingerprint(second) == make_fingerprint(secret, "c", "HN")
    write_sample_plan(master, actions_per_line=(100, 100, 100, 99))
    import os

    os.utime(master, ns=(1, 1))
    RequestWorkbookFactory(master, read_master(master, "Code", "Responsible"))
    assert len(calls) == 2
