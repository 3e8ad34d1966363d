"""A local OpenAI-compatible chat server that answers DSPy's adapters, with realistic token usage.

It powers the offline demo and the test suite: DSPy's own engines (the 3.4 native client and
LiteLLM) make real HTTP calls to it on 127.0.0.1, so nothing about the LM path is mocked. It reads
the output fields DSPy's ChatAdapter asks for and answers every one, and drives ReAct through one tool
call then `finish`.

It speaks three dialects, each with its provider's own usage conventions, because that is where
pricing goes wrong:
- OpenAI chat completions (`.../chat/completions`): prompt tokens include cached ones, reasoning tokens
  are inside completion tokens;
- Anthropic messages (`.../messages`): `input_tokens` leaves cache reads and writes out, writes are
  split by TTL in `cache_creation` (5 minutes, 1 hour);
- Gemini `generateContent` (`.../models/<m>:generateContent`): thoughts are counted apart from the
  candidates.
Streaming (server-sent events) is spoken in the OpenAI dialect only; so are embeddings (`.../embeddings`).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from otel_dspy_cost.pricing.tokenizers import encoding_for

_OUTPUT_FIELDS = re.compile(r"Your output fields are:\s*\n(.*?)(?:\n\n|\Z)", re.S)
_FIELD = re.compile(r"^\s*\d+\.\s*`(\w+)`\s*\(([^)]*\)?)\)?", re.M)
_TOOL_ARGS = re.compile(r"\(\d+\)\s*(\w+)[^\n]*?takes arguments\s*(\{.*?\})\.?\s*$", re.M)
_WORDS = ("amber", "basil", "cedar", "delta", "ember", "fjord", "garnet", "harbor", "indigo", "juniper")


def _tokens(text: str) -> int:
    return max(1, math.ceil(len(text) / 4))


def _counter(model: str) -> Callable[[str], int]:
    """How the provider counts tokens: OpenAI models by their own tokenizer (as OpenAI bills; offline, from
    LiteLLM's bundled files), anything else at about four characters a token."""
    enc = encoding_for(model)
    if enc is None:
        return _tokens
    return lambda text: max(1, len(enc.encode(text, disallowed_special=())))


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return str(content or "")


@dataclass
class SimulatedLM:
    """Answer policy and usage reporting; tweak the fields in tests."""

    include_usage: bool = True
    reasoning_tokens: int = 0
    min_cache_tokens: int = 1024
    latency_s: float = 0.0
    answers: dict[str, str] = field(default_factory=dict)  # substring of the prompt -> answer text
    # Answer every request with this HTTP error status instead (e.g. 401, 429, 500); with `echo_credentials`
    # the error body repeats the request's Authorization header, as some providers do.
    error_status: int | None = None
    echo_credentials: bool = False
    # With `error_status`: only this many requests fail, the rest are answered (a transient error, retried).
    errors_left: int | None = None
    # Report exactly this usage (OpenAI-style totals: prompt_tokens includes cached_tokens, cache_write_tokens and
    # audio_input_tokens, completion_tokens includes reasoning_tokens, audio_output_tokens and image_output_tokens;
    # cache_write_1h_tokens is the 1-hour part of the writes; web_search_requests are searches the provider ran),
    # rendered in each dialect's own conventions. For hand-computed cost figures in tests.
    fixed_usage: dict[str, int] | None = None
    # Answers of varied length, as real models give: each free-text field gets between these many words more,
    # chosen by a hash of the conversation (the same prompt, the same answer). None: the short fixed answers.
    answer_words: tuple[int, int] | None = None
    _seen_prefixes: set[str] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def complete(self, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        messages = body.get("messages") or [{"role": "user", "content": body.get("prompt", "")}]
        system = "".join(_content_text(m.get("content")) for m in messages if m.get("role") == "system")
        convo = "".join(_content_text(m.get("content")) for m in messages if m.get("role") != "system")
        json_mode = bool(body.get("response_format")) or "Outputs will be a JSON object" in system
        text = self._answer(system, convo, messages, json_mode)
        count = _counter(str(body.get("model") or ""))
        prompt_tokens = sum(count(_content_text(m.get("content"))) + 4 for m in messages)
        cached = 0
        prefix_tokens = count(system) if system else 0
        key = hashlib.sha256(system.encode()).hexdigest()
        with self._lock:
            if system and key in self._seen_prefixes and prefix_tokens >= self.min_cache_tokens:
                cached = (prefix_tokens // 128) * 128 if self.min_cache_tokens >= 128 else prefix_tokens
            self._seen_prefixes.add(key)
        tools = body.get("tools") or body.get("functions")
        if tools:  # providers bill tool schemas as prompt tokens
            prompt_tokens += count(json.dumps(tools))
        n = max(1, int(body.get("n") or 1))
        completion = (count(text) + self.reasoning_tokens) * n  # n completions are n times the output
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                 "total_tokens": prompt_tokens + completion,
                 "prompt_tokens_details": {"cached_tokens": min(cached, prompt_tokens)},
                 "completion_tokens_details": {"reasoning_tokens": self.reasoning_tokens}}
        if self.fixed_usage is not None:
            usage = _openai_usage(self.fixed_usage)
        if str(body.get("model") or "").startswith("deepseek"):  # DeepSeek's own cache counters, no details
            cached = usage["prompt_tokens_details"]["cached_tokens"]
            usage = {"prompt_tokens": usage["prompt_tokens"], "completion_tokens": usage["completion_tokens"],
                     "total_tokens": usage["total_tokens"], "prompt_cache_hit_tokens": cached,
                     "prompt_cache_miss_tokens": usage["prompt_tokens"] - cached,
                     "completion_tokens_details": usage["completion_tokens_details"]}
        return text, usage

    def _answer(self, system: str, convo: str, messages: list[dict[str, Any]], json_mode: bool = False) -> str:
        match = _OUTPUT_FIELDS.search(system)
        if not match and _OUTPUT_FIELDS.search(convo):  # the instructions came in the user turn (LiteLLM's
            system, match = convo, _OUTPUT_FIELDS.search(convo)  # Gemini route for models without system turns)
        if not match:
            return self._free_text(convo)
        fields = _FIELD.findall(match.group(1))
        last_user = _content_text(messages[-1].get("content")) if messages else ""
        if json_mode:  # DSPy's JSONAdapter (GEPA's reflection, structured outputs): one JSON object
            return json.dumps({name: self._value(name, type_, system, last_user, convo) for name, type_ in fields})
        parts = []
        for name, type_ in fields:
            parts.append(f"[[ ## {name} ## ]]\n{self._value(name, type_, system, last_user, convo)}")
        parts.append("[[ ## completed ## ]]")
        return "\n\n".join(parts)

    def _free_text(self, convo: str) -> str:
        return f"Simulated answer about {self._word(convo)}."

    @staticmethod
    def _word(seed: str) -> str:
        return _WORDS[int(hashlib.sha256(seed.encode()).hexdigest(), 16) % len(_WORDS)]

    def _value(self, name: str, type_: str, system: str, last_user: str, convo: str) -> str:
        type_ = type_.strip()
        if name == "next_tool_name":
            options = re.findall(r"'([^']+)'", type_) or ["finish"]
            tools = [o for o in options if o != "finish"]
            done = "observation_0" in last_user or not tools
            return "finish" if done else tools[0]
        if name == "next_tool_args":
            if "observation_0" in last_user:
                return "{}"
            found = _TOOL_ARGS.search(system)
            keys = re.findall(r"['\"](\w+)['\"]\s*:\s*\{", found.group(2)) if found else []
            return json.dumps({k: f"{self._word(convo + k)} facts" for k in keys})
        for needle, answer in self.answers.items():
            if needle in last_user:
                if name in ("answer", "output", "response"):
                    return answer
        low = type_.lower()
        if low.startswith("literal"):
            options = re.findall(r"'([^']+)'", type_)
            return options[0] if options else ""
        if low.startswith("bool"):
            return "True"
        if low.startswith("int"):
            return "42"
        if low.startswith("float"):
            return "0.5"
        if low.startswith("list"):
            return json.dumps([self._word(convo), self._word(convo + "2")])
        if low.startswith("dict"):
            return "{}"
        word = self._word(convo + name)
        if name in ("reasoning", "next_thought"):
            return f"Considering the {word} angle step by step, the evidence points one way.{self._more(convo + name)}"
        return f"The {name} is {word}.{self._more(convo + name)}"

    def _more(self, seed: str) -> str:
        if self.answer_words is None:
            return ""
        low, high = self.answer_words
        n = low + int(hashlib.sha256(seed.encode()).hexdigest()[:8], 16) % (high - low + 1)
        return "".join(f" {self._word(seed + str(i))}" for i in range(n))


def _openai_usage(fixed: dict[str, int]) -> dict[str, Any]:
    """OpenAI's usage; audio in and out in the details (as gpt-audio reports them), inside the totals."""
    prompt, completion = fixed.get("prompt_tokens", 0), fixed.get("completion_tokens", 0)
    usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
             "prompt_tokens_details": {"cached_tokens": fixed.get("cached_tokens", 0),
                                       "cache_write_tokens": fixed.get("cache_write_tokens", 0)},
             "completion_tokens_details": {"reasoning_tokens": fixed.get("reasoning_tokens", 0)}}
    if fixed.get("audio_input_tokens"):
        usage["prompt_tokens_details"]["audio_tokens"] = fixed["audio_input_tokens"]
    if fixed.get("audio_output_tokens"):
        usage["completion_tokens_details"]["audio_tokens"] = fixed["audio_output_tokens"]
    return usage


def _fixed(usage: dict[str, Any]) -> dict[str, int]:
    """An OpenAI-shaped usage back to the flat counters the dialects render."""
    p, c = usage.get("prompt_tokens_details") or {}, usage.get("completion_tokens_details") or {}
    return {"prompt_tokens": usage["prompt_tokens"], "completion_tokens": usage["completion_tokens"],
            "cached_tokens": p.get("cached_tokens", 0), "cache_write_tokens": p.get("cache_write_tokens", 0),
            "reasoning_tokens": c.get("reasoning_tokens", 0)}


def _blocks_text(content: Any) -> str:
    if isinstance(content, list):
        return "".join(b.get("text", "") for b in content if isinstance(b, dict))
    return str(content or "")


def _from_anthropic(body: dict[str, Any]) -> dict[str, Any]:
    """An Anthropic messages request as the OpenAI-shaped body `SimulatedLM.complete` reads."""
    messages = [{"role": "system", "content": _blocks_text(body.get("system"))}] if body.get("system") else []
    messages += [{"role": m.get("role", "user"), "content": _blocks_text(m.get("content"))}
                 for m in body.get("messages") or []]
    return {"model": body.get("model"), "messages": messages, "tools": body.get("tools")}


def _anthropic_usage(fixed: dict[str, int], ttl_1h: int) -> dict[str, Any]:
    """Anthropic's counters are disjoint: input_tokens excludes cache reads and writes."""
    read, write = fixed.get("cached_tokens", 0), fixed.get("cache_write_tokens", 0)
    usage: dict[str, Any] = {
        "input_tokens": fixed["prompt_tokens"] - read - write, "output_tokens": fixed["completion_tokens"],
        "cache_read_input_tokens": read, "cache_creation_input_tokens": write,
        "cache_creation": {"ephemeral_5m_input_tokens": write - ttl_1h, "ephemeral_1h_input_tokens": ttl_1h}}
    if fixed.get("web_search_requests"):  # the server-side web search tool
        usage["server_tool_use"] = {"web_search_requests": fixed["web_search_requests"]}
    return usage


def _from_gemini(body: dict[str, Any], path: str) -> dict[str, Any]:
    system = body.get("systemInstruction") or body.get("system_instruction") or {}
    messages = [{"role": "system", "content": _blocks_text(system.get("parts"))}] if system else []
    messages += [{"role": "assistant" if c.get("role") == "model" else "user", "content": _blocks_text(c.get("parts"))}
                 for c in body.get("contents") or []]
    model = path.rsplit("/models/", 1)[-1].split(":", 1)[0]
    return {"model": model, "messages": messages, "tools": body.get("tools")}


def _gemini_usage(fixed: dict[str, int]) -> dict[str, Any]:
    """Gemini counts thoughts apart: candidatesTokenCount is the visible output only."""
    thoughts = fixed.get("reasoning_tokens", 0)
    visible = fixed["completion_tokens"] - thoughts
    usage: dict[str, Any] = {
        "promptTokenCount": fixed["prompt_tokens"], "candidatesTokenCount": visible,
        "thoughtsTokenCount": thoughts, "cachedContentTokenCount": fixed.get("cached_tokens", 0),
        "totalTokenCount": fixed["prompt_tokens"] + fixed["completion_tokens"]}
    audio_in, image_out = fixed.get("audio_input_tokens", 0), fixed.get("image_output_tokens", 0)
    if audio_in:  # modality breakdowns, as Gemini reports them
        usage["promptTokensDetails"] = [{"modality": "TEXT", "tokenCount": fixed["prompt_tokens"] - audio_in},
                                        {"modality": "AUDIO", "tokenCount": audio_in}]
    if image_out:
        usage["candidatesTokensDetails"] = [{"modality": "TEXT", "tokenCount": visible - image_out},
                                            {"modality": "IMAGE", "tokenCount": image_out}]
    return usage


class _Handler(BaseHTTPRequestHandler):
    server: SimulatorServer

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        return

    def do_GET(self) -> None:
        if self.path.rstrip("/").endswith("/models"):
            self._json(200, {"object": "list", "data": [{"id": "sim", "object": "model"}]})
        else:
            self._json(404, {"error": {"message": "not found"}})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw or b"{}")
        except json.JSONDecodeError:
            self._json(400, {"error": {"message": "invalid JSON"}})
            return
        self.server.record(self.path, body, dict(self.headers))
        path = self.path.split("?", 1)[0].rstrip("/")
        if path.endswith("/messages"):
            dialect = "anthropic"
        elif path.endswith((":generateContent", ":streamGenerateContent")):
            dialect = "gemini"
        elif path.endswith(("/chat/completions", "/completions")):
            dialect = "openai"
        elif path.endswith("/embeddings"):
            dialect = "embeddings"
        else:
            self._json(404, {"error": {"message": f"unknown path {self.path}"}})
            return
        sim = self.server.sim
        if sim.latency_s:
            time.sleep(sim.latency_s)
        failing = bool(sim.error_status)
        if failing and sim.errors_left is not None:
            with sim._lock:
                failing = sim.errors_left > 0
                sim.errors_left -= int(failing)
        if failing:
            message = f"simulated error {sim.error_status}"
            if sim.echo_credentials:
                message += f": invalid credentials {self.headers.get('Authorization', '')}"
            self._json(sim.error_status, {"error": {"message": message, "type": "invalid_request_error",
                                                    "code": sim.error_status}})
            return
        if dialect == "anthropic":
            self._anthropic(body)
            return
        if dialect == "embeddings":
            self._embeddings(body)
            return
        if dialect == "gemini":
            self._gemini(body, path)
            return
        text, usage = sim.complete(body)
        model = body.get("model", "sim")
        rid = f"chatcmpl-{self.server.count:08d}"
        if body.get("stream"):
            self._stream(rid, model, text, usage, body)
            return
        n = max(1, int(body.get("n") or 1))
        payload = {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
                   "choices": [{"index": i, "finish_reason": "stop",
                                "message": {"role": "assistant", "content": text}} for i in range(n)]}
        if sim.include_usage:
            payload["usage"] = usage
        self._json(200, payload)

    def _embeddings(self, body: dict[str, Any]) -> None:
        """OpenAI's embeddings: a small deterministic vector per input, usage as input tokens only."""
        inputs = body.get("input")
        texts = [inputs] if isinstance(inputs, str) else [str(t) for t in inputs or []]
        count = _counter(str(body.get("model") or ""))
        tokens = sum(count(t) for t in texts)
        data = [{"object": "embedding", "index": i,
                 "embedding": [b / 255 for b in hashlib.sha256(t.encode()).digest()[:8]]} for i, t in enumerate(texts)]
        payload = {"object": "list", "data": data, "model": body.get("model", "sim")}
        if self.server.sim.fixed_usage is not None:
            tokens = self.server.sim.fixed_usage.get("prompt_tokens", tokens)
        if self.server.sim.include_usage:
            payload["usage"] = {"prompt_tokens": tokens, "total_tokens": tokens}
        self._json(200, payload)

    def _anthropic(self, body: dict[str, Any]) -> None:
        sim = self.server.sim
        text, usage = sim.complete(_from_anthropic(body))
        fixed = sim.fixed_usage or _fixed(usage)
        payload = {"id": f"msg_{self.server.count:08d}", "type": "message", "role": "assistant",
                   "model": body.get("model", "sim"), "content": [{"type": "text", "text": text}],
                   "stop_reason": "end_turn", "stop_sequence": None}
        if sim.include_usage:
            payload["usage"] = _anthropic_usage(fixed, (sim.fixed_usage or {}).get("cache_write_1h_tokens", 0))
        self._json(200, payload)

    def _gemini(self, body: dict[str, Any], path: str) -> None:
        sim = self.server.sim
        request = _from_gemini(body, path)
        text, usage = sim.complete(request)
        payload: dict[str, Any] = {
            "candidates": [{"content": {"role": "model", "parts": [{"text": text}]}, "finishReason": "STOP",
                            "index": 0}],
            "modelVersion": request["model"], "responseId": f"sim-{self.server.count:08d}"}
        if sim.include_usage:
            payload["usageMetadata"] = _gemini_usage(sim.fixed_usage or _fixed(usage))
        searches = (sim.fixed_usage or {}).get("web_search_requests", 0)
        if searches:  # grounding with Google Search: the distinct queries it ran
            payload["candidates"][0]["groundingMetadata"] = {
                "webSearchQueries": [f"query {i}" for i in range(searches)], "groundingChunks": []}
        self._json(200, payload)

    def _stream(self, rid: str, model: str, text: str, usage: dict[str, Any], body: dict[str, Any]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()

        def send(obj: Any) -> None:
            self.wfile.write(f"data: {json.dumps(obj)}\n\n".encode())

        base = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model}
        send({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
        for i in range(0, len(text), 24):
            send({**base, "choices": [{"index": 0, "delta": {"content": text[i:i + 24]}, "finish_reason": None}]})
        send({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        if self.server.sim.include_usage and (body.get("stream_options") or {}).get("include_usage"):
            send({**base, "choices": [], "usage": usage})
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    def _json(self, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class SimulatorServer(ThreadingHTTPServer):
    """`with SimulatorServer() as s: dspy.LM("openai/gpt-4o-mini", api_base=s.api_base, api_key="x")`."""

    daemon_threads = True
    # socketserver's default backlog of 5 resets connections when 16 client threads connect at once.
    request_queue_size = 256

    def __init__(self, sim: SimulatedLM | None = None, host: str = "127.0.0.1", port: int = 0):
        super().__init__((host, port), _Handler)
        self.sim = sim or SimulatedLM()
        self.requests: list[tuple[str, dict[str, Any], dict[str, str]]] = []
        self._req_lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def count(self) -> int:
        return len(self.requests)

    @property
    def api_base(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"

    def record(self, path: str, body: dict[str, Any], headers: dict[str, str]) -> None:
        with self._req_lock:
            self.requests.append((path, body, headers))

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that gave up (its timeout, a cancelled task) is expected here: no traceback on stderr."""
        import sys

        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)

    def start(self) -> SimulatorServer:
        self._thread = threading.Thread(target=self.serve_forever, name="dspy-simulator", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()

    def __enter__(self) -> SimulatorServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
