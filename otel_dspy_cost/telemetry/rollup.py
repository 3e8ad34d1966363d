"""The roll-up tree: recorded spans still open, and the totals of the LM calls below each.

A parent's roll-up must be written while it is still open (an ended span is read-only in the SDK, and
`_on_ending` runs after attributes are frozen), so totals are kept per open span here and written onto
our own spans once, just before they end (`write`), and onto spans of other instrumentations (a user's
span around a DSPy call) after every LM call below them. Nodes drop their span reference at end; nothing
grows with the run length.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from opentelemetry.sdk.trace import Span

from otel_dspy_cost import _attributes as A
from otel_dspy_cost._context import STARTING
from otel_dspy_cost.budgets.accounting import LMCall
from otel_dspy_cost.pricing.cost import money
from otel_dspy_cost.telemetry import viewers


class Node:
    """Book-keeping for one open span. The span reference is dropped when the span ends."""

    __slots__ = ("span", "context", "parent", "is_lm", "ours", "lm_ancestor", "usd", "econ", "inp", "out", "calls",
                 "unknown", "call", "taken_over", "deferred", "module")

    def __init__(self, span: Span | None, parent: Node | None, is_lm: bool, ours: bool):
        self.span = span
        self.context = span.context if span is not None else None  # kept after the end: a late call's parent
        self.parent = parent
        self.is_lm = is_lm
        self.ours = ours
        self.lm_ancestor: Node | None = None
        self.usd = self.econ = 0.0
        self.inp = self.out = self.calls = self.unknown = 0
        self.call: LMCall | None = None  # ours: handed over by the wrapper; foreign: admitted at on_start
        self.taken_over = False  # a foreign LM span around one of our LM calls: ours counts
        # Our own spans get their roll-up written once, by our wrapper just before they end
        # (`write_rollup`); other spans are updated after every LM call below them.
        self.deferred = ours and not is_lm
        self.module = ""

    def rollup_attributes(self) -> dict[str, Any]:
        """The subtree's totals as span attributes (read under the processor's lock)."""
        attrs: dict[str, Any] = {A.TOTAL_USD: money(self.usd), A.TOTAL_ECONOMIC_USD: money(self.econ),
                                 A.TOTAL_INPUT_TOKENS: self.inp,
                                 A.TOTAL_OUTPUT_TOKENS: self.out, A.LM_CALLS: self.calls}
        if self.unknown:
            attrs[A.TOTAL_UNKNOWN_CALLS] = self.unknown
        return attrs


def is_lm(attrs: Any) -> bool:
    return attrs.get(A.SPAN_KIND) == "lm" or attrs.get(A.GEN_AI_OPERATION) in A.LM_OPERATIONS


ENDED_KEPT = 4096  # recently ended spans remembered (bounded: nothing grows with the run's length)


class RollupTree:
    """Open spans by span id. Only single get/set/pop operations touch the map, each atomic on a dict, so
    they take no lock (two lock round-trips per span were measurable); `_lock` guards the sums."""

    def __init__(self) -> None:
        self._live: dict[int, Node] = {}
        # Spans that ended lately, so a child started after its parent ended still finds its place in the tree.
        self.recently_ended: dict[int, Node] = {}
        self._lock = threading.Lock()
        # (ended parent, node): a subtree's totals arrived after its parent ended (set by the processor)
        self.on_late: Callable[[Node, Node], None] | None = None

    def track(self, span: Span) -> Node:
        ours = getattr(span.instrumentation_scope, "name", None) == A.SCOPE_NAME
        attrs = STARTING.attributes if ours else None  # ours, being started: the dict we gave the SDK
        if attrs is None:
            attrs = span.attributes or {}
        parent_ctx = span.parent
        parent = None
        if parent_ctx is not None:
            # A parent that ended already (a thread started under a span that has ended since) is found among the
            # recently ended: the child's totals are late from the start (see `add_to_parent`).
            parent = self._live.get(parent_ctx.span_id) or self.recently_ended.get(parent_ctx.span_id)
        node = Node(span, parent, is_lm(attrs), ours)
        if parent is not None:
            node.lm_ancestor = parent if parent.is_lm else parent.lm_ancestor
            node.module = parent.module
        node.module = attrs.get(A.MODULE_PATH, node.module)
        self._live[span.context.span_id] = node
        return node

    def get(self, span_id: int) -> Node | None:
        return self._live.get(span_id)

    def pop(self, span_id: int) -> Node | None:
        return self._live.pop(span_id, None)

    def ended_trim(self) -> None:
        """Ended spans are kept a while (the processor adds each as it ends) for children that start after their
        parent ended; past `ENDED_KEPT` the oldest goes."""
        try:
            self.recently_ended.pop(next(iter(self.recently_ended)), None)  # the oldest (insertion order)
        except (RuntimeError, StopIteration):  # another thread changed it meanwhile: the next end trims
            pass

    def clear(self) -> None:
        self._live.clear()
        self.recently_ended.clear()

    def count(self, node: Node, call: LMCall) -> None:
        """`node` is the span that counts this settled call: its totals, added to every open ancestor."""
        cost, usage = call.cost, call.billed
        if cost is None:
            return
        node.usd, node.econ = cost.usd, cost.economic_usd
        node.inp, node.out, node.calls, node.unknown = usage.input_tokens, usage.output_tokens, 1, int(cost.unknown)
        self.add_to_parent(node)

    def write(self, span: Span, extra: dict[str, Any] | None = None, root_output: bool = False) -> None:
        """Our span is about to end: write its totals once (with `extra` attributes, in the same write); a
        trace's root also gets them as its `output.value` (`telemetry.viewers`)."""
        node = self._live.get(span.get_span_context().span_id)
        if node is not None and node.calls:
            with self._lock:
                attrs = node.rollup_attributes()
            if extra:
                attrs.update(extra)
        elif extra:
            attrs = dict(extra)
        elif root_output:
            attrs = {}
        else:
            return
        if root_output:
            attrs.update(viewers.root_output(attrs, span.attributes))
        if attrs:
            span.set_attributes(attrs)

    def add_to_parent(self, node: Node) -> None:
        parent = node.parent
        if parent is not None and parent.span is None and self.on_late is not None:
            # Its parent ended before it (a call still running when DSPy's pool gave up on it, a straggler): the
            # ended spans' attributes cannot change, so the cost goes into the trace as a record of its own.
            self.on_late(parent, node)
        while parent is not None and parent.span is None:  # ended early (e.g. a straggler thread): skip up
            parent = parent.parent
        if parent is None:
            return
        with self._lock:
            parent.usd += node.usd
            parent.econ += node.econ
            parent.inp += node.inp
            parent.out += node.out
            parent.calls += node.calls
            parent.unknown += node.unknown
            attrs = parent.rollup_attributes()
        span = parent.span
        if span is not None and not parent.deferred:
            span.set_attributes(attrs)
