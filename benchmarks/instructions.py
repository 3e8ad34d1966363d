"""Instructions per program call, counted by valgrind: the overhead table without this VM's timing noise.

    python benchmarks/instructions.py [--calls 20] [--only "baseline;otel-dspy-cost;..."] [--parts 200]

Why instructions: wall-clock (and CPU) time on the machines we measure on drifts by up to 2x within
seconds, so a 100 us difference between variants moves by half its size from one run to the next even
with paired bursts (`benchmarks/overhead.py`). The number of instructions a call executes does not
drift: the same code counts the same, run after run, to a fraction of a percent. It is a proxy (a cache
miss costs more than an add; it leaves out time spent waiting), and the wall-clock table stays the
measurement of record for microseconds; this one decides which variant does more work, and by how much.

The script runs itself under `valgrind --tool=callgrind` (Debian package `valgrind`) and, in that one
process, for each variant of `benchmarks/overhead.py`: switches it on, warms up, zeroes the counters
(`callgrind_control -z`), makes `--calls` program calls, dumps the counters (`callgrind_control -d`) and
switches it off. The instructions of a zero-then-dump with no call between are subtracted. Starting
Python and importing DSPy under valgrind takes a few minutes; the calls themselves run ~50x slower.
"""

from __future__ import annotations

import argparse
import gc
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import warnings

warnings.simplefilter("ignore")  # DSPy 3.4 deprecates BaseLM.forward(); the path is still what users run

_UNDER = "OTEL_DSPY_COST_BENCH_UNDER_CALLGRIND"  # set for the run inside valgrind: the dump directory


def _outside(argv: list[str]) -> int:
    """Re-run this script under callgrind, then print the table from its dumps."""
    _parser().parse_args(argv)  # --help and bad arguments answer here, not minutes later under valgrind
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("valgrind is not installed (Debian: apt-get install valgrind)", file=sys.stderr)
        return 2
    out = tempfile.mkdtemp(prefix="callgrind-")
    env = {**os.environ, _UNDER: out, "PYTHONHASHSEED": "0", "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}/cg.out", "--dump-instr=no",
           "--compress-strings=no", sys.executable, os.path.abspath(__file__), *argv]
    run = subprocess.run(cmd, env=env, stderr=subprocess.PIPE, text=True)
    if run.returncode != 0:
        print(run.stderr[-3000:], file=sys.stderr)
        return run.returncode
    labels: dict[int, str] = {}
    with open(os.path.join(out, "labels.txt")) as fh:
        for line in fh:
            number, label = line.rstrip("\n").split("\t", 1)
            labels[int(number)] = label
    counts = {}
    for path in sorted(glob.glob(os.path.join(out, "cg.out.*")), key=lambda p: int(p.rsplit(".", 1)[1])):
        number = int(path.rsplit(".", 1)[1])
        with open(path) as fh:
            summary = next(int(line.split()[1]) for line in fh if line.startswith("summary:"))
        counts.setdefault(labels[number], []).append(summary)  # in the order measured, as overhead.py lists them
    _report(counts, argv)
    shutil.rmtree(out, ignore_errors=True)
    return 0


