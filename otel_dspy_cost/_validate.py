"""Checks for numbers and words users give us, where they give them.

Why a module of its own: a NaN limit compares false with everything, so `spent > nan` never stops a run; a
string `max_calls` or a negative price silently switches a cap off or makes spend go down. Every option that
feeds the money path is checked here, before any call, with the option's name in the message.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any


def number(name: str, value: Any, *, minimum: float = 0.0, strict: bool = False, allow_none: bool = True,
           allow_inf: bool = False) -> float | None:
    """A real number >= `minimum` (> with `strict`); NaN, infinities (unless `allow_inf`), bools and strings
    are refused. Returns it as a float."""
    if value is None:
        if allow_none:
            return None
        raise TypeError(f"{name} is required (a number), not None")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, not {type(value).__name__} {value!r}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name} must be a number, not NaN")
    if math.isinf(value) and not (allow_inf and value > 0):
        raise ValueError(f"{name} must be finite, not {value!r}")
    if value < minimum or (strict and value == minimum):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {minimum:g}, not {value!r}")
    return value


def integer(name: str, value: Any, *, minimum: int = 0, allow_none: bool = True) -> int | None:
    """A whole number >= `minimum`; floats (even 3.0), bools and strings are refused."""
    if value is None:
        if allow_none:
            return None
        raise TypeError(f"{name} is required (a whole number), not None")
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a whole number, not {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, not {value!r}")
    return value


def choice(name: str, value: Any, options: Collection[Any]) -> Any:
    if value not in options:
        raise ValueError(f"{name} must be one of {', '.join(repr(o) for o in options)}, not {value!r}")
    return value


def finite_tree(where: str, data: Any, path: str = "") -> None:
    """Every number in a parsed JSON document (or a dict given in code) is finite: Python's json module
    reads `NaN` and `Infinity`, and JSON Schema's `minimum` lets NaN through (NaN < 0 is false)."""
    if isinstance(data, float) and not math.isfinite(data):
        raise ValueError(f"{where}: field {path or '(top level)'!r}: {data!r} is not a finite number")
    if isinstance(data, dict):
        for key, value in data.items():
            finite_tree(where, value, f"{path}.{key}" if path else str(key))
    elif isinstance(data, (list, tuple)):
        for i, value in enumerate(data):
            finite_tree(where, value, f"{path}[{i}]")
