"""`python -m otel_dspy_cost.cli`: the same command as the `otel-dspy-cost` script."""

import sys

from otel_dspy_cost.cli.commands import main

sys.exit(main())
