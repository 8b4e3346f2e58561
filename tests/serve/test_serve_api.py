"""The API through the official openai client: greedy answers equal `lorakit generate`, alone and batched."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from tests.serve.conftest import ADAPTERS

PROMPTS = ["hello world", "what is the capital of france?", "one two three", "the quick brown fox"]


def test_models_lists_the_base_and_every_adapter(served):
    ids = [m.id for m in served.client().models.list().data]
    assert ids == ["tiny", *ADAPTERS]


def test_chat_greedy_equals_lorakit_generate(served, reference):
    client = served.client()
    for adapter in ("a0", "a3", None):
        reply = client.chat.completions.create(model=adapter or "tiny", temperature=0, max_tokens=12,
                                               messages=[{"role": "user", "content": PROMPTS[1]}])
        assert reply.choices[0].message.content == reference(adapter, PROMPTS[1], 12)
        # 12 tokens: the budget ran out ("length"); fewer: the model ended its answer ("stop")
        assert reply.choices[0].finish_reason == ("length" if reply.usage.completion_tokens == 12 else "stop")
        assert reply.usage.completion_tokens <= 12 and reply.usage.prompt_tokens > 0
        assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    answers = {reference(a, PROMPTS[1], 12) for a in ADAPTERS[:4]}
    assert len(answers) > 1, "the adapters must change the answer, or the test proves nothing"


def test_completion_greedy_equals_lorakit_generate_raw(served, reference):
    reply = served.client().completions.create(model="a5", prompt=PROMPTS[0], max_tokens=10, temperature=0)
    assert reply.choices[0].text == reference("a5", PROMPTS[0], 10, chat=False)


def test_sixteen_concurrent_requests_over_eight_adapters_equal_generate_alone(served, reference):
    client = served.client()
    jobs = [(ADAPTERS[i % 8], PROMPTS[i % 4], 8 + i % 5) for i in range(16)]

    def ask(job):
        adapter, prompt, max_tokens = job
        reply = client.chat.completions.create(model=adapter, temperature=0, max_tokens=max_tokens,
                                               messages=[{"role": "user", "content": prompt}])
        return reply.choices[0].message.content

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(ask, jobs))
    assert got == [reference(*job) for job in jobs]
