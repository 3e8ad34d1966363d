"""A compile's final spend, projected while it runs: spend so far plus the trials still to come at what trials
have cost so far.

Why per trial: an optimizer's schedule is known in trials (MIPROv2's `n_trials`, handed to Optuna), and its
trials cost alike (the same examples, candidate programs of one shape), so after a few trials the rest is a
count times a measured cost. The stages before the first trial (bootstrap, instruction proposals) are already
spent by then. GEPA's schedule is a budget of metric calls instead, a random search's a number of candidate
seeds (each a bootstrap and an evaluation): their spend is projected in proportion to the work done (shown, not
acted on). BootstrapFewShot has no trials (it stops when it has its demos): no projection.

Where it goes: `Budget.projected_usd` on every budget the compile runs under, `dspy.optimizer.projected_usd` on
the compile span and on each trial's summary span, the `dspy.optimizer.projected_cost` gauge, and the demo's
progress line. A budget made with `stop_on_projection=True` stops a MIPROv2 compile between trials, once even
its cheapest trial so far, times the trials left, would pass the cap (after at least 3 trials past the baseline):
`ProjectedOverrunError`, a budget stop, so `guarded_compile()` returns the best program so far.

Spend is read from the accounting station's totals: calls made meanwhile outside the compile (another compile
in another thread) count toward it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from otel_dspy_cost import _attributes as A
from otel_dspy_cost import _context, _runtime
from otel_dspy_cost.errors import ProjectedOverrunError

_CONFIDENT_AFTER = 3  # trials past the baseline before a projection may stop a compile


@dataclasses.dataclass
class Progress:
    """The projection state of one compile (on its `CompileRun`)."""

    spent_at_start: float
    planned_trials: int | None = None  # the baseline included, as the trials are numbered
    trial_costs: dict[int, float] = dataclasses.field(default_factory=dict)
    projected_usd: float | None = None
    # Or a budget in units of work (GEPA: metric calls; a random search: its candidate seeds, each a bootstrap
    # and an evaluation) and the units done so far.
    planned_units: int | None = None
    done_units: int = 0
    units_are_trials: bool = False  # each trial that ends is one unit done


def spent_now() -> float:
    rt = _runtime.active()
    return float(rt.accountant.aggregator.row().get("usd", 0.0)) if rt is not None else 0.0


def begin(run: Any) -> None:
    run.progress = Progress(spent_now())


def plan(run: Any, trials: int) -> None:
    """The optimizer said how many trials it will run (MIPROv2: Optuna's n_trials, its baseline on top)."""
    if run.progress is not None:
        run.progress.planned_trials = trials


def units(run: Any, done: int, planned: int | None, *, per_trial: bool = False) -> None:
    """The optimizer's own count of work done against its budget (GEPA: metric calls of `max_metric_calls`);
    `per_trial`: every trial that ends is one unit (a random search's candidate seeds)."""
    if run.progress is not None and planned:
        run.progress.planned_units, run.progress.done_units = planned, done
        run.progress.units_are_trials = per_trial


def trial_ended(run: Any, number: int, cost: float, span: Any = None) -> ProjectedOverrunError | None:
    """After each trial: project and publish; returns the stop to raise (once the trial's spans have ended)
    when a budget asked for it and the projection is sure to pass its cap."""
    progress = run.progress
    if progress is None:
        return None
    progress.trial_costs[number] = cost
    if progress.units_are_trials:
        progress.done_units = len(progress.trial_costs)
    spent = spent_now() - progress.spent_at_start
    if progress.planned_trials is None:
        if progress.planned_units and progress.done_units:
            # Spend in proportion to the work done. Shown, never acted on: GEPA's runs high in early iterations
            # (reflections are spend without metric calls; GEPA stops gracefully at a cap already), a random
            # search's low in its first seeds (no bootstrap).
            progress.projected_usd = spent * progress.planned_units / progress.done_units
            _publish(run, progress.projected_usd, span)
        return None
    costs = [c for n, c in progress.trial_costs.items() if n != 1] or list(progress.trial_costs.values())
    done = len(progress.trial_costs)
    left = max(0, progress.planned_trials - done)
    progress.projected_usd = spent + left * sum(costs) / len(costs)
    _publish(run, progress.projected_usd, span)
    if not left or len(costs) < _CONFIDENT_AFTER:
        return None
    floor = spent + left * min(costs)
    for budget in _context.current().budgets:
        limit = budget.limit_usd
        if getattr(budget, "stop_on_projection", False) and limit is not None and floor > limit:
            return ProjectedOverrunError(
                f"budget {budget.label!r}: {run.name} is projected to spend ${progress.projected_usd:.6f} "
                f"(${spent:.6f} after {done} of {progress.planned_trials} trials; even at its cheapest trial, "
                f"${min(costs):.6f}, the {left} left pass the ${limit} cap): stopped early "
                f"(stop_on_projection=True)", budget=budget, projected_usd=progress.projected_usd)
    return None


def _publish(run: Any, usd: float, span: Any) -> None:
    value = round(usd, 9)
    for budget in _context.current().budgets:
        budget.projected_usd = value
    for target in (getattr(run, "span", None), span):
        if target is not None and target.is_recording():
            target.set_attribute(A.OPTIMIZER_PROJECTED_USD, value)
    rt = _runtime.active()
    metrics = rt.metrics if rt is not None else None
    if metrics is not None:
        metrics.record_projection(run.name, value)
