"""What a call can be billed for besides text tokens: read from the request before it is sent (so the worst
case covers it), and from the provider's answer where DSPy's usage leaves it out.

Audio in and out, image output and web searches are priced apart from text (`pricing.cost`). A request says
which of them it can cause: audio parts in its messages, `modalities` asking for audio or images, search tools
(Anthropic's `web_search_*` with `max_uses`, Gemini's `googleSearch`, OpenAI's `web_search_options`). DSPy 3.4's
native engine keeps image tokens and search counts out of its usage dict; they are in the provider's own
answer (`Response.provider_data`), read here.
"""

from __future__ import annotations

from typing import Any

from otel_dspy_cost.pricing.cost import Usage

# Searches reserved for a search tool that sets no `max_uses` (Anthropic's default is unbounded, Gemini
# bills each grounded query): documented in docs/budgets.md. A call that searched more is counted as billed.
SEARCHES_BOUND = 10
_AUDIO_PARTS = frozenset({"input_audio", "audio"})
_SEARCH_TOOL_KEYS = ("googleSearch", "google_search", "googleSearchRetrieval", "google_search_retrieval")


def request_units(request: dict[str, Any], multimodal_messages: Any) -> tuple[tuple[str, ...], int]:
    """(units the request can be billed for apart from text, the most searches its tools allow).
    `multimodal_messages`: the messages when some content is not a plain string, else None (nothing to walk)."""
    apart: list[str] = []
    if multimodal_messages is not None and _has_audio(multimodal_messages):
        apart.append("audio_input")
    modalities = request.get("modalities") or request.get("response_modalities") or ()
    if isinstance(modalities, str):
        modalities = (modalities,)
    wanted = {str(m).lower() for m in modalities} if isinstance(modalities, (list, tuple)) else set()
    if "audio" in wanted or request.get("audio"):
        apart.append("audio_output")
    if "image" in wanted:
        apart.append("image_output")
    return tuple(apart), _searches(request)


def _searches(request: dict[str, Any]) -> int:
    searches = 0
    if request.get("web_search_options") is not None:
        searches = SEARCHES_BOUND
    for tool in request.get("tools") or ():
        if not isinstance(tool, dict):
            continue
        kind = str(tool.get("type") or "")
        if kind.startswith("web_search"):
            uses = tool.get("max_uses")
            searches += uses if isinstance(uses, int) and not isinstance(uses, bool) and uses > 0 else SEARCHES_BOUND
        elif any(key in tool for key in _SEARCH_TOOL_KEYS):
            searches += SEARCHES_BOUND
    return searches


def _has_audio(value: Any) -> bool:
    if isinstance(value, dict):
        return value.get("type") in _AUDIO_PARTS or any(
            _has_audio(v) for v in value.values() if isinstance(v, (list, dict)))
    if isinstance(value, (list, tuple)):
        return any(_has_audio(v) for v in value)
    return False


def add_native_units(usage: Usage, responses: Any) -> None:
    """Image output tokens and search counts from the provider's own answers (DSPy 3.4's native engine), which
    DSPy's usage dict leaves out: Gemini's `candidatesTokensDetails` (IMAGE) and grounding queries,
    Anthropic's `usage.server_tool_use.web_search_requests`. Audio is in DSPy's dict already."""
    images = searches = 0
    for response in responses:
        raw = getattr(response, "provider_data", None)
        if not isinstance(raw, dict):
            continue
        meta = raw.get("usageMetadata")
        if isinstance(meta, dict):
            images += _modality(meta.get("candidatesTokensDetails") or meta.get("responseTokensDetails"), "IMAGE")
            queries = set()
            for candidate in raw.get("candidates") or ():
                grounding = candidate.get("groundingMetadata") if isinstance(candidate, dict) else None
                if isinstance(grounding, dict):
                    queries.update(q for q in grounding.get("webSearchQueries") or () if isinstance(q, str) and q)
            searches += len(queries)
        counters = raw.get("usage")
        server = counters.get("server_tool_use") if isinstance(counters, dict) else None
        if isinstance(server, dict) and isinstance(server.get("web_search_requests"), int):
            searches += max(0, server["web_search_requests"])
    if images:
        usage.image_output_tokens = min(images, usage.output_tokens - usage.audio_output_tokens)
    if searches:
        usage.web_search_requests = searches


def _modality(details: Any, modality: str) -> int:
    if not isinstance(details, list):
        return 0
    return sum(int(d.get("tokenCount") or 0) for d in details
               if isinstance(d, dict) and str(d.get("modality", "")).upper() == modality)
