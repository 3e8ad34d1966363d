"""Tracer and meter providers from the standard OTEL_* variables, for when the user set none.

With no exporter endpoint configured the provider has no exporter at all: spans still carry cost,
budgets still enforce and `spend_report()` still works, and nothing ever dials localhost:4317.
"""

from __future__ import annotations

import logging
import os
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


def provider_from_env() -> TracerProvider:
    """Resource from OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES; exporter from OTEL_TRACES_EXPORTER and
    OTEL_EXPORTER_OTLP_* (none unless an endpoint or exporter is named)."""
    provider = TracerProvider(resource=Resource.create())
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
    return MeterProvider(resource=Resource.create(), metric_readers=[PeriodicExportingMetricReader(
        OTLPMetricExporter())])
