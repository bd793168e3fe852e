"""The hostile input corpus through the real intake: each file gets its outcome, the service goes on, memory stays low.

tests/fixtures/hostile/ holds the corpus (written by make_corpus.py there) and manifest.yaml,
what mailflow must make of each file. A campaign is opened on the local transport; every
corpus file is delivered to its inbox (a bare file attached to a reply from the delegation's
contact, an .eml as it is), then a good reply from Panama; one ``Engine.tick`` reads them all.
That tick runs in a child process, which reports its peak RSS: the limit is stated below,
and the figure is printed. Each file then gets its own test of what the store recorded.

Also here: formula-shaped answers stay text in the consolidated workbook, script answers are
escaped in the HTML of a receipt and a digest sent through the real aiosmtpd after a reply read
from the real Dovecot, and no value that arrives from outside ever becomes an email header.
"""

from __future__ import annotations

import email
import email.policy
import importlib.util
import io
import json
import mailbox
import re
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import python_calamine
import yaml

from mailflow.clock import FixedClock
from mailflow.config import Config, load_config
from mailflow.consolidate import gather, render_consolidated
from mailflow.engine import Engine
from mailflow.inbound import parse_message
from mailflow.sender import LocalTransport
from mailflow.store import InboundRow, Store
from tests.helpers import ROOT, example_data, fill_workbook, reply_to, workbook_of, write_config
from tests.servers import ImapAccount, SmtpServer

CORPUS = Path(__file__).resolve().parent / "fixtures" / "hostile"
MANIFEST: dict[str, dict[str, Any]] = yaml.safe_load((CORPUS / "manifest.yaml").read_text(encoding="utf-8"))["files"]
OPENS = datetime(2017, 10, 18, 16, 0, tzinfo=UTC)
READ_AT = OPENS + timedelta(hours=1)
CAMPAIGN = "responsible-2017"
ALL_KEYS = [f"{line}.{action}" for line in range(1, 6) for action in range(1, 9)]
RSS_LIMIT_MB = 400
"""Peak resident memory allowed to the process that reads the whole corpus (imports included)."""
MAX_COMMITTED_FILE = 200 * 1024
MAX_COMMITTED_TOTAL = 3 * 1024 * 1024
SPY = "spy@evil.example"
GOOD = ("PA", "enlace@mire.example.pa")  # the good reply read after the corpus, in the same tick
ALLOWED_HEADERS = {
    "x-mailflow-envelope-from",  # written by the local transport, as a server records the envelope
    "x-mailflow-envelope-to",
    "from",
    "to",
    "reply-to",
    "subject",
    "date",
    "message-id",
    "in-reply-to",
    "references",
    "mime-version",
    "auto-submitted",
    "content-language",
    "x-mailflow-kind",
    "x-mailflow-campaign",
    "x-mailflow-delegation",
    "content-type",
}
"""Every header an email of mailflow may carry at its top level: anything else was injected."""


def _load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_corpus", CORPUS / "make_corpus.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_corpus = _load_generator()


# ==========================================================================
# The corpus itself
# ==========================================================================


def test_every_corpus_file_has_an_expected_outcome_and_is_small() -> None:
    committed = {p.name for p in CORPUS.iterdir() if p.is_file() and p.name not in ("manifest.yaml", "make_corpus.py")}
    runtime = {name for name, entry in MANIFEST.items() if entry.get("runtime")}
    assert runtime == set(make_corpus.RUNTIME)
    assert committed == set(MANIFEST) - runtime, "a file without an expected outcome, or an outcome without a file"
    assert set(make_corpus.BUILDERS) == set(MANIFEST)
    assert len(MANIFEST) >= 40
    sizes = {name: (CORPUS / name).stat().st_size for name in committed}
    assert max(sizes.values()) < MAX_COMMITTED_FILE, max(sizes.items(), key=lambda item: item[1])
    assert sum(sizes.values()) < MAX_COMMITTED_TOTAL
    for name, entry in MANIFEST.items():
        assert entry["send"] in ("attachment", "message"), name
        assert entry["outcome"] in ("applied", "held", "auto_reply", "bounce", "unrelated", "failed"), name
        assert entry["what"], name


