"""Bad input and faults: a clear error with the right status, nothing lost, the server keeps serving."""

from __future__ import annotations

import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from lorakit.core.walk import lora_layers
from tests.serve.conftest import make_engine, start
from tests.serve.http import next_event, open_stream, post, request

CHAT = "/v1/chat/completions"


def chat_body(**fields):
    return {"model": "a0", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, **fields}


def test_malformed_json_and_wrong_types_name_the_field(served):
    status, _, body = post(served.url, CHAT, b'{"model": "a0", "messages": [')
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    for field, value, words in [("max_tokens", "abc", "'max_tokens' must be an integer, got string"),
                                ("temperature", "hot", "'temperature' must be a number"),
                                ("messages", "hi", "'messages' must be a non-empty list"),
                                ("stream", 1, "'stream' must be a boolean, got integer"),
                                ("stop", [1], "'stop' must be a non-empty string or a list")]:
        status, _, body = post(served.url, CHAT, chat_body(**{field: value}))
        assert status == 400 and words in body["error"]["message"], body
        assert body["error"]["param"] == field


def test_unknown_model_is_404_listing_the_served_names(served):
    with pytest.raises(openai.NotFoundError, match="'nope' is not served here; served models: tiny, a0, a1"):
        served.client().completions.create(model="nope", prompt="hi", max_tokens=2)


def test_prompt_longer_than_the_context_gives_both_lengths(served):
    long = "one two three four five six seven eight nine ten " * 40
    with pytest.raises(openai.BadRequestError,
                       match=r"the prompt is \d+ tokens, longer than the model's context of 256 tokens"):
        served.client().completions.create(model="a0", prompt=long, max_tokens=2)
    with pytest.raises(openai.BadRequestError,
                       match=r"max_tokens=300 does not fit: the prompt is \d+ tokens"):
        served.client().completions.create(model="a0", prompt="hi", max_tokens=300)


@pytest.mark.parametrize("fields, words", [
    (dict(max_tokens=0), "max_tokens must be at least 1, got 0"),
    (dict(max_tokens=-3), "max_tokens must be at least 1, got -3"),
    (dict(n=2), "n=2 is not supported by this server"),
    (dict(logprobs=True), "logprobs=true is not supported"),
    (dict(tools=[{"type": "function", "function": {"name": "f"}}]), "tools=.* is not supported"),
    (dict(presence_penalty=0.5), "presence_penalty=0.5 is not supported"),
    (dict(frobnicate=1), "unsupported field 'frobnicate'"),
])
def test_unsupported_or_bad_options_are_refused(served, fields, words):
    status, _, body = post(served.url, CHAT, chat_body(**fields))
    assert status == 400
    assert pytest.importorskip("re").search(words, body["error"]["message"]), body


def test_neutral_values_of_unsupported_options_are_accepted(served):
    status, _, body = post(served.url, CHAT, chat_body(n=1, logprobs=False, presence_penalty=0))
    assert status == 200, body


def test_api_key_is_required_on_v1_routes(files):
    running = start(make_engine(files), api_key="s3cret")
    try:
        with pytest.raises(openai.AuthenticationError, match="the API key is wrong"):
            running.client(api_key="guess").models.list()
        status, _, body = request(running.url, "GET", "/v1/models")
        assert status == 401 and "the API key is missing" in body["error"]["message"]
        assert [m.id for m in running.client(api_key="s3cret").models.list().data][0] == "tiny"
        assert request(running.url, "GET", "/health")[0] == 200
    finally:
        running.stop()


def test_full_queue_is_429_with_retry_after(files):
    running = start(make_engine(files, max_queue=0))
    try:
        status, headers, body = post(running.url, CHAT, chat_body())
        assert status == 429 and headers["retry-after"] == "1"
        assert "the queue is full (0 requests waiting, --max-queue)" in body["error"]["message"]
    finally:
        running.stop()


@pytest.fixture
def slow(files):
    """A server whose every forward takes 10 ms more, so requests overlap long enough to act on them."""
    engine = make_engine(files, max_batch=8)
    engine.model.register_forward_hook(lambda *args: time.sleep(0.01))
    running = start(engine)
    yield running
    running.stop()


def long_running(running):
    """(adapter, prompt) whose greedy answer runs to 150 tokens without an end-of-sequence token."""
    client = running.client()
    for adapter in ("a0", "a1", "a2", "a3", "a4", "a5", "a6", "a7"):
        reply = client.completions.create(model=adapter, prompt="one", max_tokens=150, temperature=0)
        if reply.choices[0].finish_reason == "length":
            return adapter, "one"
    pytest.skip("every adapter stops early on this prompt")


def test_a_client_that_disconnects_mid_stream_leaves_the_batch(slow):
    adapter, prompt = long_running(slow)
    connection, response = open_stream(slow.url, dict(model=adapter, prompt=prompt, max_tokens=150,
                                                       temperature=0))
    next_event(response)
    next_event(response)
    connection.close()
    deadline = time.monotonic() + 10
    while slow.engine.scheduler.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not slow.engine.scheduler.running, "the abandoned row is still in the batch"
    sample = slow.engine.metrics.registry.get_sample_value
    assert sample("lorakit_generated_tokens_total", {"model": adapter}) < 2 * 150  # the probe's 150 + a few
    # and the server still answers
    assert slow.client().completions.create(model="a1", prompt="hi", max_tokens=3, temperature=0).choices


