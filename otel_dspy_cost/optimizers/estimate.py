"""Pre-run estimates: how many LM calls and how many dollars a program, dataset and optimizer will take.

A range, because the count depends on the answers (ReAct stops early or not; BootstrapFewShot stops
once it has enough demos) and output length is unknown until the call:

- calls: low assumes early stops (1 ReAct step, bootstrap demos found at once), high the caps
  (`max_iters`, every example tried in every round);
- prompt tokens per call come from formatting each predictor's real prompt with DSPy's ChatAdapter
  (signature, instructions, demos) around inputs of `input_chars // 4` (low) to `2 * input_chars` (high)
  characters;
- output tokens: low a short answer per output field, high `max_tokens` (or the model's maximum);
- USD: actual respects `cache_hit_rate` (DSPy cache hits are free), economic is uncached.

MIPROv2 (auto light/medium/heavy or explicit), BootstrapFewShot (and RandomSearch), GEPA
(`max_metric_calls` or auto) and plain `Evaluate` are understood. Tests run each optimizer for real
against the simulator and assert the actual cost falls inside the range (docs/estimates.md).
"""

from __future__ import annotations

import dataclasses
import math
import types
from typing import Any

from otel_dspy_cost import _validate
from otel_dspy_cost.optimizers import registry as optimizers
from otel_dspy_cost.pricing.cost import Usage, compute_cost, estimate_tokens

_FIELD_OUTPUT_TOKENS = 12  # a short answer per output field, markers included, for the low end


@dataclasses.dataclass
class Estimate:
    model: str
    calls_low: int
    calls_high: int
    usd_low: float
    usd_high: float
    economic_usd_low: float
    economic_usd_high: float
    budget_usd: float | None
    exceeds_budget: bool
    stages: dict[str, dict[str, Any]]
    assumptions: list[str]
    # With a pilot: the point forecast (inside low..high) and what the pilot ran and spent.
    usd_forecast: float | None = None
    calls_forecast: int | None = None
    pilot: dict[str, Any] | None = None

    def __add__(self, other: Estimate) -> Estimate:
        """Two stages of one run (a compile, then an evaluation) as one projection."""
        budget = self.budget_usd if self.budget_usd is not None else other.budget_usd
        high = self.usd_high + other.usd_high
        both = self.usd_forecast is not None and other.usd_forecast is not None
        return Estimate(self.model, self.calls_low + other.calls_low, self.calls_high + other.calls_high,
                        self.usd_low + other.usd_low, high, self.economic_usd_low + other.economic_usd_low,
                        self.economic_usd_high + other.economic_usd_high, budget,
                        budget is not None and high > budget, {**self.stages, **other.stages},
                        self.assumptions + [a for a in other.assumptions if a not in self.assumptions],
                        self.usd_forecast + other.usd_forecast if both else None,
                        self.calls_forecast + other.calls_forecast if both else None, self.pilot or other.pilot)

    def summary(self) -> str:
        verdict = ""
        if self.budget_usd is not None:
            verdict = (f"; budget ${self.budget_usd:.4f}: " +
                       ("MAY EXCEED" if self.exceeds_budget else "fits"))
        point = ""
        if self.usd_forecast is not None:
            point = f"; forecast from a pilot: ${self.usd_forecast:.6f}, {self.calls_forecast} calls"
        return (f"estimate for {self.model}: {self.calls_low}..{self.calls_high} LM calls, "
                f"${self.usd_low:.6f}..${self.usd_high:.6f} actual "
                f"(${self.economic_usd_low:.6f}..${self.economic_usd_high:.6f} uncached){point}{verdict}")


@dataclasses.dataclass
class _CallShape:
    prompt_tokens: int
    outputs: int  # output fields


