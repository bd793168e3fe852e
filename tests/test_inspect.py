"""`inspect`: a dry run for one received .eml or a bare workbook, exactly the contract's JSON, changing nothing."""

from __future__ import annotations

import hashlib
import json
import mailbox
from pathlib import Path

import pytest

from mailflow.cli import main
from tests.helpers import example_data, fill_workbook, write_config

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "mail"
CONTRACT_KEYS = {"kind", "delegation", "campaign", "sender_trusted", "attachments"}
ATTACHMENT_KEYS = {"filename", "status", "reason", "filled", "missing"}


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    data = example_data()
    data["store"] = str(tmp_path / "store.db")
    data["mail"] = {"transport": "local", "local": {"outbox": str(tmp_path / "outbox"), "inbox": str(tmp_path / "in")}}
    return write_config(tmp_path, data)


def inspect(capsys: pytest.CaptureFixture[str], config: Path, file: Path, *extra: str) -> dict[str, object]:
    code = main(["--config", str(config), "inspect", str(file), "--json", *extra])
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads(out)
    assert isinstance(result, dict) and result.keys() >= CONTRACT_KEYS
    for attachment in result["attachments"]:
        assert attachment.keys() >= ATTACHMENT_KEYS
        assert attachment["status"] in ("parsed", "unreadable", "rejected", "ignored")
    return result


@pytest.mark.parametrize(
    ("fixture", "kind", "delegation", "trusted", "outcome"),
    [
        ("gmail_reply_with_xlsx.eml", "reply", "HN", True, "applied"),
        ("outlook_reply_xlsx.eml", "reply", "HN", True, "applied"),
        ("apple_mail_reply.eml", "reply", "BZ", True, "applied"),
        ("forward_with_rfc822.eml", "reply", "GT", True, "applied"),
        ("body_answers_es.eml", "reply", "NI", True, "applied"),
        ("ooo_en.eml", "auto_reply", "CA", True, "auto_reply"),
        # A delivery report that returns no email of ours (this store sent none) marks nobody: held for review.
        ("dsn_postfix.eml", "bounce", "PA", False, "held"),
        ("dmarc_fail_m365.eml", "reply", "HN", False, "held"),
    ],
)
def test_inspect_an_email(
    capsys: pytest.CaptureFixture[str],
    config_path: Path,
    fixture: str,
    kind: str,
    delegation: str,
    trusted: bool,
    outcome: str,
) -> None:
    result = inspect(capsys, config_path, FIXTURES / fixture)
    assert (result["kind"], result["campaign"], result["delegation"]) == (kind, "responsible-2017", delegation)
    assert result["sender_trusted"] is trusted
    assert result["outcome"] == outcome
    if outcome != "applied":
        assert result["follow_up"] is None  # nothing is ever sent to an auto-reply, a bounce or a stranger
    if outcome == "held":  # why, as a code a program can act on, beside the sentence for people
        assert result["reason_code"] in ("held_forged_bounce", "held_authentication"), result["reason_code"]
    assert not (config_path.parent / "store.db").exists()  # nothing was written


def test_inspect_reads_the_workbook_of_a_reply(capsys: pytest.CaptureFixture[str], config_path: Path) -> None:
    result = inspect(capsys, config_path, FIXTURES / "gmail_reply_with_xlsx.eml")
    [workbook] = [a for a in result["attachments"] if a["filename"].endswith(".xlsx")]  # type: ignore[union-attr]
    assert workbook["status"] == "parsed"
    assert isinstance(workbook["filled"], dict) and isinstance(workbook["missing"], list)
    assert len(workbook["filled"]) + len(workbook["missing"]) == 40
    assert result["follow_up"] in ("receipt", "missing")


def test_inspect_a_bare_workbook_finds_its_delegation_and_changes_nothing(
    capsys: pytest.CaptureFixture[str], config_path: Path, tmp_path: Path
) -> None:
    assert main(["--config", str(config_path), "tick", "--now", "2017-10-18T10:00"]) == 0
    capsys.readouterr()
    sent = next(m for m in mailbox.Maildir(tmp_path / "outbox") if m["X-Mailflow-Delegation"] == "NI")
    [part] = [p for p in sent.walk() if p.get_filename()]
    payload = part.get_payload(decode=True)
    assert isinstance(payload, bytes)
    returned = tmp_path / "renamed by the delegation.xlsx"
    returned.write_bytes(fill_workbook(payload, {"1.1": "Ministerio de la Familia", "1.2": "-"}))
    store = tmp_path / "store.db"
    before = hashlib.sha256(store.read_bytes()).hexdigest()
    result = inspect(capsys, config_path, returned)
    assert result["delegation"] == "NI" and result["campaign"] == "responsible-2017"
    [attachment] = result["attachments"]  # type: ignore[misc]
    assert attachment["status"] == "parsed"
    assert attachment["filled"] == {"1.1": "Ministerio de la Familia"}  # "-" is no answer
    assert "1.2" in attachment["missing"]
    assert hashlib.sha256(store.read_bytes()).hexdigest() == before


def test_inspect_for_people_and_a_missing_file(capsys: pytest.CaptureFixture[str], config_path: Path) -> None:
    assert main(["--config", str(config_path), "inspect", str(FIXTURES / "dsn_postfix.eml")]) == 0
    out = capsys.readouterr().out
    assert "kind:        bounce" in out and "failed:" in out
    assert main(["--config", str(config_path), "inspect", str(FIXTURES / "absent.eml")]) == 2
    assert "cannot read" in capsys.readouterr().err
