"""Configuration: every problem in one run, each naming its key and line."""

from __future__ import annotations

import shutil
from datetime import datetime, time
from pathlib import Path

import pytest

from mailflow.checks import check_resources, load_checked_config
from mailflow.config import load_config, parse_config
from mailflow.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config.example.yaml"
SAMPLE_PLAN = ROOT / "templates" / "workbooks" / "strategic-plan-2017-2022.xlsx"


def minimal(workbook: Path, extra_campaign: str = "", extra_top: str = "") -> str:
    return f"""\
secretariat:
  name: TS
  address: ts@example.org
  timezone: America/Costa_Rica
mail:
  transport: local
delegations:
  - id: HN
    name: Honduras
    language: es
    timezone: America/Tegucigalpa
    contacts: [enlace@sre.example.hn]
campaigns:
  - id: c1
    title: Responsible column
    workbook: {workbook}
    key_column: Code
    fill_column: Responsible
    opens: 2017-10-18T10:00
    deadline: 2017-10-23
{extra_campaign}{extra_top}"""


def problems_of(text: str, tmp_path: Path, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, tmp_path / "mailflow.yaml", environ or {})
    return caught.value.problems


def test_the_example_configuration_is_valid_and_complete() -> None:
    config = load_checked_config(EXAMPLE)
    assert [d.name for d in config.delegations] == [
        "Belize",
        "Canada",
        "Costa Rica",
        "República Dominicana",
        "El Salvador",
        "Guatemala",
        "Honduras",
        "México",
        "Nicaragua",
        "Panamá",
        "United States",
    ]
    zones = {d.id: d.timezone for d in config.delegations}
    assert zones["PA"] == "America/Panama" and zones["DO"] == "America/Santo_Domingo"
    assert {d.id: d.language for d in config.delegations}["US"] == "en"
    campaign = config.campaigns[0]
    assert campaign.opens == datetime(2017, 10, 18, 10, 0, tzinfo=config.secretariat.tz)
    assert campaign.delegations == tuple(d.id for d in config.delegations)
    assert campaign.reminders == (-3, -1, 0)
    assert campaign.send_time == time(9, 0)
    assert config.mail.transport == "local"
    assert config.mail.rate_per_minute == 30
    assert config.store == ROOT / "var" / "mailflow.db"


def test_minimal_configuration_takes_the_defaults(tmp_path: Path) -> None:
    config = parse_config(minimal(SAMPLE_PLAN), tmp_path / "m.yaml", {})
    campaign = config.campaigns[0]
    assert campaign.skip_weekends is True
    assert campaign.overdue.every_days == 2 and campaign.overdue.max == 3
    assert config.store == tmp_path / "mailflow.db"
    assert config.mail.local.outbox == tmp_path / "outbox"


def test_every_problem_is_reported_at_once_with_key_and_line(tmp_path: Path) -> None:
    text = """\
secretariat:
  name: TS
  adress: ts@example.org
  timezone: America/San_Jose
  digest:
    to: [coordinator@example.org]
    schedule: "0 25 * * *"
mail:
  transport: local
delegations:
  - id: HN
    name: Honduras
    language: es
    timezone: America/Tegucigalpa
    contacts: [enlace@sre.example.hn]
  - id: HN
    name: Honduras again
    language: fr
    timezone: America/Tegucigalpa
    contacts: [not-an-address]
campaigns:
  - id: c1
    title: Responsible column
    workbook: missing.xlsx
    key_column: Code
    fill_column: Responsible
    opens: 2017-10-18T10:00
    deadline: 2017-10-01
    reminders: ["-3x", "2d"]
    overdue: {every: 0d, max: 3}
    delegations: [HN, GTM]
    deadlin: 2017-10-23
"""
    found = problems_of(text, tmp_path)
    joined = "\n".join(found)
    expected = [
        ("mailflow.yaml:3: secretariat.adress: unknown key; did you mean 'address'?"),
        ("mailflow.yaml:1: secretariat.address: is required"),  # an absent key: the line of its parent
        ("mailflow.yaml:4: secretariat.timezone: unknown IANA time zone 'America/San_Jose'"),
        ("mailflow.yaml:16: delegations[1].id: duplicate id 'HN'"),
        ("mailflow.yaml:18: delegations[1].language: must be one of es, en"),
        ("mailflow.yaml:20: delegations[1].contacts[0]: 'not-an-address' is not an email address"),
        ("mailflow.yaml:24: campaigns[0].workbook: workbook file"),
        ("mailflow.yaml:29: campaigns[0].reminders[0]: '-3x' is not an offset"),
        ("mailflow.yaml:29: campaigns[0].reminders[1]: '2d' is after the deadline"),
        ("mailflow.yaml:30: campaigns[0].overdue.every:"),
        ("mailflow.yaml:31: campaigns[0].delegations[1]: unknown delegation 'GTM'"),
        ("mailflow.yaml:32: campaigns[0].deadlin: unknown key; did you mean 'deadline'?"),
    ]
    for start in expected:
        assert any(problem.startswith(start) for problem in found), f"{start!r} not in\n{joined}"
    # With the secretariat's zone unknown (and its address misspelt), neither the cron nor `opens` can be
    # read; fix them and they are.
    fixed = problems_of(text.replace("America/San_Jose", "America/Costa_Rica").replace("adress", "address"), tmp_path)
    assert any(p.startswith("mailflow.yaml:7: secretariat.digest.schedule: bad cron expression") for p in fixed)
    assert any(
        p.startswith("mailflow.yaml:28: campaigns[0].deadline: deadline 2017-10-01 is before opens 2017-10-18")
        for p in fixed
    )


