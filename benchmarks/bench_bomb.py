"""bomb: a decompression bomb (a 1 MB .xlsx declaring 1 GB inside) rejected in bounded memory.

The bomb is a real .xlsx package (content types, workbook, relationships)
whose one worksheet is 1 GiB of zeros, streamed through zlib into the zip
member, so it is never held in memory: about 1 MB on disk. A second bomb
lies about its size: its worksheet is 1 GiB of well-formed sheet XML (a
sheet's start, then the same row over and over; 3 MB on disk) and declares
900 KB, so no declared size or ratio gives it away and, its content being a
plausible sheet, only the streamed decompression under a cap can stop it.

Measured, each in a child process started by the launcher of
:mod:`benchmarks.processes` (so the peak RSS is the child's own):

* ``read_return`` on each bomb, beside ``read_return`` on a normal returned
  workbook (the filled 40-action sample): outcome, wall time, and peak RSS
  (the target: under 150 MB). The child also prints its ``VmHWM`` before and
  after the call, so the memory the call itself added is visible;
* ``mailflow inspect FILE --json`` on an email carrying the bomb, beside the
  same command on an email carrying the normal workbook: the whole command.
"""

from __future__ import annotations

import struct
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import CAMPAIGN_ID, Stopwatch, config_data, make_delegations, say, seconds, verdict, write_yaml
from benchmarks.processes import ProcessRun, child_env, run_measured
from mailflow.render import subject_reference
from mailflow.returns import STATUS_PARSED, STATUS_REJECTED
from mailflow.sample import write_sample_plan
from mailflow.workbook import read_master
from tests.helpers import fill_workbook, reply_to

TARGET_MB = 150.0
BOMB_MEMBER = "xl/worksheets/sheet1.xml"
LYING_SIZE = 900 * 1024  # under the 1 MB below which compression ratios are not judged
ATTACHMENT_NAME = "Plan estratégico - Delegación 1.xlsx"

_CONTENT_TYPES = (
    '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
    '<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
    '<Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
    '<Default Extension="xml" ContentType="application/xml"/>'
    '<Override PartName="/xl/workbook.xml" '
    'ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.sheet.main+xml"/>'
    '<Override PartName="/xl/worksheets/sheet1.xml" '
    'ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.worksheet+xml"/>'
    "</Types>"
)
_ROOT_RELS = (
    '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
    '<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">'
    '<Relationship Id="rId1" '
    'Type="http://schemas.openxmlformats.org/officeDocument/2006/relationships/officeDocument" '
    'Target="xl/workbook.xml"/></Relationships>'
)
_WORKBOOK = (
    '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
    '<workbook xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main" '
    'xmlns:r="http://schemas.openxmlformats.org/officeDocument/2006/relationships">'
    '<sheets><sheet name="Strategic Plan" sheetId="1" r:id="rId1"/></sheets></workbook>'
)
_WORKBOOK_RELS = (
    '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
    '<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">'
    '<Relationship Id="rId1" '
    'Type="http://schemas.openxmlformats.org/officeDocument/2006/relationships/worksheet" '
    'Target="worksheets/sheet1.xml"/></Relationships>'
)

READ_SCRIPT = """\
import time
_start = time.perf_counter()
import json
import sys
from pathlib import Path

from mailflow.returns import read_return
from mailflow.workbook import read_master


def hwm_kb():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


layout = read_master(Path(sys.argv[1]), "Code", "Responsible")
path = Path(sys.argv[2])
data = path.read_bytes()
before = hwm_kb()
_begin = time.perf_counter()
reading = read_return(data, path.name, layout, "Code", "Responsible")
_end = time.perf_counter()
print(json.dumps({
    "status": reading.status,
    "reason": reading.reason,
    "format": reading.format,
    "answers": len(reading.answers),
    "read": _end - _begin,
    "hwm_before_kb": before,
    "hwm_after_kb": hwm_kb(),
}))
"""


@dataclass(frozen=True)
class Sizes:
    declared: int  # bytes of the bomb's worksheet
    runs: int


FULL = Sizes(declared=1 << 30, runs=3)
QUICK = Sizes(declared=256 << 20, runs=1)  # still beyond the 200 MB limit on declared sizes


_SHEET_START = (
    b'<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
    b'<worksheet xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main"><sheetData>'
)
_SHEET_ROW = b'<row r="1"><c r="A1"><v>0</v></c></row>'


