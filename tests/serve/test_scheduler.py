"""The continuous-batching scheduler driven step by step, without HTTP: which forwards run, with which
rows and adapters, and that every row's tokens equal what its adapter gives alone."""

from __future__ import annotations

import threading
from contextlib import nullcontext
from typing import Any

import pytest
import torch

from lorakit import disable_adapters, set_adapter
from lorakit.core.walk import lora_layers
from lorakit.serve.engine import Engine
from lorakit.serve.sampling import make_generator, sample
from lorakit.serve.schemas import ApiError, GenerationRequest
from lorakit.serve.sequence import Sequence
from tests.serve.conftest import Files, load

SERVED = ["a0", "a1", "a2", "a6"]
SHORT, LONG = "hello world", "what is the capital of france? the capital of"


def make_engine(files: Files, **options: Any) -> Engine:
    """An engine over the tiny model with adapters a0, a1, a2 and a6; its scheduler thread is not started."""
    model, tokenizer = load(files, adapters=[])
    return Engine(model, tokenizer, "tiny", {name: str(files.adapters / name) for name in SERVED}, **options)


def ask(engine: Engine, model: str, prompt: str, max_tokens: int, **fields: Any) -> Sequence:
    request = GenerationRequest(model=model, chat=False, prompt=prompt, max_tokens=max_tokens,
                                **{"temperature": 0.0, **fields})
    return engine.start_request(request, lambda: None)


def run(engine: Engine, sequences: list[Sequence], most_steps: int = 50) -> int:
    """Step until every sequence is done; the number of steps taken."""
    for steps in range(1, most_steps + 1):
        engine.scheduler.step()
        if all(s.done for s in sequences):
            return steps
    raise AssertionError(f"not done after {most_steps} steps")


@pytest.fixture(scope="module")
def alone(files: Files) -> Any:
    """The tokens an adapter (None: the base) gives for prompt ids by itself, with no cache and no batch:
    greedy (seed None) or sampled with a seeded generator, ending at an end-of-sequence token."""
    model, tokenizer = load(files, adapters=SERVED)
    eos = {tokenizer.eos_token_id}

    @torch.inference_mode()
    def tokens(adapter: str | None, prompt_ids: list[int], max_tokens: int, seed: int | None = None,
               temperature: float = 1.0, top_p: float = 1.0) -> list[int]:
        generator = None if seed is None else make_generator(seed)
        if adapter is not None:
            set_adapter(model, adapter)
        out: list[int] = []
        with disable_adapters(model) if adapter is None else nullcontext():
            while len(out) < max_tokens and not eos.intersection(out):
                logits = model(input_ids=torch.tensor([prompt_ids + out])).logits[0, -1]
                out.append(int(logits.argmax()) if generator is None else
                           sample(logits, temperature, top_p, generator))
        return out

    return tokens


