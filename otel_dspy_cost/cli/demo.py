"""`otel-dspy-cost demo`: the README's main job, offline by default.

A planner / ReAct searcher / synthesizer program is estimated, compiled with a small optimizer and
evaluated under a budget that trips partway, against the built-in OpenAI-compatible simulator (no API
key, no network, no collector); the run's artifacts are written and reported.
"""

from __future__ import annotations

import argparse
import os
import sys


def demo_program():
    """planner -> ReAct searcher (with a tool) -> synthesizer: the demo's multi-module program."""
    import dspy

    def search(query: str) -> str:
        """Searches the knowledge base."""
        return f"Three documents mention {query}."

    class ResearchAgent(dspy.Module):
        def __init__(self):
            super().__init__()
            self.planner = dspy.ChainOfThought("question -> plan")
            self.searcher = dspy.ReAct("plan -> findings", tools=[search], max_iters=3)
            self.synthesizer = dspy.ChainOfThought("question, findings -> answer")

        def forward(self, question):
            plan = self.planner(question=question).plan
            findings = self.searcher(plan=plan).findings
            return self.synthesizer(question=question, findings=findings)

    return ResearchAgent()


def provider_key_variable(model: str) -> str:
    """The variable a provider's API key is read from, as LiteLLM reads it (`openai/...` -> OPENAI_API_KEY)."""
    provider = model.split("/", 1)[0].upper() if "/" in model else "OPENAI"
    return f"{provider}_API_KEY"


def _provider_key(model: str) -> str | None:
    return os.environ.get(provider_key_variable(model))


class _Progress:
    """One live line on a terminal: spend, calls and a budget bar, redrawn every quarter second.

    Whatever else prints meanwhile (DSPy's prints, log lines, our own warnings) goes through `_Guarded`
    streams that clear the line first and redraw it after, so the two never share a line; DSPy's tqdm bars
    are switched off for the demo (TQDM_DISABLE). Not on a terminal: a plain line at each quarter of the
    budget."""

    WIDTH = 20

    def __init__(self, guard, stream=None):
        import threading

        self.guard, self.stop = guard, threading.Event()
        self.out = stream or sys.stdout
        self.tty = self.out.isatty()
        self.lock = threading.RLock()
        self.shown = ""
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self._saved: list = []

    def line(self) -> str:
        g = self.guard
        share = g.spent_usd / g.limit_usd if g.limit_usd else 0.0
        filled = min(self.WIDTH, int(share * self.WIDTH))
        projected = f", compile projected ${g.projected_usd:.6f}" if g.projected_usd is not None else ""
        return (f"  [{'#' * filled}{'.' * (self.WIDTH - filled)}] {int(100 * share):3d}%  "
                f"${g.spent_usd:.6f} of ${g.limit_usd:.4f}, {g.call_count} calls{projected}")

    def clear(self) -> None:
        if self.tty and self.shown:
            self.out.write("\r\x1b[K")
            self.shown = ""

    def draw(self) -> None:
        if self.tty:
            self.shown = self.line()
            self.out.write("\r\x1b[K" + self.shown)
            self.out.flush()

    def _loop(self) -> None:
        quarter = -1
        while not self.stop.wait(0.25):
            with self.lock:
                if self.tty:
                    self.draw()
                else:
                    g = self.guard
                    now = int(4 * g.spent_usd / g.limit_usd) if g.limit_usd else 0
                    if now != quarter:
                        quarter = now
                        self.out.write(self.line() + "\n")
                        self.out.flush()

    def __enter__(self):
        if self.tty:
            import logging

            self._saved = [(sys, "stdout", sys.stdout), (sys, "stderr", sys.stderr)]
            sys.stdout, sys.stderr = _Guarded(sys.stdout, self), _Guarded(sys.stderr, self)
            for name in (None, "dspy", "otel_dspy_cost"):
                for handler in logging.getLogger(name).handlers:
                    stream = getattr(handler, "stream", None)
                    if stream in (sys.__stdout__, sys.__stderr__, self._saved[0][2], self._saved[1][2]):
                        self._saved.append((handler, "stream", stream))
                        handler.stream = _Guarded(stream, self)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        with self.lock:
            for owner, attr, value in reversed(self._saved):
                setattr(owner, attr, value)
            self._saved = []
            if self.tty:
                self.out.write("\r\x1b[K" + self.line() + "\n")  # the final figures stay on screen
                self.out.flush()


class _Guarded:
    """A stream that clears the progress line before anything else is written and redraws it after a
    completed line."""

    def __init__(self, stream, progress: _Progress):
        self._stream, self._progress = stream, progress

    def write(self, text: str) -> int:
        with self._progress.lock:
            self._progress.clear()
            n = self._stream.write(text)
            self._stream.flush()
            if text.endswith("\n"):
                self._progress.draw()
            return n

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


# The demo's cap for its default model: it trips partway through the evaluation.
DEFAULT_BUDGET_USD = 0.012
_REFERENCE_MODEL = "openai/gpt-4o-mini"


