"""The optimizers we know, one module each (`mipro`, `bootstrap`, `gepa`): adding one is one module here.

Each module may define any of: `NAMES` (class names it covers), `METHOD_HOOKS` (class name -> private
method -> a begin/end pair, wrapped where the class along the optimizer's MRO defines the method),
`lm_roles(optimizer)`, `before_compile(optimizer)` (raises before any LM call), `public_patches(optimizer)`,
`on_compile(optimizer, run)` (attach observers; returns the undo), `guard(optimizer, budget)` (a graceful
stop for `guarded_compile`), `recover_best(run, optimizer, program)`, `estimate_stages(...)`, `CLI_NAMES`
and `from_cli(name, args)`. Everything else about a compile (trials, Evaluate, best-so-far) is in `runs`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from otel_dspy_cost.optimizers import bootstrap, gepa, mipro, projection, runs

MODULES = (bootstrap, mipro, gepa)  # the CLI lists them in this order


def _each(hook: str) -> Iterator[Callable[..., Any]]:
    for module in MODULES:
        fn = getattr(module, hook, None)
        if fn is not None:
            yield fn


def method_hooks() -> dict[str, dict[str, Any]]:
    """Class name -> private method -> (begin, end), for every optimizer module."""
    out: dict[str, dict[str, Any]] = {}
    for module in MODULES:
        for cls, hooks in getattr(module, "METHOD_HOOKS", {}).items():
            out.setdefault(cls, {}).update(hooks)
    return out


def by_name(name: str | None) -> Any:
    """The module covering an optimizer class name exactly, or None."""
    return next((m for m in MODULES if name in getattr(m, "NAMES", ())), None)


def lm_roles(optimizer: Any) -> dict[int, str]:
    """LM instance -> role, from the optimizer's own attributes; an LM in two roles is left out."""
    found: dict[int, set[str]] = {}
    for roles in _each("lm_roles"):
        for lm, role in roles(optimizer):
            if lm is not None:
                found.setdefault(id(lm), set()).add(role)
    return {k: next(iter(v)) for k, v in found.items() if len(v) == 1}


def before_compile(optimizer: Any) -> None:
    for check in _each("before_compile"):
        check(optimizer)


def public_patches(optimizer: Any) -> list[tuple[Any, str, Any]]:
    return [patch for patches in _each("public_patches") for patch in patches(optimizer)]


def begin_compile(optimizer: Any, args: tuple, kwargs: dict, span: Any = None
                  ) -> tuple[Any, list[Callable[[], None]]]:
    """A compile starts here: its `CompileRun` is current, with each module's observers attached."""
    student = kwargs.get("student", args[0] if args else None)
    run = runs.CompileRun(type(optimizer).__name__, optimizer, student=student, roles=lm_roles(optimizer),
                          span=span)
    if runs.COMPILE_RUN.get() is None:  # an inner compile (MIPROv2's bootstrap) is part of the outer one's spend
        projection.begin(run)
    undo = [u for attach in _each("on_compile") if (u := attach(optimizer, run)) is not None]
    return runs.COMPILE_RUN.set(run), undo


def end_compile(state: tuple[Any, list[Callable[[], None]]]) -> None:
    token, undo = state
    run = runs.COMPILE_RUN.get()
    runs.COMPILE_RUN.reset(token)
    for restore in undo:
        restore()
    if run is not None:
        runs.finished(run)


def guard(optimizer: Any, budget: Any) -> tuple[Any, Callable[[], None]] | None:
    """A graceful stop before the budget runs out, from the first module offering one for this optimizer."""
    for make in _each("guard"):
        found = make(optimizer, budget)
        if found is not None:
            return found
    return None


def recover_best(run: runs.CompileRun | None, optimizer: Any, program: Any) -> Any:
    """The best program a stopped run left: the best full evaluation, else what an optimizer module rebuilds."""
    if run is not None and run.best_program is not None:
        best = run.best_program.deepcopy()
        best._compiled = True
        return best
    for recover in _each("recover_best"):
        best = recover(run, optimizer, program)
        if best is not None:
            return best
    return None


def cli_names() -> tuple[str, ...]:
    return ("evaluate", *(n for m in MODULES for n in getattr(m, "CLI_NAMES", ())))


def from_cli(name: str, args: Any) -> tuple[str, dict[str, Any]] | None:
    """(class name, constructor settings) for an `--optimizer` name of the CLI; None for an unknown one."""
    for parse in _each("from_cli"):
        found = parse(name, args)
        if found is not None:
            return found
    return None
