"""The running batch's KV cache: rows joining (padded on the left) and leaving (padding columns cut),
compared with each row run alone, key for key and logit for logit."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch

from lorakit.hf.generate import left_pad
from lorakit.serve.batch_cache import BatchCache, check_layers
from tests.models import tiny_llama

PROMPTS = [[5, 9, 2], [7, 1, 4, 4, 8], [3, 3, 6, 11, 12, 13, 2]]  # lengths 3, 5 and 7


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_llama(vocab=64)


def cache_arg(model: torch.nn.Module) -> str:
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.inference_mode()
def prefill(model: torch.nn.Module, prompts: list[list[int]]) -> tuple[Any, torch.Tensor]:
    """(cache, mask) of the prompts in one left-padded forward, positions counting real tokens."""
    ids, mask = left_pad(prompts, pad_token_id=0)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    return getattr(out, cache_arg(model)), mask


@torch.inference_mode()
def step(model: torch.nn.Module, batch: BatchCache, tokens: list[int]) -> torch.Tensor:
    """One decode step over the batch, one token per row; logits (rows, vocab)."""
    inputs = batch.step_inputs(cache_arg(model))
    out = model(input_ids=torch.tensor([[t] for t in tokens]), logits_to_keep=1, **inputs)
    batch.advance(inputs["attention_mask"])
    return out.logits[:, -1]


class Alone:
    """One prompt run by itself, unpadded: the reference a batch row must match."""

    def __init__(self, model: torch.nn.Module, prompt: list[int]) -> None:
        self.model = model
        with torch.inference_mode():
            self.cache = getattr(model(input_ids=torch.tensor([prompt]), use_cache=True), cache_arg(model))

    @torch.inference_mode()
    def step(self, token: int) -> torch.Tensor:
        inputs = {"input_ids": torch.tensor([[token]]), cache_arg(self.model): self.cache}
        out = self.model(**inputs, use_cache=True)
        self.cache = getattr(out, cache_arg(self.model))
        return out.logits[0, -1]


def joined(model: torch.nn.Module) -> BatchCache:
    """Rows 0 and 1 prefilled together, then row 2 joining them: 3 rows, 7 columns."""
    batch = BatchCache()
    batch.add(*prefill(model, PROMPTS[:2]), lengths=[3, 5])
    batch.add(*prefill(model, PROMPTS[2:]), lengths=[7])
    return batch


def test_joining_rows_pads_on_the_left_and_keeps_each_rows_keys(model):
    batch = joined(model)
    assert (batch.rows, batch.width, batch.positions) == (3, 7, [3, 5, 7])
    assert batch.mask.tolist() == [[0, 0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1], [1] * 7]
    config = model.config
    shape = (3, config.num_key_value_heads, 7, config.hidden_size // config.num_attention_heads)
    for row, prompt in enumerate(PROMPTS):
        alone = Alone(model, prompt).cache
        for mine, theirs in zip(batch.cache.layers, alone.layers, strict=True):
            assert mine.keys.shape == mine.values.shape == shape
            real = slice(7 - len(prompt), 7)
            torch.testing.assert_close(mine.keys[row, :, real], theirs.keys[0], rtol=0, atol=1e-5)
            torch.testing.assert_close(mine.values[row, :, real], theirs.values[0], rtol=0, atol=1e-5)
    # The columns pasted in front of rows 0 and 1 when row 2 joined are zeros.
    assert not batch.cache.layers[0].keys[:2, :, :2].any()


def test_decode_steps_give_each_row_its_logits_alone_as_rows_leave(model):
    batch = joined(model)
    alone = [Alone(model, prompt) for prompt in PROMPTS]
    for tokens in ([20, 21, 22], [30, 31, 32]):
        logits = step(model, batch, tokens)
        for row, token in enumerate(tokens):
            torch.testing.assert_close(logits[row], alone[row].step(token), rtol=0, atol=1e-5)
    assert (batch.width, batch.positions) == (9, [5, 7, 9])

    batch.keep([0, 2])  # row 1 leaves; row 2 still fills every column, so none is cut
    assert (batch.rows, batch.width, batch.positions) == (2, 9, [5, 9])
    assert batch.mask.tolist() == [[0] * 4 + [1] * 5, [1] * 9]
    logits = step(model, batch, [40, 42])
    torch.testing.assert_close(logits[0], alone[0].step(40), rtol=0, atol=1e-5)
    torch.testing.assert_close(logits[1], alone[2].step(42), rtol=0, atol=1e-5)

    batch.keep([0])  # row 2 leaves: the 4 columns that were padding for row 0 go
    assert (batch.rows, batch.width, batch.positions) == (1, 6, [6])
    assert batch.mask.tolist() == [[1] * 6]
    assert [layer.keys.shape[2] for layer in batch.cache.layers] == [6, 6]
    torch.testing.assert_close(batch.cache.layers[1].keys, alone[0].cache.layers[1].keys, rtol=0, atol=1e-5)
    torch.testing.assert_close(step(model, batch, [50])[0], alone[0].step(50), rtol=0, atol=1e-5)


def test_a_row_joining_a_running_batch_matches_alone(model):
    batch = BatchCache()
    batch.add(*prefill(model, PROMPTS[:1]), lengths=[3])
    first = Alone(model, PROMPTS[0])
    for token in (20, 21, 22, 23, 24):  # row 0 grows to 8 columns, wider than the newcomer's 7
        step(model, batch, [token])
        first.step(token)
    batch.add(*prefill(model, PROMPTS[2:]), lengths=[7])
    assert batch.mask.tolist() == [[1] * 8, [0] + [1] * 7]
    second = Alone(model, PROMPTS[2])
    logits = step(model, batch, [25, 26])
    torch.testing.assert_close(logits[0], first.step(25), rtol=0, atol=1e-5)
    torch.testing.assert_close(logits[1], second.step(26), rtol=0, atol=1e-5)


def test_keeping_no_rows_empties_the_batch_and_it_starts_again(model):
    batch = joined(model)
    batch.keep([])
    assert (batch.rows, batch.width, batch.cache, batch.positions) == (0, 0, None, [])
    batch.add(*prefill(model, PROMPTS[1:2]), lengths=[5])
    assert (batch.rows, batch.width, batch.positions) == (1, 5, [5])
    alone = Alone(model, PROMPTS[1])
    torch.testing.assert_close(step(model, batch, [9])[0], alone.step(9), rtol=0, atol=1e-5)


def test_step_inputs_add_one_column_and_the_next_positions(model):
    batch = joined(model)
    inputs = batch.step_inputs("cache")
    assert inputs["cache"] is batch.cache and inputs["use_cache"] is True
    assert inputs["attention_mask"].tolist() == [[0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1, 1], [1] * 8]
    assert inputs["position_ids"].tolist() == [[3], [5], [7]]
    assert inputs["cache_position"].tolist() == [7]


def test_keep_reorders_rows(model):
    batch = joined(model)
    batch.keep([0, 2, 1])
    assert batch.positions == [3, 7, 5]


def test_caches_other_than_full_attention_are_refused_unchanged(model):
    from transformers import DynamicCache, MistralConfig

    sliding = DynamicCache(config=MistralConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                                num_hidden_layers=2, sliding_window=4))
    message = ("lorakit serve batches full-attention KV caches only (transformers' DynamicLayer); this "
               "model's cache holds DynamicSlidingWindowLayer. Serve it with vLLM instead (docs/serve.md)")
    with pytest.raises(ValueError) as caught:
        check_layers(sliding)
    assert str(caught.value) == message
    batch = joined(model)
    with pytest.raises(ValueError, match="DynamicSlidingWindowLayer"):
        batch.add(sliding, torch.ones(1, 2, dtype=torch.long), [2])
    assert (batch.rows, batch.width) == (3, 7)
    check_layers(batch.cache)  # a plain DynamicCache passes
