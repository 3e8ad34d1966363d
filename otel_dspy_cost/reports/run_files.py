"""A run's files read back, damaged or not: `costs.jsonl` line by line, `summary.json` or its rebuild.

A run killed mid-write leaves a truncated last line; a disk or an editor can leave garbage; a run killed with
SIGKILL leaves no `summary.json` at all. None of that may stop `report` or make it print $0: a line that is not
a cost line is skipped with a warning naming its file and line, and a missing or unreadable summary is rebuilt
from the cost lines, marked as a run that did not finish.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger("otel_dspy_cost")

# What a cost line must carry to be counted (`artifacts._line` writes these), and how each is checked.
_COUNTS = ("input_tokens", "cached_input_tokens", "output_tokens", "reasoning_tokens")
_MONEY = ("usd", "economic_usd")  # a number, or null for a call of unknown cost
_WORDS = ("module", "model", "phase")
_SAID_AT_MOST = 5  # bad lines named one by one; past that, counted


def cost_files(run_dir: str | os.PathLike[str]) -> list[Path]:
    """`costs.jsonl` and its rotated files (`costs.jsonl.1` is the newest of those), oldest first."""
    base = Path(run_dir) / "costs.jsonl"
    rotated = sorted(base.parent.glob("costs.jsonl.*"), key=lambda p: -int(p.suffix[1:]) if p.suffix[1:].isdigit()
                     else 0)
    return [*rotated, base]


def read_costs(run_dir: str | os.PathLike[str], problems: list[str] | None = None) -> list[dict[str, Any]]:
    """Every LM-call line of a run, oldest first (rotated files included). Lines that are not cost lines are
    skipped, each said in one line with its file and line number: appended to `problems` when given, else
    logged as a warning."""
    out: list[dict[str, Any]] = []
    said: list[str] = []
    for path in cost_files(run_dir):
        if not path.exists():
            continue
        try:
            text = path.read_text(errors="replace")
        except OSError as exc:
            said.append(f"{path}: unreadable ({exc.strerror or exc}); its calls are left out")
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            row, why = _cost_line(line)
            if row is None:
                said.append(f"{path}:{number}: {why}; skipped")
            else:
                out.append(row)
    _tell(said, problems)
    return out


def _cost_line(line: str) -> tuple[dict[str, Any] | None, str]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        return None, f"not a JSON line ({exc.msg} at column {exc.colno}: a truncated or damaged write)"
    if not isinstance(row, dict):
        return None, f"not a cost line (a JSON {type(row).__name__})"
    for key in _COUNTS:
        value = row.get(key, 0)
        if type(value) is not int or value < 0:
            return None, f"not a cost line ({key} is {value!r})"
    for key in _MONEY:
        value = row.get(key)
        if value is not None and (type(value) not in (int, float) or not math.isfinite(value) or value < 0):
            return None, f"not a cost line ({key} is {value!r})"
    for key in _WORDS:
        if not isinstance(row.get(key), str):
            return None, f"not a cost line ({key} is {row.get(key)!r})"
    trial = row.get("trial")
    if trial is not None and type(trial) is not int:
        return None, f"not a cost line (trial is {trial!r})"
    return row, ""


def _tell(said: list[str], problems: list[str] | None) -> None:
    shown = said[:_SAID_AT_MOST]
    if len(said) > _SAID_AT_MOST:
        shown.append(f"... and {len(said) - _SAID_AT_MOST} more line(s) skipped")
    if problems is not None:  # the caller says them (the CLI: one "warning:" line each on stderr)
        problems.extend(shown)
        return
    for line in shown:
        logger.warning("otel-dspy-cost: %s", line)


def read_summary(run_dir: str | os.PathLike[str], problems: list[str] | None = None,
                 aggregator: Any = None) -> dict[str, Any]:
    """A run's summary. Older summaries without cost fields read as zero cost, never as an error. A missing or
    unreadable `summary.json` of a folder with cost lines is rebuilt from them (its totals, models and
    modules; trials and program runs are not in the cost lines) and marked `incomplete` with the reason.
    `aggregator`: the cost lines already read (`artifacts.aggregate`), so a report reads them once."""
    path = Path(run_dir) / "summary.json"
    data: Any = None
    reason = None
    try:
        data = json.loads(path.read_text(errors="replace"))
        if not isinstance(data, dict):
            reason, data = f"{path} is not a summary (a JSON {type(data).__name__}): rebuilt from the cost lines", None
    except FileNotFoundError:
        reason = "no summary.json: the run did not finish (killed, or still running); rebuilt from the cost lines"
    except (OSError, ValueError) as exc:
        reason = f"{path} is unreadable ({getattr(exc, 'msg', None) or exc}): rebuilt from the cost lines"
    if data is None:
        if not any(p.exists() for p in cost_files(run_dir)):
            data = {}
        else:
            from otel_dspy_cost.reports.artifacts import build_summary

            data = build_summary(run_dir, problems=problems, aggregator=aggregator)
            data.pop("finished_at", None)
            data["incomplete"] = reason
            _tell([reason], problems)
    for key in ("train_cost_usd", "infer_cost_usd", "total_cost_usd", "inference_economic_cost_usd"):
        data.setdefault(key, 0.0)
    data.setdefault("trials", [])
    data.setdefault("by_model", {})
    data.setdefault("by_module", {})
    return data
