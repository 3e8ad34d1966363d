"""A worker process for the shared-ledger tests: makes LM calls under a shared budget until stopped.

    python ledger_worker.py LEDGER_URL CAP CALLS   -> prints {"made": n, "refused": 0|1}
    python ledger_worker.py --hold LEDGER_URL      -> reserves once, prints "held", then sleeps (to be killed)
"""

import json
import os
import sys
import time
import warnings

warnings.simplefilter("ignore")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import dspy  # noqa: E402
from litellm import ModelResponse  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402

import otel_dspy_cost  # noqa: E402


class TinyLM(dspy.BaseLM):
    """A real BaseLM answering in process with fixed usage: each call costs the same."""

    def __init__(self):
        super().__init__(model="openai/gpt-4o-mini", max_tokens=32)

    def forward(self, prompt=None, messages=None, **kwargs):
        return ModelResponse(id="w", model="gpt-4o-mini",
                             usage={"prompt_tokens": 40, "completion_tokens": 10, "total_tokens": 50},
                             choices=[{"index": 0, "finish_reason": "stop",
                                       "message": {"role": "assistant", "content": "ok"}}])


def main() -> None:
    if sys.argv[1] == "--hold":
        from otel_dspy_cost.ledgers.protocol import Limits
        from otel_dspy_cost.ledgers.urls import ledger_from_url

        ledger = ledger_from_url(sys.argv[2], reservation_timeout_s=float(sys.argv[3]))
        account = ledger.key("held")
        ledger.open(account, Limits(1.0, None, {}, True))
        ledger.reserve([account], 0.25, "infer")
        print("held", flush=True)
        time.sleep(600)
        return
    url, cap, calls = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
    otel_dspy_cost.instrument(tracer_provider=TracerProvider(), unknown_model="warn")
    lm = TinyLM()
    made = refused = 0
    guard = otel_dspy_cost.budget(limit_usd=cap, label="fleet", ledger=url)
    for i in range(calls):
        try:
            with guard:
                lm(f"worker {os.getpid()} call {i}")
            made += 1
        except otel_dspy_cost.BudgetExceededError:
            refused = 1
            break
    print(json.dumps({"made": made, "refused": refused}), flush=True)


if __name__ == "__main__":
    main()