def test_corpus_files_are_what_the_generator_writes() -> None:
    for name, data in make_corpus.build_committed().items():
        assert (CORPUS / name).read_bytes() == data, f"{name}: run tests/fixtures/hostile/make_corpus.py"


# ==========================================================================
# One tick reads the whole corpus, in a child process that measures its memory
# ==========================================================================

CHILD = r"""
import json, resource, sys, time
from datetime import datetime
from mailflow.clock import FixedClock
from mailflow.config import load_config
from mailflow.engine import Engine
from mailflow.mailbox import MaildirMailbox
from mailflow.sender import LocalTransport
from mailflow.store import Store

def high_water_kb():
    # VmHWM: this process's own peak. ru_maxrss is printed too, but Linux carries it over execve
    # from the forked parent (pytest), so it can only be at least the parent's size.
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

config = load_config(sys.argv[1])
import mailflow.intake, mailflow.returns, openpyxl, python_calamine  # noqa: the baseline includes them
baseline = high_water_kb()
with Store.open(config.store) as store:
    engine = Engine(
        config, store, LocalTransport(config.mail.local.outbox), FixedClock(datetime.fromisoformat(sys.argv[2])),
        mailbox=MaildirMailbox(config.mail.local.inbox),
    )
    started = time.perf_counter()
    report = engine.tick()
    seconds = time.perf_counter() - started
inbox = report.inbox
print(json.dumps({
    "baseline_kb": baseline,
    "peak_kb": high_water_kb(),
    "ru_maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    "seconds": seconds,
    "read": inbox.read,
    "failed": inbox.failed,
    "error": inbox.error,
    "by_outcome": inbox.by_outcome,
    "sent": len(report.sent),
    "compose_errors": len(report.compose_errors),
}))
"""


@dataclass
class CorpusRun:
    """What the corpus tick left behind: the store, the emails sent, the child's own figures."""

    config: Config
    store: Store
    rows: dict[str, InboundRow]
    """The recorded message of each corpus file."""
    good: InboundRow
    figures: dict[str, Any]
    outbox: list[EmailMessage]
    root: Path

    def follow_up(self, row: InboundRow) -> EmailMessage | None:
        """The email sent in answer to ``row``, if any."""
        planned = [o for o in self.store.outbox() if o.inbound_id == row.id]
        if not planned:
            return None
        assert len(planned) == 1
        found = [m for m in self.outbox if str(m["Message-ID"]).strip() == planned[0].message_id]
        assert len(found) == 1, f"the {planned[0].kind} for message {row.id} was not sent: {planned[0].last_error}"
        return found[0]


def _read_maildir(folder: Path) -> list[EmailMessage]:
    box = mailbox.Maildir(folder, factory=lambda f: email.message_from_binary_file(f, policy=email.policy.default))
    return [message for message in box if isinstance(message, EmailMessage)]


def _corpus_config(root: Path) -> Config:
    data = example_data()
    data["store"] = str(root / "mailflow.db")
    data["mail"] = {"transport": "local", "local": {"outbox": str(root / "out"), "inbox": str(root / "in")}}
    # The whole corpus arrives from a few delegations at one instant; the daily cap of answers
    # (tested in test_trust.py) would otherwise leave most of it unanswered.
    data["inbound"] = {"max_follow_ups_per_day": 1000}
    return load_config(write_config(root, data))


