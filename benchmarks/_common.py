"""Shared pieces of the benchmarks: an in-process LM, the programs, providers that export nowhere.

The LM is a real `dspy.BaseLM` subclass whose `forward` builds an OpenAI-shaped response in
process (no HTTP), so a DSPy call costs what DSPy itself costs and the instrumentation's share is
easy to see. Every benchmark measures its baseline in the same process run and prints ratios.
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from collections.abc import Callable, Sequence

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import dspy  # noqa: E402
from litellm import ModelResponse  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult  # noqa: E402

from otel_dspy_cost.simulator import SimulatedLM  # noqa: E402

MODEL = "openai/gpt-4o-mini"


class InProcessLM(dspy.BaseLM):
    """A fast LM: the simulator's answer policy and usage, without a socket."""

    def __init__(self, max_tokens: int = 256):
        super().__init__(model=MODEL, max_tokens=max_tokens)
        self.sim = SimulatedLM()

    def forward(self, prompt=None, messages=None, **kwargs):
        body = {"model": self.model, "messages": messages or [{"role": "user", "content": prompt}]}
        text, usage = self.sim.complete(body)
        return ModelResponse(id="bench", model="gpt-4o-mini", usage=usage,
                             choices=[{"index": 0, "finish_reason": "stop",
                                       "message": {"role": "assistant", "content": text}}])


class NullExporter(SpanExporter):
    """Exports nowhere, so the benchmark measures span creation and processing, not a network."""

    def export(self, spans):
        return SpanExportResult.SUCCESS

    def shutdown(self):
        return None


def batch_provider(**options) -> TracerProvider:
    provider = TracerProvider(**options)
    provider.add_span_processor(BatchSpanProcessor(NullExporter(), max_queue_size=65536))
    return provider


class FourModules(dspy.Module):
    """planner -> researcher -> critic -> writer: four predictors, four LM calls per run."""

    def __init__(self):
        super().__init__()
        self.planner = dspy.Predict("question -> plan")
        self.researcher = dspy.Predict("plan -> notes")
        self.critic = dspy.Predict("notes -> critique")
        self.writer = dspy.Predict("question, notes, critique -> answer")

    def forward(self, question):
        plan = self.planner(question=question).plan
        notes = self.researcher(plan=plan).notes
        critique = self.critic(notes=notes).critique
        return self.writer(question=question, notes=notes, critique=critique)


def one_predict() -> dspy.Module:
    return dspy.Predict("question -> answer")


class Variant:
    """One way of running the programs (uninstrumented, ours, another instrumentation): on, measure, off."""

    def __init__(self, name: str, on: Callable[[], object], off: Callable[[], object]):
        self.name, self.on, self.off = name, on, off


def interleaved(variants: Sequence[Variant], programs: dict[str, dspy.Module], calls: int,
                rounds: int) -> dict[tuple[str, str], float]:
    """Median seconds per program call for each (program, variant), measured as paired differences.

    This VM's speed drifts by up to 2x within seconds (identical back-to-back bursts of the same
    uninstrumented calls differ that much), which swamps a 100 us difference between variants measured
    minutes apart. So every variant's burst is sandwiched between two bursts of the first variant (the
    baseline), and its cost is the median over rounds of (its burst - the mean of the two around it); the
    value returned is the baseline's median plus that. Variants take turns round by round."""
    base, rest = variants[0], variants[1:]
    base_samples: dict[str, list[float]] = {p: [] for p in programs}
    diffs: dict[tuple[str, str], list[float]] = {(p, v.name): [] for p in programs for v in rest}

    def burst(pname: str, program: dspy.Module) -> float:
        gc.collect()
        return time_per_call(lambda i: program(question=f"question {i}"), calls)

    for _ in range(rounds):
        for v in rest:
            for pname, program in programs.items():
                time_per_call(lambda i, program=program: program(question=f"warm {i}"), 5)
                before = burst(pname, program)
                v.on()
                try:
                    time_per_call(lambda i, program=program: program(question=f"warm {i}"), 5)
                    during = burst(pname, program)
                finally:
                    v.off()
                after = burst(pname, program)
                base_samples[pname] += [before, after]
                diffs[(pname, v.name)].append(during - (before + after) / 2)
    out = {(p, base.name): median(xs) for p, xs in base_samples.items()}
    out.update({key: out[(key[0], base.name)] + median(xs) for key, xs in diffs.items()})
    return out


def time_per_call(fn: Callable[[int], object], n: int) -> float:
    """Seconds per call of fn(i) over n calls."""
    start = time.perf_counter()
    for i in range(n):
        fn(i)
    return (time.perf_counter() - start) / n


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def rss_mb() -> float:
    """Resident set size now (Linux /proc), in MiB."""
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
