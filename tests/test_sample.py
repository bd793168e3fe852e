"""The sample Strategic Plan: the shape of the real file, deterministic, any size."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import openpyxl
import pytest

from mailflow.sample import DEFAULT_TITLE, HEADERS, build_sample_plan, write_sample_plan

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_PLAN = ROOT / "templates" / "workbooks" / "strategic-plan-2017-2022.xlsx"


def codes_of(data: bytes) -> list[str]:
    sheet = openpyxl.load_workbook(io.BytesIO(data))["Strategic Plan"]
    return [str(row[2]) for row in sheet.iter_rows(min_row=4, values_only=True) if row[2] is not None]


def test_same_arguments_give_the_same_bytes() -> None:
    assert build_sample_plan() == build_sample_plan()


def test_shipped_template_is_the_generated_sample() -> None:
    # If this fails, regenerate it with write_sample_plan(SAMPLE_PLAN).
    assert SAMPLE_PLAN.read_bytes() == build_sample_plan()


def test_content_types_come_first() -> None:
    names = zipfile.ZipFile(io.BytesIO(build_sample_plan())).namelist()
    assert names[0] == "[Content_Types].xml"


def test_layout_of_the_default_plan() -> None:
    book = openpyxl.load_workbook(io.BytesIO(build_sample_plan()))
    assert book.sheetnames == ["Strategic Plan"]
    sheet = book["Strategic Plan"]
    assert sheet["A1"].value == DEFAULT_TITLE
    assert sheet["A1"].font.bold
    assert [cell.value for cell in sheet[3]] == list(HEADERS)
    assert all(cell.font.bold for cell in sheet[3])
    merged = {str(cell_range) for cell_range in sheet.merged_cells.ranges}
    assert "A1:H1" in merged
    assert "A4:H4" in merged  # banner of strategic line 1
    assert sheet["A4"].value.startswith("Strategic line 1: ")
    assert sheet["C4"].value is None
    # Strategic line and specific objective merged down the eight actions of line 1.
    assert {"A5:A12", "B5:B12"} <= merged
    assert sheet.column_dimensions["D"].width >= 40
    assert sheet["D5"].alignment.wrap_text


def test_default_plan_has_forty_actions_and_an_empty_responsible_column() -> None:
    sheet = openpyxl.load_workbook(io.BytesIO(build_sample_plan()))["Strategic Plan"]
    rows = [row for row in sheet.iter_rows(min_row=4, values_only=True) if row[2] is not None]
    assert [row[2] for row in rows] == [f"{line}.{action}" for line in range(1, 6) for action in range(1, 9)]
    assert all(row[6] is None for row in rows)
    assert all(row[3] and row[4] and row[5] for row in rows)
    observed = [row[7] for row in rows if row[7]]
    assert 0 < len(observed) < len(rows) / 4
    assert len({row[3] for row in rows}) == 40


@pytest.mark.parametrize(
    ("actions_per_line", "first", "last", "count"),
    [([200], "1.1", "1.200", 200), ([5] * 40, "1.1", "40.5", 200), ([1, 3], "1.1", "2.3", 4)],
)
def test_scales_for_benchmarks(actions_per_line: list[int], first: str, last: str, count: int) -> None:
    codes = codes_of(build_sample_plan(actions_per_line=actions_per_line))
    assert (codes[0], codes[-1], len(codes), len(set(codes))) == (first, last, count, count)


@pytest.mark.parametrize("actions_per_line", [[], [3, 0]])
def test_refuses_empty_plans(actions_per_line: list[int]) -> None:
    with pytest.raises(ValueError):
        build_sample_plan(actions_per_line=actions_per_line)


def test_write_sample_plan_creates_parent_directories(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "plan.xlsx"
    write_sample_plan(target, actions_per_line=[2, 2], title="Plan")
    sheet = openpyxl.load_workbook(target)["Strategic Plan"]
    assert sheet["A1"].value == "Plan"
    assert codes_of(target.read_bytes()) == ["1.1", "1.2", "2.1", "2.2"]
