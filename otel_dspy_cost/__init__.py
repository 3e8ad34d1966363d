"""otel-dspy-cost: DSPy programs as OpenTelemetry traces, with USD cost and hard budgets.

    import otel_dspy_cost
    otel_dspy_cost.instrument()
    with otel_dspy_cost.budget(limit_usd=5.0, label="compile") as b:
        optimizer.compile(program, trainset=train)

Data flow: DSPy call points (wrappers, `_dspy_patches`; threads, `_threads`; optimizer trials,
`_optimizers`) -> one `LMCall` per provider call (`_lm_span`) -> the accounting station (`_accounting`:
worst case priced by `_costing`/`pricing`, reserved in each budget's ledger, `_ledger` /
`_shared_ledgers`, then settled; spend report, metrics `_metrics`, `record_run`'s cost log) -> the span
(`BudgetSpanProcessor`: roll-up tree, and the budget gate for other instrumentations' LM spans) -> the
tracer provider's exporters. See docs/architecture.md.
"""

import os as _os

# LiteLLM fetches its price map online at import unless told otherwise; we never want that.
_os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from . import pricing  # noqa: E402
from .artifacts import record_run  # noqa: E402
from .budget import (  # noqa: E402
    Budget,
    BudgetExceededError,
    ForkedBudgetError,
    LedgerUnavailableError,
    ScopeExhaustedError,
    UnpricedModelError,
    budget,
    scope,
)
from .estimate import Estimate, estimate  # noqa: E402
from .guarded import CompileResult, NothingUsableError, guarded_compile  # noqa: E402
from .instrumentor import DSPyCostInstrumentor, instrument, uninstrument  # noqa: E402
from .processor import BudgetSpanProcessor  # noqa: E402
from .report import spend_report  # noqa: E402

__all__ = [
    "Budget",
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
    "record_run",
    "scope",
    "spend_report",
    "uninstrument",
]
