"""The attribute names MLflow and Phoenix read, written beside ours so both show our spans, tokens and cost.

Why a second vocabulary: Phoenix marks every span without `openinference.span.kind` as UNKNOWN and prices
LM spans from its own model store; MLflow types spans from OpenInference's kind, lists traces by a name tag
and their root span's `input.value`/`output.value`, and reprices every LM span that has no `mlflow.llm.cost`
(`../shared/notes/backends-and-dspy-facts.md`). Our `dspy.*` and `gen_ai.*` names stay the source of truth
(docs/attributes.md); these are derived from them, in one place, and `instrument(backend_attributes=False)`
turns them off.

What goes where:

- every span: `openinference.span.kind` (MLflow maps it to its span type);
- a trace's root span: `input.value` (the span's `dspy.*` description: never prompt content), and at its end
  `output.value` (cost, calls, tokens, score), plus MLflow's trace-name tag;
- compile, trial and evaluate roots: `session.id`, the compile's trace id, so one filter finds a compile's
  trials in both backends (Phoenix drops span links);
- LM spans: OpenInference model, provider and token counts, and `mlflow.llm.cost` with our figure.
"""

from __future__ import annotations

import json
import math
from typing import Any

from opentelemetry import trace

from otel_dspy_cost import _attributes as A

OI_KIND = "openinference.span.kind"
OI_INPUT = "input.value"
OI_OUTPUT = "output.value"
OI_MODEL = "llm.model_name"
OI_PROVIDER = "llm.provider"
OI_EMBEDDING_MODEL = "embedding.model_name"
OI_PROMPT_TOKENS = "llm.token_count.prompt"
OI_COMPLETION_TOKENS = "llm.token_count.completion"
OI_TOTAL_TOKENS = "llm.token_count.total"
OI_CACHE_READ = "llm.token_count.prompt_details.cache_read"
OI_CACHE_WRITE = "llm.token_count.prompt_details.cache_write"
OI_REASONING = "llm.token_count.completion_details.reasoning"
SESSION_ID = "session.id"  # OpenInference's and MLflow's (the OTel semantic conventions' session.id)
MLFLOW_COST = "mlflow.llm.cost"  # JSON {"input_cost", "output_cost", "total_cost"}: MLflow keeps it, unpriced
MLFLOW_TRACE_NAME = "mlflow.traceTag.mlflow.traceName"  # a root-span attribute MLflow turns into the trace name

# dspy.span.kind -> OpenInference span kind (MLflow: the same name as its span type). A predictor is a CHAIN,
# not an LLM: only the LM span under it carries tokens, so no backend counts a call twice.
_KINDS = {"lm": "LLM", "embeddings": "EMBEDDING", "tool": "TOOL", "retriever": "RETRIEVER", "evaluate": "EVALUATOR",
          "module": "CHAIN", "predictor": "CHAIN", "adapter.format": "CHAIN", "adapter.parse": "CHAIN",
          "compile": "CHAIN", "trial": "CHAIN", "trial_summary": "CHAIN", "stage": "CHAIN", "bootstrap": "CHAIN",
          "late_cost": "CHAIN"}
_AGENTS = frozenset({"ReAct", "CodeAct", "ProgramOfThought"})
_ROOT_OUTPUT = ((A.TOTAL_USD, "cost_usd"), (A.LM_CALLS, "lm_calls"), (A.TOTAL_INPUT_TOKENS, "input_tokens"),
                (A.TOTAL_OUTPUT_TOKENS, "output_tokens"), (A.TOTAL_UNKNOWN_CALLS, "unpriced_calls"),
                (A.OPTIMIZER_SCORE, "score"), (A.EVAL_SCORE, "score"))

# What a trace list's truncated "input" column should show first: what the trace is.
_SHOWN_FIRST = (A.SPAN_KIND, A.OPTIMIZER_NAME, A.OPTIMIZER_TRIAL, A.MODULE_CLASS, A.MODULE_PATH, A.OPTIMIZER_EVAL,
                A.EVAL_SIZE, A.PHASE)

on = True  # instrument(backend_attributes=...): read by the span starters, set by the instrumentor


def kind_of(attrs: dict[str, Any]) -> str:
    kind = attrs.get(A.SPAN_KIND)
    if kind == "lm" and attrs.get(A.GEN_AI_OPERATION) == "embeddings":
        return "EMBEDDING"
    if kind == "module" and attrs.get(A.MODULE_CLASS) in _AGENTS:
        return "AGENT"
    return _KINDS.get(kind, "UNKNOWN")


