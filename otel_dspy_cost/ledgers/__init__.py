"""Ledgers: where a budget's spend is counted, in this process (`in_process`) or shared by a fleet.

`protocol` is what every ledger implements and the one statement of the limits; `sqlite_ledger` and
`redis_ledger` share a budget across processes and machines (an account is the budget's label), with spend
in time buckets (`windows`) so a reservation costs the same with 10 or 10 million calls in the window;
`failure_policy` decides what happens when a shared ledger cannot be reached; `urls` opens one from its URL
(`OTEL_DSPY_COST_LEDGER` sets a process-wide default). Amounts on shared ledgers are integer nano-dollars.

Every shared reservation carries an expiry (`reservation_timeout_s`, default 600 s): a process that crashes
while holding one leaks it only until then. A settle counts its call by consuming the reservation (an
expired one is kept 7 days for a late settle), so each call is counted exactly once.
"""
