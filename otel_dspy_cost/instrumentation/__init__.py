"""Instrumentation: the OpenTelemetry instrumentor and the wrappers it puts on DSPy's call points.

`instrumentor` is what `instrument()` calls; `patches` is the list of DSPy call points wrapped (applied and
removed as one set); `lm_call` turns one provider call into an `LMCall` for the accounting station and its
span; `threads` carries run state into threads the user starts.
"""
