"""The command line: exit codes, one-line errors, the contract's JSON, and the local transport."""

from __future__ import annotations

import json
import mailbox
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mailflow.cli import main
from tests.helpers import example_data, write_config

OPENING = "2017-10-18T10:05:00-06:00"


@pytest.fixture
def local_config(tmp_path: Path) -> Path:
    data = example_data()
    data["store"] = str(tmp_path / "store.db")
    data["mail"] = {"transport": "local", "local": {"outbox": str(tmp_path / "outbox"), "inbox": str(tmp_path / "in")}}
    return write_config(tmp_path, data)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_check_config_accepts_the_example(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--config", "config.example.yaml", "check-config")
    assert code == 0 and "OK (11 delegations; campaigns: responsible-2017)" in out


def test_tick_sends_every_request_once_through_the_local_transport(
    capsys: pytest.CaptureFixture[str], local_config: Path, tmp_path: Path
) -> None:
    code, out, _ = run(capsys, "--config", str(local_config), "tick", "--now", OPENING)
    assert code == 0 and "11 sent" in out
    outbox = mailbox.Maildir(tmp_path / "outbox", create=False)
    kinds = sorted(str(message["X-Mailflow-Kind"]) for message in outbox)
    assert kinds == ["request"] * 11
    code, out, _ = run(capsys, "--config", str(local_config), "tick", "--now", OPENING)
    assert code == 0 and "0 sent" in out
    assert len(list(outbox.keys())) == 11


def test_status_json_follows_the_contract(capsys: pytest.CaptureFixture[str], local_config: Path) -> None:
    run(capsys, "--config", str(local_config), "tick", "--now", OPENING)
    code, out, _ = run(capsys, "--config", str(local_config), "status", "--json", "--now", "2017-10-19T12:00")
    assert code == 0
    data = json.loads(out)
    [campaign] = data["campaigns"]
    assert campaign["id"] == "responsible-2017"
    assert len(campaign["delegations"]) == 11
    honduras = next(d for d in campaign["delegations"] if d["id"] == "HN")
    contract_keys = {"id", "state", "overdue", "filled", "total", "missing", "last_reply_at", "next_reminder_at"}
    assert contract_keys <= honduras.keys()
    assert honduras["state"] == "awaiting"
    assert honduras["overdue"] is False
    assert (honduras["filled"], honduras["total"]) == (0, 40)
    assert honduras["missing"][:3] == ["1.1", "1.2", "1.3"]
    assert honduras["last_reply_at"] is None
    # Friday 20 October, 09:00 in Tegucigalpa (UTC-6).
    assert honduras["next_reminder_at"] == "2017-10-20T15:00:00+00:00"
    # Past the deadline (end of Monday 23 in Santo Domingo, UTC-4) it is overdue.
    code, out, _ = run(capsys, "--config", str(local_config), "status", "--json", "--now", "2017-10-24T04:00+00:00")
    dominican = next(d for d in json.loads(out)["campaigns"][0]["delegations"] if d["id"] == "DO")
    honduras = next(d for d in json.loads(out)["campaigns"][0]["delegations"] if d["id"] == "HN")
    assert dominican["overdue"] is True and honduras["overdue"] is False


def test_status_table_is_readable(capsys: pytest.CaptureFixture[str], local_config: Path) -> None:
    run(capsys, "--config", str(local_config), "tick", "--now", OPENING)
    code, out, _ = run(capsys, "--config", str(local_config), "status", "--now", "2017-10-19T12:00")
    assert code == 0
    assert "Honduras (HN)" in out and "awaiting" in out and "0/40" in out
    assert "Fri 20 Oct 09:00" in out  # next reminder, secretariat time
    assert "0 of 11 delegations complete" in out


def test_a_configuration_error_sends_nothing_and_prints_the_check_config_lines(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    data = example_data()
    data["store"] = str(tmp_path / "store.db")
    data["mail"] = {"transport": "local", "local": {"outbox": str(tmp_path / "outbox")}}
    data["delegations"][0]["timezone"] = "America/Belice"
    data["campaigns"][0]["remiders"] = ["-1d"]
    path = write_config(tmp_path, data)
    code, _, checked = run(capsys, "--config", str(path), "check-config")
    assert code == 2
    code, _, ticked = run(capsys, "--config", str(path), "tick", "--now", OPENING)
    assert code == 2
    assert ticked == checked
    assert "delegations[0].timezone: unknown IANA time zone 'America/Belice'; did you mean 'America/Belize'?" in ticked
    assert "campaigns[0].remiders: unknown key; did you mean 'reminders'?" in ticked
    assert not (tmp_path / "outbox").exists() and not (tmp_path / "store.db").exists()


def test_preview_renders_without_sending(
    capsys: pytest.CaptureFixture[str], local_config: Path, tmp_path: Path
) -> None:
    eml = tmp_path / "preview.eml"
    code, out, _ = run(
        capsys,
        "--config",
        str(local_config),
        "preview",
        "reminder",
        "--delegation",
        "HN",
        "--now",
        "2017-10-20T09:00",
        "--eml",
        str(eml),
    )
    assert code == 0
    assert "X-Mailflow-Kind: reminder" in out
    assert "[Ref. responsible-2017/HN]" in out
    assert "lunes 23 de octubre de 2017" in out
    assert "[attachment: Plan estratégico - Honduras.xlsx" in out
    assert eml.read_bytes().startswith(b"From:") or b"\r\nFrom:" in eml.read_bytes()
    assert not (tmp_path / "outbox").exists()
    code, out, _ = run(capsys, "--config", str(local_config), "preview", "request", "--delegation", "US", "--html")
    assert code == 0 and "<html" in out.lower() and "Monday, 23 October 2017" in out


def test_usage_errors_are_one_line_with_exit_2(capsys: pytest.CaptureFixture[str], local_config: Path) -> None:
    code, _, err = run(capsys, "--config", str(local_config), "preview", "request", "--delegation", "XX")
    assert code == 2
    assert err.strip().count("\n") == 0 and "delegation 'XX' is not in campaign responsible-2017" in err
    code, _, err = run(capsys, "--config", str(local_config), "tick", "--now", "yesterday")
    assert code == 2 and "--now 'yesterday' is not an ISO 8601 instant" in err
    code, _, err = run(capsys, "--config", str(local_config), "status", "--campaign", "nope")
    assert code == 2 and "unknown campaign 'nope'" in err
    with pytest.raises(SystemExit) as exited:
        main(["frobnicate"])
    assert exited.value.code == 2


def test_console_script_uses_mailflow_config_and_debug_shows_a_traceback(local_config: Path) -> None:
    exe = Path(sys.executable).parent / "mailflow"
    env = {**os.environ, "MAILFLOW_CONFIG": str(local_config)}
    done = subprocess.run([exe, "check-config"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    done = subprocess.run(
        [exe, "preview", "request", "--delegation", "XX"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    done = subprocess.run(
        [exe, "--debug", "preview", "request", "--delegation", "XX"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0 and "Traceback" in done.stderr
    missing = subprocess.run(
        [exe, "--config", "/nonexistent/mailflow.yaml", "status"], capture_output=True, text=True, timeout=60
    )
    assert missing.returncode == 2 and "configuration file not found" in missing.stderr


def test_history_timeline_and_consolidate_commands(
    capsys: pytest.CaptureFixture[str], local_config: Path, tmp_path: Path
) -> None:
    import csv
    import io

    import openpyxl

    run(capsys, "--config", str(local_config), "tick", "--now", OPENING)
    run(capsys, "--config", str(local_config), "tick", "--now", "2017-10-20T09:30")
    code, out, _ = run(capsys, "--config", str(local_config), "status", "--delegation", "HN")
    assert code == 0
    assert out.startswith("Honduras (HN) — times in America/Costa_Rica")
    assert "2017-10-18 10:05  → request" in out and "2017-10-20 09:30  → reminder" in out
    code, out, _ = run(capsys, "--config", str(local_config), "history", "--format", "csv")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out, newline="")))
    assert {row["delegation"] for row in rows} >= {"HN", "BZ", "US"}
    assert [row["kind"] for row in rows if row["delegation"] == "HN" and row["direction"] == "out"] == [
        "request",
        "reminder",
    ]
    export = tmp_path / "history.json"
    code, _, _ = run(capsys, "--config", str(local_config), "history", "--format", "json", "--output", str(export))
    assert code == 0 and json.loads(export.read_text(encoding="utf-8"))["campaign"] == "responsible-2017"
    target = tmp_path / "consolidated.xlsx"
    code, out, _ = run(capsys, "--config", str(local_config), "consolidate", "--output", str(target))
    assert code == 0 and str(target) in out
    book = openpyxl.load_workbook(target)
    assert len(book.sheetnames) == 3
    code, _, err = run(capsys, "--config", str(local_config), "status", "--delegation", "XX")
    assert code == 2 and "unknown delegation 'XX'" in err
    master = example_data()["campaigns"][0]["workbook"]
    code, _, err = run(capsys, "--config", str(local_config), "consolidate", "--output", master)
    assert code == 1 and "never writes over it" in err