@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CorpusRun]:
    root = tmp_path_factory.mktemp("corpus")
    config = _corpus_config(root)
    with Store.open(config.store) as store:
        engine = Engine(config, store, LocalTransport(config.mail.local.outbox), FixedClock(OPENS))
        assert len(engine.tick().sent) == 11
    requests = {str(m["X-Mailflow-Delegation"]): m for m in _read_maildir(root / "out")}
    inbox = mailbox.Maildir(root / "in", create=True)
    runtime = root / "runtime"
    runtime.mkdir()
    by_digest: dict[str, str] = {}
    for name, entry in MANIFEST.items():
        if entry.get("runtime"):
            (runtime / name).write_bytes(make_corpus.build(name))
            data = (runtime / name).read_bytes()
        else:
            data = (CORPUS / name).read_bytes()
        raw = make_corpus.message_for(name, data, entry["send"], entry.get("delegation", "HN"), entry.get("filename"))
        assert raw not in by_digest.values()
        by_digest[_sha256(raw)] = name
        inbox.add(raw)
    delegation, sender = GOOD
    attachment_name, copy = workbook_of(requests[delegation])
    good = reply_to(
        requests[delegation],
        sender=sender,
        attachments=[(attachment_name, fill_workbook(copy, {key: f"Institución {key}" for key in ALL_KEYS}))],
    )
    inbox.add(good)
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(config.path), READ_AT.isoformat()],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    store = Store.open(config.store)
    rows: dict[str, InboundRow] = {}
    good_row: InboundRow | None = None
    for row in store.inbound_rows():
        if row.sha256 == _sha256(good):
            good_row = row
        elif row.sha256 in by_digest:
            rows[by_digest[row.sha256]] = row
    assert good_row is not None, "the good reply after the corpus was not recorded"
    print(
        f"\ncorpus: {len(MANIFEST)} files in one tick of {figures['seconds']:.1f} s; "
        f"peak RSS {figures['peak_kb'] / 1024:.0f} MB (after imports {figures['baseline_kb'] / 1024:.0f} MB; "
        f"ru_maxrss {figures['ru_maxrss_kb'] / 1024:.0f} MB, inherited from pytest across exec; "
        f"limit {RSS_LIMIT_MB} MB); outcomes {figures['by_outcome']}"
    )
    try:
        yield CorpusRun(config, store, rows, good_row, figures, _read_maildir(root / "out"), root)
    finally:
        store.close()


def _sha256(raw: bytes) -> str:
    import hashlib

    return hashlib.sha256(raw).hexdigest()


def _defect(name: str) -> Any:
    entry = MANIFEST[name]
    if "defect" in entry:
        return pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=f"defect: {entry['defect']}"))
    return name


@pytest.mark.parametrize("name", [_defect(name) for name in MANIFEST])
def test_corpus_file(corpus_run: CorpusRun, name: str) -> None:
    entry = MANIFEST[name]
    assert name in corpus_run.rows, f"{name} left no record: every message must be accounted for"
    row = corpus_run.rows[name]
    assert row.outcome == entry["outcome"], (row.outcome, row.reason)
    if "reason" in entry:
        assert entry["reason"] in (row.reason or ""), row.reason
    if row.outcome in ("applied", "held", "auto_reply", "bounce"):
        expected_delegation = entry.get("delegation", "HN")
        assert (row.campaign, row.delegation) == (CAMPAIGN, expected_delegation)

    recorded = corpus_run.store.attachments(row.id)
    expected = entry.get("attachments")
    if isinstance(expected, dict):
        assert len(recorded) == expected["count"]
        assert {a.status for a in recorded} == {expected["status"]}
    elif expected is not None:
        got = [(a.status, a.reason or "") for a in recorded]
        assert len(got) == len(expected), got
        for (status, reason), (want_status, want_reason) in zip(got, expected, strict=True):
            assert status == want_status, got
            assert want_reason in reason, got
            if status != "parsed":
                assert reason and ("please" in reason or status == "ignored"), "a reason must say what to do"

    answers = {a.key for a in corpus_run.store.answers_from(row.id)}
    if "answered" in entry:
        assert answers == set(entry["answered"])
    if "answered_count" in entry:
        assert len(answers) == entry["answered_count"]

    follow_up = corpus_run.follow_up(row)
    if entry["follow_up"] is None:
        assert follow_up is None, "nothing is ever sent in answer to this"
    else:
        assert follow_up is not None
        assert follow_up["X-Mailflow-Kind"] == entry["follow_up"]
        assert follow_up["In-Reply-To"] is not None  # threaded on the message it answers

    if "problem" in entry:
        problems = parse_message(corpus_run.store.inbound_raw(row.id)).problems
        assert any(entry["problem"] in problem for problem in problems), problems