def _configured_max_tokens(model: str) -> int | None:
    """The `max_tokens` of the LM configured in DSPy (`dspy.configure(lm=...)`) when it is the model
    estimated: what the high end's answers are bounded by, instead of the model's maximum output."""
    try:
        import dspy

        lm = dspy.settings.lm
    except Exception:  # noqa: BLE001 - no DSPy settings: the model's maximum
        return None
    value = (getattr(lm, "kwargs", None) or {}).get("max_tokens") if getattr(lm, "model", None) == model else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _checked(program: Any, model: Any, optimizer: Any, trainset_size: Any, valset_size: Any, devset_size: Any,
             max_tokens: Any, input_chars: Any, cache_hit_rate: Any, budget_usd: Any, demos: Any,
             max_metric_calls: Any) -> Any:
    """`estimate`'s inputs checked, before any work (a user's mistake is a ValueError or TypeError that names
    the argument, never a negative forecast); returns the optimizer, a CLI name made into its stand-in."""
    if not hasattr(program, "named_predictors"):
        raise TypeError(f"program must be a dspy.Module, not {type(program).__name__}")
    if not isinstance(model, str) or not model.strip():
        raise TypeError(f"model must be a model name such as 'openai/gpt-4o-mini', not {model!r}")
    for name, value in (("trainset_size", trainset_size), ("devset_size", devset_size)):
        _validate.integer(name, value, allow_none=False)
    _validate.integer("valset_size", valset_size, minimum=1)
    _validate.integer("max_tokens", max_tokens, minimum=1)
    _validate.integer("input_chars", input_chars, minimum=1, allow_none=False)
    _validate.integer("demos", demos, allow_none=False)
    _validate.integer("max_metric_calls", max_metric_calls, minimum=1)
    if _validate.number("cache_hit_rate", cache_hit_rate, allow_none=False) > 1:
        raise ValueError(f"cache_hit_rate is a fraction of calls, 0..1, not {cache_hit_rate!r}")
    _validate.number("budget_usd", budget_usd, strict=True)
    if isinstance(optimizer, str):
        optimizer = optimizer_named(optimizer, demos=demos, max_metric_calls=max_metric_calls)
    if optimizer is None and not devset_size:
        raise ValueError("nothing to estimate: give optimizer= with trainset_size= for a compile, or devset_size= "
                         "for an evaluation")
    if optimizer is not None and not trainset_size:
        raise ValueError(f"trainset_size must be > 0 to estimate a {type(optimizer).__name__} compile")
    return optimizer


def optimizer_named(name: str, *, demos: int = 4, max_metric_calls: int | None = None) -> Any:
    """A stand-in for the optimizer a CLI name means (`evaluate` is None): its class name and the settings the
    estimator reads. An unknown name is a ValueError listing the known ones."""
    if name == "evaluate":
        return None
    found = optimizers.from_cli(name, types.SimpleNamespace(demos=demos, max_metric_calls=max_metric_calls))
    if found is None:
        raise ValueError(f"unknown optimizer {name!r}: use one of {', '.join(optimizers.cli_names())}")
    return type(found[0], (), found[1])()


def prompt_tokens(messages: list[dict[str, Any]]) -> int:
    """Tokens of a formatted prompt, at ~4 characters a token and 4 per message."""
    return sum(estimate_tokens(len(str(m.get("content", "")))) + 4 for m in messages)


def _predictor_shapes(program: Any, input_chars: int) -> list[tuple[Any, _CallShape, int, int]]:
    """(predictor, shape, calls per program run low, high) for every predictor of the program."""
    import dspy

    adapter = dspy.ChatAdapter()
    react_of: dict[int, Any] = {}
    for _, module in program.named_sub_modules():
        if isinstance(module, dspy.ReAct):
            react_of[id(module.react)] = module
    if isinstance(program, dspy.ReAct):
        react_of[id(program.react)] = program
    out = []
    for _, predictor in program.named_predictors():
        sig = predictor.signature
        inputs = {name: "x" * input_chars for name in sig.input_fields}
        if "trajectory" in inputs:
            inputs["trajectory"] = "x" * (input_chars * 2)
        try:
            messages = adapter.format(sig, list(predictor.demos or []), inputs)
        except Exception:  # a custom signature type the adapter cannot format: count its text
            messages = [{"role": "user", "content": " ".join([sig.instructions, *inputs.values()])}]
        prompt = prompt_tokens(messages)
        react = react_of.get(id(predictor))
        low, high = (1, react.max_iters) if react is not None else (1, 1)
        out.append((predictor, _CallShape(prompt, len(sig.output_fields)), low, high))
    return out


def _runs(optimizer: Any, trainset_size: int, valset_size: int | None, devset_size: int, n_predictors: int
          ) -> tuple[dict[str, dict[str, int]], list[str]]:
    """Program runs (low, high) per stage, and extra single calls (proposals, reflections)."""
    notes: list[str] = []
    stages: dict[str, dict[str, int]] = {}
    name = type(optimizer).__name__ if optimizer is not None else None
    if name is None:
        stages["evaluate"] = {"runs_low": devset_size, "runs_high": devset_size, "extra_calls": 0}
    elif (module := optimizers.by_name(name)) is not None and hasattr(module, "estimate_stages"):
        module.estimate_stages(optimizer, name, trainset_size, valset_size, n_predictors, stages, notes)
    else:
        stages["compile"] = {"runs_low": trainset_size, "runs_high": trainset_size * 3, "extra_calls": 0}
        notes.append(f"{name}: not modelled precisely; assumed 1-3 program runs per training example")
    if devset_size and name is not None:
        stages["evaluate"] = {"runs_low": devset_size, "runs_high": devset_size, "extra_calls": 0}
    return stages, notes


