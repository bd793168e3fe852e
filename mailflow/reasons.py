"""Why a returned file could not be read, or a message was held, in each language mailflow writes.

The readers (:mod:`mailflow.returns`, :mod:`mailflow.intake`) say what is
wrong as a code and its parameters; :func:`explain` writes the sentence. A
file's reason (:data:`FILE_CODES`) goes to the delegation and always says
what to do; a message's reason (:data:`MESSAGE_CODES`) tells the Secretariat
what became of it. English is what logs, ``inspect`` and the store's
``reason`` columns keep; the follow-up to a delegation is written in the
delegation's language, the digest in the Secretariat's. Parameters are plain
text already (sizes, part names, counts); a technical detail (``detail``,
``error``) is quoted as the reader gave it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

Params = Mapping[str, str]

IGNORED = "not_a_spreadsheet_ignored"
TOO_LARGE = "too_large"
PASSWORD = "password"
XLSB = "xlsb"
NOT_A_SPREADSHEET = "not_a_spreadsheet"
DAMAGED = "damaged"
BOMB_TOTAL = "bomb_total"
BOMB_RATIO = "bomb_ratio"
BOMB_PART_RATIO = "bomb_part_ratio"
BOMB_PART_BEYOND = "bomb_part_beyond"
ENTITIES = "entities"
TOO_MANY_ROWS = "too_many_rows"
TOO_MANY_CELLS = "too_many_cells"
TOO_MANY_SHEETS = "too_many_sheets"
NOT_OURS_CODES = "not_ours_codes"
NOT_OURS_COLUMNS = "not_ours_columns"
UNEXPECTED = "unexpected"
READER_STOPPED = "reader_stopped"
READER_TIMEOUT = "reader_timeout"
ATTACHMENT_TOO_LARGE = "attachment_too_large"
# What became of a received message (for the Secretariat).
HELD_NO_SENDER = "held_no_sender"
HELD_NOT_LISTED = "held_not_listed"
HELD_AUTHENTICATION = "held_authentication"
HELD_FORGED_BOUNCE = "held_forged_bounce"
MESSAGE_TOO_LARGE = "message_too_large"
PROCESSING_FAILED = "processing_failed"
STOPPED_TWICE = "stopped_twice"

_BOMB_EN = "a decompression bomb; please send the workbook as saved by Excel or LibreOffice"
_BOMB_ES = "una bomba de descompresión; por favor envíen el libro tal como lo guarda Excel o LibreOffice"
_RESAVE_EN = "please open it in Excel or LibreOffice, save it again as .xlsx and send it again"
_RESAVE_ES = "por favor ábranlo en Excel o LibreOffice, guárdenlo de nuevo como .xlsx y envíenlo otra vez"


def _not_ours_columns_en(p: Params) -> str:
    missing = []
    if p.get("no_key"):
        missing.append(f"no column {p['key_column']!r}")
    if p.get("no_fill"):
        missing.append(f"no column {p['fill_column']!r}")
    text = f"it is not the campaign's workbook: {' and '.join(missing)} in the first {p['rows']} rows"
    if p.get("seen"):
        text += f" of any sheet (sheet {p['sheet']!r} has: {p['seen']})"
    return text + "; please fill in the workbook we sent and send it back"


def _not_ours_columns_es(p: Params) -> str:
    missing = []
    if p.get("no_key"):
        missing.append(f"ninguna columna «{p['key_column']}»")
    if p.get("no_fill"):
        missing.append(f"ninguna columna «{p['fill_column']}»")
    text = f"no es el libro de la campaña: no hay {' ni '.join(missing)} en las primeras {p['rows']} filas"
    if p.get("seen"):
        text += f" de ninguna hoja (la hoja «{p['sheet']}» tiene: {p['seen']})"
    return text + "; por favor completen el libro que les enviamos y envíenlo de vuelta"


_CATALOGUE: dict[str, dict[str, Callable[[Params], str]]] = {
    IGNORED: {
        "en": lambda p: f"{p['filename'] or 'the attachment'} is not a spreadsheet",
        "es": lambda p: f"{p['filename'] or 'el adjunto'} no es una hoja de cálculo",
    },
    TOO_LARGE: {
        "en": lambda p: (
            f"the file is too large ({p['size']}; the limit is {p['limit']}); "
            "please send only the workbook of the plan, saved as .xlsx"
        ),
        "es": lambda p: (
            f"el archivo es demasiado grande ({p['size']}; el límite es {p['limit']}); "
            "por favor envíen solo el libro del plan, guardado como .xlsx"
        ),
    },
    PASSWORD: {
        "en": lambda p: "the file is password-protected; please send it without a password",
        "es": lambda p: "el archivo está protegido con contraseña; por favor envíenlo sin contraseña",
    },
    XLSB: {
        "en": lambda p: (
            "the file is an Excel Binary Workbook (.xlsb), which cannot be read here; "
            "please save it as 'Excel Workbook (*.xlsx)' and send it again"
        ),
        "es": lambda p: (
            "el archivo es un libro binario de Excel (.xlsb), que no podemos leer; "
            "por favor guárdenlo como «Libro de Excel (*.xlsx)» y envíenlo otra vez"
        ),
    },
    NOT_A_SPREADSHEET: {
        "en": lambda p: (
            f"the file named {p['filename'] or '(no name)'} is not a spreadsheet "
            "(it is damaged or in another format); please send the workbook saved as .xlsx"
        ),
        "es": lambda p: (
            f"el archivo {p['filename'] or '(sin nombre)'} no es una hoja de cálculo "
            "(está dañado o en otro formato); por favor envíen el libro guardado como .xlsx"
        ),
    },
    DAMAGED: {
        "en": lambda p: f"the file is damaged ({p['detail']}); {_RESAVE_EN}",
        "es": lambda p: f"el archivo está dañado ({p['detail']}); {_RESAVE_ES}",
    },
    BOMB_TOTAL: {
        "en": lambda p: f"the file would expand to {p['size']} when opened (the limit is {p['limit']}): {_BOMB_EN}",
        "es": lambda p: f"el archivo ocuparía {p['size']} al abrirlo (el límite es {p['limit']}): {_BOMB_ES}",
    },
    BOMB_RATIO: {
        "en": lambda p: f"the file would expand {p['ratio']} times when opened (the limit is {p['limit']}): {_BOMB_EN}",
        "es": lambda p: f"el archivo crecería {p['ratio']} veces al abrirlo (el límite es {p['limit']}): {_BOMB_ES}",
    },
    BOMB_PART_RATIO: {
        "en": lambda p: (
            f"a part of the file ({p['part']}) would expand {p['ratio']} times when opened "
            f"(the limit is {p['limit']}): {_BOMB_EN}"
        ),
        "es": lambda p: (
            f"una parte del archivo ({p['part']}) crecería {p['ratio']} veces al abrirla "
            f"(el límite es {p['limit']}): {_BOMB_ES}"
        ),
    },
    BOMB_PART_BEYOND: {
        "en": lambda p: f"a part of the file ({p['part']}) expands beyond the size it declares: {_BOMB_EN}",
        "es": lambda p: f"una parte del archivo ({p['part']}) crece más allá del tamaño que declara: {_BOMB_ES}",
    },
    ENTITIES: {
        "en": lambda p: (
            f"the file contains XML entity declarations (unsafe, in {p['part']}); please re-save it from Excel"
        ),
        "es": lambda p: (
            f"el archivo contiene declaraciones de entidades XML (inseguras, en {p['part']}); "
            "por favor guárdenlo de nuevo desde Excel"
        ),
    },
    TOO_MANY_ROWS: {
        "en": lambda p: (
            f"a sheet of the workbook has {p['rows']} rows (the limit is {p['limit']}); "
            "please delete the rows below the plan and send it again"
        ),
        "es": lambda p: (
            f"una hoja del libro tiene {p['rows']} filas (el límite es {p['limit']}); "
            "por favor borren las filas debajo del plan y envíenlo otra vez"
        ),
    },
    TOO_MANY_CELLS: {
        "en": lambda p: (
            f"the workbook has more than {p['limit']} cells to read (counting the empty ones between "
            "the first and the last); please delete the cells outside the plan and send it again"
        ),
        "es": lambda p: (
            f"el libro tiene más de {p['limit']} celdas que leer (contando las vacías entre "
            "la primera y la última); por favor borren las celdas fuera del plan y envíenlo otra vez"
        ),
    },
    TOO_MANY_SHEETS: {
        "en": lambda p: (
            f"the workbook has {p['count']} sheets (the limit is {p['limit']}); please send only the sheet of the plan"
        ),
        "es": lambda p: (
            f"el libro tiene {p['count']} hojas (el límite es {p['limit']}); por favor envíen solo la hoja del plan"
        ),
    },
    NOT_OURS_CODES: {
        "en": lambda p: (
            f"it is not the campaign's workbook: none of the codes in column {p['column']!r} "
            f"({p['shown'] or 'none'}) is one of the plan's ({p['wanted']}, …); "
            "please fill in the workbook we sent and send it back"
        ),
        "es": lambda p: (
            f"no es el libro de la campaña: ninguno de los códigos de la columna «{p['column']}» "
            f"({p['shown'] or 'ninguno'}) es del plan ({p['wanted']}, …); "
            "por favor completen el libro que les enviamos y envíenlo de vuelta"
        ),
    },
    NOT_OURS_COLUMNS: {"en": _not_ours_columns_en, "es": _not_ours_columns_es},
    UNEXPECTED: {
        "en": lambda p: f"the file could not be read ({p['error']}); {_RESAVE_EN}",
        "es": lambda p: f"no pudimos leer el archivo ({p['error']}); {_RESAVE_ES}",
    },
    READER_STOPPED: {
        "en": lambda p: (
            f"the file stopped the program reading it (a crash, or more memory than it may use); {_RESAVE_EN}"
        ),
        "es": lambda p: (
            f"el archivo detuvo el programa que lo lee (un fallo, o más memoria de la permitida); {_RESAVE_ES}"
        ),
    },
    READER_TIMEOUT: {
        "en": lambda p: f"reading the file took more than {p['seconds']} seconds; {_RESAVE_EN}",
        "es": lambda p: f"leer el archivo tomó más de {p['seconds']} segundos; {_RESAVE_ES}",
    },
    ATTACHMENT_TOO_LARGE: {
        "en": lambda p: f"the file is larger than {p['limit']} MB; please send a smaller file",
        "es": lambda p: f"el archivo pesa más de {p['limit']} MB; por favor envíen un archivo más pequeño",
    },
    HELD_NO_SENDER: {
        "en": lambda p: "held for review: the sender address is missing",
        "es": lambda p: "retenido para revisión: falta la dirección del remitente",
    },
    HELD_NOT_LISTED: {
        "en": lambda p: f"held for review: {p['sender']} is not a listed contact of {p['delegation']}",
        "es": lambda p: f"retenido para revisión: {p['sender']} no es un contacto registrado de {p['delegation']}",
    },
    HELD_AUTHENTICATION: {
        "en": lambda p: f"held for review: the receiving server reports failing authentication ({p['checks']})",
        "es": lambda p: (
            f"retenido para revisión: el servidor que lo recibió informa que la autenticación falló ({p['checks']})"
        ),
    },
    HELD_FORGED_BOUNCE: {
        "en": lambda p: f"held for review: a delivery report ({p['failed']}) that returns no email mailflow sent",
        "es": lambda p: (
            f"retenido para revisión: un aviso de entrega ({p['failed']}) que no devuelve ningún "
            "correo enviado por mailflow"
        ),
    },
    MESSAGE_TOO_LARGE: {
        "en": lambda p: (
            f"message of {p['size']} bytes is over the {p['limit']} MB limit; left in the inbox for a person"
        ),
        "es": lambda p: (
            f"mensaje de {p['size']} bytes, por encima del límite de {p['limit']} MB; "
            "quedó en la bandeja para una persona"
        ),
    },
    PROCESSING_FAILED: {
        "en": lambda p: f"processing failed: {p['error']}; kept for re-processing",
        "es": lambda p: f"no se pudo procesar: {p['error']}; se conserva para procesarlo de nuevo",
    },
    STOPPED_TWICE: {
        "en": lambda p: (
            "mailflow stopped while reading this message, twice: it is kept, raw bytes included, "
            "and left in the inbox for a person (mailflow inspect shows what it holds)"
        ),
        "es": lambda p: (
            "mailflow se detuvo dos veces mientras leía este mensaje: se conserva completo y quedó "
            "en la bandeja para una persona (mailflow inspect muestra lo que contiene)"
        ),
    },
}

CODES = frozenset(_CATALOGUE)
MESSAGE_CODES = frozenset(
    {
        HELD_NO_SENDER,
        HELD_NOT_LISTED,
        HELD_AUTHENTICATION,
        HELD_FORGED_BOUNCE,
        MESSAGE_TOO_LARGE,
        PROCESSING_FAILED,
        STOPPED_TWICE,
    }
)
FILE_CODES = CODES - MESSAGE_CODES


def explain(code: str, params: Params, language: str = "en") -> str:
    """The sentence for ``code`` in ``language`` (English for a language without one)."""
    texts = _CATALOGUE[code]
    return (texts.get(language) or texts["en"])(params)


def written(reason: str | None, code: str | None, params: Params, language: str) -> str:
    """A recorded reason in ``language``: from its code when it has a known one, else as recorded."""
    if code in _CATALOGUE:
        try:
            return explain(code, params, language)
        except KeyError:  # recorded by another version, with other parameters
            pass
    return reason or ""
