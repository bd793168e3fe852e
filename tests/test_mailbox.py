"""The inbox adapters: IMAP against the rig's real Dovecot, and the local maildir twin.

What the engine relies on is proved here: UIDs listed and filtered by the
RFC 3501 ``n:*`` rule, messages fetched byte for byte without ``\\Seen``,
oversized ones announced but not downloaded, a message expunged by someone
else simply missing, moves creating their folder (again, if a person deleted
it), a new UIDVALIDITY when a folder is recreated, and clear errors when the
server is down or the password wrong.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from mailbox import Maildir
from pathlib import Path

import pytest

from mailflow import mailbox as mailbox_module
from mailflow.config import ImapSettings
from mailflow.mailbox import (
    Fetched,
    ImapMailbox,
    ImapSession,
    MailboxError,
    MaildirMailbox,
    MaildirSession,
    server_folder_name,
)
from tests.servers import DovecotServer, ImapAccount


def raw_message(n: int, body: bytes = b"") -> bytes:
    return (
        b"From: Delegation %d <d%d@example.net>\r\n"
        b"To: ts@example.org\r\n"
        b"Subject: Reply %d\r\n"
        b"Message-ID: <reply-%d@example.net>\r\n"
        b"\r\n"
        b"Here is our workbook.\r\n" % (n, n, n, n)
    ) + body


def imap_settings(account: ImapAccount, **changes: object) -> ImapSettings:
    settings = ImapSettings(
        host=account.host,
        port=account.port,
        security="none",
        username=account.user,
        password=account.password,
        timeout=5,
    )
    return replace(settings, **changes)  # type: ignore[arg-type]


@pytest.fixture
def open_session(imap_account: ImapAccount) -> Iterator[Callable[..., ImapSession]]:
    """Open sessions on `imap_account` (settings changes as keywords); all closed at teardown."""
    sessions: list[ImapSession] = []

    def open_(**changes: object) -> ImapSession:
        session = ImapMailbox(imap_settings(imap_account, **changes)).open()
        sessions.append(session)
        return session

    yield open_
    for session in sessions:
        session.close()


def append_all(account: ImapAccount, folder: str, messages: list[bytes]) -> list[int]:
    uids = [account.append(folder, raw) for raw in messages]
    assert all(uid is not None for uid in uids)
    return [uid for uid in uids if uid is not None]


def folder_uids(account: ImapAccount, folder: str) -> list[int]:
    with account.client() as client:
        client.select_folder(folder, readonly=True)
        return sorted(client.search(["ALL"]))


# --------------------------------------------------------------------------- folder names (pure)


@pytest.mark.parametrize(
    ("name", "separator", "prefix", "expected"),
    [
        ("mailflow-processed", ".", "", "mailflow-processed"),
        ("Archive/mailflow", ".", "", "Archive.mailflow"),
        ("Archive/mailflow", "/", "", "Archive/mailflow"),
        ("Archive.2024", ".", "", "Archive.2024"),
        ("processed", ".", "INBOX.", "INBOX.processed"),
        ("INBOX.processed", ".", "INBOX.", "INBOX.processed"),
        ("inbox", ".", "INBOX.", "INBOX"),
        ("  Replies ", None, "", "Replies"),
    ],
)
def test_server_folder_name(name: str, separator: str | None, prefix: str, expected: str) -> None:
    assert server_folder_name(name, separator, prefix) == expected


@pytest.mark.parametrize(
    ("name", "separator", "message"),
    [
        ("Archive/2024.replies", ".", "uses both '/' and the server's separator"),
        ("Archive/x", None, "no folder hierarchy"),
        ("   ", ".", "may not be empty"),
    ],
)
def test_server_folder_name_refuses_what_it_would_have_to_guess(name: str, separator: str | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        server_folder_name(name, separator)


# --------------------------------------------------------------------------- IMAP: listing and reading


@pytest.mark.servers
def test_uids_after_filters_what_n_star_returns(
    imap_account: ImapAccount, open_session: Callable[..., ImapSession]
) -> None:
    first, second, third = append_all(imap_account, "INBOX", [raw_message(n) for n in range(3)])
    session = open_session()

    assert session.folder == "INBOX"
    assert session.uidvalidity > 0
    assert session.uids() == [first, second, third]
    assert session.uids_after(0) == [first, second, third]
    assert session.uids_after(first) == [second, third]
    # The server answers "UID n:*" with the last message even when its UID is below n.
    assert session.uids_after(third) == []
    assert session.uids_after(third + 100) == []


@pytest.mark.servers
def test_fetch_returns_exact_bytes_and_leaves_messages_unseen(
    imap_account: ImapAccount, open_session: Callable[..., ImapSession]
) -> None:
    raws = [raw_message(1), raw_message(2, b"\r\n\xc3\xa9t\xc3\xa9 \xff binary-ish\r\n")]
    uids = append_all(imap_account, "INBOX", raws)
    session = open_session()

    fetched = list(session.fetch(uids, max_bytes=1_000_000))

    assert fetched == [
        Fetched("INBOX", session.uidvalidity, uid, raw, len(raw)) for uid, raw in zip(uids, raws, strict=True)
    ]
    with imap_account.client() as client:
        client.select_folder("INBOX", readonly=True)
        flags = client.get_flags(uids)
    assert all(b"\\Seen" not in flags[uid] for uid in uids), flags


@pytest.mark.servers
def test_fetch_announces_a_message_over_the_limit_without_downloading_it(
    imap_account: ImapAccount, open_session: Callable[..., ImapSession]
) -> None:
    small = raw_message(1)
    large = raw_message(2, b"x" * 200_000 + b"\r\n")
    small_uid, large_uid = append_all(imap_account, "INBOX", [small, large])
    session = open_session()

    fetched = {f.uid: f for f in session.fetch([large_uid, small_uid], max_bytes=100_000)}

    assert fetched[small_uid].raw == small
    assert fetched[large_uid].raw == b""
    assert fetched[large_uid].size == len(large)


@pytest.mark.servers
def test_fetch_in_batches_keeps_uid_order(
    imap_account: ImapAccount, open_session: Callable[..., ImapSession], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mailbox_module, "FETCH_BATCH", 2)
    raws = [raw_message(n) for n in range(5)]
    uids = append_all(imap_account, "INBOX", raws)
    session = open_session()

    fetched = list(session.fetch(list(reversed(uids)), max_bytes=1_000_000))

    assert [f.uid for f in fetched] == uids
    assert [f.raw for f in fetched] == raws


@pytest.mark.servers
def test_message_expunged_between_search_and_fetch_is_simply_missing(
    imap_account: ImapAccount, open_session: Callable[..., ImapSession]
) -> None:
    first, second, third = append_all(imap_account, "INBOX", [raw_message(n) for n in range(3)])
    session = open_session()
    uids = session.uids()

    with imap_account.client() as other:  # a person deletes a message meanwhile
        other.select_folder("INBOX")
        other.delete_messages([second])
        other.uid_expunge([second])

    fetched = list(session.fetch(uids, max_bytes=1_000_000))

    assert [f.uid for f in fetched] == [first, third]
    assert session.uids() == [first, third]


@pytest.mark.servers
def test_uidvalidity_changes_when_the_watched_folder_is_recreated(
    imap_account: ImapAccount, open_session: Callable[..., ImapSession]
) -> None:
    raws = [raw_message(n) for n in range(2)]
    append_all(imap_account, "Replies", raws)
    before = open_session(folder="Replies")
    old_validity, old_uids = before.uidvalidity, before.uids()
    before.close()

    with imap_account.client() as client:
        client.delete_folder("Replies")
        client.create_folder("Replies")
    append_all(imap_account, "Replies", raws)
    after = open_session(folder="Replies")

    assert after.folder == "Replies"
    assert after.uidvalidity != old_validity
    assert [f.raw for f in after.fetch(after.uids(), 1_000_000)] == raws
    assert old_uids == after.uids()  # the same numbers, other messages: only UIDVALIDITY tells


# --------------------------------------------------------------------------- IMAP: moving


@pytest.mark.servers
def test_move_creates_the_target_and_removes_from_the_inbox(
    imap_account: ImapAccount, open_session: Callable[..., ImapSession]
) -> None:
    first, second = append_all(imap_account, "INBOX", [raw_message(1), raw_message(2)])
    session = open_session()

    session.move([first], "mailflow-processed")

    assert session.uids() == [second]
    with imap_account.client() as client:
        assert client.folder_exists("mailflow-processed")
        subscribed = [name for _, _, name in client.list_sub_folders()]
        client.select_folder("mailflow-processed", readonly=True)
        moved = client.fetch(client.search(["ALL"]), [b"BODY.PEEK[]"])
    assert "mailflow-processed" in subscribed
    assert [item[b"BODY[]"] for item in moved.values()] == [raw_message(1)]


@pytest.mark.servers
def test_move_recreates_a_target_a_person_deleted(
    imap_account: ImapAccount, open_session: Callable[..., ImapSession]
) -> None:
    first, second = append_all(imap_account, "INBOX", [raw_message(1), raw_message(2)])
    session = open_session()
    session.move([first], "Processed")
    with imap_account.client() as client:
        client.delete_folder("Processed")

    session.move([second], "Processed")

    assert session.uids() == []
    assert len(folder_uids(imap_account, "Processed")) == 1


@pytest.mark.servers
def test_move_recreates_a_target_deleted_between_the_check_and_the_move(
    imap_account: ImapAccount, open_session: Callable[..., ImapSession], monkeypatch: pytest.MonkeyPatch
) -> None:
    [uid] = append_all(imap_account, "INBOX", [raw_message(1)])
    session = open_session()
    session.move([], "Processed")  # nothing to move: nothing happens
    with imap_account.client() as client:
        assert not client.folder_exists("Processed")
    ensure = session._ensure_folder
    calls: list[str] = []

    def ensure_then_lose_it(name: str) -> None:
        ensure(name)
        calls.append(name)
        if len(calls) == 1:  # the race: someone deletes it right after our check
            with imap_account.client() as client:
                client.delete_folder(name)

    monkeypatch.setattr(session, "_ensure_folder", ensure_then_lose_it)
    session.move([uid], "Processed")

    assert calls == ["Processed", "Processed"]  # the MOVE said TRYCREATE; created and moved again
    assert session.uids() == []
    assert len(folder_uids(imap_account, "Processed")) == 1


@pytest.mark.servers
def test_move_translates_slash_to_the_servers_separator(
    imap_account: ImapAccount, open_session: Callable[..., ImapSession]
) -> None:
    [uid] = append_all(imap_account, "INBOX", [raw_message(1)])
    session = open_session()
    assert session.separator == "."  # Dovecot with maildir

    session.move([uid], "Archive/mailflow")

    assert len(folder_uids(imap_account, "Archive.mailflow")) == 1
    with pytest.raises(MailboxError, match="uses both '/' and the server's separator"):
        session.move([uid], "Archive/2024.x")
    with pytest.raises(MailboxError, match="into itself"):
        session.move([uid], "inbox")


@pytest.fixture
def dovecot_without_move() -> Iterator[DovecotServer]:
    """A private Dovecot announcing UIDPLUS but not MOVE after login."""
    root = Path(tempfile.mkdtemp(prefix="mailflow-dovecot-"))
    try:
        with DovecotServer(
            root, {}, extra_config="imap_capability = IMAP4rev1 LITERAL+ IDLE NAMESPACE UIDPLUS UNSELECT"
        ) as server:
            yield server
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.servers
def test_without_move_copy_then_expunge_only_our_uids(dovecot_without_move: DovecotServer) -> None:
    account = dovecot_without_move.new_account()
    ours, theirs, other = append_all(account, "INBOX", [raw_message(n) for n in range(3)])
    with account.client() as client:  # a person marked one deleted, as some mail clients do
        client.select_folder("INBOX")
        client.add_flags([theirs], [b"\\Deleted"])
    session = ImapMailbox(imap_settings(account)).open()
    try:
        assert "MOVE" not in session.capabilities and "UIDPLUS" in session.capabilities
        session.move([ours], "Processed")
        remaining = session.uids()
    finally:
        session.close()

    assert remaining == [theirs, other]  # the person's \Deleted message was not expunged with ours
    assert len(folder_uids(account, "Processed")) == 1


@pytest.mark.servers
def test_without_uidplus_originals_stay_flagged_and_it_is_reported(
    imap_account: ImapAccount, open_session: Callable[..., ImapSession], caplog: pytest.LogCaptureFixture
) -> None:
    first, second = append_all(imap_account, "INBOX", [raw_message(1), raw_message(2)])
    session = open_session()
    session.capabilities = session.capabilities - {"MOVE", "UIDPLUS"}  # an old server

    with caplog.at_level(logging.WARNING, logger="mailflow.mailbox"):
        session.move([first], "Processed")

    assert session.uids() == [first, second]
    with imap_account.client() as client:
        client.select_folder("INBOX", readonly=True)
        assert b"\\Deleted" in client.get_flags([first])[first]
    assert len(folder_uids(imap_account, "Processed")) == 1
    assert "neither MOVE nor UIDPLUS" in caplog.text and "not expunged" in caplog.text


# --------------------------------------------------------------------------- IMAP: errors


@pytest.mark.servers
def test_server_down_is_a_clear_error_and_a_restart_works(make_dovecot: Callable[..., DovecotServer]) -> None:
    server = make_dovecot()
    account = server.account("ts@example.org")
    mailbox = ImapMailbox(imap_settings(account))
    server.stop()

    with pytest.raises(MailboxError) as caught:
        mailbox.open()
    message = str(caught.value)
    assert f"cannot connect to IMAP server 127.0.0.1:{server.port}" in message
    assert "check mail.imap.host" in message

    server.start()
    session = mailbox.open()
    try:
        assert session.uids() == session.uids()
    finally:
        session.close()


@pytest.mark.servers
def test_wrong_password_names_the_user_and_the_setting(imap_account: ImapAccount) -> None:
    mailbox = ImapMailbox(imap_settings(imap_account, password="wrong"))

    with pytest.raises(MailboxError) as caught:
        mailbox.open()

    message = str(caught.value)
    assert f"rejected the login of {imap_account.user}" in message
    assert "check mail.imap.username and mail.imap.password" in message
    assert "secs)" not in message  # Dovecot's timings are noise


@pytest.mark.servers
def test_missing_watched_folder_says_which_setting(imap_account: ImapAccount) -> None:
    with pytest.raises(MailboxError, match=r"cannot open folder 'Nowhere'.*check mail\.imap\.folder"):
        ImapMailbox(imap_settings(imap_account, folder="Nowhere")).open()


@pytest.mark.servers
def test_connection_lost_during_a_session_is_a_mailbox_error(make_dovecot: Callable[..., DovecotServer]) -> None:
    server = make_dovecot()
    session = ImapMailbox(imap_settings(server.account("ts@example.org"))).open()
    try:
        server.stop()
        with pytest.raises(MailboxError, match=r"connection to IMAP server .* lost"):
            session.uids()
    finally:
        session.close()


# --------------------------------------------------------------------------- IMAP: waiting with IDLE


@pytest.mark.servers
def test_wait_for_change_wakes_up_when_a_message_arrives(
    imap_account: ImapAccount, open_session: Callable[..., ImapSession]
) -> None:
    session = open_session()
    assert "IDLE" in session.capabilities
    timer = threading.Timer(0.3, imap_account.append, args=("INBOX", raw_message(1)))
    started = time.monotonic()
    timer.start()
    try:
        changed = session.wait_for_change(5)
    finally:
        timer.join()

    assert changed is True
    assert time.monotonic() - started < 3
    assert len(session.uids()) == 1  # the session is usable again after IDLE


@pytest.mark.servers
def test_wait_for_change_reports_at_once_what_arrived_before_it_began(
    imap_account: ImapAccount, open_session: Callable[..., ImapSession]
) -> None:
    session = open_session()
    assert session.uids() == []
    imap_account.append("INBOX", raw_message(1))  # after our last look, before the wait
    started = time.monotonic()

    assert session.wait_for_change(5) is True
    assert time.monotonic() - started < 1


@pytest.mark.servers
def test_wait_for_change_sees_a_message_that_arrived_between_its_noop_and_its_idle(
    imap_account: ImapAccount, open_session: Callable[..., ImapSession]
) -> None:
    """Dovecot tells of it in the packet of "+ idling": read into imaplib's buffer with the
    continuation, it is not seen by polling the socket, and used to wait for the deadline."""
    session = open_session()
    client = session._client  # type: ignore[attr-defined]
    start_idle = client.idle
    started_idle: list[float] = []

    def append_then_idle() -> None:
        imap_account.append("INBOX", raw_message(1))
        time.sleep(0.8)  # past Dovecot's 500 ms notification delay: the news waits for IDLE's start
        started_idle.append(time.monotonic())
        start_idle()

    client.idle = append_then_idle
    assert session.wait_for_change(5) is True
    assert time.monotonic() - started_idle[0] < 1.5
    client.idle = start_idle
    assert len(session.uids()) == 1  # the session is usable again after IDLE
    assert session.wait_for_change(0.3) is False  # and nothing is reported twice


@pytest.mark.servers
@pytest.mark.parametrize("told_by", ["fetch", "move"])
def test_wait_for_change_sees_a_message_told_while_the_last_pass_read_the_inbox(
    imap_account: ImapAccount, open_session: Callable[..., ImapSession], told_by: str
) -> None:
    """A message arriving after a pass's SEARCH is told once, in the answer to its FETCH or MOVE;
    the wait that follows the pass reports it at once instead of missing it until the renewal."""
    session = open_session()
    assert session.wait_for_change(0.2) is False  # what SELECT told is not news
    imap_account.append("INBOX", raw_message(1))
    assert session.wait_for_change(5) is True
    first = session.uids()
    assert len(first) == 1
    imap_account.append("INBOX", raw_message(2))  # while the pass reads the first one
    time.sleep(0.8)  # past Dovecot's 500 ms: the next command's answer tells of it
    if told_by == "fetch":
        assert [fetched.uid for fetched in session.fetch(first, 10_000_000)] == first
    else:
        session.move(first, "Processed")
    started = time.monotonic()
    assert session.wait_for_change(5) is True
    assert time.monotonic() - started < 0.5
    assert len(session.uids_after(first[0])) == 1
    # Told once, reported once: with nothing new, the next wait times out.
    assert session.wait_for_change(0.3) is False
    # And imaplib keeps none of these notices piling up in a service that runs for months.
    kept = session._client._imap.untagged_responses  # type: ignore[attr-defined]
    assert not {"EXISTS", "EXPUNGE", "RECENT"} & set(kept), kept


@pytest.mark.servers
def test_wait_for_change_reports_news_once_even_without_a_search_between(
    imap_account: ImapAccount, open_session: Callable[..., ImapSession]
) -> None:
    session = open_session()
    imap_account.append("INBOX", raw_message(1))
    assert session.wait_for_change(5) is True
    assert session.wait_for_change(0.3) is False


@pytest.mark.servers
def test_wait_for_change_times_out_quietly(open_session: Callable[..., ImapSession]) -> None:
    session = open_session()
    started = time.monotonic()

    assert session.wait_for_change(0.4) is False
    assert 0.35 <= time.monotonic() - started < 2
    assert session.uids() == []


@pytest.mark.servers
def test_wait_for_change_polls_with_noop_without_idle(
    imap_account: ImapAccount, open_session: Callable[..., ImapSession], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mailbox_module, "NOOP_POLL_SECONDS", 0.1)
    session = open_session()
    session.capabilities = session.capabilities - {"IDLE"}
    assert session.wait_for_change(0.2) is False
    imap_account.append("INBOX", raw_message(1))

    assert session.wait_for_change(2) is True


@pytest.mark.servers
def test_wait_for_change_raises_when_the_server_goes_away(make_dovecot: Callable[..., DovecotServer]) -> None:
    server = make_dovecot()
    session = ImapMailbox(imap_settings(server.account("ts@example.org"))).open()
    timer = threading.Timer(0.3, server.stop)
    timer.start()
    try:
        with pytest.raises(MailboxError, match="lost while waiting for new messages"):
            session.wait_for_change(5)
    finally:
        timer.join()
        session.close()


# --------------------------------------------------------------------------- the maildir twin


def deliver(folder: Path, raws: list[bytes]) -> None:
    box = Maildir(folder, create=True)
    for raw in raws:
        box.add(raw)
        time.sleep(0.001)  # distinct delivery times, as from a real MDA


def test_maildir_uids_are_stable_across_instances_and_never_reused(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    deliver(inbox, [raw_message(n) for n in range(3)])
    first = MaildirMailbox(inbox).open()
    uids = first.uids()
    assert uids == [1, 2, 3]
    contents = {f.uid: f.raw for f in first.fetch(uids, 1_000_000)}
    assert contents == {1: raw_message(0), 2: raw_message(1), 3: raw_message(2)}

    second = MaildirMailbox(inbox).open()
    assert second.uidvalidity == first.uidvalidity
    assert second.uids() == uids
    assert {f.uid: f.raw for f in second.fetch(uids, 1_000_000)} == contents

    second.move([2], "mailflow-processed")
    deliver(inbox, [raw_message(9)])
    third = MaildirMailbox(inbox).open()
    assert third.uids() == [1, 3, 4]  # 2 is gone and not handed out again
    assert third.uids_after(3) == [4]
    assert third.uids_after(4) == []
    assert [f.raw for f in third.fetch([4], 1_000_000)] == [raw_message(9)]


def test_maildir_fetch_limits_size_and_skips_unknown_uids(tmp_path: Path) -> None:
    large = raw_message(2, b"x" * 5_000)
    deliver(tmp_path / "inbox", [raw_message(1), large])
    session = MaildirMailbox(tmp_path / "inbox").open()

    fetched = list(session.fetch([2, 1, 99], max_bytes=1_000))

    assert fetched == [
        Fetched("INBOX", session.uidvalidity, 1, raw_message(1), len(raw_message(1))),
        Fetched("INBOX", session.uidvalidity, 2, b"", len(large)),
    ]


def test_maildir_move_into_a_subfolder_keeps_the_bytes(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    deliver(inbox, [raw_message(1), raw_message(2)])
    session = MaildirMailbox(inbox, processed_folder="done").open()

    session.move([1], "done")
    session.move([2], "done")  # the folder exists now

    assert session.uids() == []
    processed = Maildir(inbox).get_folder("done")
    assert sorted(processed.get_bytes(key) for key in processed.iterkeys()) == [raw_message(1), raw_message(2)]
    with pytest.raises(MailboxError, match="cannot name a maildir folder"):
        session.move([1], "../escape")


def test_maildir_uidvalidity_changes_when_the_folder_is_recreated(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    deliver(inbox, [raw_message(1)])
    before = MaildirMailbox(inbox).open().uidvalidity
    shutil.rmtree(inbox)
    deliver(inbox, [raw_message(1)])

    after = MaildirMailbox(inbox).open()

    assert after.uidvalidity != before
    assert after.uids() == [1]


def test_maildir_is_created_when_missing_and_the_error_is_clear_when_it_cannot_be(tmp_path: Path) -> None:
    session = MaildirMailbox(tmp_path / "a" / "inbox").open()
    assert isinstance(session, MaildirSession)
    assert session.uids() == []

    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(MailboxError, match="cannot open the local inbox"):
        MaildirMailbox(tmp_path / "file" / "inbox").open()


def test_maildir_wait_for_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mailbox_module, "MAILDIR_POLL_SECONDS", 0.02)
    inbox = tmp_path / "inbox"
    session = MaildirMailbox(inbox).open()
    assert session.wait_for_change(0.1) is False

    timer = threading.Timer(0.1, deliver, args=(inbox, [raw_message(1)]))
    timer.start()
    try:
        assert session.wait_for_change(3) is True
    finally:
        timer.join()
    assert session.uids() == [1]
    assert session.wait_for_change(0.05) is False
