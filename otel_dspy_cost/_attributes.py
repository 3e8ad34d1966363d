"""Every span attribute name this package writes or reads, in one place.

`docs/attributes.md` is the human table of the same names; a test keeps the two in step.
GenAI names follow the OpenTelemetry GenAI semantic conventions so other backends and the
budget gate (processor) can read LM spans from any instrumentation that follows them.
"""

# Instrumentation scope of our tracer and meter: how our spans are told from other instrumentations'.
SCOPE_NAME = "otel_dspy_cost"


def scope_version() -> str:
    """The instrumentation scope's version: the installed distribution's, "0.0.0" from a source tree."""
    try:
        from importlib.metadata import version

        return version("otel-dspy-cost")
    except Exception:  # noqa: BLE001 - running from a source tree
        return "0.0.0"

# --- span model -------------------------------------------------------------------------
SPAN_KIND = "dspy.span.kind"  # compile|evaluate|module|predictor|adapter.format|lm|adapter.parse|tool|retriever
MODULE_PATH = "dspy.module.path"
MODULE_CLASS = "dspy.module.class"
PHASE = "dspy.phase"  # train|infer
OPTIMIZER_NAME = "dspy.optimizer.name"
TOOL_NAME = "gen_ai.tool.name"
EVAL_SIZE = "dspy.evaluate.dataset_size"
EVAL_THREADS = "dspy.evaluate.num_threads"
EVAL_SCORE = "dspy.evaluate.score"
EVAL_METRIC = "dspy.evaluate.metric"
EVAL_ERRORS = "dspy.evaluate.errors"
LM_ROLE = "dspy.lm.role"  # teacher|student|prompt_model|task_model|reflection

# --- optimizer runs (trial, stage and bootstrap spans; evaluate spans inside a compile) ---------------------
OPTIMIZER_TRIAL = "dspy.optimizer.trial"
OPTIMIZER_SCORE = "dspy.optimizer.score"
OPTIMIZER_EVAL = "dspy.optimizer.eval"  # minibatch|full
OPTIMIZER_BASELINE = "dspy.optimizer.baseline"
OPTIMIZER_PARAM_PREFIX = "dspy.optimizer.param."
OPTIMIZER_STAGE = "dspy.optimizer.stage"
OPTIMIZER_ROUND = "dspy.optimizer.round"
OPTIMIZER_EXAMPLE = "dspy.optimizer.example_index"
OPTIMIZER_SUCCESS = "dspy.optimizer.success"
OPTIMIZER_PARENT = "dspy.optimizer.parent_candidate"
OPTIMIZER_CANDIDATE = "dspy.optimizer.candidate"
OPTIMIZER_ACCEPTED = "dspy.optimizer.accepted"
OPTIMIZER_PROJECTED_USD = "dspy.optimizer.projected_usd"  # the compile's final spend, projected after each trial
OPTIMIZER_ITERATION = "dspy.optimizer.iteration"  # GEPA's own iteration number (its log's), beside our trial number
# A trial is the root of its own trace; its summary span in the compile trace names that trace, and links join both.
OPTIMIZER_TRIAL_TRACE_ID = "dspy.optimizer.trial_trace_id"
OPTIMIZER_COMPILE_TRACE_ID = "dspy.optimizer.compile_trace_id"
LINK_RELATION = "dspy.link.relation"  # on span links: trial (summary -> trial trace) | compile (trial -> summary)

# --- GenAI semantic conventions ------------------------------------------------------------
GEN_AI_OPERATION = "gen_ai.operation.name"
GEN_AI_PROVIDER = "gen_ai.provider.name"
GEN_AI_REQUEST_MODEL = "gen_ai.request.model"  # the model name, as the GenAI conventions want (gpt-4o-mini)
LM_MODEL = "dspy.lm.model"  # DSPy's model string, provider prefix included (openai/gpt-4o-mini)
GEN_AI_RESPONSE_MODEL = "gen_ai.response.model"
GEN_AI_REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
GEN_AI_REQUEST_TEMPERATURE = "gen_ai.request.temperature"
GEN_AI_REQUEST_CHOICE_COUNT = "gen_ai.request.choice.count"
GEN_AI_INPUT_TOKENS = "gen_ai.usage.input_tokens"
GEN_AI_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
GEN_AI_CACHE_READ_TOKENS = "gen_ai.usage.cache_read.input_tokens"
GEN_AI_CACHE_CREATION_TOKENS = "gen_ai.usage.cache_creation.input_tokens"
GEN_AI_REASONING_TOKENS = "gen_ai.usage.reasoning.output_tokens"
GEN_AI_FINISH_REASONS = "gen_ai.response.finish_reasons"
GEN_AI_INPUT_MESSAGES = "gen_ai.input.messages"
GEN_AI_OUTPUT_MESSAGES = "gen_ai.output.messages"
ERROR_TYPE = "error.type"

