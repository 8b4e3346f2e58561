"""Streaming returns the same text as a whole answer; stop strings, usage and seeds."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("adapter", ["a1", "tiny"])
def test_chat_stream_equals_whole_answer(served, adapter):
    client = served.client()
    settings = dict(model=adapter, temperature=0, max_tokens=14,
                    messages=[{"role": "user", "content": "hello world"}])
    whole = client.chat.completions.create(**settings)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True},
                                                 **settings))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completion_stream_with_stop_strings_equals_whole_answer(served):
    client = served.client()
    full = client.completions.create(model="a2", prompt="one two", max_tokens=20,
                                     temperature=0).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 2]  # a piece from the middle of the greedy answer
    assert stop.strip(), f"pick another prompt: no stop string in {full!r}"
    settings = dict(model="a2", prompt="one two", max_tokens=20, temperature=0, stop=[stop])
    whole = client.completions.create(**settings).choices[0]
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **settings))
    assert whole.text == streamed == full[:full.index(stop)]
    assert whole.finish_reason == "stop"


def test_seeded_sampling_repeats_and_differs_from_greedy(served):
    client = served.client()
    settings = dict(model="a4", prompt="the quick", max_tokens=12, temperature=1.5, top_p=0.9)
    first = client.completions.create(seed=7, **settings).choices[0].text
    assert client.completions.create(seed=7, **settings).choices[0].text == first
    others = {client.completions.create(seed=s, **settings).choices[0].text for s in range(8, 12)}
    assert others - {first}, "sampling with other seeds should give another text at least once"


def test_length_finish_when_max_tokens_is_reached(served):
    client = served.client()
    settings = dict(model="a0", prompt="hello", temperature=0)
    longer = client.completions.create(max_tokens=4, **settings)
    # The greedy answer goes on past its first token, so that token is not the end-of-sequence token:
    # a one-token answer can only have ended on max_tokens.
    assert longer.usage.completion_tokens > 1, "the first token ends the sequence here; pick another prompt"
    reply = client.completions.create(max_tokens=1, **settings)
    assert reply.usage.completion_tokens == 1
    assert reply.choices[0].finish_reason == "length"
    assert longer.choices[0].text.startswith(reply.choices[0].text)
    chunks = list(client.completions.create(max_tokens=1, stream=True, **settings))
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["length"]