def test_the_service_goes_on_after_the_corpus(corpus_run: CorpusRun) -> None:
    figures = corpus_run.figures
    assert figures["error"] is None
    assert figures["read"] == len(MANIFEST) + 1
    assert len(corpus_run.rows) == len(MANIFEST)
    assert figures["compose_errors"] == 0
    good = corpus_run.good
    assert (good.outcome, good.delegation) == ("applied", GOOD[0])
    panama = corpus_run.store.state(CAMPAIGN, GOOD[0])
    assert panama is not None and panama.state.value == "complete" and panama.filled == 40
    receipt = corpus_run.follow_up(good)
    assert receipt is not None and receipt["X-Mailflow-Kind"] == "receipt"
    # The unrelated stay in the inbox for a person; everything else was moved out of it.
    left = list(mailbox.Maildir(corpus_run.root / "in", create=False).keys())
    unrelated = [name for name, entry in MANIFEST.items() if entry["outcome"] == "unrelated"]
    assert len(left) == len(unrelated)


def test_memory_stays_bounded(corpus_run: CorpusRun) -> None:
    """The child's own peak resident memory (VmHWM, the figure getrusage would give without the exec carry-over)."""
    peak_mb = corpus_run.figures["peak_kb"] / 1024
    print(f"\npeak RSS reading the corpus: {peak_mb:.0f} MB (limit {RSS_LIMIT_MB} MB)")
    assert peak_mb < RSS_LIMIT_MB


DIGEST_AT = datetime(2017, 10, 19, 14, 0, tzinfo=UTC)  # 08:00 in Costa Rica: the first digest slot


def test_a_50000_row_reply_does_not_swell_every_digest(corpus_run: CorpusRun) -> None:
    import time

    config = corpus_run.config
    engine = Engine(config, corpus_run.store, LocalTransport(config.mail.local.outbox), FixedClock(DIGEST_AT))
    started = time.perf_counter()
    raw = engine.compose_bytes("", "", "digest", DIGEST_AT, "<digest@example.org>", DIGEST_AT).raw
    seconds = time.perf_counter() - started
    print(f"\ndigest after the corpus: {len(raw) / 1024:.0f} KB composed in {seconds:.1f} s")
    assert len(raw) < 1024 * 1024


def test_no_value_from_outside_becomes_a_header(corpus_run: CorpusRun) -> None:
    contacts = {d.id: {c.lower() for c in d.contacts} for d in corpus_run.config.delegations}
    follow_ups = [m for m in corpus_run.outbox if m["X-Mailflow-Kind"] != "request"]
    assert len(follow_ups) >= 50
    for message in corpus_run.outbox:
        names = {name.lower() for name in message}
        assert names <= ALLOWED_HEADERS, names - ALLOWED_HEADERS
        for name, value in message.items():
            assert "\r" not in str(value) and "\n" not in str(value), (name, value)
        delegation = str(message["X-Mailflow-Delegation"])
        envelope = {a.strip().lower() for a in str(message["X-Mailflow-Envelope-To"]).split(",")}
        assert envelope == contacts[delegation]
        assert {a.addr_spec.lower() for a in message["To"].addresses} == contacts[delegation]
    injected = corpus_run.follow_up(corpus_run.rows["subject-header-injection.eml"])
    assert injected is not None
    assert str(injected["Subject"]).startswith("Re: Plan Bcc: spy@evil.example X-Injected: yes")
    for message in follow_ups:
        text = message.get_body(preferencelist=("plain",)).get_content()
        assert not re.search(r"^(Bcc|To|X-Injected):", text, re.MULTILINE)


