"""Every exception this package raises to the user's code, in one place, so one import catches them.

Why the budget errors derive from `BaseException`: DSPy catches `Exception` in callbacks, `Evaluate`,
`ParallelExecutor`, BootstrapFewShot, MIPROv2's candidate evaluation, ReAct tools, BestOfN and Refine.
An `Exception` raised there would be logged and the run would carry on (and keep spending). A
`BaseException` passes through all of them, like `KeyboardInterrupt` does. Catch it by name:
`except otel_dspy_cost.BudgetExceededError:`; a bare `except Exception` will not.
"""

from __future__ import annotations


class BudgetExceededError(BaseException):
    """A budget refused a provider call. Raised before the call: nothing past the cap was spent."""

    def __init__(self, message: str, *, label: str, spent_usd: float, limit: float, reason: str,
                 requested_usd: float = 0.0, term: str | None = None):
        super().__init__(message)
        self.label = label
        self.spent_usd = spent_usd
        self.limit = limit
        self.limit_usd = limit
        self.reason = reason
        self.requested_usd = requested_usd
        self.term = term


class ProjectedOverrunError(BudgetExceededError):
    """A compile under `budget(stop_on_projection=True)` was stopped between trials: its projected spend passes
    the cap even at its cheapest trial so far. A budget stop: `guarded_compile()` returns the best so far."""

    def __init__(self, message: str, *, budget: object, projected_usd: float):
        super().__init__(message, label=getattr(budget, "label", "?"), spent_usd=getattr(budget, "spent_usd", 0.0),
                         limit=getattr(budget, "limit_usd", None) or 0.0, reason="projected_overrun")
        self.projected_usd = projected_usd


class PilotFailedError(RuntimeError):
    """`estimate(pilot=...)`: the program failed on a pilot example (the provider refused a key or a model,
    the program raised); the message names the run and the cause."""


class ScopeExhaustedError(BudgetExceededError):
    """A `scope()` sub-limit ran out; the scope's `with` block ends, the enclosing run goes on."""


class LedgerUnavailableError(BudgetExceededError):
    """The shared ledger could not be reached and the policy is fail_closed: the call was not made."""


class ForkedBudgetError(BudgetExceededError):
    """An in-process budget was inherited through `os.fork`: the child cannot count against the parent's cap."""


class AdmissionBypassedError(BudgetExceededError):
    """An LM request was about to leave under a budget without passing its admission (our wrapper was taken
    off by something else): refused, because a budget must never turn off silently."""


class UnpricedModelError(BaseException):
    """A call to a model with no known price was about to be made under a USD budget (or under the
    unknown-model policy `error`): refused before it was sent."""


class NothingUsableError(RuntimeError):
    """The budget stopped the compile before any candidate was evaluated or any demo gathered."""


class LedgerUnavailable(ConnectionError):
    """The shared ledger could not be reached."""


class CatalogError(ValueError):
    """A catalog file or override is malformed; the message names the file, the entry and the field."""


class UnknownModelError(LookupError):
    """No price is known for a model; the message names the nearest known models."""

    def __init__(self, model: str, suggestions: list[str], detail: str | None = None):
        self.model = model
        self.suggestions = suggestions
        if detail is not None:  # the model is known, what was asked of it is not (a price_version)
            super().__init__(detail)
            return
        hint = f" Nearest known models: {', '.join(suggestions)}." if suggestions else ""
        super().__init__(
            f"No price known for model {model!r}.{hint} Add it with `otel-dspy-cost pricing add`, pass "
            f"pricing_overrides= to instrument(), or set OTEL_DSPY_COST_PRICING_FILE."
        )
