"""A realistic sample of the Strategic Plan workbook, built with openpyxl.

The shipped template ``templates/workbooks/strategic-plan-2017-2022.xlsx`` is
generated here, and tests and benchmarks build variants of any size. The real
file has a merged title, one banner row per strategic line, vertically merged
"Strategic line" and "Specific objective" cells, action codes such as ``2.3``
and an empty "Responsible" column that each delegation fills in; the sample
reproduces all of these so the reader is tested against the same shape.

Output is deterministic: the same arguments give the same bytes (fixed document
dates, fixed zip timestamps, fixed member order), so the shipped file can be
regenerated without producing a spurious diff.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from openpyxl import Workbook
from openpyxl.styles import Alignment, Border, Font, PatternFill, Side
from openpyxl.utils import get_column_letter
from openpyxl.writer.excel import ExcelWriter

DEFAULT_TITLE = (
    "Strategic Plan 2017-2022 of the Liaison Officers Network for the Protection of Migrant Girls, Boys and Adolescents"
)
SUBTITLE = (
    "Regional Conference on Migration (RCM) · Technical Secretariat · "
    "Please write in the Responsible column the institution of your country in charge of each action."
)
SHEET_TITLE = "Strategic Plan"
HEADERS = (
    "Strategic line",
    "Specific objective",
    "Code",
    "Action",
    "Indicator",
    "Timeframe",
    "Responsible",
    "Observations",
)
COLUMN_WIDTHS = (24, 36, 8, 60, 42, 14, 34, 30)
HEADER_ROW = 3
# A fixed instant for the document properties and zip entries: regenerating the
# template must give identical bytes.
FIXED_TIMESTAMP = datetime(2017, 9, 4, 9, 0, 0)
_ZIP_DATE_TIME = (2017, 9, 4, 9, 0, 0)


@dataclass(frozen=True)
class _Action:
    text: str
    indicator: str
    timeframe: str
    observations: str = ""


@dataclass(frozen=True)
class _Line:
    name: str
    objective: str
    actions: tuple[_Action, ...]


# The five themes of the network's work. Larger plans (for benchmarks) cycle
# through them, so any size gives plausible, deterministic text.
_LINES: tuple[_Line, ...] = (
    _Line(
        name="Protection and care",
        objective=(
            "Guarantee the comprehensive protection of migrant girls, boys and adolescents throughout the "
            "migration cycle, in countries of origin, transit, destination and return."
        ),
        actions=(
            _Action(
                "Adopt or update national protocols for the care of unaccompanied and separated migrant children, "
                "in line with the principle of the best interests of the child.",
                "Number of countries with an approved national protocol",
                "2017-2018",
            ),
            _Action(
                "Ensure that migrant children are not held in detention and are placed in family-based or "
                "community care alternatives.",
                "Number of alternatives to detention in operation",
                "2017-2022",
            ),
            _Action(
                "Train consular staff in the protection of migrant children and adolescents, including "
                "psychosocial first aid.",
                "Number of consular officials trained",
                "2018-2019",
                "Builds on the 2016 regional training programme.",
            ),
            _Action(
                "Provide child-friendly information on rights and procedures at border posts and shelters.",
                "Information materials available at main border posts",
                "2018",
            ),
            _Action(
                "Guarantee access to health care, education and legal assistance for migrant children regardless "
                "of migration status.",
                "Percentage of assisted children with access to basic services",
                "2017-2022",
            ),
            _Action(
                "Appoint a guardian or legal representative for every unaccompanied child within 48 hours of "
                "identification.",
                "Percentage of unaccompanied children with an appointed guardian",
                "2019-2020",
            ),
            _Action(
                "Strengthen shelters and reception centres with specialised staff and standards of care.",
                "Number of shelters meeting the regional minimum standards",
                "2018-2021",
            ),
            _Action(
                "Establish mechanisms for the participation of children and adolescents in decisions that affect them.",
                "Mechanism for child participation in place",
                "2020-2022",
            ),
        ),
    ),
    _Line(
        name="Identification and referral",
        objective=(
            "Identify at the earliest stage the protection needs of migrant children and adolescents and refer "
            "them to the competent institutions."
        ),
        actions=(
            _Action(
                "Apply the Regional Guidelines for the Preliminary Identification of Profiles and Referral "
                "Mechanisms for Vulnerable Migrant Populations.",
                "Number of countries applying the Regional Guidelines",
                "2017-2018",
            ),
            _Action(
                "Design a common interview form for the first contact with unaccompanied children at borders.",
                "Common interview form approved by the network",
                "2018",
            ),
            _Action(
                "Train migration and border officers in the identification of children in need of international "
                "protection and victims of trafficking.",
                "Number of officers trained per country",
                "2018-2020",
            ),
            _Action(
                "Map national referral routes between migration authorities, child-protection agencies and "
                "asylum systems.",
                "Referral map published for each country",
                "2018-2019",
            ),
            _Action(
                "Carry out best-interests assessments before any decision on the return or stay of a child.",
                "Percentage of cases with a documented best-interests assessment",
                "2019-2022",
            ),
            _Action(
                "Establish age-assessment procedures that are multidisciplinary and give the benefit of the doubt.",
                "Age-assessment procedure adopted",
                "2019-2020",
                "Coordinate with UNHCR and IOM technical guidance.",
            ),
            _Action(
                "Set up joint identification teams at the main points of entry along the regional migration routes.",
                "Number of joint teams operating",
                "2020-2021",
            ),
            _Action(
                "Include a specific screening for children at risk of recruitment by organised criminal groups.",
                "Screening questions included in the interview form",
                "2020",
            ),
        ),
    ),
    _Line(
        name="Return and reintegration",
        objective=(
            "Ensure that the return of migrant children and adolescents is safe, orderly and dignified, and "
            "support their sustainable reintegration."
        ),
        actions=(
            _Action(
                "Apply the Regional Guidelines for the Special Protection in Cases of the Repatriation of Child and "
                "Adolescent Victims of Trafficking.",
                "Number of returns carried out under the Guidelines",
                "2017-2022",
            ),
            _Action(
                "Notify the consular authorities and child-protection agency of the country of origin before any "
                "return.",
                "Percentage of returns with prior notification",
                "2017-2018",
            ),
            _Action(
                "Ensure that children travel accompanied by trained staff and are received by the child-protection "
                "agency.",
                "Percentage of returns received by the competent agency",
                "2018-2022",
            ),
            _Action(
                "Develop individual reintegration plans with the family and the community.",
                "Number of children with an individual reintegration plan",
                "2018-2020",
            ),
            _Action(
                "Link returned children to education, vocational training and health programmes.",
                "Percentage of returned children enrolled in school within three months",
                "2019-2022",
            ),
            _Action(
                "Follow up each reintegration case for at least twelve months after return.",
                "Number of cases with twelve months of follow-up",
                "2019-2022",
            ),
            _Action(
                "Strengthen reception centres for returned children at airports and land borders.",
                "Number of reception centres strengthened",
                "2018-2019",
            ),
            _Action(
                "Document and exchange good practices in reintegration among member countries.",
                "Compendium of good practices published",
                "2021",
            ),
        ),
    ),
    _Line(
        name="Data and information",
        objective=(
            "Produce reliable, comparable and disaggregated information on migrant children and adolescents to "
            "guide public policy."
        ),
        actions=(
            _Action(
                "Agree on a minimum set of indicators on migrant children disaggregated by age, sex, nationality "
                "and accompaniment.",
                "Minimum set of indicators agreed",
                "2017-2018",
            ),
            _Action(
                "Publish quarterly national statistics on detected, assisted and returned children.",
                "Number of countries publishing quarterly statistics",
                "2018-2022",
            ),
            _Action(
                "Set up a secure channel for the exchange of case information between liaison officers.",
                "Secure channel in operation",
                "2019",
            ),
            _Action(
                "Adopt data-protection rules for the personal information of migrant children.",
                "Data-protection rules approved by the network",
                "2018-2019",
            ),
            _Action(
                "Prepare an annual regional report on the situation of migrant children and adolescents.",
                "Annual regional report presented to the RCGM",
                "2018-2022",
            ),
            _Action(
                "Carry out a regional study on the causes of the migration of unaccompanied children.",
                "Regional study published",
                "2019-2020",
                "Subject to available funding.",
            ),
            _Action(
                "Keep an updated directory of liaison officers and national focal points.",
                "Directory updated every six months",
                "2017-2022",
            ),
            _Action(
                "Share information on missing migrant children among the member countries.",
                "Procedure for the exchange of information on missing children",
                "2020-2021",
            ),
        ),
    ),
    _Line(
        name="Coordination and cooperation",
        objective=(
            "Strengthen coordination among the institutions of each country and cooperation among the member "
            "countries of the Regional Conference on Migration."
        ),
        actions=(
            _Action(
                "Hold at least two virtual meetings a year of the Liaison Officers Network.",
                "Number of meetings held per year",
                "2017-2022",
            ),
            _Action(
                "Create or strengthen national inter-institutional committees on migrant children.",
                "Number of national committees in operation",
                "2017-2019",
            ),
            _Action(
                "Sign bilateral agreements for the protection and return of migrant children between neighbouring "
                "countries.",
                "Number of bilateral agreements signed",
                "2018-2022",
            ),
            _Action(
                "Coordinate with UNHCR, IOM and UNICEF the technical assistance to member countries.",
                "Technical assistance plan agreed with partner agencies",
                "2018",
            ),
            _Action(
                "Involve civil-society organisations in the implementation and monitoring of the plan.",
                "Number of consultations held with civil society",
                "2018-2022",
            ),
            _Action(
                "Report on the progress of the plan at each Vice-Ministerial Meeting of the RCM.",
                "Progress report presented at each Vice-Ministerial Meeting",
                "2017-2022",
            ),
            _Action(
                "Carry out a mid-term review of the Strategic Plan.",
                "Mid-term review completed",
                "2019-2020",
            ),
            _Action(
                "Carry out the final evaluation of the Strategic Plan and prepare the next plan.",
                "Final evaluation report approved",
                "2022",
            ),
        ),
    ),
)

_TITLE_FONT = Font(bold=True, size=14)
_LINE_FONT = Font(bold=True, color="FFFFFF")
_LINE_FILL = PatternFill("solid", fgColor="1F4E78")
_HEADER_FONT = Font(bold=True)
_HEADER_FILL = PatternFill("solid", fgColor="D9E1F2")
_THIN = Side(style="thin", color="808080")
_BORDER = Border(left=_THIN, right=_THIN, top=_THIN, bottom=_THIN)
_WRAP_TOP = Alignment(wrap_text=True, vertical="top")
_WRAP_CENTER = Alignment(wrap_text=True, vertical="center", horizontal="center")


def build_sample_plan(*, actions_per_line: Sequence[int] = (8, 8, 8, 8, 8), title: str = DEFAULT_TITLE) -> bytes:
    """Return the bytes of a sample Strategic Plan workbook (.xlsx).

    ``actions_per_line`` gives the number of actions of each strategic line;
    codes are always ``"<line>.<action>"`` (``1.1`` … ``5.8`` by default).
    Text beyond the five themes and eight actions written out here is reused
    with a phase suffix, so benchmarks can ask for any size.
    """
    if not actions_per_line:
        raise ValueError("actions_per_line must name at least one strategic line")
    if any(count < 1 for count in actions_per_line):
        raise ValueError("every strategic line needs at least one action")

    wb = Workbook()
    ws = wb.active
    ws.title = SHEET_TITLE
    last_col = len(HEADERS)
    last_letter = get_column_letter(last_col)

    ws["A1"] = title
    ws["A1"].font = _TITLE_FONT
    ws["A1"].alignment = Alignment(wrap_text=True, vertical="center")
    ws.merge_cells(f"A1:{last_letter}1")
    ws.row_dimensions[1].height = 36
    ws["A2"] = SUBTITLE
    ws["A2"].alignment = Alignment(wrap_text=True, vertical="top")
    ws["A2"].font = Font(italic=True)
    ws.merge_cells(f"A2:{last_letter}2")
    ws.row_dimensions[2].height = 30

    for col, header in enumerate(HEADERS, start=1):
        cell = ws.cell(row=HEADER_ROW, column=col, value=header)
        cell.font = _HEADER_FONT
        cell.fill = _HEADER_FILL
        cell.border = _BORDER
        cell.alignment = _WRAP_CENTER
    for col, width in enumerate(COLUMN_WIDTHS, start=1):
        ws.column_dimensions[get_column_letter(col)].width = width

    row = HEADER_ROW + 1
    for line_no, count in enumerate(actions_per_line, start=1):
        line = _LINES[(line_no - 1) % len(_LINES)]
        cycle = (line_no - 1) // len(_LINES)
        line_name = line.name if cycle == 0 else f"{line.name} ({cycle + 1})"

        banner = ws.cell(row=row, column=1, value=f"Strategic line {line_no}: {line_name}")
        banner.font = _LINE_FONT
        banner.fill = _LINE_FILL
        banner.alignment = Alignment(vertical="center")
        ws.merge_cells(start_row=row, start_column=1, end_row=row, end_column=last_col)
        row += 1

        first = row
        for action_no in range(1, count + 1):
            action = line.actions[(action_no - 1) % len(line.actions)]
            phase = (action_no - 1) // len(line.actions)
            text = action.text if phase == 0 else f"{action.text} (phase {phase + 1})"
            values: tuple[str | None, ...] = (
                f"{line_no}. {line_name}" if action_no == 1 else None,
                line.objective if action_no == 1 else None,
                f"{line_no}.{action_no}",
                text,
                action.indicator,
                action.timeframe,
                None,  # Responsible: what each delegation fills in
                (action.observations or None) if phase == 0 else None,
            )
            for col, value in enumerate(values, start=1):
                cell = ws.cell(row=row, column=col, value=value)
                cell.border = _BORDER
                cell.alignment = _WRAP_TOP
            ws.cell(row=row, column=3).alignment = Alignment(vertical="top", horizontal="center")
            row += 1
        if count > 1:
            # The real file merges these cells down the actions of a line.
            ws.merge_cells(start_row=first, start_column=1, end_row=row - 1, end_column=1)
            ws.merge_cells(start_row=first, start_column=2, end_row=row - 1, end_column=2)

    ws.freeze_panes = ws.cell(row=HEADER_ROW + 1, column=1)
    ws.print_title_rows = f"{HEADER_ROW}:{HEADER_ROW}"
    ws.page_setup.orientation = "landscape"

    wb.properties.title = title
    wb.properties.creator = "RCM Technical Secretariat"
    wb.properties.created = FIXED_TIMESTAMP
    wb.properties.modified = FIXED_TIMESTAMP
    return _deterministic_zip(_save(wb))


def write_sample_plan(
    path: Path, *, actions_per_line: Sequence[int] = (8, 8, 8, 8, 8), title: str = DEFAULT_TITLE
) -> None:
    """Write :func:`build_sample_plan` output to ``path`` (parent directories are created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(build_sample_plan(actions_per_line=actions_per_line, title=title))


def _save(wb: Workbook) -> bytes:
    # ``Workbook.save`` stamps the "modified" property with the current time;
    # the writer it wraps does not, which keeps the output reproducible.
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        ExcelWriter(wb, archive).write_data()
    return buffer.getvalue()


def _deterministic_zip(data: bytes) -> bytes:
    """Re-pack ``data`` with fixed entry timestamps and ``[Content_Types].xml`` first.

    openpyxl stamps each zip entry with the current time and writes the content
    types last; Excel and most sniffers expect them first."""
    with zipfile.ZipFile(io.BytesIO(data)) as source:
        infos = source.infolist()
        infos.sort(key=lambda info: info.filename != "[Content_Types].xml")  # stable: keeps the rest in order
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as target:
            for info in infos:
                entry = zipfile.ZipInfo(info.filename, date_time=_ZIP_DATE_TIME)
                entry.compress_type = zipfile.ZIP_DEFLATED
                entry.external_attr = 0o644 << 16
                target.writestr(entry, source.read(info))
    return buffer.getvalue()