def test_attachment_names_are_cleaned_and_nothing_is_written_anywhere(corpus_run: CorpusRun) -> None:
    def names(corpus_file: str) -> list[str]:
        return [a.filename for a in corpus_run.store.attachments(corpus_run.rows[corpus_file].id)]

    assert names("path-traversal-names.eml") == ["x.xlsx", "y.xlsx", "z.xlsx"]
    assert names("control-character-names.eml") == ["planx.xlsx", f"xBcc: {SPY}.xlsx"]
    # Attachments live in the store only: no file of theirs appears on disk, here or where the names pointed.
    written = {path.name for path in corpus_run.root.rglob("*") if path.is_file()}
    assert not written & {"x.xlsx", "y.xlsx", "z.xlsx", "planx.xlsx"}
    assert not Path("/etc/cron.d/z.xlsx").exists() and not (ROOT.parent / "x.xlsx").exists()


def test_long_message_ids_give_a_follow_up_with_lines_a_server_accepts(corpus_run: CorpusRun) -> None:
    follow_up = corpus_run.follow_up(corpus_run.rows["long-message-ids.eml"])
    assert follow_up is not None
    raw = follow_up.as_bytes(policy=email.policy.SMTP)
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998  # RFC 5322 section 2.1.1


def test_markup_from_outside_arrives_escaped_in_the_html_of_every_follow_up(corpus_run: CorpusRun) -> None:
    for message in corpus_run.outbox:
        html = message.get_body(preferencelist=("html",)).get_content()
        assert not re.search(r"<(script|img|svg)\b", html, re.IGNORECASE), message["Subject"]
        assert not re.search(r"\bon(error|load|mouseover)=(?!alert\(\d\)&gt;)", html)
    follow_up = corpus_run.follow_up(corpus_run.rows["html-in-names.eml"])
    assert follow_up is not None
    html = follow_up.get_body(preferencelist=("html",)).get_content()
    assert "&lt;img src=x onerror=alert(2)&gt;.xlsx" in html  # the file name, quoted back as text


def test_formula_shaped_answers_stay_text_in_the_consolidated_workbook(corpus_run: CorpusRun) -> None:
    config = corpus_run.config
    campaign = config.campaign(CAMPAIGN)
    engine = Engine(config, corpus_run.store, LocalTransport(config.mail.local.outbox), FixedClock(READ_AT))
    layout = engine.layout(campaign)
    # Only Guatemala's column: Honduras's 50,000 added rows would make the workbook slow to build (see below).
    guatemala = [d for d in gather(config, corpus_run.store, campaign, layout, now=READ_AT) if d.id == "GT"]
    data = render_consolidated(
        campaign.workbook.read_bytes(), layout, guatemala, language="es", tz=config.secretariat.tz, now=READ_AT
    )
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        sheets = [name for name in archive.namelist() if name.startswith("xl/worksheets/")]
        for name in sheets:
            assert b"<f>" not in archive.read(name) and b"<f " not in archive.read(name), name
    with python_calamine.CalamineWorkbook.from_filelike(io.BytesIO(data)) as book:
        grid = book.get_sheet_by_name(layout.sheet).to_python(skip_empty_area=False)
    header = grid[layout.header_row - 1]
    column = header.index("Guatemala")
    rows = {row.key: row.row for row in layout.rows}
    for key, answer in make_corpus.FORMULA_ANSWERS.items():
        assert grid[rows[key] - 1][column] == answer, key  # the very text, never a computed value


# ==========================================================================
# A real reply through Dovecot: receipt and digest escape what the delegation wrote
# ==========================================================================


