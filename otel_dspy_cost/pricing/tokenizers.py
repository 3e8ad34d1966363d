"""Exact prompt token counts for OpenAI models, offline: what lets a budget's last calls fit.

A budget reserves a call's worst case, and the prompt part of it is a bound that holds for every provider:
one token per UTF-8 byte (`instrumentation.lm_call.input_tokens_bound`). English runs about four bytes per
token, so near the cap that bound refuses calls that would have fitted, and a budget stops a few calls short.
For models whose tokenizer is public and shipped with LiteLLM (OpenAI's `o200k_base` and `cl100k_base`, as
files in LiteLLM's package: tiktoken would otherwise download them), the exact count is a bound too. It costs
a tokenizer pass, so admission asks for it only when a call's byte bound comes near what a budget has left
(`budgets.accounting`), never on the usual path.

Nothing here reaches the network: an encoding whose file is not on disk, or a tiktoken that does not look as
expected, gives None and the byte bound stays.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import logging
import os
import threading
import types
from typing import Any

logger = logging.getLogger("otel_dspy_cost")

# Providers that bill OpenAI's own tokenizer for OpenAI's model names (an `openai/` model served by another
# backend bills its own tokens: a user who names it so gets OpenAI's count, as DSPy and LiteLLM assume too).
_OPENAI_PROVIDERS = frozenset({"openai", "azure", "text-completion-openai"})
# The chat format's framing, allowed for by both prompt bounds (this one and the byte bound of
# `instrumentation.lm_call`): OpenAI's adds 3-4 tokens per message (role, separators) and 3 to prime a reply.
MESSAGE_OVERHEAD = 8
REQUEST_OVERHEAD = 16
SCHEMA_OVERHEAD = 16  # per schema (tools, response format) around its JSON text
# Request fields the provider turns into prompt tokens besides the messages.
SCHEMA_KWARGS = ("tools", "functions", "tool_choice", "response_format")

_lock = threading.Lock()
_encodings: dict[str, Any] = {}  # encoding name -> tiktoken.Encoding, or None when it cannot be had offline


def encoding_for(model: str) -> Any:
    """The tiktoken encoding an OpenAI model bills with, loaded from LiteLLM's bundled files; None otherwise."""
    provider, _, name = model.rpartition("/")
    if provider not in _OPENAI_PROVIDERS and provider != "":
        return None
    try:
        from tiktoken.model import encoding_name_for_model  # a name table: no download

        encoding = encoding_name_for_model(name)
    except Exception:  # noqa: BLE001 - not an OpenAI model name, or no tiktoken
        return None
    if encoding not in _encodings:
        with _lock:
            if encoding not in _encodings:
                _encodings[encoding] = _load(encoding)
    return _encodings[encoding]


def prompt_tokens_bound(model: str, messages: Any, request: dict[str, Any] | None = None) -> int | None:
    """An upper bound on the prompt tokens of a chat request with text-only messages (or of an embedding
    request's list of texts), from the model's own tokenizer plus the chat format's overhead and the request's
    schemas (tools, response format) as JSON text; None when there is no exact tokenizer or a part is not text
    (images, audio: the byte bound's per-part allowances apply)."""
    enc = encoding_for(model)
    if enc is None or not isinstance(messages, list):
        return None
    total = REQUEST_OVERHEAD
    for m in messages:
        total += MESSAGE_OVERHEAD
        if isinstance(m, str):  # an embedding's inputs
            total += len(enc.encode(m, disallowed_special=()))
            continue
        if not isinstance(m, dict):
            return None
        for k, v in m.items():
            if k == "role":
                continue
            if v is None:
                continue
            if not isinstance(v, str):
                return None
            total += len(enc.encode(v, disallowed_special=()))
    for key in SCHEMA_KWARGS:
        value = (request or {}).get(key)
        if value:  # as the byte bound counts them: the JSON text, plus the provider's framing
            total += len(enc.encode(json.dumps(value, default=str), disallowed_special=())) + SCHEMA_OVERHEAD
    return total


def _load(encoding: str) -> Any:
    """tiktoken's own constructor for `encoding`, given a loader that reads LiteLLM's bundled copy of the file
    it would download (checked against the hash tiktoken expects). The constructor is run as a copy with its
    own globals, so nothing in tiktoken is patched for anyone else."""
    try:
        import tiktoken
        import tiktoken_ext.openai_public as public

        make = getattr(public, encoding)
        local = types.FunctionType(make.__code__, {**vars(public), "load_tiktoken_bpe": _bundled_ranks},
                                   make.__name__, make.__defaults__, make.__closure__)
        return tiktoken.Encoding(**local())
    except Exception as exc:  # noqa: BLE001 - the byte bound stays; say so once
        logger.debug("otel-dspy-cost: no offline %s tokenizer (%s): prompt bounds stay byte counts", encoding, exc)
        return None


def _bundled_ranks(url: str, expected_hash: str | None = None) -> dict[bytes, int]:
    spec = importlib.util.find_spec("litellm")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("LiteLLM is not installed")
    path = os.path.join(list(spec.submodule_search_locations)[0], "litellm_core_utils", "tokenizers",
                        hashlib.sha1(url.encode()).hexdigest())
    with open(path, "rb") as f:
        data = f.read()
    if expected_hash and hashlib.sha256(data).hexdigest() != expected_hash:
        raise ValueError(f"{path} does not match the hash tiktoken expects")
    return {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in data.splitlines() if line)}