def default_budget(model: str) -> float:
    """The default cap scaled by the model's price (a call of 500 input and 100 output tokens, standard rates), so
    the demo trips at the same point whichever model it is priced as."""
    from otel_dspy_cost import pricing

    def reference_call(name: str) -> float:
        rates = pricing.lookup(name).standard_rates
        return 500 * (rates.input or 0.0) + 100 * (rates.output or 0.0)

    ours, reference = reference_call(model), reference_call(_REFERENCE_MODEL)
    return round(DEFAULT_BUDGET_USD * ours / reference, 6) if ours > 0 and reference > 0 else DEFAULT_BUDGET_USD


def run(args: argparse.Namespace) -> int:
    """Estimate, then compile (RandomSearch: 4 scored trials) and evaluate the demo program under a budget
    that trips partway, against the built-in simulator on 127.0.0.1 (speaking OpenAI, Anthropic or Gemini as
    --model asks; no API key, no network), and write the run's artifacts. With --model and that provider's
    API key, the same runs for real."""
    import contextlib

    os.environ.setdefault("TQDM_DISABLE", "1")  # DSPy's progress bars would fight our progress line
    import dspy

    import otel_dspy_cost
    from otel_dspy_cost.optimizers.estimate import estimate
    from otel_dspy_cost.reports.run_report import render, run_report
    from otel_dspy_cost.simulator import SimulatorServer

    model = args.model or "openai/gpt-4o-mini"
    try:
        otel_dspy_cost.pricing.lookup(model)
    except otel_dspy_cost.pricing.UnknownModelError as exc:  # a typo would otherwise run, priced as unknown
        print(f"error: {exc}", file=sys.stderr)
        return 2
    real = args.model is not None and _provider_key(model) is not None
    if args.budget is None:
        args.budget = default_budget(model)
    otel_dspy_cost.instrument(unknown_model="warn")
    questions = [f"What drives cost in DSPy optimizer run {i}?" for i in range(args.examples)]
    devset = [dspy.Example(question=q, answer="cost").with_inputs("question") for q in questions]
    trainset = [dspy.Example(question=f"Which module of pipeline {i} costs most?", answer="cost")
                .with_inputs("question") for i in range(4)]
    optimizer = dspy.BootstrapFewShotWithRandomSearch(metric=lambda e, p, t=None: True, max_bootstrapped_demos=1,
                                                      max_labeled_demos=0, num_candidate_programs=1, num_threads=2)
    program = demo_program()
    stages = []
    for stage, opt, sizes in (("compile (RandomSearch)", optimizer, {"trainset_size": len(trainset)}),
                              ("evaluate", None, {"devset_size": len(devset)})):
        est = estimate(program, model=model, optimizer=opt, max_tokens=400, input_chars=60, budget_usd=args.budget,
                       **sizes)
        stages.append(est)
        print(f"estimate, {stage}: {est.summary()}")
    projected = stages[0] + stages[1]
    print(f"estimate, whole run: {projected.summary()}")
    with contextlib.ExitStack() as stack:
        if real:
            lm = dspy.LM(model, cache=False, max_tokens=400)
            print(f"real provider for {model}; budget ${args.budget:.4f}")
        else:
            server = stack.enter_context(SimulatorServer())
            lm = dspy.LM(model, api_base=server.api_base, api_key="sim-no-key", cache=False, max_tokens=400)
            print(f"simulated provider on {server.api_base}, priced as {model}; budget ${args.budget:.4f}")
        guard = otel_dspy_cost.budget(limit_usd=args.budget, label="demo", warn_at=0.75)
        run = stack.enter_context(otel_dspy_cost.record_run(args.out, budget=guard, estimate=projected))
        if run.previous is not None:
            print(f"the earlier run in {args.out} was moved to {run.previous}")
        try:
            with guard, dspy.context(lm=lm), _Progress(guard):
                compiled = optimizer.compile(program, trainset=trainset)
                evaluate = dspy.Evaluate(devset=devset, metric=lambda e, p, t=None: 1.0, num_threads=2,
                                         display_progress=False)
                run.score = evaluate(compiled).score
            print(f"finished within budget: ${guard.spent_usd:.6f} of ${args.budget:.4f}")
        except otel_dspy_cost.BudgetExceededError as stop:
            print(f"BUDGET STOP: {stop}")
        from otel_dspy_cost import _runtime

        _runtime.wait_for_calls()  # calls already in flight in worker threads when the stop came
        requests = "" if real else f"provider requests made: {server.count}; "
        print(f"{requests}budget status: {guard.status}; spent ${guard.spent_usd:.6f} of ${args.budget:.4f} in "
              f"{guard.call_count} calls")
    print(render(run_report(args.out)))
    print(f"artifacts: {args.out}/costs.jsonl, {args.out}/summary.json "
          f"(again: otel-dspy-cost report {args.out})")
    return 0