def add_start(name: str, attrs: dict[str, Any], parent: Any = None) -> bool:
    """Before one of our spans starts: its kind, and for a trace's root its description and trace name.
    `parent` is the span context it starts under (None: the current one). True when the span, once started,
    is given `session_of` itself: a compile (its trials share its trace id), an evaluation that is a root."""
    kind = attrs.get(A.SPAN_KIND)
    attrs[OI_KIND] = kind_of(attrs)
    if parent is None:
        parent = trace.get_current_span().get_span_context()
    if parent.is_valid:
        return kind == "compile"
    attrs[OI_INPUT] = _described(attrs)
    attrs[MLFLOW_TRACE_NAME] = name
    return kind in ("compile", "evaluate")


_DESCRIBED: dict[tuple, str] = {}  # a program's root spans describe themselves alike, call after call


def _described(attrs: dict[str, Any]) -> str:
    """JSON of the `dspy.*` attributes, what the trace is first (a trace list truncates the column)."""
    key = tuple(attrs.items())
    try:
        text = _DESCRIBED.get(key)
    except TypeError:  # a list among the values (unhashable): described, not kept
        key, text = None, None
    if text is None:
        described = {name[5:]: attrs[name] for name in _SHOWN_FIRST if name in attrs}
        described.update((k[5:], v) for k, v in attrs.items() if k.startswith("dspy.") and k not in _SHOWN_FIRST)
        text = json.dumps(described, default=str)
        if key is not None:
            if len(_DESCRIBED) >= 512:  # trials describe themselves once each: bounded
                _DESCRIBED.clear()
            _DESCRIBED[key] = text
    return text


def session_of(span: Any) -> dict[str, str]:
    """`session.id` for a compile, trial or evaluate: the trace id of `span` (the compile's, or an evaluation's
    own), which is also what a trial's `dspy.optimizer.compile_trace_id` says."""
    context = span.get_span_context()
    return {SESSION_ID: f"{context.trace_id:032x}"} if context.is_valid else {}


def root_output(attrs: dict[str, Any]) -> dict[str, Any]:
    """A root span's `output.value`: what the trace cost and, for a trial or evaluation, its score. Written by
    hand: the values are numbers, and json.dumps was most of this function's cost on every program call."""
    parts: dict[str, str] = {}
    for name, key in _ROOT_OUTPUT:
        if name in attrs and key not in parts:
            parts[key] = _number(attrs[name])
    return {OI_OUTPUT: "{" + ", ".join(f'"{k}": {v}' for k, v in parts.items()) + "}"} if parts else {}


def _number(value: Any) -> str:
    """A JSON number (null for what JSON cannot say: NaN and infinities, a metric's odd score)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return json.dumps(value, default=str)
    return repr(value) if math.isfinite(value) else "null"


def lm_start(attrs: dict[str, Any], model: str, provider: str) -> None:
    attrs[OI_EMBEDDING_MODEL if attrs.get(A.GEN_AI_OPERATION) == "embeddings" else OI_MODEL] = model
    attrs[OI_PROVIDER] = provider


def lm_end(attrs: dict[str, Any]) -> None:
    """Token counts under OpenInference's names (its prompt count includes cache reads and writes, as ours
    does) and our cost in MLflow's attribute; read from the end attributes the LM span is given."""
    prompt, completion = attrs.get(A.GEN_AI_INPUT_TOKENS, 0), attrs.get(A.GEN_AI_OUTPUT_TOKENS, 0)
    attrs[OI_PROMPT_TOKENS] = prompt
    attrs[OI_COMPLETION_TOKENS] = completion
    attrs[OI_TOTAL_TOKENS] = prompt + completion
    for ours, theirs in ((A.GEN_AI_CACHE_READ_TOKENS, OI_CACHE_READ), (A.GEN_AI_CACHE_CREATION_TOKENS, OI_CACHE_WRITE),
                         (A.GEN_AI_REASONING_TOKENS, OI_REASONING)):
        if attrs.get(ours):
            attrs[theirs] = attrs[ours]
    total = attrs.get(A.COST_USD)
    if total is not None:
        # The prompt side is everything but output and reasoning (cache reads and writes, audio, searches,
        # request fees): input + output is then exactly the total we count, as MLflow adds them up.
        completion_usd = round(attrs.get(A.COST_OUTPUT_USD, 0.0) + attrs.get(A.COST_REASONING_USD, 0.0), 9)
        prompt_usd = round(total - completion_usd, 9)
        attrs[MLFLOW_COST] = (f'{{"input_cost": {_number(prompt_usd)}, "output_cost": {_number(completion_usd)}, '
                              f'"total_cost": {_number(total)}}}')
