"""Each request of an LM call: where it leaves for the provider, its retries admitted, its failures priced.

One LM call may send several requests: DSPy 3.4 retries a failed attempt (`num_retries`) through
`execution._attempt`, DSPy 3.3 hands `num_retries` to LiteLLM, and LiteLLM and the OpenAI/Anthropic SDKs retry
inside their own clients. The call's reservation covers its planned requests (n of them where the engine sends
one per completion); each retry needs room of its own, so it is admitted like a call (another worst case held,
waiting or stopping as a call would) before it is sent. Two layers show us requests:
- DSPy's send points (3.4: `execution._attempt`/`_aattempt`; 3.3: the LiteLLM helpers of `lm.py`), which also
  mark the call sent (a failure before them sent nothing) and catch a request made without admission;
- the HTTP client under LiteLLM and the SDKs (`httpx.Client.send`/`AsyncClient.send`), which sees every
  request they make, retries included, and its status.
A failed request whose outcome is unknown (a timeout, a 5xx) may have been billed: it counts at one request's
worst case when the call settles; one answered with a client error (4xx), or that never connected, costs nothing.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any

from otel_dspy_cost import _context, _runtime
from otel_dspy_cost.budgets.accounting import REFUSED, REJECTED, UNKNOWN, LMCall, classify_failure
from otel_dspy_cost.errors import BudgetExceededError
from otel_dspy_cost.instrumentation.lm_call import settle_at_worst_case

# Where a request leaves for the provider, per DSPy version (private, feature-detected): 3.4 runs every
# attempt of a dspy.LM through execution._attempt/_aattempt, 3.3 through these LiteLLM helpers of lm.py.
_SEND_POINTS = (("dspy.clients.execution", ("_attempt", "_aattempt")),
                ("dspy.clients.lm", ("litellm_completion", "alitellm_completion", "litellm_text_completion",
                                     "alitellm_text_completion", "litellm_responses_completion",
                                     "alitellm_responses_completion")))
_send_tracked: list[type | None] = [None]  # the LM class whose sending the markers see (dspy.LM), once wrapped
_is_ours: list[Callable[[Any], bool]] = [lambda _: True]


# -- DSPy's layer ---------------------------------------------------------------------------------------

def _send_begin(call: LMCall | None) -> LMCall | None:
    """Before a DSPy attempt: the call is sent from here; a retry (the last attempt failed) needs room."""
    if call is None:
        if _context.current().budgets and not _lm_wrapper_in_place():
            raise _bypassed()
        return None
    call.sent = True
    call.dspy_attempts += 1
    if call.retry_pending:
        call.retry_pending = False
        return call
    return None


def _send_failed(call: LMCall | None, exc: BaseException) -> None:
    if call is None:
        return
    call.retry_pending = True
    if not call.http_requests:  # no HTTP layer below (the native client): this layer says what it cost
        call.failed_attempts.append(classify_failure(exc)[0])


def _mark_sent_sync(wrapped, instance, args, kwargs):
    call = _context.CURRENT_CALL.get()
    retry = _send_begin(call)
    if retry is not None:
        _admit_retry(retry, per_request(retry, dspy_layer=True))
    try:
        return wrapped(*args, **kwargs)
    except BaseException as exc:
        _send_failed(call, exc)
        raise


async def _mark_sent_async(wrapped, instance, args, kwargs):
    call = _context.CURRENT_CALL.get()
    retry = _send_begin(call)
    if retry is not None:
        await _admit_retry_async(retry, per_request(retry, dspy_layer=True))
    try:
        return await wrapped(*args, **kwargs)
    except BaseException as exc:
        _send_failed(call, exc)
        raise


# -- the HTTP layer under LiteLLM and the SDKs ------------------------------------------------------------

def _http_begin(call: LMCall) -> bool:
    """True when this request is a retry (more requests than the attempts DSPy planned)."""
    call.http_requests += 1
    return call.http_requests > max(1, call.dspy_attempts)


def _http_outcome(call: LMCall, response: Any, exc: BaseException | None) -> None:
    if exc is not None:
        call.failed_attempts.append(classify_failure(exc)[0])
        return
    status = getattr(response, "status_code", 200)
    if isinstance(status, int) and status >= 400:
        call.failed_attempts.append(REJECTED if status < 500 and status != 408 else UNKNOWN)


def _http_send_sync(wrapped, instance, args, kwargs):
    call = _context.CURRENT_CALL.get()
    if call is None:
        return wrapped(*args, **kwargs)
    if _http_begin(call):
        _admit_retry(call, per_request(call, dspy_layer=False))
    try:
        response = wrapped(*args, **kwargs)
    except BaseException as exc:
        _http_outcome(call, None, exc)
        raise
    _http_outcome(call, response, None)
    return response


async def _http_send_async(wrapped, instance, args, kwargs):
    call = _context.CURRENT_CALL.get()
    if call is None:
        return await wrapped(*args, **kwargs)
    if _http_begin(call):
        await _admit_retry_async(call, per_request(call, dspy_layer=False))
    try:
        response = await wrapped(*args, **kwargs)
    except BaseException as exc:
        _http_outcome(call, None, exc)
        raise
    _http_outcome(call, response, None)
    return response


# -- admission and pricing of the extra requests ----------------------------------------------------------

def per_request(call: LMCall, *, dspy_layer: bool | None = None) -> float:
    """One request's worst case: DSPy 3.4 sends one request per completion (n of them), LiteLLM and the SDKs
    one request with all n."""
    native = call.dspy_attempts and not call.http_requests if dspy_layer is None else dspy_layer
    return call.reserved_usd / max(1, call.n) if native else call.reserved_usd


def _admit_retry(call: LMCall, amount: float) -> None:
    rt = _runtime.active()
    if rt is not None and call.budgets:
        rt.accountant.admit_extra(call, amount)  # the deliberate stops propagate: no money past the cap


async def _admit_retry_async(call: LMCall, amount: float) -> None:
    rt = _runtime.active()
    if rt is not None and call.budgets:
        await rt.accountant.admit_extra_async(call, amount)


def unknown_retries_usd(call: LMCall, failed: bool) -> float:
    """What the call's failed requests may have cost: one request's worst case for each whose outcome is unknown
    (the call's own failure, when it failed, is priced with the call)."""
    attempts = call.failed_attempts
    if failed and attempts:
        attempts = attempts[:-1]
    unknown = sum(1 for outcome in attempts if outcome == UNKNOWN)
    return unknown * per_request(call) if unknown else 0.0


def add_failed_requests(call: LMCall, failed: bool) -> None:
    """After the call is priced: its earlier requests that failed with an unknown outcome count too (each at one
    request's worst case, marked estimated); a call refused at a retry counts only those."""
    extra = unknown_retries_usd(call, failed and call.outcome != REFUSED)
    if not extra:
        return
    reason = "retried after an unknown outcome"
    cost = call.cost
    if cost is None:  # the call's own request sent nothing: its earlier ones may have been billed
        settle_at_worst_case(call, reason, extra)
        call.outcome = UNKNOWN
        return
    call.cost = dataclasses.replace(cost, usd=cost.usd + extra, economic_usd=cost.economic_usd + extra)
    call.estimated = True
    call.estimate_reason = f"{call.estimate_reason}; {reason}" if call.estimate_reason else reason


# -- a request without admission ------------------------------------------------------------------------

def _lm_wrapper_in_place() -> bool:
    """Whether `dspy.LM` still calls through our admission (a request without a call of ours in progress is
    otherwise only our own failed start, which lets the call go on unbudgeted and logged)."""
    lm_class = _send_tracked[0]
    if lm_class is None:
        return True
    return all(_is_ours[0](getattr(lm_class, name, None)) for name in ("__call__", "acall"))


def _bypassed() -> BudgetExceededError:
    """An LM request is about to leave without admission: something took our wrapper off `dspy.LM` (another
    instrumentation's uninstrument() restoring what it saw as the original). Refused loudly, never unbudgeted."""
    from otel_dspy_cost.errors import AdmissionBypassedError

    budgets = _context.current().budgets
    label = budgets[-1].label if budgets else ""
    return AdmissionBypassedError(
        f"Budget {label!r} refused an LM request that did not pass its admission: dspy.LM's call no longer goes "
        f"through otel-dspy-cost (another instrumentation's uninstrument() replaced it). Call "
        f"otel_dspy_cost.instrument() again after instrumenting or uninstrumenting others.",
        label=label, spent_usd=0.0, limit=(budgets[-1].limit_usd or 0.0) if budgets else 0.0, reason="bypassed")


def tracks_sending(lm: Any) -> bool:
    """A plain dspy.LM goes through the send points; a subclass may override forward and send elsewhere."""
    return type(lm) is _send_tracked[0]


def apply(wrap: Callable[[Any, str, Any], None], is_ours: Callable[[Any], bool]) -> None:
    """DSPy's send points (only a version whose send points are all found trusts "not sent"; elsewhere
    `LMCall.sent` stays None and a failed call counts at its worst case) and httpx's send."""
    import dspy

    _is_ours[0] = is_ours
    _send_tracked[0] = None
    for module_name, names in _SEND_POINTS:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        if all(callable(getattr(module, n, None)) for n in names):
            for n in names:
                wrap(module, n, (_mark_sent_sync, _mark_sent_async))
            _send_tracked[0] = dspy.LM
            break
    try:
        import httpx
    except ImportError:  # no HTTP client of the kind LiteLLM and the SDKs use: DSPy's layer alone
        return
    wrap(httpx.Client, "send", _http_send_sync)
    wrap(httpx.AsyncClient, "send", (_http_send_sync, _http_send_async))