def estimate(program: Any, *, model: str, optimizer: Any = None, trainset_size: int = 0,
             valset_size: int | None = None, devset_size: int = 0, max_tokens: int | None = None,
             input_chars: int = 200, cache_hit_rate: float = 0.0, budget_usd: float | None = None,
             resolver: Any = None, demos: int = 4, max_metric_calls: int | None = None, pilot: Any = None,
             pilot_budget_usd: float = 1.0) -> Estimate:
    """Project LM calls and USD for compiling (if `optimizer`) and evaluating `program` on `model`.

    `optimizer`: an optimizer (its class and settings are read), or one of the CLI's names (`evaluate`,
    `bootstrap`, `mipro-light|medium|heavy`, `gepa`...: `registry.cli_names()`), with `demos` and
    `max_metric_calls` as the CLI takes them. `pilot`: a few examples (dspy.Example with inputs marked) to
    run the program on for real with the configured LM, under a budget of `pilot_budget_usd`: the result then
    has a point forecast (`usd_forecast`, `calls_forecast`) from what the pilot measured. Every input is
    checked before any work: a negative size, a cache-hit rate outside 0..1 or nothing to estimate is a
    ValueError naming the argument."""
    from otel_dspy_cost.pricing.resolver import default_resolver

    optimizer = _checked(program, model, optimizer, trainset_size, valset_size, devset_size, max_tokens,
                         input_chars, cache_hit_rate, budget_usd, demos, max_metric_calls)
    _validate.number("pilot_budget_usd", pilot_budget_usd, strict=True, allow_none=False)

    entry = (resolver or default_resolver()).lookup(model)
    bound_from = "given"
    if max_tokens is None:
        max_tokens = _configured_max_tokens(model)
        bound_from = "the configured LM's" if max_tokens is not None else "the model's maximum output"
    max_out = max_tokens or entry.max_output_tokens or 4096
    shapes = _predictor_shapes(program, input_chars)
    short = {id(p): s.prompt_tokens for p, s, *_ in _predictor_shapes(program, max(1, input_chars // 4))}
    stages, notes = _runs(optimizer, trainset_size, valset_size, devset_size, max(1, len(shapes)))
    per_run_low = sum(low for *_, low, _high in shapes)
    per_run_high = sum(high for *_, _low, high in shapes)

    def run_usage(high: bool) -> tuple[Usage, int]:
        inp = out = calls = 0
        for predictor, shape, low, hi in shapes:
            n = hi if high else low
            calls += n
            inp += (shape.prompt_tokens * 2 if high else short[id(predictor)]) * n
            out += (max_out if high else _FIELD_OUTPUT_TOKENS * shape.outputs) * n
        return Usage(inp, out), calls

    low_usage, _ = run_usage(False)
    high_usage, _ = run_usage(True)
    avg_prompt = sum(s.prompt_tokens for _, s, *_ in shapes) // max(1, len(shapes))
    calls_low = calls_high = 0
    econ_low = econ_high = 0.0
    for stage in stages.values():
        extra_low = stage.get("extra_calls_low", stage["extra_calls"])
        calls_low += stage["runs_low"] * per_run_low + extra_low
        calls_high += stage["runs_high"] * per_run_high + stage["extra_calls"]
        econ_low += stage["runs_low"] * compute_cost(low_usage, entry).economic_usd
        econ_high += stage["runs_high"] * compute_cost(high_usage, entry).economic_usd
        extra = Usage(avg_prompt * 2, _FIELD_OUTPUT_TOKENS * 4)
        extra_high = Usage(avg_prompt * 4, max_out)
        econ_low += extra_low * compute_cost(extra, entry).economic_usd
        econ_high += stage["extra_calls"] * compute_cost(extra_high, entry).economic_usd
    free = 1.0 if entry.local else 0.0
    usd_low = econ_low * (1 - cache_hit_rate) * (1 - free)
    usd_high = econ_high * (1 - free)  # a cold cache is the worst case
    notes.append(f"prompt tokens from DSPy's ChatAdapter with {input_chars // 4}..{input_chars * 2}-character "
                 f"inputs; output "
                 f"{_FIELD_OUTPUT_TOKENS} tokens per field (low) to max_tokens={max_out} (high: {bound_from})")
    high_cost = compute_cost(high_usage, entry)
    if high_cost.economic_usd > 0:
        share = high_cost.output_usd / high_cost.economic_usd
        if share >= 0.5:  # say which assumption makes the high end what it is
            notes.append(f"the high end is {share:.0%} output at max_tokens={max_out} on every call ({bound_from}); "
                         f"a tighter max_tokens on the LM narrows it")
    result = Estimate(model, calls_low, calls_high, round(usd_low, 8), round(usd_high, 8), round(econ_low, 8),
                      round(econ_high, 8), budget_usd, budget_usd is not None and usd_high > budget_usd, stages,
                      notes)
    if pilot is not None:
        _forecast(result, program, pilot, optimizer, entry, pilot_budget_usd, (1 - cache_hit_rate) * (1 - free),
                  max_out, max(per_run_high, 1))
    return result


_EXTRA_CALL_FACTOR = 3.0  # an instruction proposal or a reflection against a pilot call: a longer prompt


def _forecast(result: Estimate, program: Any, pilot: Any, optimizer: Any, entry: Any, budget_usd: float,
              paid: float, max_out: int, calls_per_run_high: int) -> None:
    """The point forecast from a pilot: each stage's expected program runs at the measured cost per run (plus
    the demos and proposed instructions its programs carry), its single calls at a few pilot calls' cost.

    The high end is recomputed from the pilot too, and the range kept if wider: every run at its most calls,
    each call with the measured prompt grown by every demo and an instruction, answering `max_out` tokens."""
    from otel_dspy_cost.optimizers.pilot import run_pilot

    wants_rate = any("successes_wanted" in stage for stage in result.stages.values())
    measured = run_pilot(program, pilot, metric=getattr(optimizer, "metric", None) if wants_rate else None,
                         budget_usd=budget_usd)
    rate = measured.success_rate
    rate = 1.0 if rate is None else max(rate, 1.0 / (measured.runs + 1))  # none passed: fewer than 1 in runs
    in_rate, out_rate = (entry.rates.input or 0.0) / 1_000_000, (entry.rates.output or 0.0) / 1_000_000
    demo_usd = measured.demo_tokens_per_run * in_rate
    # A proposed instruction is about as long as an answer: what it adds to each call's prompt, per run.
    instruction_usd = measured.calls_per_run * measured.output_tokens_per_call * in_rate
    demo_per_call = measured.demo_tokens_per_run / measured.calls_per_run
    usd = calls = high = 0.0
    for stage in result.stages.values():
        prompt_high = (measured.input_tokens_per_call + 2 * stage.get("demos", 0) * demo_per_call
                       + stage.get("new_instructions", 0.0) * measured.output_tokens_per_call)
        run_high = max(calls_per_run_high, measured.calls_per_run) * (prompt_high * in_rate + max_out * out_rate)
        high += stage["runs_high"] * run_high + stage["extra_calls"] * (
            _EXTRA_CALL_FACTOR * measured.input_tokens_per_call * in_rate + max_out * out_rate)
        if "successes_wanted" in stage:
            sets = stage.get("sets", 1)
            runs = min(stage["runs_high"], sets * math.ceil(stage["successes_wanted"] / rate))
            runs = max(runs, stage["runs_low"])
        else:
            runs = stage.get("runs_point", (stage["runs_low"] + stage["runs_high"]) / 2)
        extra = stage.get("extra_calls_point", stage.get("extra_calls_low", stage["extra_calls"]))
        stage["runs_point"], stage["extra_calls_point"] = runs, extra
        usd += runs * (measured.usd_per_run + stage.get("demos", 0) * demo_usd
                       + stage.get("new_instructions", 0.0) * instruction_usd)
        usd += extra * measured.usd_per_call * _EXTRA_CALL_FACTOR
        calls += runs * measured.calls_per_run + extra
    result.usd_forecast = round(usd * paid, 8)
    result.calls_forecast = round(calls)
    result.usd_low = min(result.usd_low, result.usd_forecast)
    result.usd_high = max(result.usd_high, result.usd_forecast, 0.0 if entry.local else round(high, 8))
    result.calls_low, result.calls_high = min(result.calls_low, result.calls_forecast), max(result.calls_high,
                                                                                             result.calls_forecast)
    result.pilot = {"runs": measured.runs, "calls": measured.calls, "usd": measured.usd, "budget_usd": budget_usd,
                    "usd_per_run": measured.usd_per_run, "calls_per_run": measured.calls_per_run,
                    "success_rate": measured.success_rate, "demo_tokens_per_run": measured.demo_tokens_per_run,
                    "input_tokens_per_call": measured.input_tokens_per_call,
                    "output_tokens_per_call": measured.output_tokens_per_call,
                    "stopped": measured.stopped}
    result.assumptions.append(
        f"forecast from a pilot of {measured.runs} runs (${measured.usd:.6f} spent of its ${budget_usd} budget): "
        f"${measured.usd_per_run:.6f} and {measured.calls_per_run:.1f} calls per run"
        + (f", metric pass rate {measured.success_rate:.0%}" if measured.success_rate is not None else "")
        + (f"; {measured.stopped}" if measured.stopped else ""))
    if result.budget_usd is not None:
        result.exceeds_budget = result.usd_high > result.budget_usd