def test_timezone_suggestion(tmp_path: Path) -> None:
    found = problems_of(minimal(SAMPLE_PLAN).replace("America/Tegucigalpa", "America/Tegucigalp"), tmp_path)
    assert any("did you mean 'America/Tegucigalpa'" in p for p in found), found


def test_environment_variables_are_substituted(tmp_path: Path) -> None:
    text = (
        minimal(SAMPLE_PLAN)
        .replace("name: TS", "name: ${TS_NAME}")
        .replace(
            "transport: local", "transport: smtp\n  smtp: {host: smtp.example.org, username: ts, password: '${PW}'}"
        )
    )
    config = parse_config(text, tmp_path / "m.yaml", {"TS_NAME": "Secretaría Técnica", "PW": "s3cret"})
    assert config.secretariat.name == "Secretaría Técnica"
    assert config.mail.smtp is not None and config.mail.smtp.password == "s3cret"
    assert config.mail.smtp.port == 587
    found = problems_of(text, tmp_path, {"TS_NAME": "x"})
    assert any("mail.smtp.password: environment variable PW is not set" in p for p in found), found


def test_credentials_of_an_unused_transport_need_not_be_set(tmp_path: Path) -> None:
    text = minimal(SAMPLE_PLAN).replace(
        "transport: local", "transport: local\n  smtp: {host: smtp.example.org, username: ts, password: '${PW}'}"
    )
    assert parse_config(text, tmp_path / "m.yaml", {}).mail.smtp is not None


def test_smtp_transport_needs_smtp_settings(tmp_path: Path) -> None:
    found = problems_of(minimal(SAMPLE_PLAN).replace("transport: local", "transport: smtp"), tmp_path)
    assert any("mail.smtp: is required when mail.transport is smtp" in p for p in found), found


def test_unquoted_send_time_read_as_sexagesimal_is_understood(tmp_path: Path) -> None:
    config = parse_config(minimal(SAMPLE_PLAN, "    send_time: 9:30\n"), tmp_path / "m.yaml", {})
    assert config.campaigns[0].send_time == time(9, 30)


def test_header_injection_in_names_is_refused(tmp_path: Path) -> None:
    text = minimal(SAMPLE_PLAN).replace("name: Honduras", 'name: "Honduras\\r\\nBcc: spy@evil.example"')
    found = problems_of(text, tmp_path)
    assert any("delegations[0].name: may not contain line breaks" in p for p in found), found


def test_not_yaml_and_not_found(tmp_path: Path) -> None:
    found = problems_of("secretariat: [unclosed\n", tmp_path)
    assert found[0].startswith("mailflow.yaml:2: not valid YAML")
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "absent.yaml")
    assert "configuration file not found" in caught.value.problems[0]


def test_resource_checks_name_a_column_the_workbook_lacks(tmp_path: Path) -> None:
    shutil.copy(SAMPLE_PLAN, tmp_path / "plan.xlsx")
    text = minimal(Path("plan.xlsx")).replace("fill_column: Responsible", "fill_column: Institution")
    config = parse_config(text, tmp_path / "mailflow.yaml", {})
    found = check_resources(config)
    assert len(found) == 1
    assert found[0].startswith("mailflow.yaml:16: campaigns[0].workbook:")
    assert "Institution" in found[0] and "Responsible" in found[0]  # it lists the headers it saw


