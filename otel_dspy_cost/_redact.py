"""Keeps credentials out of everything that leaves the process: span attributes, events, status and
exception messages and stack traces, logs, artifacts.

LM kwargs are never copied wholesale. What is scrubbed: the credential values (api keys, header values,
URL userinfo) of the LM being captured, and of every LM whose call failed (its error may echo them; they
are remembered process-wide from then on), any URL userinfo, and the shapes of common provider keys and
bearer tokens (a provider may echo a key in an error body we never saw as a kwarg).
"""

from __future__ import annotations

import functools
import logging
import re
import threading
import traceback
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

_SECRET_KEY = re.compile(r"(api[_-]?key|token|secret|password|auth|credential|cookie|signature)", re.I)
_SECRET_SHAPES = re.compile(
    r"(sk-[A-Za-z0-9_\-]{8,}"  # OpenAI, Anthropic (sk-ant-), DeepSeek, OpenRouter (sk-or-)
    r"|(?:Bearer|Basic)\s+[A-Za-z0-9_\-\.=+/]{8,}"
    r"|AKIA[0-9A-Z]{16}|ASIA[0-9A-Z]{16}"  # AWS access key ids
    r"|AIza[0-9A-Za-z_\-]{20,}"  # Google API keys (Gemini)
    r"|gsk_[A-Za-z0-9]{16,}|xai-[A-Za-z0-9]{16,}|hf_[A-Za-z0-9]{16,}|r8_[A-Za-z0-9]{16,}"  # Groq, xAI, HF, Replicate
    r"|gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,}"
    r"|xox[abpr]-[A-Za-z0-9\-]{8,}"
    r"|(?:api[_-]?key|x-api-key|x-goog-api-key|access_token|password)[\"']?\s*[:=]\s*[\"']?[^\s\"',;&]{6,})",
    re.I)
# Any userinfo of a URL, with or without a password: `http://TOKEN@host/v1` carries a token as its user name.
_USERINFO = re.compile(r"(?<=://)[^/\s@?#]+@")
REDACTED = "[REDACTED]"

_known: set[str] = set()
_known_lock = threading.Lock()


def secrets_of(kwargs: Mapping[str, Any]) -> list[str]:
    """String values of credential-like kwargs (api_key, extra headers' Authorization, ...)."""
    found: list[str] = []
    for key, value in kwargs.items():
        if isinstance(value, Mapping):
            found.extend(secrets_of(value))
        elif isinstance(value, str) and _SECRET_KEY.search(str(key)) and len(value) >= 4:
            found.append(value)
            if " " in value:  # "Bearer <token>": the token alone may be echoed too
                found.append(value.split(" ", 1)[1])
        elif isinstance(value, str) and "@" in value and "://" in value:  # api_base, base_url, a proxy URL
            try:
                parts = urlsplit(value)
                userinfo = [parts.username, parts.password]
            except ValueError:
                userinfo = []
            found.extend(u for u in userinfo if u and len(u) >= 4)
    return found


def remember(secrets: Iterable[str]) -> None:
    """Secrets to scrub from every later message (the LM's configured keys), process-wide."""
    new = [s for s in secrets if s and len(s) >= 4 and s not in _known]
    if new:
        with _known_lock:
            _known.update(new)


def remember_lm(lm: Any) -> None:
    try:
        remember(secrets_of(getattr(lm, "kwargs", None) or {}))
    except Exception:  # noqa: BLE001 - scrubbing still applies the key shapes
        pass


def scrub(text: str, secrets: Iterable[str] = ()) -> str:
    for secret in (*secrets, *_known):
        if secret and secret in text:
            text = text.replace(secret, REDACTED)
    text = _USERINFO.sub(REDACTED + "@", text)
    return _SECRET_SHAPES.sub(REDACTED, text)


def exception_attributes(exc: BaseException) -> dict[str, str]:
    """The span event attributes `record_exception` would write, scrubbed."""
    try:
        stack = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    except Exception:  # noqa: BLE001
        stack = ""
    return {"exception.type": f"{type(exc).__module__}.{type(exc).__qualname__}",
            "exception.message": scrub(str(exc)), "exception.stacktrace": scrub(stack),
            "exception.escaped": "False"}


class ScrubbingFilter(logging.Filter):
    """On our loggers: a record's message and traceback text are scrubbed before any handler sees them."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
            clean = scrub(message)
            if clean != message or record.args:
                record.msg, record.args = clean, ()
            if record.exc_info and record.exc_info[1] is not None:
                record.exc_text = scrub("".join(traceback.format_exception(*record.exc_info)))
                record.exc_info = None
        except Exception:  # noqa: BLE001 - a log line is never lost to the filter
            pass
        return True


def install_log_filter() -> None:
    """The package's one logger gets the filter: every module logs through `logging.getLogger("otel_dspy_cost")`
    (one name, because a logger's filters do not apply to records of its child loggers)."""
    log = logging.getLogger("otel_dspy_cost")
    if not any(isinstance(f, ScrubbingFilter) for f in log.filters):
        log.addFilter(ScrubbingFilter())


def server_address(api_base: Any) -> tuple[str, int | None] | None:
    """host and port of an api_base, never its userinfo, path or query."""
    if not isinstance(api_base, str) or not api_base:
        return None
    return _server_address(api_base)


@functools.lru_cache(maxsize=256)  # one api_base per LM in practice: parsed once, not on every call
def _server_address(api_base: str) -> tuple[str, int | None] | None:
    try:
        parts = urlsplit(api_base)
        return (parts.hostname or "", parts.port)
    except ValueError:
        return None
