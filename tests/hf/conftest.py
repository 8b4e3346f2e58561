"""Tiny models built in the test: a random Llama, a byte-level BPE tokenizer and a GGUF of both.

Everything here is made offline in well under a second, so the fast tests never need the real
default model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "hello world, the quick brown fox jumps over the lazy dog.",
    "what is the capital of france? the capital of france is paris.",
    "one two three four five six seven eight nine ten",
]
N_HEADS, N_KV_HEADS, N_LAYERS, HIDDEN = 4, 2, 2, 32


@dataclass
class TinyModel:
    """A tiny random Llama and its tokenizer, with where they were saved."""

    model: torch.nn.Module
    tokenizer: object
    folder: Path


def build_tokenizer(chat_template: str | None = CHAT_TEMPLATE):
    """A byte-level BPE tokenizer trained on a few sentences, with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS * 4, trainer)
    # No pad token on purpose: load_model must fall back to eos.
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>"
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def build_model(vocab_size: int, bos_token_id: int, eos_token_id: int, seed: int = 0) -> torch.nn.Module:
    """A 2-layer random Llama with grouped-query attention and tied embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=N_HEADS,
        num_key_value_heads=N_KV_HEADS,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def _permute_for_gguf(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder q/k rows the way llama.cpp's converter does (transformers undoes it on load)."""
    rows = weight.shape[0]
    return (
        weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def write_gguf(model: torch.nn.Module, tokenizer, path: Path) -> Path:
    """Write `model` and `tokenizer` as a float32 llama GGUF, as llama.cpp's converter would."""
    import gguf

    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(config.vocab_size)

    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.__getitem__)
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if token in SPECIAL_TOKENS else 1 for token in tokens])  # 3 = control
    writer.add_token_merges([" ".join(pair) for pair in merges])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_chat_template(tokenizer.chat_template)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight":
            continue  # tied to the embedding; a GGUF without output.weight means tied
        module, suffix = key.rsplit(".", 1)
        array = tensor.detach().float().numpy()
        if key.endswith("q_proj.weight"):
            array = _permute_for_gguf(array, config.num_attention_heads)
        elif key.endswith("k_proj.weight"):
            array = _permute_for_gguf(array, config.num_key_value_heads)
        writer.add_tensor(f"{names.get_name(module)}.{suffix}", array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    """A tiny Llama + tokenizer saved as a transformers folder (treat the folder as read-only)."""
    tokenizer = build_tokenizer()
    model = build_model(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return TinyModel(model=model, tokenizer=tokenizer, folder=folder)


@pytest.fixture(scope="session")
def tiny_gguf_source(tiny: TinyModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model written once as a GGUF file; copy it before changing it."""
    return write_gguf(tiny.model, tiny.tokenizer, tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf")


@pytest.fixture
def tiny_gguf(tiny_gguf_source: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny GGUF, so each test gets its own cache key."""
    copy = tmp_path / "gguf" / tiny_gguf_source.name
    copy.parent.mkdir()
    copy.write_bytes(tiny_gguf_source.read_bytes())
    return copy


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point lorakit's cache at an empty folder for this test."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("LORAKIT_CACHE_DIR", str(folder))
    return folder
