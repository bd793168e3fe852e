"""OAuth2 login for IMAP and SMTP: the access token comes from a command.

Like a mail client's ``passwordeval``, mailflow does not run the OAuth2 dance
itself: a configured command (``oauth2-helper --account ts``, ``gcloud auth
print-access-token``, a script around MSAL) prints a fresh access token on its
first line, and mailflow logs in with SASL XOAUTH2. The command is split with
shell rules but run without a shell, and the token never appears in a message.
"""

from __future__ import annotations

import shlex
import subprocess

from mailflow.errors import MailflowError

DEFAULT_TOKEN_TIMEOUT = 30.0


class OAuth2TokenError(MailflowError):
    """The token command could not be run, failed, timed out or printed nothing."""


def oauth2_token(
    command: str, timeout: float = DEFAULT_TOKEN_TIMEOUT, *, setting: str = "mail.imap.oauth2_token_command"
) -> str:
    """Run ``command`` and return the stripped first line of what it prints.

    ``setting`` names the config key the command came from, for the message
    of the :class:`OAuth2TokenError` raised when no token can be had.
    """
    advice = f"check the command in {setting}"
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        raise OAuth2TokenError(f"oauth2_token_command is not a valid command line ({exc}); {advice}") from exc
    if not argv:
        raise OAuth2TokenError(f"oauth2_token_command is empty; {advice}")
    try:
        done = subprocess.run(argv, capture_output=True, stdin=subprocess.DEVNULL, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise OAuth2TokenError(f"oauth2_token_command did not finish within {timeout:g} s; {advice}") from exc
    except OSError as exc:
        raise OAuth2TokenError(f"oauth2_token_command cannot be run ({argv[0]}: {exc.strerror}); {advice}") from exc
    if done.returncode != 0:
        reason = _first_line(done.stderr) or "no message on stderr"
        raise OAuth2TokenError(f"oauth2_token_command failed (exit {done.returncode}): {reason}; {advice}")
    token = _first_line(done.stdout)
    if not token:
        raise OAuth2TokenError(f"oauth2_token_command printed no token; {advice}")
    return token


def xoauth2_string(user: str, token: str) -> str:
    """The SASL XOAUTH2 initial response (before base64), as Google and Microsoft define it."""
    return f"user={user}\x01auth=Bearer {token}\x01\x01"


def _first_line(output: bytes) -> str:
    for line in output.decode("utf-8", "replace").splitlines():
        if line.strip():
            return line.strip()
    return ""