# --- DSPy specifics on LM spans ---------------------------------------------------------------
CACHE_HIT = "dspy.cache_hit"
USAGE_MISSING = "dspy.usage.missing"
INPUT_TOKENS_BOUND = "dspy.request.input_tokens_bound"  # worst-case prompt tokens, set at span start
LM_OUTCOME = "dspy.lm.outcome"  # ok|unknown|rejected|refused

# --- cost on LM spans -------------------------------------------------------------------------
COST_USD = "dspy.cost.usd"
COST_ECONOMIC_USD = "dspy.cost.economic_usd"
COST_INPUT_USD = "dspy.cost.input_usd"
COST_CACHED_INPUT_USD = "dspy.cost.cached_input_usd"
COST_OUTPUT_USD = "dspy.cost.output_usd"
COST_REASONING_USD = "dspy.cost.reasoning_usd"
COST_ESTIMATED = "dspy.cost.estimated"
COST_UNKNOWN = "dspy.cost.unknown"
COST_ESTIMATE_REASON = "dspy.cost.estimate_reason"  # usage missing | timeout | cancelled | connection | error: <type>
PRICING_SOURCE = "dspy.pricing.source"
PRICING_VERSION = "dspy.pricing.version"
PRICING_TIER = "dspy.pricing.tier"
PRICING_TIER_MISSING = "dspy.pricing.tier_missing"  # the tier asked for, absent for this model: standard rates used
# Why the price used is not simply the one in force: history_gap | before_history | no_history | fine_tune_at_base
PRICING_FALLBACK = "dspy.pricing.fallback"
# The 1-hour part of gen_ai.usage.cache_creation.input_tokens (Anthropic bills it at 2x input, 5-minute at 1.25x).
CACHE_WRITE_1H_TOKENS = "dspy.usage.cache_write_1h_tokens"
# Units billed apart from text tokens (set only when the provider reported some): audio in (part of
# gen_ai.usage.input_tokens), audio and image out (part of gen_ai.usage.output_tokens), web searches or grounded
# queries; what they cost, and the units the price entry had no rate for.
AUDIO_INPUT_TOKENS = "dspy.usage.audio_input_tokens"
AUDIO_OUTPUT_TOKENS = "dspy.usage.audio_output_tokens"
IMAGE_OUTPUT_TOKENS = "dspy.usage.image_output_tokens"
WEB_SEARCH_REQUESTS = "dspy.usage.web_search_requests"
COST_MEDIA_USD = "dspy.cost.media_usd"  # audio and image tokens at their own rates
COST_SEARCH_USD = "dspy.cost.search_usd"  # web searches and per-request fees
COST_UNPRICED_UNITS = "dspy.cost.unpriced_units"  # e.g. ["web_search_requests"]: the call settled at its worst case
# Proposed GenAI cost attributes (semantic-conventions PR #443), experimental: names may change upstream.
GEN_AI_COST_AMOUNT = "gen_ai.usage.cost.amount"
GEN_AI_COST_CURRENCY = "gen_ai.usage.cost.currency"
OPENINFERENCE_COST_TOTAL = "llm.cost.total"

# --- roll-up on every ancestor span ------------------------------------------------------------
TOTAL_USD = "dspy.cost.total_usd"
TOTAL_ECONOMIC_USD = "dspy.cost.total_economic_usd"
TOTAL_INPUT_TOKENS = "dspy.usage.total_input_tokens"
TOTAL_OUTPUT_TOKENS = "dspy.usage.total_output_tokens"
LM_CALLS = "dspy.lm.calls"
TOTAL_UNKNOWN_CALLS = "dspy.cost.unknown_calls"  # LM calls below whose price is unknown

# --- budgets ------------------------------------------------------------------------------------
BUDGET_LABEL = "dspy.budget.label"
BUDGET_REFUSED = "dspy.budget.refused"
BUDGET_RESERVED_USD = "dspy.budget.reserved_usd"

LM_OPERATIONS = frozenset({"chat", "text_completion", "generate_content", "responses"})
