"""A task for a spawn-started process pool (a module of its own: the spawned child imports it by name)."""

import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


def ask(api_base: str) -> str:
    """One DSPy call in the worker, under whatever budget the pool's initializer entered."""
    import dspy

    lm = dspy.LM("openai/gpt-4o-mini", api_base=api_base, api_key="sk-test-0000000000", cache=False, max_tokens=64,
                 num_retries=0)
    with dspy.context(lm=lm):
        dspy.Predict("question -> answer")(question="from a spawned worker")
    return "ok"
