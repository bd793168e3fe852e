"""``mailflow demo``: one run of the whole simulated campaign, and what it leaves in its folder."""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from email import message_from_bytes, policy
from email.message import EmailMessage
from html.parser import HTMLParser
from pathlib import Path

import openpyxl
import pytest

from mailflow.checks import load_checked_config
from mailflow.demo import MARKER, DemoResult, demo_answers, encrypted_workbook, run_demo
from mailflow.errors import MailflowError
from mailflow.returns import read_return, sniff_format
from mailflow.store import DelegationState, Store
from mailflow.workbook import read_fingerprint, read_master, verify_fingerprint

EVERYONE = ("BZ", "CA", "CR", "DO", "SV", "GT", "HN", "MX", "NI", "PA", "US")
ON_TIME = ("CA", "DO", "PA", "US")
REQUEST = "→ request sent"
REMINDER = "→ reminder"
RECEIPT = "→ receipt"
COMPLETE = "← reply: 40/40 answered (complete)"


@dataclass(frozen=True)
class Run:
    result: DemoResult
    output: str
    seconds: float


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Run:
    out = io.StringIO()
    started = time.monotonic()
    result = run_demo(tmp_path_factory.mktemp("demo") / "demo", out=out)
    return Run(result, out.getvalue(), time.monotonic() - started)


def said(run: Run, delegation: str) -> list[str]:
    """What the timeline tells of one delegation, in order."""
    return [entry.text for entry in run.result.entries if entry.delegation == delegation]


def matches(texts: list[str], prefixes: list[str]) -> bool:
    return len(texts) == len(prefixes) and all(t.startswith(p) for t, p in zip(texts, prefixes, strict=True))


def test_the_demo_takes_well_under_thirty_seconds(demo: Run) -> None:
    assert demo.seconds < 30
    assert demo.result.elapsed_seconds <= demo.seconds


def test_costa_rica_answers_completely_the_morning_after(demo: Run) -> None:
    assert matches(said(demo, "CR"), [REQUEST, COMPLETE, RECEIPT])
    reply = next(e for e in demo.result.entries if e.delegation == "CR" and e.text.startswith("←"))
    assert "Thu 19 Oct 09:30" in reply.line(load_checked_config(demo.result.config_path).secretariat.tz)


def test_guatemala_answers_partially_then_the_rest_after_the_missing_follow_up(demo: Run) -> None:
    assert matches(
        said(demo, "GT"),
        [
            REQUEST,
            REMINDER,
            "← reply: 30/40 answered (partial)",
            "→ missing: 10 action(s) still to fill",
            REMINDER,
            "← reply: 10 answers, now 40/40 answered (complete)",
            RECEIPT,
        ],
    )


def test_el_salvador_sends_a_password_protected_file_then_a_good_one(demo: Run) -> None:
    assert matches(
        said(demo, "SV"),
        [
            REQUEST,
            "← unreadable file «Plan estratégico - El Salvador.xlsx»: the file is password-protected",
            "→ unreadable",
            COMPLETE,
            RECEIPT,
        ],
    )


def test_mexico_is_out_of_office_and_gets_no_answer_to_its_auto_reply(demo: Run) -> None:
    assert matches(
        said(demo, "MX"),
        [
            REQUEST,
            "← automatic reply «Respuesta automática: fuera de la oficina» (no answer sent)",
            REMINDER,
            REMINDER,
            COMPLETE,
            RECEIPT,
        ],
    )
    with Store.open(demo.result.folder / "mailflow.db") as store:
        kinds = [row.kind for row in store.outbox(delegation="MX")]
        auto = store.inbound_rows(delegation="MX", outcome="auto_reply")
    assert kinds == ["request", "reminder", "reminder", "receipt"]  # nothing in answer to the auto-reply
    assert len(auto) == 1


