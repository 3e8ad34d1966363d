"""`otel-dspy-cost estimate`: load the program, run a pilot if asked, print the projection (exit 1 over budget
in CI or with --strict)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from otel_dspy_cost._redact import scrub
from otel_dspy_cost.cli.commands import _UsageError


def _load_program(spec: str) -> Any:
    """`module:attr` of a dspy.Module instance, a Module class, or a function making one. The current
    folder is importable, as for `python -m`: `--program my_app:build` works from the script's folder."""
    import importlib

    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    module, _, attr = spec.partition(":")
    try:
        target = getattr(importlib.import_module(module), attr or "program")
    except (ImportError, AttributeError) as exc:
        raise _UsageError(f"--program {spec}: {exc}") from None
    if isinstance(target, type) or (callable(target) and not hasattr(target, "named_predictors")):
        try:
            target = target()
        except Exception as exc:  # noqa: BLE001 - e.g. dspy:ChainOfThought, a class that needs a signature
            raise _UsageError(f"--program {spec}: calling {spec} with no arguments failed ({type(exc).__name__}: "
                              f"{exc}); point at a program instance, or a function that builds one") from None
    if not hasattr(target, "named_predictors"):
        raise _UsageError(f"--program {spec}: {type(target).__name__} is not a dspy.Module")
    return target


_ESTIMATE_FLAGS = {"trainset_size=": "--trainset", "devset_size=": "--devset", "optimizer=": "--optimizer",
                   "trainset_size": "--trainset", "valset_size": "--valset", "devset_size": "--devset",
                   "max_tokens": "--max-tokens", "input_chars": "--input-chars", "cache_hit_rate": "--cache-hit-rate",
                   "budget_usd": "--budget", "max_metric_calls": "--max-metric-calls", "demos": "--demos",
                   "pilot_budget_usd": "--pilot-budget"}


def _pilot(program: Any, args: argparse.Namespace) -> list[Any]:
    """`--pilot N`: N synthetic examples, run with the LM the program's module configured, else `--model` (at
    `--api-base`, its key from the provider's usual variable)."""
    import dspy

    from otel_dspy_cost.cli.demo import provider_key_variable
    from otel_dspy_cost.optimizers.pilot import synthetic_examples

    if args.pilot < 1:
        raise ValueError(f"--pilot must be at least 1 example, not {args.pilot}")
    if dspy.settings.lm is None:
        variable = provider_key_variable(args.model)
        key = os.environ.get(variable) or ("unused" if args.api_base else None)
        if key is None:  # a real provider without its key: said before any call, not as the provider's error
            raise ValueError(f"--pilot runs the program for real with {args.model}: set {variable}, or "
                             f"point --api-base at an OpenAI-compatible server")
        dspy.configure(lm=dspy.LM(args.model, api_base=args.api_base, api_key=key, max_tokens=args.max_tokens))
    return synthetic_examples(program, args.pilot, args.input_chars)


def run(args: argparse.Namespace) -> int:
    from otel_dspy_cost.errors import PilotFailedError, UnknownModelError
    from otel_dspy_cost.optimizers.estimate import estimate

    if args.program == "demo":
        from otel_dspy_cost.cli.demo import demo_program

        program = demo_program()
    else:
        program = _load_program(args.program)
    try:
        pilot = _pilot(program, args) if args.pilot is not None else None
        est = estimate(program, model=args.model, optimizer=args.optimizer, trainset_size=args.trainset,
                       valset_size=args.valset, devset_size=args.devset, max_tokens=args.max_tokens,
                       input_chars=args.input_chars, cache_hit_rate=args.cache_hit_rate, budget_usd=args.budget,
                       demos=args.demos, max_metric_calls=args.max_metric_calls, pilot=pilot,
                       pilot_budget_usd=args.pilot_budget)
    except (UnknownModelError, PilotFailedError, ValueError, TypeError) as exc:  # said in one line
        message = scrub(str(exc))
        for name, flag in _ESTIMATE_FLAGS.items():  # the API's argument names, as this command spells them
            message = message.replace(name, flag)
        print(f"error: {message}", file=sys.stderr)
        return 2
    if args.json:
        from dataclasses import asdict

        print(json.dumps(asdict(est), indent=1))
    else:
        print(est.summary())
        for stage, numbers in est.stages.items():
            print(f"  {stage:22s} {numbers}")
        for note in est.assumptions:
            print(f"  - {note}")
    if est.exceeds_budget:
        print(f"projection ${est.usd_high:.6f} may exceed the budget ${args.budget:.6f}", file=sys.stderr)
        return 1 if os.environ.get("CI") or args.strict else 0
    return 0


