"""Property-based fuzzing of the parsers that read what strangers send, and of the configuration reader.

Each target must never let an exception escape other than mailflow's own (``MailflowError`` and its subclasses),
and must say what it made of the input in its own terms:

- ``inbound.parse_message`` on arbitrary bytes, on MIME trees built from strategies (nested multiparts and attached
  messages, missing or lying boundaries, unknown charsets and transfer encodings, RFC 2047 and RFC 2231 names, path
  traversal in file names) and on the email fixtures with their bytes mutated: a ``Message``, never an "internal
  error" (the parser's last line of defence, which would hide a bug);
- ``returns.read_return`` on the sample workbook with its bytes, its zip members' XML and its zip structure mutated:
  a reading of a known status whose reason, when the file could not be read, is not a Python error of mailflow's
  own code (IndexError, KeyError, TypeError...);
- ``inbound.body_answers`` and ``inbound.strip_quoted`` on text built for them;
- ``config.parse_config`` on the example configuration mutated as text and as data: a ``Config`` or a
  ``ConfigError`` whose every line names the file.

Bounded by default (``FUZZ_EXAMPLES`` examples per target, derandomized so CI runs the same cases, a few seconds in
all); a long run explores afresh::

    MAILFLOW_FUZZ_EXAMPLES=5000 .venv/bin/pytest tests/test_fuzz.py
"""

from __future__ import annotations

import io
import os
import re
import unicodedata
import warnings
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from mailflow import inbound
from mailflow.config import Config, parse_config
from mailflow.errors import ConfigError, MailflowError
from mailflow.returns import read_return
from mailflow.workbook import read_master
from tests.helpers import EXAMPLE, ROOT, SAMPLE_PLAN, fill_workbook

# Hypothesis checks by reading their source that composite functions use ``draw`` and recursive extensions their
# argument; it cannot read a nested function or a lambda spread over lines, and warns although both do.
pytestmark = [
    pytest.mark.filterwarnings("ignore:There is no reason to use @st.composite"),
    pytest.mark.filterwarnings("ignore:.*doesn't use it's argument"),
]

LONG_RUN = "MAILFLOW_FUZZ_EXAMPLES" in os.environ
FUZZ_EXAMPLES = int(os.environ.get("MAILFLOW_FUZZ_EXAMPLES") or 100)
FUZZ = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,  # the bound is the number of examples; a slow example shows in the run's time
    derandomize=not LONG_RUN,
    database=None,  # nothing written into the repository; a failure prints how to reproduce it
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)

MAIL_FIXTURES = sorted((ROOT / "tests" / "fixtures" / "mail").glob("*.eml"))
KEYS = [f"{line}.{action}" for line in range(1, 6) for action in range(1, 9)]
LAYOUT = read_master(SAMPLE_PLAN, "Code", "Responsible")
SAMPLE = SAMPLE_PLAN.read_bytes()
FILLED = fill_workbook(SAMPLE, {key: f"Institución {key}" for key in KEYS[::2]})
#: What a Python bug in mailflow's own code looks like once read_return has turned it into a reading.
PYTHON_BUGS = re.compile(
    r"\((IndexError|KeyError|TypeError|AttributeError|AssertionError|UnboundLocalError|NameError|"
    r"ZeroDivisionError|RecursionError|StopIteration|NotImplementedError)\b"
)


def mutate(data: bytes, edits: list[tuple[int, int, bytes]]) -> bytes:
    """Apply (position, length to cut, bytes to put) edits, positions taken modulo the current length."""
    out = bytearray(data)
    for position, cut, put in edits:
        at = position % (len(out) + 1)
        out[at : at + cut] = put
    return bytes(out)


EDITS = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=1 << 20),
        st.integers(min_value=0, max_value=64),
        st.one_of(
            st.binary(max_size=16),
            st.sampled_from(
                [b"\r\n", b"\n\n", b"--", b"\x00", b"=?utf-8?b?", b"?=", b"\r\n\r\n--b\r\n", b";", b'"', b"\\"]
            ),
        ),
    ),
    min_size=1,
    max_size=8,
)


