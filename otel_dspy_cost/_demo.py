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


def _provider_key(model: str) -> str | None:
    provider = model.split("/", 1)[0].upper() if "/" in model else "OPENAI"
    return os.environ.get(f"{provider}_API_KEY")


class _Progress:
    """A live spend-vs-budget line while the run goes (on a terminal; a few plain lines otherwise)."""

    def __init__(self, guard):
        import threading

        self.guard, self.stop = guard, threading.Event()
        self.tty = sys.stdout.isatty()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        shown = -1
        while not self.stop.wait(0.25):
            g = self.guard
            pct = int(100 * g.spent_usd / g.limit_usd) if g.limit_usd else 0
            line = f"  spend ${g.spent_usd:.6f} of ${g.limit_usd:.4f} ({pct}%), {g.call_count} calls"
            if self.tty:
                print("\r" + line, end="", flush=True)
            elif pct // 25 != shown:
                shown = pct // 25
                print(line, flush=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        if self.tty:
            print()


def run(args: argparse.Namespace) -> int:
    """Estimate, then compile (RandomSearch: 4 scored trials) and evaluate the demo program under a budget
    that trips partway, against the built-in OpenAI-compatible simulator on 127.0.0.1 (no API key, no network), and
    write the run's artifacts. With --model and that provider's API key, the same runs for real."""
    import contextlib

    import dspy

    import otel_dspy_cost
    from otel_dspy_cost._run_report import render, run_report
    from otel_dspy_cost.estimate import estimate
    from otel_dspy_cost.simulator import SimulatorServer

    model = args.model or "openai/gpt-4o-mini"
    real = args.model is not None and _provider_key(model) is not None
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
