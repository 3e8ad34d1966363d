"""A pilot for `estimate(pilot=...)`: the program run for real on a few examples, measured, so that the forecast
stands on what this program and this LM actually cost per run instead of on assumed answer lengths.

What the pilot measures (under a budget of its own, with DSPy's cache off so every call is a real one):
calls and USD per program run, what one more demo per predictor adds to a run (the prompt grows by one
demo built from the pilot's own inputs and answers, formatted by DSPy's ChatAdapter), and, when the
optimizer has a metric and the examples carry labels, how often the metric accepts an answer (bootstrap
stops once it has its demos, so a low rate means more tries).
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

_pilots = itertools.count(1)


@dataclasses.dataclass
class PilotResult:
    """What the pilot ran and measured; `usd` is what it spent, under its own budget."""

    runs: int
    calls: int
    usd: float
    budget_usd: float
    success_rate: float | None  # the optimizer's metric on the pilot's answers (None: no metric or no labels)
    demo_tokens_per_run: float  # prompt tokens one more demo per predictor adds to a program run
    input_tokens: int = 0  # the pilot's calls' prompts, in all
    output_tokens: int = 0  # what the pilot's calls answered, in all
    stopped: str | None = None  # why the pilot ended early (its budget), if it did

    @property
    def usd_per_run(self) -> float:
        return self.usd / self.runs

    @property
    def calls_per_run(self) -> float:
        return self.calls / self.runs

    @property
    def usd_per_call(self) -> float:
        return self.usd / self.calls if self.calls else 0.0

    @property
    def output_tokens_per_call(self) -> float:
        return self.output_tokens / self.calls if self.calls else 0.0

    @property
    def input_tokens_per_call(self) -> float:
        return self.input_tokens / self.calls if self.calls else 0.0


def run_pilot(program: Any, examples: Any, *, metric: Any = None, budget_usd: float = 1.0,
              lm: Any = None) -> PilotResult:
    """Run `program` on each of `examples` (dspy.Example with inputs marked) with the configured LM."""
    import dspy

    from otel_dspy_cost._redact import scrub, secrets_of
    from otel_dspy_cost.budgets.budget import budget
    from otel_dspy_cost.errors import BudgetExceededError, PilotFailedError

    examples = list(examples)
    if not examples:
        raise ValueError("pilot must hold at least one example")
    lm = lm or dspy.settings.lm
    if lm is None:
        raise ValueError("pilot= runs the program for real: configure its LM first (dspy.configure(lm=...))")
    if hasattr(lm, "copy"):  # every pilot call a real one: a cached answer would cost $0 and say nothing
        lm = lm.copy(cache=False)
    program = program.deepcopy()
    runs = successes = scored = 0
    traces: list[list[Any]] = []
    stopped = None
    label = f"estimate-pilot-{next(_pilots)}"  # its own row in the spend totals: the tokens it used
    with budget(limit_usd=budget_usd, label=label) as spent, dspy.context(lm=lm):
        for example in examples:
            try:
                with dspy.context(trace=[]):
                    prediction = program(**example.inputs())
                    trace = list(dspy.settings.trace or [])
                passed = bool(metric(example, prediction, trace)) if metric is not None and example.labels() \
                    else None
            except BudgetExceededError:
                stopped = f"the pilot's budget (${budget_usd}) stopped it after {runs} runs"
                break
            except Exception as exc:  # the provider refused (a key, a model name), the metric raised: said so
                secrets = secrets_of(getattr(lm, "kwargs", None) or {})
                raise PilotFailedError(f"the pilot's run {runs + 1} failed: {type(exc).__name__}: "
                                       f"{scrub(str(exc), secrets)[:400]}") from exc
            runs += 1
            traces.append(trace)
            if passed is not None:
                scored += 1
                successes += passed
    if not runs:
        raise ValueError(f"the pilot's budget (${budget_usd}) stopped it before one program run finished: "
                         f"raise pilot_budget_usd")
    return PilotResult(runs, spent.call_count, spent.spent_usd, budget_usd,
                       successes / scored if scored else None, _demo_tokens(traces, runs),
                       *_tokens_under(label), stopped)


def _tokens_under(label: str) -> tuple[int, int]:
    """(input, output) tokens counted under the pilot's budget label (the accounting station's spend totals)."""
    from otel_dspy_cost import _runtime

    rt = _runtime.active()
    row = rt.accountant.aggregator.row("budget", label) if rt is not None else {}
    return int(row.get("input_tokens", 0)), int(row.get("output_tokens", 0))


def _demo_tokens(traces: list[list[Any]], runs: int) -> float:
    """Prompt tokens one demo (built from the pilot's own inputs and answers) adds to each predictor's prompt,
    times that predictor's calls per run."""
    import dspy

    from otel_dspy_cost.optimizers.estimate import prompt_tokens

    adapter = dspy.ChatAdapter()
    added = 0
    seen: dict[int, int] = {}
    for trace in traces:
        for predictor, inputs, outputs in trace:
            key = id(predictor)
            if key not in seen:
                demo = dspy.Example(**inputs, **dict(outputs))
                try:
                    bare = adapter.format(predictor.signature, [], inputs)
                    with_one = adapter.format(predictor.signature, [demo], inputs)
                    seen[key] = max(0, prompt_tokens(with_one) - prompt_tokens(bare))
                except Exception:  # noqa: BLE001 - a signature the adapter cannot format: no demo growth known
                    seen[key] = 0
            added += seen[key]
    return added / runs



def synthetic_examples(program: Any, n: int, input_chars: int) -> list[Any]:
    """`n` examples for a pilot from the command line, where no data is at hand: each input of the program's
    `forward` filled with about `input_chars` characters of words (different per example, so no two calls are
    alike). A stand-in: real examples (`estimate(pilot=...)`) measure real answers to real questions."""
    import inspect

    import dspy

    # the class's forward: reading `program.forward` on an instance makes DSPy warn about calling it directly
    params = [p.name for p in inspect.signature(type(program).forward).parameters.values()
              if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"]
    if not params:
        raise ValueError("--pilot needs a program whose forward() takes named inputs")
    words = ("budget", "model", "signal", "harbor", "orbit", "ledger", "canyon", "meadow", "quartz", "lantern")
    out = []
    for i in range(n):
        text = " ".join(words[(i + j) % len(words)] for j in range(max(1, input_chars // 7)))[:input_chars]
        out.append(dspy.Example(**{name: f"{i}: {text}" for name in params}).with_inputs(*params))
    return out