# --------------------------------------------------------------------------- inbound.parse_message


def assert_taken_apart(message: inbound.Message) -> None:
    assert isinstance(message, inbound.Message)
    event(f"kind: {message.kind}, {min(len(message.attachments), 3)} attachment(s) or more")
    assert not [p for p in message.problems if p.startswith("internal error")], message.problems
    assert message.kind in (inbound.KIND_REPLY, inbound.KIND_AUTO_REPLY, inbound.KIND_BOUNCE)
    assert message.from_address is None or message.from_address == message.from_address.lower()
    assert isinstance(message.body_text, str) and isinstance(message.subject, str)
    for attachment in message.attachments:
        name = attachment.filename
        assert "/" not in name and "\\" not in name, name
        assert not any(unicodedata.category(c) == "Cc" for c in name), name
        assert attachment.too_large or len(attachment.data) == attachment.size


@FUZZ
@given(st.binary(max_size=3000))
def test_parse_message_takes_any_bytes_apart(raw: bytes) -> None:
    assert_taken_apart(inbound.parse_message(raw))


@FUZZ
@given(st.sampled_from(MAIL_FIXTURES), EDITS)
def test_parse_message_takes_mutated_real_emails_apart(fixture: Path, edits: list[tuple[int, int, bytes]]) -> None:
    assert_taken_apart(inbound.parse_message(mutate(fixture.read_bytes(), edits)))


CHARSETS = ["utf-8", "iso-8859-1", "windows-1252", "us-ascii", "utf-16", "koi8-r", "gb2312", "x-unknown", "utf-99", ""]
ENCODINGS = ["7bit", "8bit", "binary", "base64", "quoted-printable", "BASE64", "x-uuencode", "garbage"]
LEAF_TYPES = [
    "text/plain",
    "text/html",
    "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
    "application/vnd.ms-excel",
    "application/octet-stream",
    "application/pdf",
    "message/delivery-status",
    "text/rfc822-headers",
    "image/png",
    "",
]
FILENAMES = st.one_of(
    st.text(max_size=30),
    st.sampled_from(
        [
            "../../x.xlsx",
            "..\\..\\x.xlsx",
            "/etc/passwd",
            "C:\\plan.xlsx",
            "plan\x00.xlsx",
            "plan\r\nBcc: x@y.z.xlsx",
            "=?utf-8?b?UGxhbiDDqS54bHN4?=",
            "=?x-unknown?q?plan?=",
            "plan.xlsx" * 40,
        ]
    ),
)
TOKEN = st.text(alphabet="abcXYZ019'()+_,-./:=? ", min_size=1, max_size=40)


def header_value(text: str, how: str, charset: str) -> bytes:
    if how == "raw":
        return text.encode("utf-8", "surrogatepass")
    if how == "b":
        import base64

        return b"=?" + charset.encode() + b"?b?" + base64.b64encode(text.encode("utf-8", "replace")) + b"?="
    return b"=?" + charset.encode() + b"?q?" + text.encode("utf-8", "replace").replace(b" ", b"_") + b"?="


@st.composite
def headers(draw: st.DrawFn) -> list[bytes]:
    lines = []
    for name in draw(st.lists(st.sampled_from(["From", "Subject", "To", "Reply-To", "X-Other"]), max_size=4)):
        value = header_value(
            draw(st.text(max_size=40)), draw(st.sampled_from(["raw", "b", "q"])), draw(st.sampled_from(CHARSETS))
        )
        lines.append(name.encode() + b": " + value)
    return lines