class Forwards:
    """Records each model forward: (rows, columns) of its input ids and the adapter of each row."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls: list[tuple[tuple[int, int], list[str | None] | None]] = []
        self.layer = lora_layers(model)[0]
        self.handle = model.register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        plan = self.layer.row_adapters
        self.calls.append((tuple(kwargs["input_ids"].shape), None if plan is None else list(plan.names)))

    def take(self) -> list[tuple[tuple[int, int], list[str | None] | None]]:
        calls, self.calls = self.calls, []
        return calls


def test_requests_for_different_adapters_share_one_decode_forward(files, alone):
    engine = make_engine(files)
    forwards = Forwards(engine.model)
    rows = [ask(engine, "a0", SHORT, 6), ask(engine, "a1", SHORT, 6), ask(engine, "tiny", LONG, 6)]
    expected = [alone(s.adapter, s.prompt_ids, 6) for s in rows]
    assert all(len(tokens) == 6 for tokens in expected), f"an answer ends early, change prompts: {expected}"
    assert expected[0] != expected[1], "a0 and a1 must answer differently, or the test proves nothing"

    assert run(engine, rows) == 5  # step 1: prefill (first token) and one decode; steps 2-5: one decode each
    width = len(rows[2].prompt_ids)
    assert width > len(rows[0].prompt_ids)  # rows 0 and 1 are left-padded in the prefill
    assert forwards.take() == [((3, width), ["a0", "a1", None])] + [((3, 1), ["a0", "a1", None])] * 5
    assert [s.generated for s in rows] == expected
    assert [s.finish_reason for s in rows] == ["length"] * 3


def test_a_request_joins_a_running_batch_and_the_other_leaves_it(files, alone):
    engine = make_engine(files)
    forwards = Forwards(engine.model)
    first = ask(engine, "a2", SHORT, 9)
    engine.scheduler.step()
    engine.scheduler.step()
    assert forwards.take() == [((1, len(first.prompt_ids)), ["a2"]), ((1, 1), ["a2"]), ((1, 1), ["a2"])]
    assert len(first.generated) == 3

    second = ask(engine, "a0", LONG, 3)
    engine.scheduler.step()  # the newcomer is prefilled alone, then both decode in one forward
    assert forwards.take() == [((1, len(second.prompt_ids)), ["a0"]), ((2, 1), ["a2", "a0"])]
    assert (len(first.generated), len(second.generated)) == (4, 2)
    engine.scheduler.step()
    assert second.finish_reason == "length" and forwards.take() == [((2, 1), ["a2", "a0"])]

    engine.scheduler.step()  # the finished row leaves before the decode
    assert forwards.take() == [((1, 1), ["a2"])]
    batch = engine.scheduler.batch
    assert len(second.prompt_ids) > len(first.prompt_ids) + 2  # wider than the first row's cache at its join
    # The newcomer's longer prompt had padded the first row on the left; those columns are cut.
    assert batch.rows == 1 and batch.width == batch.positions[0] == len(first.prompt_ids) + 5
    assert batch.mask.all()
    run(engine, [first])
    assert first.generated == alone("a2", first.prompt_ids, 9)
    assert second.generated == alone("a0", second.prompt_ids, 3)


def test_max_batch_bounds_the_running_rows_and_max_queue_refuses(files):
    engine = make_engine(files, max_batch=1, max_queue=2)
    forwards = Forwards(engine.model)
    scheduler, gauge = engine.scheduler, engine.metrics.registry.get_sample_value
    first, second = ask(engine, "a0", SHORT, 2), ask(engine, "a1", SHORT, 2)
    assert gauge("lorakit_queue_length") == 2
    with pytest.raises(ApiError) as caught:
        ask(engine, "a2", SHORT, 2)
    assert (caught.value.status, caught.value.headers) == (429, {"Retry-After": "1"})
    assert caught.value.message == ("the queue is full (2 requests waiting, --max-queue); retry shortly")

    scheduler.step()
    assert (scheduler.running, list(scheduler.waiting)) == ([first], [second]) and first.done
    assert (gauge("lorakit_queue_length"), gauge("lorakit_batch_size")) == (1, 1)
    scheduler.step()
    assert scheduler.running == [second] and second.done and not scheduler.waiting
    assert gauge("lorakit_queue_length") == 0
    scheduler.step()
    assert scheduler.running == [] and gauge("lorakit_batch_size") == 0
    assert [rows for (rows, _), _ in forwards.take()] == [1, 1, 1, 1]


def test_generated_tokens_are_counted_per_model(files):
    engine = make_engine(files)
    count = engine.metrics.registry.get_sample_value
    rows = [ask(engine, "a0", SHORT, 4), ask(engine, "a0", LONG, 3), ask(engine, "tiny", SHORT, 5)]
    run(engine, rows)
    assert count("lorakit_generated_tokens_total", {"model": "a0"}) == 7
    assert count("lorakit_generated_tokens_total", {"model": "tiny"}) == 5
    assert count("lorakit_generated_tokens_total", {"model": "a1"}) is None


def test_finish_reason_stop_on_end_of_sequence_and_length_on_max_tokens(files, alone):
    engine = make_engine(files)
    prompt = engine.prompt_ids(GenerationRequest(model="a1", chat=False, prompt=SHORT))
    tokens = alone("a1", prompt, 6)
    assert len(tokens) == 6, f"the answer ends early, pick another prompt: {tokens}"
    end = next(i for i in range(1, 6) if tokens[i] not in tokens[:i])  # a token that has not come before
    engine.eos_ids = frozenset({tokens[end]})  # pretend that token ends the sequence
    stops, at_limit = ask(engine, "a1", SHORT, 6), ask(engine, "a1", SHORT, end + 1)
    engine.eos_ids = frozenset()
    runs_out = ask(engine, "a1", SHORT, 4)
    run(engine, [stops, at_limit, runs_out])
    assert (stops.generated, stops.finish_reason) == (tokens[:end + 1], "stop")
    assert (at_limit.generated, at_limit.finish_reason) == (tokens[:end + 1], "stop")  # the end token wins
    assert (runs_out.generated, runs_out.finish_reason) == (tokens[:4], "length")


def test_a_seeded_sampled_row_beside_a_greedy_row_draws_as_alone(files, alone):
    engine = make_engine(files)
    sampled = ask(engine, "a1", SHORT, 8, temperature=1.3, top_p=0.9, seed=11)
    greedy = ask(engine, "a0", LONG, 8)
    run(engine, [sampled, greedy])
    assert sampled.generated == alone("a1", sampled.prompt_ids, 8, seed=11, temperature=1.3, top_p=0.9)
    assert greedy.generated == alone("a0", greedy.prompt_ids, 8)
    assert sampled.generated != alone("a1", sampled.prompt_ids, 8), "sampling should leave the greedy path"


def test_a_cancelled_request_leaves_at_the_next_step(files, alone):
    engine = make_engine(files)
    forwards = Forwards(engine.model)
    kept, gone = ask(engine, "a0", SHORT, 6), ask(engine, "a1", LONG, 6)
    engine.scheduler.step()
    assert engine.scheduler.in_use("a1") == 1
    gone.cancelled.set()
    assert engine.scheduler.in_use("a1") == 1  # still running until the next step drops it
    run(engine, [kept])
    assert engine.scheduler.running == [kept] and engine.scheduler.batch.rows == 1
    assert (len(gone.generated), gone.finish_reason) == (2, None)
    assert [rows for (rows, _), _ in forwards.take()] == [2, 2, 1, 1, 1, 1]
    assert kept.generated == alone("a0", kept.prompt_ids, 6)


@pytest.mark.parametrize("phase, layer", [
    ("prefill", None), ("decode", None),
    ("decode", 1),
])
def test_an_exception_in_one_row_fails_it_alone(files, alone, phase, layer):
    engine = make_engine(files)
    model: Any = engine.model
    where = model.model if layer is None else model.model.layers[layer]

    def poison(module, args, kwargs):  # forwards of this phase whose rows include adapter a6 fail
        plan = lora_layers(model)[0].row_adapters
        assert plan is not None
        columns = (args[0] if args else kwargs["input_ids"]).shape[1]
        if "a6" in plan.names and (columns == 1) == (phase == "decode"):
            raise RuntimeError("injected fault")

    where.register_forward_pre_hook(poison, with_kwargs=True)
    rows = [ask(engine, "a0", SHORT, 5), ask(engine, "a6", SHORT, 5), ask(engine, "tiny", LONG, 5)]
    run(engine, rows)
    assert isinstance(rows[1].error, RuntimeError) and str(rows[1].error) == "injected fault"
    assert len(rows[1].generated) == (0 if phase == "prefill" else 1)
    assert (rows[0].error, rows[2].error) == (None, None)
    assert rows[0].generated == alone("a0", rows[0].prompt_ids, 5)
    assert rows[2].generated == alone(None, rows[2].prompt_ids, 5)
    engine.scheduler.step()
    assert engine.scheduler.running == [] and engine.scheduler.in_use("a6") == 0


def test_the_thread_answers_requests_and_stops_when_they_are_done(files, alone):
    engine = make_engine(files)
    finished = threading.Semaphore(0)
    requests = [GenerationRequest(model=m, chat=False, prompt=SHORT, max_tokens=4, temperature=0.0)
                for m in ("a0", "a2")]
    engine.scheduler.start()
    try:
        rows = [engine.start_request(r, finished.release) for r in requests]
        for sequence in rows:
            while not sequence.done:
                assert finished.acquire(timeout=60), "the scheduler thread stopped answering"
    finally:
        engine.scheduler.stop(timeout=60)
    assert not engine.scheduler._thread.is_alive()
    assert [s.generated for s in rows] == [alone(s.adapter, s.prompt_ids, 4) for s in rows]
