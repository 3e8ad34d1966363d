"""Keeps credentials out of telemetry: LM kwargs are never copied wholesale, and captured content is
scrubbed of the LM's own secrets and of common key shapes."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

_SECRET_KEY = re.compile(r"(api[_-]?key|token|secret|password|authorization|credential)", re.I)
_SECRET_SHAPES = re.compile(
    r"(sk-[A-Za-z0-9_\-]{8,}|Bearer\s+[A-Za-z0-9_\-\.=]{8,}|AKIA[0-9A-Z]{16}|xox[abp]-[A-Za-z0-9\-]{8,})")
REDACTED = "[REDACTED]"


def secrets_of(kwargs: Mapping[str, Any]) -> list[str]:
    """String values of credential-like kwargs (api_key, extra headers' Authorization, ...)."""
    found: list[str] = []
    for key, value in kwargs.items():
        if isinstance(value, Mapping):
            found.extend(secrets_of(value))
        elif isinstance(value, str) and _SECRET_KEY.search(key) and len(value) >= 4:
            found.append(value)
        elif key in ("api_base", "base_url") and isinstance(value, str):
            userinfo = urlsplit(value).password
            if userinfo:
                found.append(userinfo)
    return found


def scrub(text: str, secrets: Iterable[str] = ()) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return _SECRET_SHAPES.sub(REDACTED, text)


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