@pytest.mark.servers
def test_script_and_header_injection_answers_reach_the_receipt_and_the_digest_as_text(
    tmp_path: Path, smtp_server: SmtpServer, imap_account: ImapAccount
) -> None:
    from tests.test_replies import Campaign

    opened = Campaign(tmp_path, smtp_server, imap_account)
    try:
        request = opened.requests["HN"]
        name, data = workbook_of(request)
        answers = {key: f"Institución {key}" for key in ALL_KEYS}
        answers["1.1"] = "<script>alert(1)</script>"
        answers["1.2"] = f"Secretaría X\r\nBcc: {SPY}"
        answers["1.3"] = '<img src=x onerror="alert(document.cookie)">'
        imap_account.append(
            "INBOX",
            reply_to(request, sender="enlace@sre.example.hn", attachments=[(name, fill_workbook(data, answers))]),
        )
        # A stranger's message, held: its subject reaches the digest's "needs a person" list.
        imap_account.append(
            "INBOX",
            reply_to(
                opened.requests["MX"],
                sender="intruso@evil.example",
                subject="<script>alert('held')</script> [Ref. responsible-2017/MX]",
                body="1.1: <b>Ministerio</b>",
            ),
        )
        report = opened.tick()
        assert report.inbox is not None and report.inbox.by_outcome == {"applied": 1, "held": 1}
        [receipt] = smtp_server.wait_for(1)
        assert receipt.message["X-Mailflow-Kind"] == "receipt"
        assert receipt.rcpt_tos == ["enlace@sre.example.hn"]
        _assert_text_only(receipt.message)
        smtp_server.clear()
        # The next digest slot: 08:00 in Costa Rica on Thursday 19 October (14:00 UTC).
        opened.tick(hours=22)
        digest = next(m for m in smtp_server.wait_for(1) if m.message["X-Mailflow-Kind"] == "digest")
        assert digest.rcpt_tos == ["coordinator@example.org"]
        html = _assert_text_only(digest.message)
        assert "&lt;script&gt;alert(&#39;held&#39;)&lt;/script&gt;" in html  # the held message's subject, as text
        workbook = next(
            part.get_payload(decode=True)
            for part in digest.message.iter_attachments()
            if str(part.get_filename()).endswith(".xlsx")
        )
        with zipfile.ZipFile(io.BytesIO(workbook)) as archive:
            assert not any(b"<f>" in archive.read(n) for n in archive.namelist() if n.startswith("xl/worksheets/"))
    finally:
        opened.close()


def _assert_text_only(message: EmailMessage) -> str:
    """No injected header, no live markup from the answers; returns the HTML part."""
    names = {name.lower() for name in message}
    assert "bcc" not in names and names <= ALLOWED_HEADERS | {"x-peer", "x-mailfrom", "x-rcptto"}, names
    for name, value in message.items():
        assert SPY not in str(value), (name, value)
    html = message.get_body(preferencelist=("html",)).get_content()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&lt;img src=x onerror=" in html
    assert not re.search(r"<(script|img|svg)\b", html, re.IGNORECASE)
    text = message.get_body(preferencelist=("plain",)).get_content()
    assert not re.search(r"^Bcc:", text, re.MULTILINE)
    return str(html)


# ==========================================================================
# Values from the configuration that reach a header
# ==========================================================================

INJECTIONS = [f"X\r\nBcc: {SPY}", f"X\nBcc: {SPY}", f"X\rBcc: {SPY}", "X\x00Bcc", "X\tY\x1bZ"]
HEADER_VALUES = {
    "delegations[6].name": lambda data, value: data["delegations"][6].__setitem__("name", value),
    "campaigns[0].title.es": lambda data, value: data["campaigns"][0]["title"].__setitem__("es", value),
    "campaigns[0].title": lambda data, value: data["campaigns"][0].__setitem__("title", value),
    "secretariat.name": lambda data, value: data["secretariat"].__setitem__("name", value),
    "campaigns[0].attachment_name": lambda data, value: data["campaigns"][0]["attachment_name"].__setitem__(
        "es", f"{value} {{delegation}}.xlsx"
    ),
    "campaigns[0].ref": lambda data, value: data["campaigns"][0].__setitem__("ref", value),
    "delegations[6].id": lambda data, value: data["delegations"][6].__setitem__("id", value),
    "delegations[6].contacts[0]": lambda data, value: data["delegations"][6].__setitem__(
        "contacts", [f"enlace@sre.example.hn{value[1:]}"]
    ),
    "secretariat.address": lambda data, value: data["secretariat"].__setitem__("address", f"ts@example.org{value[1:]}"),
    "secretariat.digest.to[0]": lambda data, value: data["secretariat"]["digest"].__setitem__(
        "to", [f"coordinator@example.org{value[1:]}"]
    ),
}


