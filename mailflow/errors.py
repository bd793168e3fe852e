"""The exception tree. Every error mailflow raises on purpose derives from
:class:`MailflowError`; the CLI maps them to one line on stderr and an exit code."""

from __future__ import annotations


class MailflowError(Exception):
    """Base of every error mailflow raises on purpose."""

    exit_code = 1


class ConfigError(MailflowError):
    """The configuration is invalid. Carries every problem found, one per line."""

    exit_code = 2

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class UsageError(MailflowError):
    """A command was called with arguments that cannot work together."""

    exit_code = 2


class WorkbookError(MailflowError):
    """A workbook cannot be read or does not have the expected shape."""


class TemplateError(MailflowError):
    """An email template is missing or fails to render."""


class StoreError(MailflowError):
    """The tracking store cannot be opened, migrated or written."""


class SendError(MailflowError):
    """Sending an email failed. ``refused`` names the recipients the server refused, with code and text."""

    def __init__(
        self, message: str, *, code: int | None = None, refused: dict[str, tuple[int, str]] | None = None
    ) -> None:
        self.code = code
        self.refused = dict(refused or {})
        super().__init__(message)


class TemporarySendError(SendError):
    """A failure worth retrying later: a 4xx reply, a refused or dropped connection."""


class ServerUnavailable(TemporarySendError):
    """The server could not be reached or refused the session (connection, TLS or login)."""


class PermanentSendError(SendError):
    """The server refused for good (5xx): retrying the same message will not help."""
