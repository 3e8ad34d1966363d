"""otel-dspy-cost: DSPy programs as OpenTelemetry traces, with USD cost and hard budgets.

    import otel_dspy_cost
    otel_dspy_cost.instrument()
    with otel_dspy_cost.budget(limit_usd=5.0, label="compile") as b:
        optimizer.compile(program, trainset=train)

Data flow, one package per station (docs/architecture.md has the picture): DSPy call points wrapped by
`instrumentation` (its `patches`, thread hand-offs, optimizer hooks from `optimizers`) -> one `LMCall` per
provider call -> the accounting station in `budgets` (worst case priced by `pricing`, reserved in each
budget's ledger from `ledgers`, then settled; spend totals, metrics, `record_run`'s cost log) -> the span,
where `telemetry`'s `BudgetSpanProcessor` rolls cost up the tree (and gates other instrumentations' LM
spans) -> the tracer provider's exporters. `reports` and `cli` read what the stations recorded.
"""

import os as _os

# LiteLLM fetches its price map online at import unless told otherwise; we never want that. The one place it
# is set: every module of this package (and `python -m otel_dspy_cost.cli`) runs this file first.
_os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from otel_dspy_cost import pricing  # noqa: E402
from otel_dspy_cost.budgets.budget import Budget, budget, scope  # noqa: E402
from otel_dspy_cost.errors import (
    AdmissionBypassedError,
    BudgetExceededError,
    ForkedBudgetError,
    LedgerUnavailableError,
    NothingUsableError,
    ScopeExhaustedError,
    UnpricedModelError,
)
from otel_dspy_cost.instrumentation.instrumentor import DSPyCostInstrumentor, instrument, uninstrument  # noqa: E402
from otel_dspy_cost.instrumentation.processes import process_initializer  # noqa: E402
from otel_dspy_cost.optimizers.estimate import Estimate, estimate  # noqa: E402
from otel_dspy_cost.optimizers.guarded import CompileResult, guarded_compile  # noqa: E402
from otel_dspy_cost.reports.artifacts import record_run  # noqa: E402
from otel_dspy_cost.reports.spend import spend_report  # noqa: E402
from otel_dspy_cost.telemetry.processor import BudgetSpanProcessor  # noqa: E402

__all__ = [
    "Budget",
    "AdmissionBypassedError",
    "BudgetExceededError",
    "BudgetSpanProcessor",
    "CompileResult",
    "DSPyCostInstrumentor",
    "Estimate",
    "ForkedBudgetError",
    "LedgerUnavailableError",
    "NothingUsableError",
    "ScopeExhaustedError",
    "UnpricedModelError",
    "budget",
    "estimate",
    "guarded_compile",
    "instrument",
    "pricing",
    "process_initializer",
    "record_run",
    "scope",
    "spend_report",
    "uninstrument",
]
