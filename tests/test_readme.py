"""The README's samples run as printed (with a real program where the sample says `my_program`)."""

import re
from pathlib import Path

import dspy
from conftest import ResearchAgent

import otel_dspy_cost

README = Path(__file__).resolve().parent.parent / "README.md"


def _block(marker):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    return next(b for b in blocks if marker in b)


def test_the_own_program_sample_runs_under_its_cap_on_this_dspy(otel, caplog):
    code = _block("SimulatorServer() as sim")
    spent = {}

    def my_program(question):
        result = ResearchAgent()(question=question)
        spent["budget"] = next(iter(otel_dspy_cost._context.current().budgets))
        return result

    namespace = {"dspy": dspy, "otel_dspy_cost": otel_dspy_cost, "my_program": my_program}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own README, as a user would paste it
    b = spent["budget"]
    assert b.call_count == 5 and 0 < b.spent_usd <= 0.05 and b.status in ("within_budget", "warned")