@st.composite
def leaves(draw: st.DrawFn) -> tuple[list[bytes], bytes]:
    content_type = draw(st.sampled_from(LEAF_TYPES))
    params = []
    if draw(st.booleans()):
        params.append(b"charset=" + draw(st.sampled_from(CHARSETS)).encode())
    filename = draw(st.one_of(st.none(), FILENAMES))
    if filename is not None:
        encoded = filename.encode("utf-8", "surrogatepass")
        style = draw(st.sampled_from(["quoted", "2231", "2231-split", "bare"]))
        if style == "quoted":
            params.append(b'name="' + encoded + b'"')
        elif style == "2231":
            params.append(b"filename*=utf-8''" + re.sub(rb"[^A-Za-z0-9.]", lambda m: b"%%%02X" % m[0][0], encoded))
        elif style == "2231-split":
            params.append(b"filename*0=" + encoded[:5] + b"; filename*1*=utf-8''" + encoded[5:])
        else:
            params.append(b"filename=" + encoded)
    cte = draw(st.sampled_from(ENCODINGS))
    payload = draw(
        st.one_of(st.binary(max_size=400), st.text(max_size=300).map(lambda t: t.encode("utf-8", "replace")))
    )
    if cte.lower() == "base64" and draw(st.booleans()):
        import base64

        payload = base64.encodebytes(payload)
    head = [b"Content-Type: " + content_type.encode() + b"".join(b"; " + p for p in params)]
    head.append(b"Content-Transfer-Encoding: " + cte.encode())
    if filename is not None and draw(st.booleans()):
        head.append(b'Content-Disposition: attachment; filename="' + filename.encode("utf-8", "surrogatepass") + b'"')
    return head + draw(headers()), payload


def multiparts(children: st.SearchStrategy[tuple[list[bytes], bytes]]) -> st.SearchStrategy[tuple[list[bytes], bytes]]:
    @st.composite
    def build(draw: st.DrawFn) -> tuple[list[bytes], bytes]:
        subtype = draw(st.sampled_from(["mixed", "alternative", "related", "report", "signed", "digest", "x-odd"]))
        boundary = draw(TOKEN).encode()
        declared = boundary if draw(st.integers(0, 5)) else draw(TOKEN).encode()  # sometimes the header lies
        parts = draw(st.lists(children, max_size=4))
        body = draw(st.binary(max_size=30))  # preamble
        for part_headers, part_body in parts:
            body += b"\r\n--" + boundary + b"\r\n" + b"\r\n".join(part_headers) + b"\r\n\r\n" + part_body
        if draw(st.booleans()):
            body += b"\r\n--" + boundary + b"--\r\n" + draw(st.binary(max_size=20))  # else: never closed
        quoted = draw(st.booleans())
        value = b'"' + declared + b'"' if quoted else declared
        extra = b"; report-type=delivery-status" if subtype == "report" else b""
        return [b"Content-Type: multipart/" + subtype.encode() + b"; boundary=" + value + extra], body

    return build()


def attached_messages(
    children: st.SearchStrategy[tuple[list[bytes], bytes]],
) -> st.SearchStrategy[tuple[list[bytes], bytes]]:
    return st.tuples(headers(), children).map(
        lambda pair: (
            [b"Content-Type: message/rfc822"],
            b"\r\n".join(pair[0] + pair[1][0]) + b"\r\n\r\n" + pair[1][1],
        )
    )


ENTITIES = st.recursive(leaves(), lambda c: st.one_of(multiparts(c), attached_messages(c)), max_leaves=10)


@st.composite
def emails(draw: st.DrawFn) -> bytes:
    top = [
        b"From: " + draw(st.sampled_from([b"Enlace <enlace@sre.example.hn>", b"<>", b"MAILER-DAEMON@x", b"x", b""])),
        b"Message-ID: <" + draw(TOKEN).encode() + b"@example.org>",
        b"In-Reply-To: " + draw(TOKEN).encode(),
        b"Date: " + draw(st.sampled_from([b"Fri, 20 Oct 2017 16:00:00 +0000", b"yesterday", b"Fri, 99 Oct 2017"])),
        b"MIME-Version: 1.0",
    ]
    top += draw(
        st.lists(
            st.sampled_from(
                [
                    b"Auto-Submitted: auto-replied",
                    b"Precedence: bulk",
                    b"Authentication-Results: mx.example.org; dmarc=fail header.from=sre.example.hn",
                    b"Authentication-Results: ; spf=pass",
                    b"Subject: Re: [Ref. responsible-2017/HN] Plan",
                    b"Subject:" + b"x" * 2000,
                    b"X-Long: " + b"y" * 5000,
                    b"Received: from x\r\n\tby y",
                ]
            ),
            max_size=4,
        )
    )
    entity_headers, body = draw(ENTITIES)
    newline = draw(st.sampled_from([b"\r\n", b"\n"]))
    raw = b"\r\n".join(top + entity_headers) + b"\r\n\r\n" + body
    return raw.replace(b"\r\n", newline)


