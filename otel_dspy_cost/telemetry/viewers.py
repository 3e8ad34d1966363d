"""The attribute names MLflow and Phoenix read, written beside ours so both show our spans, tokens and cost.

Why a second vocabulary: Phoenix marks every span without `openinference.span.kind` as UNKNOWN and prices
LM spans from its own model store; MLflow types spans from OpenInference's kind, lists traces by a name tag
and their root span's `input.value`/`output.value`, and reprices every LM span that has no `mlflow.llm.cost`
(`../shared/notes/backends-and-dspy-facts.md`). Our `dspy.*` and `gen_ai.*` names stay the source of truth
(docs/attributes.md); these are derived from them, in one place, and `instrument(backend_attributes=False)`
turns them off.

What goes where:

- every span but LM and tool spans: `openinference.span.kind` (MLflow maps it to its span type);
- a trace's root span: `input.value` (the span's `dspy.*` description: never prompt content), and at its end
  `output.value` (cost, calls, tokens, score), plus MLflow's trace-name tag;
- compile, trial and evaluate roots: `session.id`, the compile's trace id, so one filter finds a compile's
  trials in both backends (Phoenix drops span links);
- LM spans: `mlflow.llm.cost` with our figure (their kind, model and tokens both backends read from the GenAI
  attributes).
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
SESSION_ID = "session.id"  # OpenInference's and MLflow's (the OTel semantic conventions' session.id)
MLFLOW_COST = "mlflow.llm.cost"  # JSON {"input_cost", "output_cost", "total_cost"}: MLflow keeps it, unpriced
MLFLOW_TRACE_NAME = "mlflow.traceTag.mlflow.traceName"  # a root-span attribute MLflow turns into the trace name

# dspy.span.kind -> OpenInference span kind (MLflow: the same name as its span type), for our spans without
# gen_ai.operation.name (LM and tool spans have it: both backends type those themselves). A predictor is a
# CHAIN, not an LLM: only the LM span under it carries tokens, so no backend counts a call twice.
_KINDS = {"retriever": "RETRIEVER", "evaluate": "EVALUATOR", "module": "CHAIN", "predictor": "CHAIN",
          "adapter.format": "CHAIN", "adapter.parse": "CHAIN", "compile": "CHAIN", "trial": "CHAIN",
          "trial_summary": "CHAIN", "stage": "CHAIN", "bootstrap": "CHAIN", "late_cost": "CHAIN"}
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
    if kind == "module" and attrs.get(A.MODULE_CLASS) in _AGENTS:
        return "AGENT"
    return _KINDS.get(kind, "UNKNOWN")


def add_start(name: str, attrs: dict[str, Any], parent: Any = None) -> bool:
    """Before one of our spans starts: its kind, and for a trace's root its description and trace name.
    `parent` is the span context it starts under (None: the current one). True when the span, once started,
    is given `session_of` itself: a compile (its trials share its trace id), an evaluation that is a root.
    LM and tool spans carry `gen_ai.operation.name`, from which both backends type them: no kind of ours."""
    kind = attrs.get(A.SPAN_KIND)
    if A.GEN_AI_OPERATION not in attrs:
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


def root_output(attrs: dict[str, Any], earlier: Any = None) -> dict[str, Any]:
    """A root span's `output.value`: what the trace cost (`attrs`, its roll-up) and, for a trial or evaluation,
    its score (in `attrs`, or among the span's `earlier` attributes). Written by hand: the values are numbers,
    and json.dumps was most of this function's cost on every program call."""
    parts: dict[str, str] = {}
    for name, key in _ROOT_OUTPUT:
        if key in parts:
            continue
        value = attrs.get(name)
        if value is None and earlier is not None and key == "score":
            value = earlier.get(name)
        if value is not None:  # a score is the user's metric's (NaN possible); the rest are our own finite sums
            parts[key] = _number(value) if key == "score" else repr(value)
    return {OI_OUTPUT: "{" + ", ".join(f'"{k}": {v}' for k, v in parts.items()) + "}"} if parts else {}


def _number(value: Any) -> str:
    """A JSON number (null for what JSON cannot say: NaN and infinities, a metric's odd score)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return json.dumps(value, default=str)
    return repr(value) if math.isfinite(value) else "null"


def lm_end(attrs: dict[str, Any]) -> None:
    """Our cost in MLflow's attribute, from the end attributes the LM span is given. Nothing else: both
    backends read an LM span's kind, model, provider and token counts from its GenAI attributes (Phoenix turns
    them into OpenInference's, MLflow's GenAI translator reads them), so writing them twice would only cost."""
    total = attrs.get(A.COST_USD)
    if total is not None:
        # The input side is everything but output and reasoning (cache reads and writes, audio, searches,
        # request fees): input + output is then exactly the total we count, as MLflow adds them up. Our own
        # rounded, finite figures: each repr is its JSON.
        completion_usd = round(attrs.get(A.COST_OUTPUT_USD, 0.0) + attrs.get(A.COST_REASONING_USD, 0.0), 9)
        prompt_usd = round(total - completion_usd, 9)
        attrs[MLFLOW_COST] = (f'{{"input_cost": {prompt_usd!r}, "output_cost": {completion_usd!r}, '
                              f'"total_cost": {total!r}}}')
