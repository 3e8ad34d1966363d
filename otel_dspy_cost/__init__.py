"""otel-dspy-cost: DSPy programs as OpenTelemetry traces, with USD cost and hard budgets.

    import otel_dspy_cost
    otel_dspy_cost.instrument()
    with otel_dspy_cost.budget(limit_usd=5.0, label="compile") as b:
        optimizer.compile(program, trainset=train)

Data flow: DSPy call points (wrappers, `_dspy_patches`; optimizer trials, `_optimizers`) -> spans
with GenAI usage and cost (`_lm_span`, `pricing`) -> `BudgetSpanProcessor` (reservations in a ledger,
`_ledger` / `_shared_ledgers`; roll-ups; spend report; metrics, `_metrics`) -> the tracer provider's
exporters (and `artifacts.record_run`'s cost log). See docs/architecture.md.
"""

import os as _os

# LiteLLM fetches its price map online at import unless told otherwise; we never want that.
_os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from . import pricing  # noqa: E402
from .artifacts import record_run  # noqa: E402
from .budget import (  # noqa: E402
    Budget,
    BudgetExceededError,
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