def test_honduras_answers_in_the_body_and_the_answers_are_recorded(demo: Run) -> None:
    assert matches(
        said(demo, "HN"),
        [REQUEST, REMINDER, REMINDER, "← reply in the email text: 40/40 answered (complete)", RECEIPT],
    )
    config = load_checked_config(demo.result.config_path)
    keys = read_master(config.campaigns[0].workbook, "Code", "Responsible").keys
    with Store.open(config.store) as store:
        history = store.answer_history("responsible-2017", "HN")
        current = store.current_answers("responsible-2017", "HN")["HN"]
    assert history and {a.source for a in history} == {"body"}
    assert current == demo_answers(config.delegation("HN"), keys)
    assert current["1.1"] == "Dirección de Niñez, Adolescencia y Familia"


def test_nicaragua_answers_only_after_the_second_overdue_notice(demo: Run) -> None:
    assert matches(
        said(demo, "NI"),
        [REQUEST, REMINDER, REMINDER, "→ overdue notice 1", "→ overdue notice 2", COMPLETE, RECEIPT],
    )


def test_belize_never_answers_and_gets_every_overdue_notice(demo: Run) -> None:
    assert matches(
        said(demo, "BZ"),
        [REQUEST, REMINDER, REMINDER, "→ overdue notice 1", "→ overdue notice 2", "→ overdue notice 3"],
    )


@pytest.mark.parametrize("delegation", ON_TIME)
def test_the_others_answer_completely_before_the_deadline(demo: Run, delegation: str) -> None:
    texts = said(demo, delegation)
    assert texts[0].startswith(REQUEST)
    assert texts[-2:] == [COMPLETE, "→ receipt: return complete, thank you"]
    assert not any("overdue" in text for text in texts)
    status = demo.result.status_of(delegation)
    assert status.last_reply_at is not None and status.last_reply_at < status.deadline_at


def test_the_final_status_of_every_delegation(demo: Run) -> None:
    states = {s.id: (s.state, s.filled, s.total, s.overdue) for s in demo.result.statuses}
    expected = {d: (DelegationState.COMPLETE, 40, 40, False) for d in EVERYONE if d != "BZ"}
    expected["BZ"] = (DelegationState.AWAITING, 0, 40, True)
    assert states == expected


def test_the_digest_goes_to_the_coordinator_each_working_morning(demo: Run) -> None:
    digests = [e for e in demo.result.entries if e.delegation == "" and e.text.startswith("→ digest")]
    assert len(digests) == 11  # Thu 19 Oct to Thu 2 Nov, weekdays, 08:00
    assert all("coordinator@example.org" in e.text for e in digests)
    assert digests[-1].text.endswith("(10 of 11 complete)")


def test_the_output_holds_the_timeline_the_table_and_where_things_are(demo: Run) -> None:
    folder = demo.result.folder
    for line in demo.result.timeline:
        assert line in demo.output
    assert "Wed 18 Oct 10:00  Costa Rica (CR)" in demo.output
    assert "10 of 11 delegations complete" in demo.output
    assert str(folder / "consolidated.xlsx") in demo.output
    assert str(folder / "last-digest.html") in demo.output
    assert f"mailflow --config {folder / 'mailflow.yaml'} status" in demo.output
    assert "status --delegation NI" in demo.output


def test_the_consolidated_workbook_holds_costa_ricas_answers(demo: Run) -> None:
    config = load_checked_config(demo.result.config_path)
    campaign = config.campaigns[0]
    layout = read_master(campaign.workbook, campaign.key_column, campaign.fill_column)
    book = openpyxl.load_workbook(demo.result.consolidated_path, read_only=False)
    sheet = book[layout.sheet]
    header = [cell.value for cell in sheet[layout.header_row]]
    column = header.index("Costa Rica") + 1
    found = {row.key: sheet.cell(row=row.row, column=column).value for row in layout.rows}
    assert found == demo_answers(config.delegation("CR"), layout.keys)
    assert found["1.1"] == "Patronato Nacional de la Infancia"


