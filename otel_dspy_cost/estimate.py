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
from typing import Any

from ._cost import Usage, compute_cost, estimate_tokens

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
    stages: dict[str, dict[str, int]]
    assumptions: list[str]

    def __add__(self, other: Estimate) -> Estimate:
        """Two stages of one run (a compile, then an evaluation) as one projection."""
        budget = self.budget_usd if self.budget_usd is not None else other.budget_usd
        high = self.usd_high + other.usd_high
        return Estimate(self.model, self.calls_low + other.calls_low, self.calls_high + other.calls_high,
                        self.usd_low + other.usd_low, high, self.economic_usd_low + other.economic_usd_low,
                        self.economic_usd_high + other.economic_usd_high, budget,
                        budget is not None and high > budget, {**self.stages, **other.stages},
                        self.assumptions + [a for a in other.assumptions if a not in self.assumptions])

    def summary(self) -> str:
        verdict = ""
        if self.budget_usd is not None:
            verdict = (f"; budget ${self.budget_usd:.4f}: " +
                       ("MAY EXCEED" if self.exceeds_budget else "fits"))
        return (f"estimate for {self.model}: {self.calls_low}..{self.calls_high} LM calls, "
                f"${self.usd_low:.6f}..${self.usd_high:.6f} actual "
                f"(${self.economic_usd_low:.6f}..${self.economic_usd_high:.6f} uncached){verdict}")


@dataclasses.dataclass
class _CallShape:
    prompt_tokens: int
    outputs: int  # output fields


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
        prompt = sum(estimate_tokens(len(str(m.get("content", "")))) + 4 for m in messages)
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
    elif name in ("BootstrapFewShot", "BootstrapFewShotWithRandomSearch"):
        demos = getattr(optimizer, "max_bootstrapped_demos", 4)
        rounds = getattr(optimizer, "max_rounds", 1)
        low = min(trainset_size, demos)
        high = trainset_size * rounds
        if name == "BootstrapFewShotWithRandomSearch":
            candidates = getattr(optimizer, "num_candidate_sets", 16) + 3
            val = valset_size if valset_size is not None else trainset_size
            stages["bootstrap"] = {"runs_low": low * (candidates - 3), "runs_high": high * (candidates - 3),
                                   "extra_calls": 0}
            stages["candidates"] = {"runs_low": val * candidates, "runs_high": val * candidates, "extra_calls": 0}
        else:
            stages["bootstrap"] = {"runs_low": low, "runs_high": high, "extra_calls": 0}
    elif name == "MIPROv2":
        if valset_size is None:
            valset_size = min(1000, max(1, int(trainset_size * 0.8)))
            trainset_size -= valset_size
            notes.append("MIPROv2 splits 80% of the trainset off as its valset")
        auto = getattr(optimizer, "auto", None)
        settings = {"light": (6, 100), "medium": (12, 300), "heavy": (18, 1000)}.get(auto or "", None)
        zeroshot = getattr(optimizer, "max_bootstrapped_demos", 4) == 0 and getattr(optimizer, "max_labeled_demos",
                                                                                   4) == 0
        if settings is not None:
            n, val_cap = settings
            valset_size = min(valset_size, val_cap)
            n_fewshot = n
            n_instruct = n if zeroshot else int(n * 0.5)
            n_vars = n_predictors * (1 if zeroshot else 2)
            trials = int(max(2 * n_vars * math.log2(n), 1.5 * n))
        else:
            n_fewshot = getattr(optimizer, "num_fewshot_candidates", None) or getattr(optimizer, "num_candidates", 6)
            n_instruct = getattr(optimizer, "num_instruct_candidates", None) or n_fewshot
            trials = getattr(optimizer, "num_trials", None) or 10
        minibatch_size = 35
        minibatch = valset_size > minibatch_size
        demos = getattr(optimizer, "max_bootstrapped_demos", 4)
        sets = max(0, n_fewshot - 2) if not zeroshot else 0  # seeds -1 .. n-3 bootstrap; -3, -2 do not
        stages["bootstrap"] = {"runs_low": sets * min(trainset_size, demos), "runs_high": sets * trainset_size,
                               "extra_calls": 0}
        # Instruction proposal: per predictor and candidate one proposal call, plus the program and
        # dataset summaries (about one call per 10 examples, at least two).
        summaries = max(2, math.ceil(trainset_size / 10)) + 2
        stages["propose_instructions"] = {"runs_low": 0, "runs_high": 0,
                                          "extra_calls_low": n_predictors * n_instruct + summaries,
                                          "extra_calls": 2 * (n_predictors * n_instruct + summaries)}
        per_trial = minibatch_size if minibatch else valset_size
        full_evals = (trials // 5 + 1) * valset_size if minibatch else 0
        stages["trials"] = {"runs_low": valset_size + trials * per_trial,
                            "runs_high": valset_size + trials * per_trial + full_evals, "extra_calls": 0}
        notes.append(f"MIPROv2: {trials} trials on {per_trial} examples, {n_instruct} instruction and "
                     f"{n_fewshot} few-shot candidates")
    elif name == "GEPA":
        budget_calls = getattr(optimizer, "max_metric_calls", None)
        if budget_calls is None:
            budget_calls = 400 * n_predictors
            notes.append("GEPA without max_metric_calls: assumed 400 metric calls per predictor")
        reflections = math.ceil(budget_calls / 3)  # one reflection per iteration on a minibatch of 3
        # GEPA checks its budget between iterations, so the last one may pass it; the seed's valset
        # evaluation comes on top.
        stages["rollouts"] = {"runs_low": budget_calls // 2,
                              "runs_high": int(budget_calls * 1.25) + (valset_size or trainset_size), "extra_calls": 0}
        stages["reflection"] = {"runs_low": 0, "runs_high": 0, "extra_calls": reflections}
        notes.append("GEPA: each metric call is one program run; one reflection call per iteration")
    else:
        stages["compile"] = {"runs_low": trainset_size, "runs_high": trainset_size * 3, "extra_calls": 0}
        notes.append(f"{name}: not modelled precisely; assumed 1-3 program runs per training example")
    if devset_size and name is not None:
        stages["evaluate"] = {"runs_low": devset_size, "runs_high": devset_size, "extra_calls": 0}
    return stages, notes


def estimate(program: Any, *, model: str, optimizer: Any = None, trainset_size: int = 0,
             valset_size: int | None = None, devset_size: int = 0, max_tokens: int | None = None,
             input_chars: int = 200, cache_hit_rate: float = 0.0, budget_usd: float | None = None,
             resolver: Any = None) -> Estimate:
    """Project LM calls and USD for compiling (if `optimizer`) and evaluating `program` on `model`."""
    from .pricing import default_resolver

    entry = (resolver or default_resolver()).lookup(model)
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
                 f"{_FIELD_OUTPUT_TOKENS} tokens per field (low) to max_tokens={max_out} (high)")
    return Estimate(model, calls_low, calls_high, round(usd_low, 8), round(usd_high, 8), round(econ_low, 8),
                    round(econ_high, 8), budget_usd, budget_usd is not None and usd_high > budget_usd, stages, notes)
