"""The `otel-dspy-cost` command: `commands` parses and dispatches, `demo` is the README's main job."""

from otel_dspy_cost.cli.commands import main

__all__ = ["main"]
