"""The sentences that say why a file could not be read, in English and Spanish."""

from __future__ import annotations

import string

import pytest

from mailflow import reasons
from mailflow.returns import ReturnLimits, read_return
from tests.test_returns import LAYOUT, xlsx_package

SAMPLE_PARAMS = {
    "filename": "Plan estratégico - Honduras.xlsx",
    "size": "30 MB",
    "limit": "20 MB",
    "detail": "part xl/workbook.xml does not match its checksum",
    "ratio": "1,027",
    "part": "xl/worksheets/sheet1.xml",
    "rows": "2,000,000",
    "count": "300",
    "column": "Código",
    "shown": "A1, A2",
    "wanted": "1.1, 1.2, 1.3",
    "key_column": "Code",
    "fill_column": "Responsible",
    "no_key": "yes",
    "no_fill": "yes",
    "sheet": "Hoja1",
    "seen": "Nombre, Fecha",
    "error": "ValueError: bad",
    "sender": "asistente@otra.example.cr",
    "delegation": "Costa Rica",
    "checks": "dmarc=fail",
    "failed": "enlace@sre.example.hn 5.1.1",
    "seconds": "60",
}


def _fields(code: str, language: str) -> set[str]:
    """The parameters a sentence uses (read from what it writes when each parameter is marked)."""
    marked = {name: f"<{name}>" for name in SAMPLE_PARAMS}
    text = reasons.explain(code, marked, language)
    return {name for name in SAMPLE_PARAMS if f"<{name}>" in text}


def test_every_code_is_a_file_s_or_a_message_s() -> None:
    assert reasons.FILE_CODES | reasons.MESSAGE_CODES == reasons.CODES
    assert not reasons.FILE_CODES & reasons.MESSAGE_CODES


@pytest.mark.parametrize("code", sorted(reasons.CODES))
def test_every_reason_is_written_in_both_languages_and_a_file_s_says_what_to_do(code: str) -> None:
    english = reasons.explain(code, SAMPLE_PARAMS, "en")
    spanish = reasons.explain(code, SAMPLE_PARAMS, "es")
    assert english != spanish and english and spanish
    if code in reasons.FILE_CODES - {reasons.IGNORED}:  # to a delegation: what to do (a logo asks nothing)
        assert "please" in english and "por favor" in spanish
    if code != reasons.IGNORED:  # that one starts with the file's name
        assert spanish[0] not in string.ascii_uppercase  # they follow "«file»: " in a list
    # Both languages say the same facts: the same parameters appear in each.
    assert _fields(code, "en") == _fields(code, "es")
    assert not set(spanish) & set("{}"), spanish  # no placeholder left unfilled


def test_a_language_without_sentences_gets_english_and_an_unknown_code_the_recorded_text() -> None:
    assert reasons.explain(reasons.PASSWORD, {}, "fr") == reasons.explain(reasons.PASSWORD, {}, "en")
    assert reasons.written("as recorded", "a-code-of-a-later-version", {}, "es") == "as recorded"
    assert reasons.written("as recorded", reasons.DAMAGED, {}, "es") == "as recorded"  # parameters missing
    assert reasons.written(None, None, {}, "es") == ""


def test_a_reading_carries_the_code_and_parameters_its_english_reason_was_written_from() -> None:
    reading = read_return(xlsx_package([("Sheet1", "")]), "Plan.xlsx", LAYOUT, "Code", "Responsible", ReturnLimits())
    assert reading.reason_code == reasons.NOT_OURS_COLUMNS
    assert reading.reason == reasons.explain(reading.reason_code, reading.reason_params)
    assert "no hay ninguna columna «Code» ni ninguna columna «Responsible»" in reasons.explain(
        reading.reason_code, reading.reason_params, "es"
    )