def test_spanish_header_names_match(tmp_path: Path) -> None:
    text = (
        minimal(SAMPLE_PLAN)
        .replace("key_column: Code", "key_column: Código")
        .replace("fill_column: Responsible", "fill_column: Responsable")
    )
    config = parse_config(text, tmp_path / "mailflow.yaml", {})
    assert check_resources(config) == []


def test_a_slow_to_validate_configuration_is_cached_until_anything_it_depends_on_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mailflow.config as config_module

    monkeypatch.setattr(config_module, "CACHE_WHEN_SLOWER_THAN_SECONDS", 0.0)
    shutil.copy(SAMPLE_PLAN, tmp_path / "plan.xlsx")
    path = tmp_path / "mailflow.yaml"
    path.write_text(minimal(Path("plan.xlsx")).replace("name: TS", "name: ${TS_NAME}"), encoding="utf-8")
    environ = {"MAILFLOW_CACHE": str(tmp_path / "cache"), "TS_NAME": "Secretaría"}
    first = load_config(path, environ)
    [cached_file] = (tmp_path / "cache").iterdir()
    calls: list[str] = []
    real_parse = config_module.parse_config

    def counting_parse(*args: object, **kwargs: object) -> object:
        calls.append("parsed")
        return real_parse(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(config_module, "parse_config", counting_parse)
    assert load_config(path, environ) == first and calls == []
    # A change of an environment variable it uses, of the file, or of the workbook: validated again.
    assert load_config(path, {**environ, "TS_NAME": "Otra"}).secretariat.name == "Otra"
    assert calls == ["parsed"]
    (tmp_path / "plan.xlsx").write_bytes((tmp_path / "plan.xlsx").read_bytes() + b"")
    import os

    os.utime(tmp_path / "plan.xlsx", ns=(1, 1))
    load_config(path, environ)
    assert calls == ["parsed", "parsed"]
    cached_file.write_bytes(b"garbage")
    assert load_config(path, environ) == first
    assert load_config(path, {**environ, "MAILFLOW_CACHE": "off"}) == first


BILLION_LAUGHS = "\n".join(
    [
        'a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]',
        *(
            f"{name}: &{name} [{', '.join([f'*{previous}'] * 9)}]"
            for previous, name in zip("abcdefgh", "bcdefghi", strict=True)
        ),
    ]
)


def test_a_yaml_billion_laughs_is_refused_before_anything_walks_it(tmp_path: Path) -> None:
    """Nine levels of nine aliases stand for 387 million values: refused from the node graph, whose distinct
    nodes are few (a walk of every value would take minutes and gigabytes: this test would not end)."""
    assert problems_of(BILLION_LAUGHS, tmp_path) == [
        "mailflow.yaml: the anchors and aliases (& and *) add more than 100,000 values; "
        "write the repeated parts out, or repeat them fewer times"
    ]


def test_only_what_aliases_add_is_bounded_not_what_is_written() -> None:
    """A configuration of thousands of delegations is many values, all written out: none added by aliases."""
    import yaml

    from mailflow.config import SAFE_LOADER, _aliased_values

    written = yaml.compose("values: [" + ", ".join(f"v{n}" for n in range(150_000)) + "]", Loader=SAFE_LOADER)
    assert _aliased_values(written) == 0
    twice = yaml.compose("a: &a [1, 2, 3]\nb: *a\nc: [*a, *a]", Loader=SAFE_LOADER)
    assert _aliased_values(twice) == 12  # three more copies of a list of three: 3 x (1 + 3)
    laughs = yaml.compose(BILLION_LAUGHS, Loader=SAFE_LOADER)
    assert _aliased_values(laughs) > 9**9


def test_anchors_and_aliases_used_as_people_use_them_are_fine() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    # The same contact list for two delegations, written once.
    shared = text.replace(
        "contacts: [liaison@immigration.example.bz]", "contacts: &shared [liaison@immigration.example.bz]", 1
    ).replace("contacts: [enlace@sre.example.hn]", "contacts: *shared", 1)
    assert shared.count("*shared") == 1 and shared.count("&shared") == 1
    config = parse_config(shared, EXAMPLE, {})
    contacts = {d.id: d.contacts for d in config.delegations}
    assert contacts["HN"] == contacts["BZ"] == ("liaison@immigration.example.bz",)