def test_loading_bad_or_outside_adapters_is_400_and_running_requests_are_unaffected(slow, files, tmp_path,
                                                                                    reference):
    from lorakit import LoraConfig, add_adapter, save_adapter
    from tests.models import tiny_llama

    wrong = tiny_llama(vocab=320, hidden=48)  # another width: its adapter cannot fit the tiny base
    add_adapter(wrong, LoraConfig(r=2, targets=["q_proj"]), name="w")
    save_adapter(wrong, files.adapters / "wrong-shape", name="w")
    shutil.copytree(files.adapters / "a0", tmp_path / "outside")
    client = slow.client()
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(lambda: client.chat.completions.create(
            model="a3", temperature=0, max_tokens=30, messages=[{"role": "user", "content": "hello world"}]))
        for body, words in [({"lora_name": "w", "lora_path": "wrong-shape"},
                             "adapter 'w' from 'wrong-shape' was not loaded: .*shape"),
                            ({"lora_name": "o", "lora_path": str(tmp_path / "outside")},
                             "is outside --adapter-dir"),
                            ({"lora_name": "o", "lora_path": "../outside"}, "is outside --adapter-dir"),
                            ({"lora_name": "m", "lora_path": "missing"}, "was not loaded"),
                            ({"lora_name": "a1", "lora_path": "a1"}, "taken already")]:
            status, _, answer = post(slow.url, "/v1/load_lora_adapter", body)
            assert status == 400, answer
            assert pytest.importorskip("re").search(words, answer["error"]["message"]), answer
        assert running.result().choices[0].message.content == reference("a3", "hello world", 30)
    assert [m.id for m in client.models.list().data] == ["tiny", *[f"a{i}" for i in range(8)]]


def test_load_then_unload_at_run_time(slow, files, reference):
    shutil.copytree(files.adapters / "a5", files.adapters / "copy5", dirs_exist_ok=True)
    status, _, text = post(slow.url, "/v1/load_lora_adapter", {"lora_name": "fresh", "lora_path": "copy5"})
    assert status == 200 and text == "Success: LoRA adapter 'fresh' added successfully."
    client = slow.client()
    reply = client.chat.completions.create(model="fresh", temperature=0, max_tokens=8,
                                           messages=[{"role": "user", "content": "hello world"}])
    assert reply.choices[0].message.content == reference("a5", "hello world", 8)
    status, _, text = post(slow.url, "/v1/unload_lora_adapter", {"lora_name": "fresh"})
    assert status == 200 and "removed" in text
    assert "fresh" not in [m.id for m in client.models.list().data]
    status, _, body = post(slow.url, "/v1/unload_lora_adapter", {"lora_name": "fresh"})
    assert status == 404 and "adapter 'fresh' is not loaded" in body["error"]["message"]


@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_an_exception_in_one_request_fails_it_alone(slow, reference, phase):
    model = slow.engine.model
    layer = lora_layers(model)[0]

    def poison(module, args, kwargs):  # forwards of this phase that include adapter a6 fail
        plan = layer.row_adapters
        decoding = kwargs["input_ids"].shape[1] == 1
        if plan is not None and "a6" in plan.names and decoding == (phase == "decode"):
            raise RuntimeError("injected fault")

    handle = model.model.register_forward_pre_hook(poison, with_kwargs=True)
    client = slow.client()
    try:
        def ask(adapter):
            return client.chat.completions.create(model=adapter, temperature=0, max_tokens=10,
                                                  messages=[{"role": "user", "content": "hello world"}])

        with ThreadPoolExecutor(4) as pool:
            futures = {a: pool.submit(ask, a) for a in ("a1", "a6", "a2", "tiny")}
            with pytest.raises(openai.InternalServerError,
                               match="generation failed for this request: RuntimeError: injected fault"):
                futures["a6"].result()
            for adapter in ("a1", "a2", "tiny"):
                expected = reference(None if adapter == "tiny" else adapter, "hello world", 10)
                assert futures[adapter].result().choices[0].message.content == expected
    finally:
        handle.remove()
    assert ask("a6").choices[0].message.content == reference("a6", "hello world", 10)


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of GET /metrics: (name, labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    status, headers, text = request(url, "GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_metrics_count_requests_tokens_batch_and_queue(served):
    before = scrape(served.url)
    reply = served.client().completions.create(model="a7", prompt="hi", max_tokens=3, temperature=0)
    assert post(served.url, CHAT, chat_body(model="zz"))[0] == 404
    after = scrape(served.url)

    def grew(name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert grew("lorakit_requests_total", model="a7", status="200") == 1
    assert grew("lorakit_requests_total", model="zz", status="404") == 1
    assert grew("lorakit_generated_tokens_total", model="a7") == reply.usage.completion_tokens > 0
    assert grew("lorakit_generated_tokens_total", model="zz") == 0
    assert grew("lorakit_request_seconds_count") == 1  # the latency of answered requests only
    assert grew("lorakit_request_seconds_sum") > 0
    deadline = time.monotonic() + 10  # the scheduler drops the finished row at its next step
    while scrape(served.url)[("lorakit_batch_size", frozenset())] and time.monotonic() < deadline:
        time.sleep(0.01)
    idle = scrape(served.url)
    assert (idle[("lorakit_batch_size", frozenset())], idle[("lorakit_queue_length", frozenset())]) == (0, 0)


def test_dora_adapters_are_refused_at_load(served, files):
    import json

    # --adapter-dir is the session's shared folder: this test's adapter is made and removed in it.
    folder = files.adapters / f"dora-{os.getpid()}"
    shutil.copytree(files.adapters / "a2", folder)
    try:
        config_file = folder / "adapter_config.json"
        config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "use_dora": True}))
        status, _, body = post(served.url, "/v1/load_lora_adapter",
                               {"lora_name": "d", "lora_path": folder.name})
    finally:
        shutil.rmtree(folder)
    assert status == 400
    assert "is a DoRA adapter, which lorakit serve cannot run per row" in body["error"]["message"]
