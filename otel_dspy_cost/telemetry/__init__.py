"""Telemetry: spans, the span processor with its roll-up tree, metrics, and provider set-up.

`spans` starts and ends our spans; `processor` (`BudgetSpanProcessor`) rolls cost up the span tree
(`rollup`) and gates other instrumentations' LM spans; `metrics` emits cost metrics; `provider` builds
tracer and meter providers from the standard `OTEL_*` variables when the user set none.
"""