def _write_bomb(path: Path, declared: int, *, rows: bool = False) -> None:
    """An .xlsx package whose worksheet is ``declared`` bytes, deflated 1 MiB at a time: zeros, or (``rows``) a
    sheet's start and the same row over and over (never closed: a bomb need not end)."""
    chunk = _SHEET_ROW * ((1 << 20) // len(_SHEET_ROW)) if rows else bytes(1 << 20)
    start = _SHEET_START if rows else b""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        archive.writestr("[Content_Types].xml", _CONTENT_TYPES)
        archive.writestr("_rels/.rels", _ROOT_RELS)
        archive.writestr("xl/workbook.xml", _WORKBOOK)
        archive.writestr("xl/_rels/workbook.xml.rels", _WORKBOOK_RELS)
        with archive.open(BOMB_MEMBER, "w") as member:
            member.write(start)
            for _ in range((declared - len(start)) // len(chunk)):
                member.write(chunk)


def _write_lying_bomb(source: Path, target: Path, declared: int) -> None:
    """``source`` with the worksheet's uncompressed size set to ``declared`` in both of its headers."""
    with zipfile.ZipFile(source) as archive:
        info = archive.getinfo(BOMB_MEMBER)
    assert not info.flag_bits & 0x08 and info.file_size < 0xFFFFFFFF, "expected plain 32-bit sizes in the headers"
    data = bytearray(source.read_bytes())
    name = BOMB_MEMBER.encode()
    local = info.header_offset
    assert data[local : local + 4] == b"PK\x03\x04" and data[local + 30 : local + 30 + len(name)] == name
    struct.pack_into("<I", data, local + 22, declared)
    end = data.rfind(b"PK\x05\x06")  # the end of central directory record
    entries, _size, central = struct.unpack_from("<HII", data, end + 10)
    patched = 0
    for _ in range(entries):
        assert data[central : central + 4] == b"PK\x01\x02", "damaged central directory"
        name_length, extra_length, comment_length = struct.unpack_from("<HHH", data, central + 28)
        if data[central + 46 : central + 46 + name_length] == name:
            struct.pack_into("<I", data, central + 24, declared)
            patched += 1
        central += 46 + name_length + extra_length + comment_length
    assert patched == 1, f"{patched} central directory entries for {BOMB_MEMBER}"
    target.write_bytes(bytes(data))
    with zipfile.ZipFile(target) as check:
        assert check.getinfo(BOMB_MEMBER).file_size == declared


def _inspect_config(base: Path, workbook: Path) -> Path:
    data = config_data(
        delegations=make_delegations(3),
        workbook=workbook,
        store=base / "inspect.db",
        mail={"transport": "local", "local": {"outbox": str(base / "outbox"), "inbox": str(base / "inbox")}},
    )
    return write_yaml(base / "mailflow.yaml", data)


def _email(path: Path, attachment: bytes) -> Path:
    """A delegation's reply carrying ``attachment`` (attributed by the reference in its subject)."""
    contact = make_delegations(3)[0]["contacts"][0]
    subject = f"RE: Plan estratégico {subject_reference(CAMPAIGN_ID, 'D0001')}"
    path.write_bytes(
        reply_to(None, sender=contact, subject=subject, thread=False, attachments=[(ATTACHMENT_NAME, attachment)])
    )
    return path


@dataclass
class Measured:
    runs: list[ProcessRun]
    documents: list[dict[str, Any]]

    @property
    def best_seconds(self) -> float:
        return min(run.seconds for run in self.runs)

    @property
    def peak_mb(self) -> float:
        return max(run.peak_rss_mb for run in self.runs)

    @property
    def document(self) -> dict[str, Any]:
        return self.documents[0]


def _measure(argv: list[str], env: dict[str, str], runs: int) -> Measured:
    measured = Measured([], [])
    for _ in range(runs):
        run = run_measured(argv, env=env)
        measured.runs.append(run)
        measured.documents.append(run.json())
    return measured


def _mailflow_command() -> list[str]:
    script = Path(sys.executable).parent / "mailflow"
    return [str(script)] if script.exists() else [sys.executable, "-m", "mailflow.cli"]


def run(*, quick: bool = False) -> list[str]:
    sizes = QUICK if quick else FULL
    with tempfile.TemporaryDirectory(prefix="mailflow-bench-bomb-") as tmp:
        base = Path(tmp)
        master = base / "plan.xlsx"
        write_sample_plan(master)
        layout = read_master(master, "Code", "Responsible")
        normal = base / ATTACHMENT_NAME
        normal.write_bytes(fill_workbook(master.read_bytes(), {key: "Ministerio de Salud" for key in layout.keys}))
        say(f"bomb: writing a bomb declaring {sizes.declared / 2**20:,.0f} MiB (zeros streamed through zlib)")
        bomb = base / "bomb" / ATTACHMENT_NAME
        bomb.parent.mkdir()
        with Stopwatch() as build:
            _write_bomb(bomb, sizes.declared)
        lying = base / "lying" / ATTACHMENT_NAME
        lying.parent.mkdir()
        _write_bomb(base / "rows.xlsx", sizes.declared, rows=True)
        _write_lying_bomb(base / "rows.xlsx", lying, LYING_SIZE)
        bomb_size = bomb.stat().st_size

        env = child_env(base / "pycache")
        python = [sys.executable, "-c", READ_SCRIPT, str(master)]
        say("bomb: warming up (bytecode cache)")
        run_measured([*python, str(normal)], env=env)
        say(f"bomb: read_return in a child process, {sizes.runs} runs each")
        normal_read = _measure([*python, str(normal)], env, sizes.runs)
        bomb_read = _measure([*python, str(bomb)], env, sizes.runs)
        lying_read = _measure([*python, str(lying)], env, sizes.runs)
        assert normal_read.document["status"] == STATUS_PARSED, normal_read.document
        assert normal_read.document["answers"] == len(layout.keys), normal_read.document
        for measured in (bomb_read, lying_read):
            assert measured.document["status"] == STATUS_REJECTED, measured.document

        say(f"bomb: `mailflow inspect FILE --json` on emails with the bomb and a normal workbook, {sizes.runs} runs")
        config = _inspect_config(base, master)
        command = [*_mailflow_command(), "--config", str(config), "inspect"]
        normal_email = _email(base / "normal.eml", normal.read_bytes())
        bomb_email = _email(base / "bomb.eml", bomb.read_bytes())
        email_size = bomb_email.stat().st_size
        run_measured([*command, str(normal_email), "--json"], env=env)  # warm-up
        normal_inspect = _measure([*command, str(normal_email), "--json"], env, sizes.runs)
        bomb_inspect = _measure([*command, str(bomb_email), "--json"], env, sizes.runs)
        [bomb_attachment] = bomb_inspect.document["attachments"]
        assert bomb_attachment["status"] == STATUS_REJECTED, bomb_inspect.document
        assert normal_inspect.document["attachments"][0]["status"] == STATUS_PARSED, normal_inspect.document

    def read_line(label: str, measured: Measured, target: bool) -> str:
        document = measured.document
        added = (document["hwm_after_kb"] - document["hwm_before_kb"]) / 1024
        line = (
            f"  {label:<34} {document['status']:<9} {seconds(measured.best_seconds):>8} whole process, "
            f"read_return {seconds(float(document['read']))}; peak RSS {measured.peak_mb:5.1f} MB "
            f"(+{added:.1f} MB during the call)"
        )
        if target:
            line += f"   target < {TARGET_MB:.0f} MB  {verdict(measured.peak_mb < TARGET_MB)}"
        return line

    inspect_met = bomb_inspect.peak_mb < TARGET_MB
    return [
        f"bomb: a {bomb_size / 2**20:.2f} MB .xlsx declaring {sizes.declared / 2**30:.2f} GiB of zeros "
        f"({sizes.declared // bomb_size:,}x; written in {seconds(build.seconds)}); each a child process, "
        f"{sizes.runs} run{'s' if sizes.runs > 1 else ''}, peak RSS the largest",
        read_line("read_return, normal 40-action return", normal_read, False),
        read_line("read_return, the bomb", bomb_read, True),
        f"    reason: {bomb_read.document['reason']}",
        read_line(f"read_return, sizes lying ({LYING_SIZE // 1024} KB)", lying_read, True),
        f"    reason: {lying_read.document['reason']}",
        f"  mailflow inspect --json, normal reply       {seconds(normal_inspect.best_seconds):>8}   "
        f"peak RSS {normal_inspect.peak_mb:5.1f} MB",
        f"  mailflow inspect --json, bomb ({email_size / 2**20:.1f} MB .eml)  "
        f"{seconds(bomb_inspect.best_seconds):>8}   peak RSS {bomb_inspect.peak_mb:5.1f} MB   "
        f"target < {TARGET_MB:.0f} MB  {verdict(inspect_met)}",
        f"    attachment {bomb_attachment['status']}; kind {bomb_inspect.document['kind']}, "
        f"outcome {bomb_inspect.document.get('outcome')}, would reply {bomb_inspect.document.get('follow_up')}",
    ]
