"""Near a cap, a call's prompt is counted by the model's own tokenizer, offline; elsewhere one token per byte.

The exact count is what lets a budget's last calls fit (tests/test_admission.py measures the utilisation); here:
that it is a bound on what the provider bills, that it never reaches the network, that only OpenAI models get it,
and that admission asks for it only near a cap.
"""

import subprocess
import sys
import textwrap

import dspy
import pytest
from conftest import MODEL, QA, lm_spans

import otel_dspy_cost
from otel_dspy_cost import _attributes as A
from otel_dspy_cost.instrumentation.lm_call import input_tokens_bound
from otel_dspy_cost.pricing.tokenizers import encoding_for, prompt_tokens_bound
from otel_dspy_cost.simulator import SimulatedLM

TEXTS = [
    "How much does a long optimizer run cost?",
    "数据科学家使用优化器来改进提示。" * 20,  # CJK: about a token per character, three bytes each
    "🙂🚀🧪" * 50,  # emoji: several tokens each
    "def f(x):\n    return {k: v for k, v in x.items() if v is not None}\n" * 10,
    "a" * 3000,
    "<|endoftext|> and <|endofprompt|> are text here, not special tokens",
]


@pytest.mark.parametrize("text", TEXTS, ids=["english", "cjk", "emoji", "code", "repeat", "special"])
def test_the_exact_bound_covers_what_the_provider_bills_and_is_below_the_byte_bound(text):
    messages = [{"role": "system", "content": "Answer the question.\n" * 30}, {"role": "user", "content": text}]
    tools = [{"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}}]
    request = {"tools": tools}
    exact = prompt_tokens_bound(MODEL, messages, request)
    billed = SimulatedLM().complete({"model": "gpt-4o-mini", "messages": messages, "tools": tools})[1]
    assert billed["prompt_tokens"] <= exact <= input_tokens_bound(None, messages, request)
    enc = encoding_for(MODEL)
    content = sum(len(enc.encode(m["content"], disallowed_special=())) for m in messages)
    assert content < exact  # never below the tokenizer's own count of the text


def test_only_models_with_a_known_tokenizer_get_an_exact_count():
    messages = [{"role": "user", "content": "hello"}]
    assert encoding_for("openai/gpt-4o-mini").name == "o200k_base"
    assert encoding_for("azure/gpt-4").name == "cl100k_base"
    for model in ("anthropic/claude-sonnet-4", "gemini/gemini-2.5-flash", "openai/my-llama-on-vllm",
                  "deepseek/deepseek-chat", ""):
        assert prompt_tokens_bound(model, messages) is None, model
    # Content that is not text (an image part) keeps the byte bound's allowances.
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}]}]
    assert prompt_tokens_bound(MODEL, image) is None


def test_the_tokenizer_is_loaded_without_the_network_or_tiktokens_cache(tmp_path):
    """tiktoken would download its files to a cache dir; ours come from LiteLLM's package, checked by hash."""
    script = textwrap.dedent(f"""
        import os, socket
        os.environ["TIKTOKEN_CACHE_DIR"] = {str(tmp_path / "cache")!r}
        def no_network(*args, **kwargs):
            raise AssertionError("network reached")
        socket.socket.connect = no_network
        socket.create_connection = no_network
        socket.getaddrinfo = no_network
        from otel_dspy_cost.pricing.tokenizers import prompt_tokens_bound
        print(prompt_tokens_bound("openai/gpt-4o", [{{"role": "user", "content": "hello world"}}]))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(2 + 8 + 16)  # "hello world" is 2 tokens, plus the format's overhead
    assert not (tmp_path / "cache").exists()


def test_admission_counts_exactly_only_near_the_cap(otel, server):
    """Far from the cap a span keeps the byte bound (no tokenizer pass on the usual path); the calls that come
    near it are reserved with the exact count, and the budget spends past where the byte bound would stop."""
    exporter, _ = otel
    program = dspy.Predict(QA)
    lm = dspy.LM(MODEL, api_base=server.api_base, api_key="sk-test", cache=False, max_tokens=32, num_retries=0)
    with dspy.context(lm=lm), otel_dspy_cost.budget(label="far") as far:
        program(question="What is one plus one?")
    unit = far.spent_usd
    with dspy.context(lm=lm), pytest.raises(otel_dspy_cost.BudgetExceededError), \
            otel_dspy_cost.budget(limit_usd=unit * 30, label="near") as near:
        for i in range(60):
            program(question=f"What is {i} plus one?")
    spans = lm_spans(exporter)
    first, last = spans[0], spans[-1]
    bytes_bound = first.attributes[A.INPUT_TOKENS_BOUND]
    assert bytes_bound > 2 * first.attributes[A.GEN_AI_INPUT_TOKENS]  # the byte bound, far from any cap
    exact = last.attributes[A.INPUT_TOKENS_BOUND]
    assert last.attributes[A.GEN_AI_INPUT_TOKENS] <= exact < bytes_bound / 2
    assert 0.9 * unit * 30 <= near.spent_usd <= unit * 30