def _check_config(tmp_path: Path, key: str, value: str) -> list[str]:
    from mailflow.checks import load_checked_config
    from mailflow.errors import ConfigError

    data = example_data()
    data["store"] = str(tmp_path / "mailflow.db")
    HEADER_VALUES[key](data, value)
    try:
        load_checked_config(write_config(tmp_path, data), templates=True)
    except ConfigError as exc:
        return list(exc.problems)
    return []


@pytest.mark.parametrize("value", INJECTIONS, ids=["CRLF", "LF", "CR", "NUL", "TAB+ESC"])
@pytest.mark.parametrize("key", list(HEADER_VALUES))
def test_check_config_refuses_control_characters_in_values_that_reach_a_header(
    tmp_path: Path, key: str, value: str
) -> None:
    problems = _check_config(tmp_path, key, value)
    assert any(f"{key}:" in problem for problem in problems), problems


@pytest.mark.parametrize("separator", ["\u2028", "\u2029"], ids=["U+2028", "U+2029"])
@pytest.mark.parametrize(
    "key", ["delegations[6].name", "campaigns[0].title.es", "secretariat.name", "campaigns[0].attachment_name"]
)
def test_check_config_refuses_unicode_line_separators_in_values_that_reach_a_header(
    tmp_path: Path, key: str, separator: str
) -> None:
    problems = _check_config(tmp_path, key, f"X{separator}Bcc: {SPY}")
    assert any(f"{key}:" in problem for problem in problems), problems


def test_check_config_on_the_command_line_names_the_key_and_exits_2(tmp_path: Path) -> None:
    data = example_data()
    data["delegations"][6]["name"] = f"Honduras\r\nBcc: {SPY}"
    path = write_config(tmp_path, data)
    done = subprocess.run(
        [sys.executable, "-m", "mailflow.cli", "--config", str(path), "check-config"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "delegations[6].name: may not contain line breaks or control characters" in done.stderr


def test_a_subject_template_with_a_line_break_is_sent_on_one_line(tmp_path: Path) -> None:
    """An operator's subject template spanning lines is collapsed to one line: the "Bcc:" stays words of the subject."""
    templates = tmp_path / "templates" / "es"
    templates.mkdir(parents=True)
    (templates / "request.subject.j2").write_text(f"{{{{ campaign.title }}}}\r\nBcc: {SPY}\n{{{{ reference }}}}\n")
    data = example_data()
    data["store"] = str(tmp_path / "mailflow.db")
    data["templates"] = str(tmp_path / "templates")
    data["mail"] = {"transport": "local", "local": {"outbox": str(tmp_path / "out"), "inbox": str(tmp_path / "in")}}
    config = load_config(write_config(tmp_path, data))
    with Store.open(config.store) as store:
        assert len(Engine(config, store, LocalTransport(config.mail.local.outbox), FixedClock(OPENS)).tick().sent) == 11
    contacts = {d.id: {c.lower() for c in d.contacts} for d in config.delegations}
    for message in _read_maildir(tmp_path / "out"):
        assert {name.lower() for name in message} <= ALLOWED_HEADERS
        envelope = {a.strip() for a in str(message["X-Mailflow-Envelope-To"]).split(",")}
        assert envelope == contacts[str(message["X-Mailflow-Delegation"])]
        if message["Content-Language"] == "es":
            assert f"Bcc: {SPY} [Ref." in str(message["Subject"])