@FUZZ
@given(emails())
def test_parse_message_takes_apart_mime_trees_built_to_confuse_it(raw: bytes) -> None:
    assert_taken_apart(inbound.parse_message(raw))


def _regex_delimiters(buf: bytes, start: int, end: int, boundary: bytes) -> list[tuple[int, int, bool]]:
    """The delimiter lines as the regular expression the parser used before finds them (the oracle)."""
    pattern = re.compile(rb"(?<![^\r\n])--" + re.escape(boundary) + rb"(--)?[ \t]*(?:\r\n|\n|\r|\Z)")
    return [(m.start(), m.end(), bool(m.group(1))) for m in pattern.finditer(buf, start, end)]


DELIMITER_BYTES = st.lists(
    st.sampled_from([b"--", b"-", b"b", b"bo", b"\r\n", b"\n", b"\r", b" ", b"\t", b"x", b"--b--", b"--b"]),
    max_size=40,
).map(b"".join)


@FUZZ
@given(DELIMITER_BYTES, st.sampled_from([b"b", b"bo", b"-", b"b--"]), st.integers(0, 6), st.integers(0, 6))
@example(b"--b\r\nx\r\n--b--", b"b", 0, 0)
@example(b"x--b\n--b \t\r--b--", b"b", 0, 0)
def test_delimiter_lines_are_found_as_the_regular_expression_found_them(
    buf: bytes, boundary: bytes, skip: int, cut: int
) -> None:
    start, end = min(skip, len(buf)), max(min(skip, len(buf)), len(buf) - cut)
    assert list(inbound._delimiters(buf, start, end, boundary)) == _regex_delimiters(buf, start, end, boundary)


# --------------------------------------------------------------------------- returns.read_return


XML_SNIPPETS = [
    b'<!DOCTYPE x [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;">]>',
    b'<!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]>',
    b"&a;&b;&e;",
    b'<dimension ref="A1:XFD1048576"/>',
    b'<c r="XFD1048576" t="s"><v>99999999</v></c>',
    b'<c r="A0"><v>1</v></c>',
    b'<c r="B2" t="inlineStr"><is><t>=HYPERLINK("x")</t></is></c>',
    b'<row r="0"><c r="A-1"/></row>',
    b"<v>1e309</v>",
    b"<v>NaN</v>",
    b'<mergeCell ref="A1:Z99999"/>',
    b'<sheet name="x" sheetId="99" r:id="rId99"/>',
    b'<si><t xml:space="preserve">',
    b"</worksheet>",
    b"\x00\xff\xfe",
    b'<?xml version="1.0" encoding="utf-16"?>',
]


