"""Budgets: `Budget`, `budget()` and `scope()`, and the accounting station every LM call passes through.

`budget` holds what a user opens with `with`; `accounting` prices each call's worst case, reserves it in
every budget in force (through each budget's ledger), and settles it to the actual cost; `spend` keeps the
live totals that `spend_report()` and the run artifacts read.
"""