def _report(counts: dict[str, list[int]], argv: list[str]) -> None:
    args = _parser().parse_args(argv)
    empties = sorted(counts.pop("(empty)", [0]))
    empty = empties[len(empties) // 2]
    parts = {key.split("|", 1)[1]: counts.pop(key)[0] for key in [k for k in counts if k.startswith("parts|")]}
    per_call = {}
    for key, (total,) in counts.items():
        program, variant = key.split("|", 1)
        per_call[(program, variant)] = max(0, total - empty) / args.calls
    programs = list(dict.fromkeys(p for p, _ in per_call))
    print(f"instructions per program call (valgrind callgrind, {args.calls} calls per variant; the counting's own "
          f"{empty:,} subtracted, {empties[0]:,}..{empties[-1]:,} in {len(empties)} empty measurements)")
    for program in programs:
        base = per_call[(program, "baseline")]
        rows = {v: n for (p, v), n in per_call.items() if p == program}
        print(f"\n{program}: baseline {base:,.0f}")
        print(f"  {'variant':22s} {'instr/call':>12s} {'added':>11s} {'ratio':>6s}")
        for variant, n in rows.items():
            print(f"  {variant:22s} {n:12,.0f} {n - base:11,.0f} {n / base:6.2f}x")
        added = {v: n - base for v, n in rows.items()}
        oi = added.get("openinference")
        if oi and oi > 0:
            for ours in ("otel-dspy-cost", "ours, adapter spans", "ours, lean"):
                if ours in added:
                    print(f"  {ours} added = {added[ours] / oi:.0%} of openinference's")
        for ours, floor in (("otel-dspy-cost", "SDK floor, 2 spans"), ("ours, adapter spans", "SDK floor, 4 spans"),
                            ("ours, lean", "SDK floor, 2 spans"), ("otel-dspy-cost", "SDK floor, 2 spans+attrs")):
            if ours in added and floor in added:
                print(f"  {ours}: {added[ours] - added[floor]:,.0f} above {floor} "
                      f"({added[ours] / added[floor]:.2f}x the floor's own)")
        for sampled in ("ours, sampled out", "sampled, no metrics"):
            if sampled in added:
                print(f"  {sampled}: {added[sampled]:,.0f} added = {added[sampled] / base:.1%} of the baseline call")
    if parts:
        print(f"\nthe accounting station's pieces (sampled out, one budget), instructions per call of each "
              f"({args.parts} calls; indented: a part of the piece above):")
        for name, total in parts.items():
            print(f"  {name:42s} {max(0, total - empty) / args.parts:10,.0f}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20, help="program calls per variant (each ~50x slower here)")
    parser.add_argument("--only", default="", help="variant names to run, ';'-separated (baseline is always run)")
    parser.add_argument("--programs", default="one Predict;4-module program")
    parser.add_argument("--parts", type=int, default=0, metavar="N",
                        help="also count the accounting station's pieces, N calls of each (200 is steady)")
    return parser


def _parts(n: int, measured) -> None:
    """The pieces of one sampled-out LM call under a budget, each run `n` times on the objects instrument()
    builds (ALWAYS_OFF provider, SDK MeterProvider, one budget): where a sampled-out call's instructions go."""
    from _common import InProcessLM, dspy, one_predict
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

    import otel_dspy_cost
    from otel_dspy_cost import _runtime
    from otel_dspy_cost.instrumentation import lm_call, patches
    from otel_dspy_cost.pricing.cost import usage_from_openai

    lm, program = InProcessLM(), one_predict()
    messages = dspy.ChatAdapter().format(program.signature, demos=[], inputs={"question": "question 1"})
    usage = {"prompt_tokens": 120, "completion_tokens": 20, "total_tokens": 140,
             "prompt_tokens_details": {"cached_tokens": 0}, "completion_tokens_details": {"reasoning_tokens": 0}}
    meters, tracing = MeterProvider(metric_readers=[InMemoryMetricReader()]), TracerProvider(sampler=ALWAYS_OFF)
    otel_dspy_cost.instrument(tracer_provider=tracing, meter_provider=meters, unknown_model="warn")
    budget = otel_dspy_cost.budget(limit_usd=1e9, label="bench").__enter__()
    try:
        rt = _runtime.active()
        accountant, engine, ledger = rt.accountant, rt.engine, budget.ledger
        billed = usage_from_openai(usage)
        calls = [lm_call.new_call(lm, None, messages, {})[0] for _ in range(n)]

        def each(fn):  # fn(call) over the calls made above, in order
            it = iter(calls)
            return lambda: fn(next(it))

        def priced(call):
            call.usage = billed
            lm_call.price(rt, call, None, messages, ["answer"])

        def module_span():
            patches._module_end(patches._module_begin(program, (), {"question": "q"}), None, None)

        def reserve_settle():
            ledger.settle(ledger.reserve([budget.account], 1e-5, "infer"), 1e-5, 1e-5)

        in_flight = accountant._in_flight
        pieces = [
            ("the call record (LMCall)", lambda: lm_call.new_call(lm, None, messages, {})),
            ("  its prompt token bound", lambda: lm_call.input_tokens_bound(None, messages, {})),
            ("admission (reserve the worst case)", each(accountant.admit)),
            ("  the worst case", lambda: engine.worst_case(lm.model, 500, None, 1)),
            ("pricing the call", each(priced)),
            ("  the cost arithmetic", lambda: engine.cost(lm.model, billed)),
            ("settlement", each(accountant.settle)),
            ("  metrics", lambda: accountant.metrics.record_call(
                module="x", model=lm.model, provider="openai", operation="chat", phase="infer", budget_label="bench",
                optimizer="", usd=1e-5, economic_usd=1e-5, input_tokens=100, output_tokens=10, cache_hit=False,
                unknown=False, duration_s=0.1)),
            ("  spend report row", lambda: accountant.aggregator.add(("x", "m", "infer", ("bench",), None), 1, 1e-5,
                                                                     1e-5, 100, 0, 10, 0, 0, 0, 0)),
            ("  the warn check", budget.after_settle),
            ("ledger reserve+settle pair", reserve_settle),
            ("in-flight count in and out", lambda: (in_flight.add(), in_flight.done())),
            ("reading the usage dict", lambda: usage_from_openai(usage)),
            ("module span begin+end, nothing recorded", module_span),
        ]
        for name, fn in pieces:
            measured(f"parts|{name}", lambda fn=fn: [fn() for _ in range(n)])
    finally:
        budget.__exit__(None, None, None)
        otel_dspy_cost.uninstrument()
        tracing.shutdown()
        meters.shutdown()


def _inside(argv: list[str]) -> None:
    """In valgrind: each variant's calls between a zero and a dump of the counters."""
    args = _parser().parse_args(argv)
    out = os.environ[_UNDER]
    from _common import FourModules, InProcessLM, dspy, one_predict
    from overhead import variants

    pid = str(os.getpid())
    labels: list[str] = []

    def control(flag: str) -> None:
        # os.system, not subprocess: libc's system() runs a fixed, short path in this process (the counts
        # include it), where subprocess.run's pipe handling varies by millions of instructions between calls.
        if os.system(f"callgrind_control {flag} {pid} >/dev/null 2>&1") != 0:
            raise RuntimeError(f"callgrind_control {flag} failed")

    def measured(label: str, fn) -> None:
        gc.collect()  # every burst starts from a collected heap: a full collection inside one would count millions
        control("-z")
        fn()
        control("-d")
        labels.append(label)

    dspy.configure(lm=InProcessLM())
    known = {"one Predict": one_predict, "4-module program": FourModules}
    programs = {name: known[name]() for name in args.programs.split(";")}
    wanted = {n for n in args.only.split(";") if n}
    chosen = [v for v in variants() if v.name == "baseline" or not wanted or v.name in wanted]
    for program in programs.values():
        for i in range(3):
            program(question=f"warm {i}")
    for _ in range(3):  # the counting's own cost: the same every time (the median is subtracted)
        measured("(empty)", lambda: None)
    for pname, program in programs.items():
        for variant in chosen:
            variant.on()
            try:
                for i in range(3):
                    program(question=f"warm {i}")
                measured(f"{pname}|{variant.name}",
                         lambda program=program: [program(question=f"question {i}") for i in range(args.calls)])
            finally:
                variant.off()
    if args.parts:
        _parts(args.parts, measured)
    with open(os.path.join(out, "labels.txt"), "w") as fh:  # dump n (1-based) is labels[n - 1]
        for n, label in enumerate(labels, 1):
            fh.write(f"{n}\t{label}\n")


if __name__ == "__main__":
    if os.environ.get(_UNDER):
        _inside(sys.argv[1:])
    else:
        sys.exit(_outside(sys.argv[1:]))
