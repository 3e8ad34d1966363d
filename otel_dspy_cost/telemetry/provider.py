"""Tracer and meter providers from the standard OTEL_* variables, for when the user set none.

With no exporter endpoint configured the provider has no exporter at all: spans still carry cost,
budgets still enforce and `spend_report()` still works, and nothing ever dials localhost:4317.

Exit is bounded: the SDK's own at-exit shutdown retries a dead collector for the whole export timeout
(11-15 s were measured, with a screen of retry warnings), so the providers made here shut down from our
at-exit hook on a worker thread, waited for `OTEL_DSPY_COST_SHUTDOWN_TIMEOUT_S` (default 3 s), and the
exporters' repeated retry warnings are said once (a batch given up on is always said).
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

logger = logging.getLogger("otel_dspy_cost")


def _endpoint_and_protocol(signal: str) -> tuple[str | None, str]:
    endpoint = os.environ.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    protocol = (os.environ.get(f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL") or
                os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf")
    return endpoint, protocol


def _otlp_exporter() -> SpanExporter | None:
    endpoint, protocol = _endpoint_and_protocol("TRACES")
    if not endpoint:
        return None
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    return OTLPSpanExporter()


SHUTDOWN_TIMEOUT_ENV = "OTEL_DSPY_COST_SHUTDOWN_TIMEOUT_S"
_EXPORTER_LOGGERS = ("opentelemetry.exporter.otlp.proto.http.trace_exporter",
                     "opentelemetry.exporter.otlp.proto.http.metric_exporter",
                     "opentelemetry.exporter.otlp.proto.grpc.exporter", "opentelemetry.exporter.otlp.proto.http")
_ours: list[Any] = []
_ours_lock = threading.Lock()


class _OnceFilter(logging.Filter):
    """An exporter that cannot reach its collector warns on every retry of every batch: the retries are said
    once. A batch given up on ("Failed to export ...") is always said: telemetry is never dropped silently."""

    def __init__(self) -> None:
        super().__init__()
        self.said = False

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.levelno < logging.WARNING or "retrying" not in message:
            return True
        if self.said:
            return False
        self.said = True
        record.msg = f"{message} (otel-dspy-cost: further retry warnings are not shown)"
        record.args = ()
        return True


def _own(provider: Any) -> Any:
    """Shut this provider down from our bounded at-exit hook instead of the SDK's unbounded one."""
    with _ours_lock:
        if not _ours:
            atexit.register(shutdown_bounded)
            once = _OnceFilter()
            for name in _EXPORTER_LOGGERS:
                logging.getLogger(name).addFilter(once)
        _ours.append(provider)
    return provider


def shutdown_bounded(timeout_s: float | None = None) -> bool:
    """Flush and shut down the providers made here, waiting at most `timeout_s` in all; True if they finished.

    What a dead collector could not take in that time is dropped, and said once."""
    if timeout_s is None:
        try:
            timeout_s = float(os.environ.get(SHUTDOWN_TIMEOUT_ENV, "3"))
        except ValueError:
            timeout_s = 3.0
    with _ours_lock:
        providers, _ours[:] = list(_ours), []
    if not providers:
        return True

    def run() -> None:
        for provider in providers:
            try:
                provider.shutdown()
            except Exception:  # noqa: BLE001 - at exit, an exporter's failure must not become the user's
                logger.debug("otel-dspy-cost: provider shutdown failed", exc_info=True)

    worker = threading.Thread(target=run, name="otel-dspy-cost-shutdown", daemon=True)
    started = time.monotonic()
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        logger.warning("otel-dspy-cost: telemetry not delivered within %.1f s at exit (is the collector at %s "
                       "up?); the rest is dropped. Set %s to wait longer.", time.monotonic() - started,
                       _endpoint_and_protocol("TRACES")[0] or "(no endpoint)", SHUTDOWN_TIMEOUT_ENV)
        return False
    return True


def provider_from_env() -> TracerProvider:
    """Resource from OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES; exporter from OTEL_TRACES_EXPORTER and
    OTEL_EXPORTER_OTLP_* (none unless an endpoint or exporter is named)."""
    provider = _own(TracerProvider(resource=Resource.create(), shutdown_on_exit=False))
    names = [n.strip() for n in os.environ.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()]
    if "none" in names:
        return provider
    if "console" in names:
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    if "otlp" in names or not names:
        exporter = _otlp_exporter()
        if exporter is not None:
            provider.add_span_processor(BatchSpanProcessor(exporter))
        elif "otlp" in names:
            logger.warning("OTEL_TRACES_EXPORTER=otlp but no OTEL_EXPORTER_OTLP_ENDPOINT is set: spans are not "
                           "exported (cost, budgets and spend_report still work)")
    return provider


def meter_provider_from_env() -> Any:
    """A MeterProvider exporting OTLP when an endpoint is configured (and OTEL_METRICS_EXPORTER allows);
    None otherwise, so the metrics API stays a no-op and nothing dials out."""
    names = [n.strip() for n in os.environ.get("OTEL_METRICS_EXPORTER", "").split(",") if n.strip()]
    endpoint, protocol = _endpoint_and_protocol("METRICS")
    if "none" in names or not endpoint or (names and "otlp" not in names):
        return None
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    return _own(MeterProvider(resource=Resource.create(), shutdown_on_exit=False,
                              metric_readers=[PeriodicExportingMetricReader(OTLPMetricExporter())]))
