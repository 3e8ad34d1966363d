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
import re
import threading
import time
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

from otel_dspy_cost._redact import scrub

logger = logging.getLogger("otel_dspy_cost")


def _endpoint_and_protocol(signal: str) -> tuple[str | None, str]:
    endpoint = os.environ.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    protocol = (os.environ.get(f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL") or
                os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf")
    return endpoint, protocol


class _Tally:
    """Spans our exporters were given, by what became of them: what the exit message can say it knows."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.acknowledged = self.pending = self.failed = 0

    def text(self) -> str:
        with self.lock:
            acknowledged, pending, failed = self.acknowledged, self.pending, self.failed
        parts = [f"{acknowledged} span{'s' * (acknowledged != 1)} acknowledged"]
        if pending:
            parts.append(f"{pending} being exported with no answer yet (a slow collector may still store them)")
        if failed:
            parts.append(f"{failed} refused or undeliverable")
        return "; ".join(parts) + "; spans not yet handed to the exporter are dropped"


_tally = _Tally()


def _otlp_exporter() -> SpanExporter | None:
    endpoint, protocol = _endpoint_and_protocol("TRACES")
    if not endpoint:
        return None
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import SpanExportResult

    class _Tallied(OTLPSpanExporter):
        def export(self, spans: Any, *args: Any, **kwargs: Any) -> Any:
            n = len(spans)
            with _tally.lock:
                _tally.pending += n
            result = SpanExportResult.FAILURE
            try:
                result = super().export(spans, *args, **kwargs)
                return result
            finally:
                with _tally.lock:
                    _tally.pending -= n
                    if result == SpanExportResult.SUCCESS:
                        _tally.acknowledged += n
                    else:
                        _tally.failed += n

    return _Tallied()


SHUTDOWN_TIMEOUT_ENV = "OTEL_DSPY_COST_SHUTDOWN_TIMEOUT_S"
_EXPORTER_LOGGERS = ("opentelemetry.exporter.otlp.proto.http.trace_exporter", "opentelemetry.exporter.otlp.common.http",
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
        if _METRICS_REFUSED.search(message):  # a traces-only backend: one warning, and no more metrics sent to it
            if _metrics_refused.is_set():
                return False
            _metrics_refused.set()
            record.levelno, record.levelname, record.exc_info, record.args = logging.WARNING, "WARNING", None, ()
            record.msg = scrub(  # an endpoint may carry a token in its userinfo: the exporter's line is not ours
                f"otel-dspy-cost: the metrics endpoint {_endpoint_and_protocol('METRICS')[0]} does not take metrics "
                "(it looks traces-only, as Phoenix and MLflow are): metrics export is off for this run. Send metrics "
                "to a Collector with OTEL_EXPORTER_OTLP_METRICS_ENDPOINT, or set OTEL_METRICS_EXPORTER=none. "
                f"({message})")
            return True
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
        endpoint = scrub(_endpoint_and_protocol("TRACES")[0] or "(no endpoint)")
        logger.warning("otel-dspy-cost: telemetry not delivered within %.1f s at exit to %s: %s. Set %s to wait "
                       "longer.", time.monotonic() - started, endpoint, _tally.text(), SHUTDOWN_TIMEOUT_ENV)
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


_METRICS_EXPORTERS = ("otlp", "prometheus", "console", "none")
# An endpoint that takes traces but not metrics (Phoenix: 405 / UNIMPLEMENTED, MLflow: 404): the exporter's own
# error line, as the OTLP exporters word it, over HTTP and gRPC.
_METRICS_REFUSED = re.compile(r"Failed to export metrics.*(code: (404|405|415)\b|StatusCode\.UNIMPLEMENTED)")
_metrics_refused = threading.Event()


def meter_provider_from_env() -> Any:
    """A MeterProvider for OTEL_METRICS_EXPORTER's values (`otlp`, the default when an OTLP endpoint is set;
    `prometheus`, served on OTEL_EXPORTER_PROMETHEUS_HOST:PORT, default localhost:9464; `console`; `none`);
    None when nothing is to be exported, so the metrics API stays a no-op and nothing dials out."""
    names = [n.strip().lower() for n in os.environ.get("OTEL_METRICS_EXPORTER", "").split(",") if n.strip()]
    unknown = [n for n in names if n not in _METRICS_EXPORTERS]
    if unknown:
        logger.warning("otel-dspy-cost: OTEL_METRICS_EXPORTER=%s is not one of %s: ignored", ",".join(unknown),
                       ", ".join(_METRICS_EXPORTERS))
    if "none" in names:
        return None
    endpoint, protocol = _endpoint_and_protocol("METRICS")
    readers = []
    if "otlp" in names or (not names and endpoint):
        if endpoint:
            from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

            readers.append(PeriodicExportingMetricReader(_otlp_metric_exporter(protocol)))
        else:
            logger.warning("otel-dspy-cost: OTEL_METRICS_EXPORTER=otlp but no OTEL_EXPORTER_OTLP_ENDPOINT (or "
                           "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT) is set: metrics are not exported")
    if "prometheus" in names:
        reader = _prometheus_reader()
        if reader is not None:
            readers.append(reader)
    if "console" in names:
        from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, PeriodicExportingMetricReader

        readers.append(PeriodicExportingMetricReader(ConsoleMetricExporter()))
    if not readers:
        return None
    from opentelemetry.sdk.metrics import MeterProvider

    return _own(MeterProvider(resource=Resource.create(), shutdown_on_exit=False, metric_readers=readers))


def _otlp_metric_exporter(protocol: str) -> Any:
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    from opentelemetry.sdk.metrics.export import MetricExportResult

    class _StopsWhereRefused(OTLPMetricExporter):
        """Once the endpoint has said it takes no metrics (`_OnceFilter`), nothing more is sent to it."""

        def export(self, metrics_data: Any, timeout_millis: float = 10_000, **kwargs: Any) -> Any:
            if _metrics_refused.is_set():
                return MetricExportResult.SUCCESS
            return super().export(metrics_data, timeout_millis=timeout_millis, **kwargs)

    return _StopsWhereRefused()


def _prometheus_reader() -> Any:
    """OTEL_METRICS_EXPORTER=prometheus: a scrape endpoint, as the SDK's auto-instrumentation serves it."""
    try:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import start_http_server
    except ImportError:
        logger.warning("otel-dspy-cost: OTEL_METRICS_EXPORTER=prometheus needs opentelemetry-exporter-prometheus "
                       "(pip install 'otel-dspy-cost[prometheus]'): metrics are not exported")
        return None
    host = os.environ.get("OTEL_EXPORTER_PROMETHEUS_HOST", "localhost")
    try:
        port = int(os.environ.get("OTEL_EXPORTER_PROMETHEUS_PORT", "9464"))
        start_http_server(port=port, addr=host)
    except (ValueError, OSError) as exc:
        logger.warning("otel-dspy-cost: cannot serve Prometheus metrics on %s:%s (%s): metrics are not exported",
                       host, os.environ.get("OTEL_EXPORTER_PROMETHEUS_PORT", "9464"), exc)
        return None
    logger.info("otel-dspy-cost: Prometheus metrics at http://%s:%d/metrics", host, port)
    return PrometheusMetricReader()
