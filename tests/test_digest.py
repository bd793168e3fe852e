"""The status digest: a campaign driven through the local transport and maildir inbox, then read as the Secretariat.

One scripted campaign (requests out; a complete reply from Honduras, a partial
one from Guatemala that it later corrects, an untrusted reply for Costa Rica,
an unreadable file from El Salvador, a bounce for Belize, a file from
Nicaragua with an action's text edited) is summed up by :func:`digest_context`
and rendered in both languages; the HTML must be safe for email clients.
"""

from __future__ import annotations

import email
import io
import json
import mailbox
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.policy import default
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import openpyxl
import pytest

from mailflow import digest
from mailflow.clock import FixedClock
from mailflow.config import Config, load_config
from mailflow.digest import answer_changes, digest_context, duration_text, progress_percent
from mailflow.engine import Engine
from mailflow.errors import TemplateError
from mailflow.render import Renderer, example_context
from mailflow.sender import LocalTransport
from mailflow.store import AnswerRow, Store
from tests.helpers import bounce_of, example_data, fill_workbook, local_engine, reply_to, workbook_of, write_config

OPENS = datetime(2017, 10, 18, 16, 0, tzinfo=UTC)  # 10:00 in San José
FIRST_REPLIES = OPENS + timedelta(hours=1)
CORRECTION = OPENS + timedelta(hours=2)
CAMPAIGN = "responsible-2017"
TRICKY = "<b>Ministerio & Cía</b>"
OLE2_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"


@dataclass
class Campaign:
    """A campaign after its scripted replies: what a digest is made from."""

    config: Config
    store: Store
    engine: Engine

    def context(self, now: datetime, since: datetime | None, language: str = "es", **kwargs: Any) -> dict[str, Any]:
        return digest_context(
            self.config, self.store, self.engine.status(now), now=now, since=since, language=language, **kwargs
        )


def _edit_action(data: bytes, key: str, text: str) -> bytes:
    """What a delegation sometimes does: rewrite an action's text (outside the fill column)."""
    book = openpyxl.load_workbook(io.BytesIO(data))
    sheet = book.worksheets[0]
    header = next(row for row in sheet.iter_rows() if [c.value for c in row][2:4] == ["Code", "Action"])
    for row in sheet.iter_rows(min_row=header[0].row + 1):
        if row[2].value == key:
            row[3].value = text
    out = io.BytesIO()
    book.save(out)
    return out.getvalue()


@pytest.fixture(scope="module")
def campaign(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Campaign]:
    tmp_path = tmp_path_factory.mktemp("digest")
    engine, clock = local_engine(tmp_path, OPENS)
    config, store = engine.config, engine.store
    outbox = mailbox.Maildir(tmp_path / "out", factory=lambda f: email.message_from_binary_file(f, policy=default))
    requests: dict[str, EmailMessage] = {str(m["X-Mailflow-Delegation"]): m for m in outbox}
    inbox = mailbox.Maildir(tmp_path / "in", create=True)
    keys = engine.layout(config.campaigns[0]).keys

    name, workbook = workbook_of(requests["HN"])
    every = {key: f"Institución {key}" for key in keys} | {"1.1": TRICKY}
    inbox.add(
        reply_to(requests["HN"], sender="enlace@sre.example.hn", attachments=[(name, fill_workbook(workbook, every))])
    )
    name, workbook = workbook_of(requests["GT"])
    partial = fill_workbook(workbook, {"1.1": "Ministerio A", "1.2": "Ministerio B"})
    inbox.add(reply_to(requests["GT"], sender="enlace@minex.example.gt", attachments=[(name, partial)]))
    # A new thread from an address that is not a contact: only the workbook's fingerprint says Costa Rica.
    _, workbook = workbook_of(requests["CR"])
    inbox.add(
        reply_to(
            requests["CR"],
            sender="asistente@otra.example.cr",
            subject="Plan <script>alert(1)</script>",
            thread=False,
            attachments=[("copia final.xlsx", fill_workbook(workbook, {"1.1": "PANI"}))],
        )
    )
    inbox.add(
        reply_to(
            requests["SV"],
            sender="enlace@rree.example.sv",
            attachments=[("Plan estratégico - El Salvador.xlsx", OLE2_MAGIC + b"\x00" * 600)],
        )
    )
    inbox.add(bounce_of(requests["BZ"], "liaison@immigration.example.bz"))
    name, workbook = workbook_of(requests["NI"])
    edited = fill_workbook(_edit_action(workbook, "1.2", "Garantizar <i>algo</i> & más"), {"1.1": "Cancillería"})
    inbox.add(reply_to(requests["NI"], sender="enlace@cancilleria.example.ni", attachments=[(name, edited)]))
    clock.set(FIRST_REPLIES)
    report = engine.tick()
    assert report.inbox is not None and report.inbox.by_outcome == {"applied": 4, "held": 1, "bounce": 1}

    name, workbook = workbook_of(requests["GT"])
    correction = fill_workbook(workbook, {"1.1": "Ministerio C", "1.3": "Ministerio D"})
    inbox.add(reply_to(requests["GT"], sender="enlace@minex.example.gt", attachments=[(name, correction)]))
    clock.set(CORRECTION)
    engine.tick()
    yield Campaign(config, store, engine)
    store.close()


