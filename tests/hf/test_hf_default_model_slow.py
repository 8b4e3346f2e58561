"""The real default model, SmolLM2-135M-Instruct, through the default cache.

The first run converts the GGUF (about 35 s) into `~/.cache/lorakit/models` (or
`$LORAKIT_CACHE_DIR/models`); later runs read that cache in about a second. The cache mechanics
themselves are tested with a tiny GGUF in test_hf_gguf_cache.py.
"""

from __future__ import annotations

import time

import pytest
import torch

from lorakit.hf import generate_text, gguf_cache, load_model
from lorakit.hf.default_model import default_model_path

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    # CPU and float32 even on a GPU machine, so greedy decoding is reproducible.
    return load_model("default", dtype="float32", device="cpu")


def test_architecture(smollm2):
    model, _ = smollm2
    config = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert (config.num_attention_heads, config.num_key_value_heads) == (9, 3)
    assert config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert sum(parameter.numel() for parameter in model.parameters()) == 134_515_008
    assert model.dtype == torch.float32


def test_tokenizer(smollm2):
    _, tokenizer = smollm2
    assert len(tokenizer) == 49152
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    assert tokenizer.padding_side == "right"


def test_greedy_answer(smollm2):
    model, tokenizer = smollm2
    [answer] = generate_text(model, tokenizer, ["What is the capital of France?"], max_new_tokens=12)
    assert "Paris" in answer, answer


def test_second_load_reads_the_cache(smollm2, monkeypatch: pytest.MonkeyPatch):
    assert gguf_cache.is_complete(gguf_cache.cache_entry(default_model_path()))

    def fail(*args, **kwargs):
        raise AssertionError("the default model was converted again instead of read from the cache")

    monkeypatch.setattr(gguf_cache, "_convert", fail)
    started = time.perf_counter()
    model, _ = load_model("default", device="cpu")
    seconds = time.perf_counter() - started
    print(f"cached load of the default model: {seconds:.2f} s")
    # About half a second here; the bound leaves room for a busy shared machine.
    assert seconds < 15, f"cached load took {seconds:.1f} s"
    assert model.config.num_hidden_layers == 30
