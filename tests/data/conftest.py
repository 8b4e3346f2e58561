"""Fixtures for the data tests: tiny tokenizers built here (nothing is downloaded) and a JSONL writer."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "Below is an instruction that describes a task, paired with an input that provides further context.",
    "Write a response that appropriately completes the request.",
    "### Instruction:\n### Input:\n### Response:\n",
    "What is the capital of France? The capital of France is Paris.",
    "Translate to German: good morning. Guten Morgen.",
    "system user assistant You are a helpful assistant. hello world 1 2 3 4 5 6 7 8 9 10",
    "The quick brown fox jumps over the lazy dog. Question: Answer:",
]


def make_tokenizer(add_bos: bool = True, eos: str = "</s>", chat_template: str | None = CHATML) -> Any:
    """A byte-level BPE tokenizer of a few hundred tokens, wrapped for transformers.

    Args:
        add_bos: Put ``<s>`` before every encoded text, as Llama tokenizers do.
        eos: The EOS token: ``"</s>"`` (not in the chat template) or ``"<|im_end|>"`` (the template's
            end of turn, as in SmolLM2 and Qwen).
        chat_template: A Jinja chat template, or None for none.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    if add_bos:
        bos_id = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
        )
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token=eos, pad_token="<pad>")
    if chat_template is not None:
        wrapped.chat_template = chat_template
    return wrapped


@pytest.fixture(name="make_tokenizer", scope="session")
def make_tokenizer_fixture() -> Callable[..., Any]:
    """The `make_tokenizer` factory, for tests that need an unusual tokenizer."""
    return make_tokenizer


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    """Adds BOS; EOS is ``</s>``, which the ChatML template does not write."""
    return make_tokenizer()


@pytest.fixture(scope="session")
def chatml_tokenizer() -> Any:
    """Adds no BOS; EOS is ``<|im_end|>``, the template's end of turn."""
    return make_tokenizer(add_bos=False, eos="<|im_end|>")


@pytest.fixture
def write_jsonl(tmp_path: Path) -> Callable[..., Path]:
    """Write lines (dicts are JSON-encoded, strings written as they are) to a file in tmp_path."""

    def write(lines: list[Any], name: str = "data.jsonl") -> Path:
        path = tmp_path / name
        text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines)
        path.write_text(text + "\n", encoding="utf-8")
        return path

    return write