# --------------------------------------------------------------------------
# The context
# --------------------------------------------------------------------------


def test_one_row_per_delegation_with_its_state_and_progress(campaign: Campaign) -> None:
    context = campaign.context(CORRECTION + timedelta(minutes=10), None)
    [block] = context["campaigns"]
    assert block["id"] == CAMPAIGN and block["title"].startswith("Columna «Responsable»")
    assert block["deadline_text"] == "lunes 23 de octubre de 2017"
    rows = {row["id"]: row for row in block["rows"]}
    assert list(rows) == ["BZ", "CA", "CR", "DO", "SV", "GT", "HN", "MX", "NI", "PA", "US"]
    total = rows["HN"]["total"]
    assert (rows["HN"]["state"], rows["HN"]["state_text"], rows["HN"]["percent"]) == ("complete", "completo", 100)
    assert rows["HN"]["filled"] == total and rows["HN"]["bar_text"] == "[##########]"
    assert rows["HN"]["bar"] == [{"width": 100, "color": digest.BAR_FILLED_COMPLETE}]
    assert (rows["GT"]["state"], rows["GT"]["filled"], rows["GT"]["percent"]) == ("partial", 3, 3 * 100 // total)
    assert [cell["width"] for cell in rows["GT"]["bar"]] == [7, 93]
    assert (rows["NI"]["state"], rows["NI"]["filled"]) == ("partial", 1)
    for quiet in ("CR", "SV", "BZ", "CA", "US"):  # held, unreadable, bounced or silent: nothing recorded
        assert (rows[quiet]["state"], rows[quiet]["state_text"], rows[quiet]["percent"]) == ("awaiting", "en espera", 0)
    assert rows["HN"]["last_reply_text"] == "miércoles 18 de octubre de 2017, 11:00"  # San José time
    assert rows["GT"]["last_reply_text"] == "miércoles 18 de octubre de 2017, 12:00"
    assert rows["CA"]["last_reply_text"] is None
    assert rows["HN"]["next_reminder_text"] is None
    assert (
        rows["GT"]["next_reminder_text"] == "viernes 20 de octubre de 2017, 09:00"
    )  # reminder:-3d, 09:00 in Guatemala
    assert all(row["overdue_days"] == 0 and not row["overdue"] for row in rows.values())
    assert rows["BZ"]["notes"] == [
        "contacto que rebota: liaison@immigration.example.bz",
        "ningún contacto recibe el correo",
    ]
    assert rows["CR"]["notes"] == ["1 respuesta retenida para revisión"]
    assert rows["HN"]["notes"] == []
    assert block["complete_count"] == 1 and block["total_delegations"] == 11
    assert context["totals"] == {
        "delegations": 11,
        "complete": 1,
        "partial": 2,
        "awaiting": 8,
        "not_sent": 0,
        "overdue": 0,
    }


def test_overdue_days_count_in_each_delegations_own_day(campaign: Campaign) -> None:
    # 2017-10-25 04:30 UTC: still the 24th in Central America (UTC-6), already the 25th in Washington (UTC-4)...
    context = campaign.context(datetime(2017, 10, 25, 4, 30, tzinfo=UTC), None, "en")
    rows = {row["id"]: row for row in context["campaigns"][0]["rows"]}
    assert rows["HN"]["overdue_days"] == 0 and not rows["HN"]["overdue"]  # complete: never overdue
    assert rows["GT"]["overdue_days"] == 1 and rows["GT"]["state_text"] == "partial"
    assert rows["US"]["overdue_days"] == 2 and rows["US"]["state_text"] == "awaiting reply"
    assert rows["GT"]["bar"][0]["color"] == digest.BAR_FILLED_OVERDUE
    assert context["totals"]["overdue"] == 10


def test_the_first_digest_lists_every_reply_and_answer_so_far(campaign: Campaign) -> None:
    context = campaign.context(CORRECTION + timedelta(minutes=10), None)
    assert context["first_digest"] and context["since_text"] is None
    [changes] = context["changes"]
    by_id = {d["id"]: d for d in changes["delegations"]}
    assert list(by_id) == ["SV", "GT", "HN", "NI"]  # who replied (applied), in the campaign's order
    assert [r["recorded"] for r in by_id["GT"]["replies"]] == [2, 2]
    assert by_id["SV"]["replies"][0]["recorded"] == 0 and by_id["SV"]["answers"] == []
    assert by_id["GT"]["answers"] == [
        {"key": "1.1", "value": "Ministerio C", "previous": None},
        {"key": "1.2", "value": "Ministerio B", "previous": None},
        {"key": "1.3", "value": "Ministerio D", "previous": None},
    ]
    honduras = by_id["HN"]
    assert honduras["answers"][0] == {"key": "1.1", "value": TRICKY, "previous": None}
    total = next(row["total"] for row in context["campaigns"][0]["rows"] if row["id"] == "HN")
    assert len(honduras["answers"]) == digest.ANSWERS_PER_DELEGATION
    assert honduras["more_answers"] == total - digest.ANSWERS_PER_DELEGATION
    assert "CR" not in by_id  # a held reply is not a reply until someone accepts it


def test_changes_since_the_previous_digest_show_what_was_there_before(campaign: Campaign) -> None:
    context = campaign.context(CORRECTION + timedelta(minutes=10), FIRST_REPLIES + timedelta(minutes=30))
    assert not context["first_digest"]
    assert context["since_text"] == "miércoles 18 de octubre de 2017, 11:30"
    [changes] = context["changes"]
    [guatemala] = changes["delegations"]
    assert guatemala["id"] == "GT" and len(guatemala["replies"]) == 1
    assert guatemala["answers"] == [
        {"key": "1.1", "value": "Ministerio C", "previous": "Ministerio A"},
        {"key": "1.3", "value": "Ministerio D", "previous": None},
    ]
    assert campaign.context(CORRECTION + timedelta(minutes=10), CORRECTION)["changes"] == []


def test_attention_lists_what_needs_a_person(campaign: Campaign) -> None:
    context = campaign.context(CORRECTION + timedelta(minutes=10), None)
    items = context["attention"]
    assert [item["kind"] for item in items] == ["all_contacts_failing", "held", "unreadable", "bounce", "row_changes"]
    failing, held, unreadable, bounce, changed = items
    assert failing["delegation"] == "Belize" and "liaison@immigration.example.bz" in failing["detail"]
    assert held["delegation"] == "Costa Rica" and held["new"]
    assert "asistente@otra.example.cr" in held["detail"] and "Plan <script>" in held["detail"]
    assert "no es un contacto registrado de Costa Rica" in held["detail"]  # in the Secretariat's language
    assert unreadable["delegation"] == "El Salvador"
    assert unreadable["detail"].startswith("Plan estratégico - El Salvador.xlsx: ")
    assert "no es una hoja de cálculo" in unreadable["detail"]  # the reason the delegation was given, in Spanish
    assert bounce["delegation"] == "Belize" and "5.1.1" in bounce["detail"]
    assert changed["delegation"] == "Nicaragua" and changed["what"] == "1 cambio fuera de la columna «Responsible»"
    [line] = changed["lines"]
    assert line.startswith("fila 1.2, columna «Action»: «Ensure that migrant children") and "«Garantizar <i>" in line
    assert all(item["when_text"] == "miércoles 18 de octubre de 2017, 11:00" for item in items)
    assert context["attention_more"] == 0


def test_held_replies_stay_listed_until_dealt_with_one_off_problems_do_not(campaign: Campaign) -> None:
    context = campaign.context(CORRECTION + timedelta(minutes=10), CORRECTION)
    assert [(item["kind"], item["new"]) for item in context["attention"]] == [
        ("all_contacts_failing", False),
        ("held", False),
    ]


def test_attention_is_capped_most_urgent_first(campaign: Campaign, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(digest, "ATTENTION_LIMIT", 2)
    context = campaign.context(CORRECTION + timedelta(minutes=10), None)
    assert [item["kind"] for item in context["attention"]] == ["all_contacts_failing", "held"]
    assert context["attention_more"] == 3


def test_health_warns_when_the_inbox_was_not_read_for_too_long(campaign: Campaign) -> None:
    fresh = campaign.context(CORRECTION + timedelta(minutes=10), None)["health"]
    assert not fresh["inbox_stale"] and fresh["warning"] is None and fresh["stale_for_text"] is None
    assert fresh["last_inbox_read_at_text"] == "miércoles 18 de octubre de 2017, 12:00"
    assert fresh["read_ago_text"] == "10 min"
    assert fresh["last_sent_at_text"] == "miércoles 18 de octubre de 2017, 12:00"  # the receipt to Guatemala
    stale = campaign.context(CORRECTION + timedelta(days=1, minutes=5), None)["health"]
    assert stale["inbox_stale"] and stale["stale_for_text"] == "1 día"
    assert stale["warning"] is not None
    assert stale["warning"].startswith("La bandeja de entrada no se ha leído desde el miércoles 18 de octubre")
    assert "las respuestas de las delegaciones no se están leyendo" in stale["warning"]
    english = campaign.context(CORRECTION + timedelta(hours=3, minutes=20), None, "en")["health"]
    assert english["stale_for_text"] == "3 h 20 min" and english["stale_after_text"] == "2 h"
    assert english["warning"] is not None and "replies from delegations are not being read" in english["warning"]
    # The interval is the configuration's.
    relaxed = campaign.context(CORRECTION + timedelta(hours=3), None, inbox_stale_after=timedelta(hours=4))
    assert not relaxed["health"]["inbox_stale"]


def test_health_reads_the_services_heartbeats(tmp_path: Path) -> None:
    data = example_data()
    data["store"] = str(tmp_path / "store.db")
    data["mail"] = {"transport": "local", "local": {"outbox": str(tmp_path / "out"), "inbox": str(tmp_path / "in")}}
    config = load_config(write_config(tmp_path, data))
    with Store.open(config.store) as store:
        now = OPENS + timedelta(hours=5)
        with store.transaction():
            store.set_meta(digest.HEARTBEAT_SEND_PASS, (now - timedelta(minutes=1)).isoformat())
            stopped = {
                "pid": 1,
                "started_at": OPENS.isoformat(),
                "stopped_at": (OPENS + timedelta(hours=1)).isoformat(),
            }
            store.set_meta(digest.HEARTBEAT_SERVICE, json.dumps(stopped))
        engine = Engine(config, store, LocalTransport(config.mail.local.outbox), FixedClock(now))
        health = digest_context(config, store, engine.status(now), now=now, since=None, language="en")["health"]
    assert health["last_inbox_read_at_text"] is None and health["inbox_stale"]
    assert health["last_sent_at_text"] is None
    assert health["last_send_pass_at_text"] == "Wednesday, 18 October 2017, 14:59"
    assert health["service_stopped_at_text"] == "Wednesday, 18 October 2017, 11:00"
    assert health["warning"] is not None
    assert health["warning"].startswith("The inbox has never been read. The mailflow service stopped on Wednesday")


def test_the_digest_only_reads_the_store(campaign: Campaign) -> None:
    before = (len(campaign.store.events()), len(campaign.store.outbox()), campaign.store.last_inbox_read_at())
    campaign.context(CORRECTION + timedelta(days=3), None)
    assert (len(campaign.store.events()), len(campaign.store.outbox()), campaign.store.last_inbox_read_at()) == before


def test_the_example_context_has_the_shape_of_a_real_one(campaign: Campaign) -> None:
    """Renderer.check() renders the digest from the example: it must hold every key a real digest has."""

    def shape(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: shape(item) for key, item in value.items()}
        if isinstance(value, list):
            return shape(value[0]) if value and isinstance(value[0], dict) else "list"
        return "value"

    real = campaign.context(CORRECTION + timedelta(days=1), FIRST_REPLIES + timedelta(minutes=30))
    for language in ("es", "en"):
        assert shape(example_context("digest", language)) == shape(real)


# --------------------------------------------------------------------------
# The rendered email
# --------------------------------------------------------------------------


class _StrictHTML(HTMLParser):
    """Collects every tag and attribute, and checks that elements nest and close."""

    VOID = frozenset({"meta", "br", "img", "hr", "link", "input", "col", "area", "base", "wbr"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.tags: list[str] = []
        self.attributes: list[tuple[str, str]] = []
        self.errors: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attributes.extend((name, value or "") for name, value in attrs)
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
            return
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _parse(html: str) -> _StrictHTML:
    parser = _StrictHTML()
    parser.feed(html)
    parser.close()
    assert parser.errors == [] and parser.stack == [], (parser.errors, parser.stack)
    return parser


@pytest.mark.parametrize("language", ["es", "en"])
def test_the_digest_renders_safe_for_email_clients(campaign: Campaign, language: str) -> None:
    context = campaign.context(CORRECTION + timedelta(minutes=10), None, language)
    rendered = Renderer().render("digest", language, context)
    html = rendered.html
    parsed = _parse(html)
    assert "<script" not in html and "<style" not in html and "<link" not in html and "<img" not in html
    for name, value in parsed.attributes:
        assert "http://" not in value and "https://" not in value, (name, value)
        assert name not in ("src", "class", "background"), name
        if name == "href":
            assert value.startswith("mailto:")
    # What came from outside is escaped: the answer, the held reply's subject, the edited action.
    assert "&lt;b&gt;Ministerio &amp; Cía&lt;/b&gt;" in html and TRICKY not in html
    assert "Plan &lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "Garantizar &lt;i&gt;algo&lt;/i&gt; &amp; más" in html
    assert TRICKY in rendered.text and "Plan <script>alert(1)</script>" in rendered.text
    # The progress bar is table cells with width and bgcolor attributes (what Outlook and Gmail both honour).
    assert (
        '<td width="7" height="10" bgcolor="#2563eb"' in html and '<td width="93" height="10" bgcolor="#e5e7eb"' in html
    )
    page = " ".join(parsed.text)
    for name in ("Belize", "Honduras", "Guatemala", "El Salvador", "United States"):
        assert name in page and name in rendered.text
    assert "Ministerio C" in page and "Ministerio A" not in page  # first digest: nothing "was"
    assert context["campaigns"][0]["title"] in page
    assert 'bgcolor="#b91c1c"' not in html  # a fresh inbox: no red box


@pytest.mark.parametrize(
    ("language", "prefix", "words"),
    [
        (
            "es",
            "[ATENCIÓN: bandeja sin leer] ",
            "Resumen mailflow: 1 de 11 completas, 5 por revisar — jueves 19 de octubre de 2017",
        ),
        (
            "en",
            "[ATTENTION: inbox not read] ",
            "mailflow digest: 1 of 11 complete, 5 to review — Thursday, 19 October 2017",
        ),
    ],
)
def test_a_stale_inbox_is_the_first_thing_read(campaign: Campaign, language: str, prefix: str, words: str) -> None:
    now = CORRECTION + timedelta(days=1)
    stale = Renderer().render("digest", language, campaign.context(now, None, language))
    assert stale.subject == prefix + words
    warning = campaign.context(now, None, language)["health"]["warning"]
    body = stale.html.split("<body", 1)[1]
    first_cell = body.index("<td bgcolor=")
    assert body[first_cell:].startswith('<td bgcolor="#b91c1c"')  # the red box comes before anything else
    assert body.index(warning.split(" (")[0]) < body.index("Belize")
    assert stale.text.startswith("⚠ ")
    _parse(stale.html)
    fresh = Renderer().render(
        "digest", language, campaign.context(OPENS + timedelta(hours=2, minutes=5), None, language)
    )
    assert fresh.subject.startswith(words.split(":")[0])
    assert 'bgcolor="#b91c1c"' not in fresh.html
    assert not fresh.text.startswith("⚠")


def test_the_text_part_shows_changes_and_attention(campaign: Campaign) -> None:
    context = campaign.context(CORRECTION + timedelta(minutes=10), FIRST_REPLIES + timedelta(minutes=30), "en")
    text = Renderer().render("digest", "en", context).text
    assert "1.1: “Ministerio C” (was: “Ministerio A”)" in text
    assert "1.3: “Ministerio D” (new)" in text
    assert "Reply held: sender not verified — Costa Rica" in text and "[still pending]" in text
    assert "Guatemala: partial [" in text and "3/40" in text
    assert "(Costa Rica Time)." in text  # the Secretariat's zone named for people, not as America/Costa_Rica


def test_the_spanish_digest_names_the_secretariat_s_time_in_spanish(campaign: Campaign) -> None:
    context = campaign.context(CORRECTION + timedelta(minutes=10), FIRST_REPLIES + timedelta(minutes=30), "es")
    rendered = Renderer().render("digest", "es", context)
    assert "(hora de Costa Rica)." in rendered.text and "(hora de Costa Rica)" in rendered.html
    assert "America/Costa_Rica" not in rendered.text


# --------------------------------------------------------------------------
# Pure helpers
# --------------------------------------------------------------------------


def test_duration_text() -> None:
    assert duration_text(timedelta(seconds=30), "es") == "menos de 1 min"
    assert duration_text(timedelta(minutes=45), "en") == "45 min"
    assert duration_text(timedelta(hours=3, minutes=20), "es") == "3 h 20 min"
    assert duration_text(timedelta(hours=2), "en") == "2 h"
    assert duration_text(timedelta(days=1, hours=4, minutes=59), "es") == "1 día 4 h"
    assert duration_text(timedelta(days=3), "en") == "3 days"


def test_progress_percent_never_rounds_to_done_or_to_nothing() -> None:
    assert progress_percent(0, 40) == 0
    assert progress_percent(1, 200) == 1
    assert progress_percent(39, 40) == 97
    assert progress_percent(199, 200) == 99
    assert progress_percent(40, 40) == 100
    assert progress_percent(0, 0) == 0 and progress_percent(0, 0, complete=True) == 100


def test_answer_changes_collapse_several_changes_into_one() -> None:
    since = datetime(2017, 10, 20, tzinfo=UTC)

    def answer(key: str, value: str, hours: int) -> AnswerRow:
        return AnswerRow(key, value, "workbook", 1, since + timedelta(hours=hours), False)

    history = [
        answer("1.1", "A", -5),
        answer("1.2", "X", -5),
        answer("1.1", "B", 1),
        answer("1.3", "N", 2),
        answer("1.1", "C", 3),
        answer("1.2", "Y", 3),
        answer("1.2", "X", 4),  # back to what it was: no change to report
    ]
    assert answer_changes(history, since) == [("1.1", "C", "A"), ("1.3", "N", None)]
    assert answer_changes(history, None) == [("1.1", "C", None), ("1.2", "X", None), ("1.3", "N", None)]


def test_bad_arguments_are_refused(campaign: Campaign) -> None:
    with pytest.raises(TemplateError, match="'fr'"):
        campaign.context(CORRECTION, None, "fr")
    with pytest.raises(ValueError, match="since must be an aware datetime"):
        campaign.context(CORRECTION, datetime(2017, 10, 18, 12, 0))