def test_the_last_digest_is_written_as_html_naming_the_delegations(demo: Run) -> None:
    path = demo.result.digest_path
    assert path is not None and path.is_file()
    text = path.read_text(encoding="utf-8")

    class Collect(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.tags: list[str] = []
            self.text: list[str] = []

        def handle_starttag(self, tag: str, attrs: object) -> None:
            self.tags.append(tag)

        def handle_data(self, data: str) -> None:
            self.text.append(data)

    parser = Collect()
    parser.feed(text)
    parser.close()
    assert {"html", "body", "table"} <= set(parser.tags)
    words = " ".join(parser.text)
    config = load_checked_config(demo.result.config_path)
    for delegation in config.delegations:
        assert delegation.name in words
    assert "jueves 2 de noviembre de 2017" in words  # the last one, in the secretariat's language


def test_the_folder_config_is_valid_and_keeps_everything_inside(demo: Run) -> None:
    folder = demo.result.folder
    config = load_checked_config(demo.result.config_path)
    assert demo.result.config_path == folder / "mailflow.yaml"
    assert config.mail.transport == "local"
    assert config.store == folder / "mailflow.db"
    assert config.mail.local.outbox == folder / "outbox"
    assert config.mail.local.inbox == folder / "inbox"
    assert config.campaigns[0].workbook == folder / "strategic-plan-2017-2022.xlsx"
    assert (folder / MARKER).is_file()
    assert len(list((folder / "outbox" / "new").iterdir())) == len(
        [e for e in demo.result.entries if e.text.startswith("→")]
    )


def test_replies_are_filled_in_the_copy_received_with_its_fingerprint(demo: Run) -> None:
    config = load_checked_config(demo.result.config_path)
    with Store.open(config.store) as store:
        row = store.inbound_rows(delegation="CR")[0]
        raw = store.inbound_raw(row.id)
        attachments = store.attachments(row.id)
    assert row.evidence.startswith("in reply to <mailflow.")
    assert [a.status for a in attachments] == ["parsed"]
    message = message_from_bytes(raw, policy=policy.default)
    assert isinstance(message, EmailMessage)
    data = next(iter(message.iter_attachments())).get_payload(decode=True)
    assert isinstance(data, bytes)
    fingerprint = read_fingerprint(data)
    assert fingerprint is not None and (fingerprint.campaign, fingerprint.delegation) == ("responsible-2017", "CR")
    assert config.fingerprint_secret is not None
    assert verify_fingerprint(fingerprint, config.fingerprint_secret.encode())


def test_the_password_protected_file_is_what_excel_makes() -> None:
    data = encrypted_workbook("SV")
    assert data.startswith(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1")
    assert sniff_format(data, "Plan.xlsx") == "encrypted"
    plan = Path(__file__).resolve().parent.parent / "templates" / "workbooks" / "strategic-plan-2017-2022.xlsx"
    layout = read_master(plan, "Code", "Responsible")
    reading = read_return(data, "Plan.xlsx", layout, "Code", "Responsible")
    assert reading.reason == "the file is password-protected; please send it without a password"


def test_running_again_in_the_same_folder_makes_it_anew(demo: Run) -> None:
    folder = demo.result.folder
    (folder / "inbox" / "new" / "stray-message").write_bytes(b"Subject: left over\r\n\r\nnot from this run\r\n")
    (folder / "my-notes.txt").write_text("mine", encoding="utf-8")
    again = run_demo(folder, out=io.StringIO())
    assert again.timeline == demo.result.timeline  # the same story: deterministic, and nothing left over counted
    assert not (folder / "inbox" / "new" / "stray-message").exists()
    assert (folder / "my-notes.txt").read_text(encoding="utf-8") == "mine"  # only what the demo made is removed
    (folder / "my-notes.txt").unlink()


def test_a_folder_that_is_not_a_demo_folder_is_refused_untouched(tmp_path: Path) -> None:
    folder = tmp_path / "work"
    folder.mkdir()
    (folder / "mailflow.yaml").write_text("precious: true\n", encoding="utf-8")
    with pytest.raises(MailflowError, match="not a mailflow demo folder"):
        run_demo(folder, out=io.StringIO())
    assert [p.name for p in folder.iterdir()] == ["mailflow.yaml"]
    assert (folder / "mailflow.yaml").read_text(encoding="utf-8") == "precious: true\n"


def test_a_file_in_place_of_the_folder_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "demo"
    path.write_text("a file", encoding="utf-8")
    with pytest.raises(MailflowError, match="is not a folder"):
        run_demo(path, out=io.StringIO())
    assert path.read_text(encoding="utf-8") == "a file"