@st.composite
def mutated_workbooks(draw: st.DrawFn) -> bytes:
    base = draw(st.sampled_from([SAMPLE, FILLED]))
    how = draw(st.sampled_from(["bytes", "member", "member", "structure"]))
    if how == "bytes":
        return mutate(base, draw(EDITS))
    with zipfile.ZipFile(io.BytesIO(base)) as source:
        members = [(info.filename, source.read(info)) for info in source.infolist()]
    if how == "member":
        index = draw(st.integers(0, len(members) - 1))
        name, content = members[index]
        edits = draw(
            st.lists(
                st.tuples(
                    st.integers(0, 1 << 20),
                    st.integers(0, 40),
                    st.one_of(st.sampled_from(XML_SNIPPETS), st.binary(max_size=12)),
                ),
                min_size=1,
                max_size=5,
            )
        )
        members[index] = (name, mutate(content, edits))
    else:
        action = draw(st.sampled_from(["drop", "duplicate", "add", "rename"]))
        index = draw(st.integers(0, len(members) - 1))
        if action == "drop":
            del members[index]
        elif action == "duplicate":
            members.append(members[index])
        elif action == "add":
            members.append((draw(st.sampled_from(["xl/worksheets/sheet9.xml", "xl/x.xml", "../x"])), draw(st.binary())))
        else:
            members[index] = (draw(st.sampled_from(["xl/workbook.xml", "[Content_Types].xml", "x"])), members[index][1])
    out = io.BytesIO()
    compression = draw(st.sampled_from([zipfile.ZIP_DEFLATED, zipfile.ZIP_STORED]))
    with zipfile.ZipFile(out, "w", compression) as target, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Duplicate name": wanted here
        for name, content in members:
            target.writestr(name, content)
    return out.getvalue()


@FUZZ
@given(mutated_workbooks(), st.sampled_from(["plan.xlsx", "plan.xlsm", "plan.ods", "plan.xls", "plan.bin"]))
@example(SAMPLE, "plan.xlsx")
def test_read_return_says_what_any_mutated_workbook_is(data: bytes, filename: str) -> None:
    reading = read_return(data, filename, LAYOUT, "Code", "Responsible")
    event(f"{reading.status}: {(reading.reason or '')[:50]}")
    assert reading.status in ("parsed", "unreadable", "rejected", "ignored")
    if reading.status == "parsed":
        assert reading.reason is None
        assert set(reading.answers) <= set(LAYOUT.keys) and set(reading.missing) <= set(LAYOUT.keys)
        assert not set(reading.answers) & set(reading.missing)
    else:
        assert reading.reason, reading
        assert not PYTHON_BUGS.search(reading.reason), reading.reason


# --------------------------------------------------------------------------- body answers, quoted text


ANSWER_TEXT = st.text(
    alphabet=st.characters(
        whitelist_categories=("Lu", "Ll", "Nd", "Zs", "Po", "Pd", "Ps", "Pe"), blacklist_characters="\r\n\x85"
    ),
    max_size=60,
)
LINE_PIECES = st.sampled_from(
    [
        "1.1: Ministerio",
        "- 2.3 – Dirección",
        "* 4.1) Instituto",
        "Acción 1.2: X",
        "1.2. Y",
        "> 1.1: quoted",
        "El lun., 23 oct. 2017 a las 10:00, Enlace <e@x.hn> escribió:",
        "On Mon, Oct 23, 2017 at 10:00 AM Liaison <l@x.gov> wrote:",
        "-----Original Message-----",
        "-----Mensaje original-----",
        "From: Secretaría <ts@example.org>",
        "Sent: Monday, October 23, 2017 10:00 AM",
        "De: Secretaría",
        "Enviado el: lunes",
        "________________________________",
        "---------- Forwarded message ---------",
        "",
        "   ",
        "1.1:",
        "1.1: -",
    ]
)
BODIES = st.lists(st.one_of(LINE_PIECES, ANSWER_TEXT), max_size=30).map("\n".join)


@FUZZ
@given(BODIES, st.sampled_from(["\n", "\r\n", "\r"]))
def test_strip_quoted_keeps_only_lines_the_sender_wrote(body: str, newline: str) -> None:
    text = body.replace("\n", newline)
    kept = inbound.strip_quoted(text)
    lines = {line.rstrip() for line in body.split("\n")}
    for line in kept.split("\n"):
        assert not line.lstrip().startswith(">")
        assert line in lines or not line, line


@FUZZ
@given(BODIES, st.lists(st.sampled_from(KEYS), unique=True))
def test_body_answers_only_returns_real_answers_for_the_keys_asked(body: str, keys: list[str]) -> None:
    answers = inbound.body_answers(body, keys)
    assert set(answers) <= set(keys)
    for value in answers.values():
        assert value == value.strip() and value not in ("", "-") and "\n" not in value


