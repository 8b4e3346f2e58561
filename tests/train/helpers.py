"""A tiny model, tokenizer and data set for training tests (built here, nothing downloaded)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tests.data.conftest import make_tokenizer
from tests.models import tiny_llama


def tiny_model_and_tokenizer() -> tuple[nn.Module, Any]:
    tokenizer = make_tokenizer(add_bos=True)
    model = tiny_llama(vocab=len(tokenizer), hidden=32, layers=2)
    # The default init (std 0.02) caps a frozen head's logits near +-0.6, so no adapter could
    # lower the loss much; a head of std 0.3 lets the adapted layers express confident answers.
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
    return model, tokenizer


def write_data(folder: Path, count: int = 24) -> Path:
    words = ["one", "two", "three", "four", "five", "six", "seven", "eight"]
    path = folder / "train.jsonl"
    with path.open("w") as handle:
        for i in range(count):
            a, b = words[i % 8], words[(i * 3 + 1) % 8]
            handle.write(json.dumps({"prompt": f"Question: {a} {b}? Answer:", "completion": f" {b} {a}"})
                         + "\n")
    return path