@FUZZ
@given(
    st.dictionaries(st.sampled_from(KEYS), st.tuples(st.sampled_from("AbÉñ1("), ANSWER_TEXT).map("".join), max_size=12),
    st.sampled_from(
        ["{key}: {value}", "- {key} – {value}", "{key} - {value}", "Acción {key}: {value}", "{key}) {value}"]
    ),
)
def test_body_answers_reads_back_every_answer_written_one_per_line(answers: dict[str, str], form: str) -> None:
    body = "Estimados:\n\n" + "\n".join(form.format(key=k, value=v) for k, v in answers.items()) + "\n\nSaludos"
    expected = {k: unicodedata.normalize("NFC", v).strip() for k, v in answers.items()}
    assert inbound.body_answers(body, KEYS) == expected


# --------------------------------------------------------------------------- config.parse_config


EXAMPLE_TEXT = EXAMPLE.read_text(encoding="utf-8")
EXAMPLE_DATA = yaml.safe_load(EXAMPLE_TEXT)
ENVIRON = {"SMTP_PASSWORD": "s", "IMAP_PASSWORD": "i"}
YAML_VALUES = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(allow_nan=True),
        st.text(max_size=20),
        st.sampled_from(
            ["", "all", "09:00", "25:99", "-3d", "2017-02-30", "Mars/Olympus", "${UNSET}", "x@y", "0 8 * *"]
        ),
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=3), st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=6,
)


def assert_config_or_config_error(text: str) -> None:
    try:
        config = parse_config(text, EXAMPLE, ENVIRON)
    except ConfigError as exc:
        event("ConfigError")
        assert exc.problems and all(p.startswith("config.example.yaml") for p in exc.problems), exc.problems
        return
    except MailflowError:
        return
    event("Config")
    assert isinstance(config, Config)


@FUZZ
@given(EDITS)
def test_parse_config_reads_any_mutation_of_the_example_text(edits: list[tuple[int, int, bytes]]) -> None:
    text = mutate(EXAMPLE_TEXT.encode("utf-8"), edits).decode("utf-8", "replace")
    assert_config_or_config_error(text)


def paths(data: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(data, dict):
        for key, value in data.items():
            out += paths(value, (*prefix, key))
    elif isinstance(data, list):
        for index, value in enumerate(data):
            out += paths(value, (*prefix, index))
    return out


EXAMPLE_PATHS = paths(EXAMPLE_DATA)[1:]


@FUZZ
@given(
    st.lists(
        st.tuples(st.sampled_from(EXAMPLE_PATHS), st.sampled_from(["set", "delete", "add"]), YAML_VALUES), max_size=4
    )
)
def test_parse_config_reads_any_mutation_of_the_example_data(changes: list[tuple[tuple[Any, ...], str, Any]]) -> None:
    data = yaml.safe_load(EXAMPLE_TEXT)
    for path, action, value in changes:
        parent: Any = data
        try:
            for step in path[:-1]:
                parent = parent[step]
        except (KeyError, IndexError, TypeError):
            continue  # an earlier change removed or replaced this path
        last = path[-1]
        if isinstance(parent, dict) and action == "add":
            parent[f"{last}_extra"] = value
        elif isinstance(parent, list) and action == "add":
            parent.append(value)
        elif (isinstance(parent, dict) and last in parent) or (
            isinstance(parent, list) and isinstance(last, int) and last < len(parent)
        ):
            if action == "set":
                parent[last] = value
            else:
                del parent[last]
    assert_config_or_config_error(yaml.safe_dump(data, allow_unicode=True, sort_keys=False))


def test_parse_config_refuses_a_deeply_nested_value_with_a_config_error() -> None:
    with pytest.raises(ConfigError):
        parse_config("secretariat: " + "[" * 600 + "]" * 600, EXAMPLE, ENVIRON)
