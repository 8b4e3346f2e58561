"""A tiny Llama, eight adapters and a running server on 127.0.0.1, for the serve tests."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from lorakit.serve.server import BackgroundServer
from tests.hf.conftest import build_model, build_tokenizer

ADAPTERS = [f"a{i}" for i in range(8)]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class Files:
    """The tiny model's folder and an adapter folder holding one subfolder per adapter."""

    model: Path
    adapters: Path


@pytest.fixture(scope="session")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    from lorakit import LoraConfig, add_adapter, save_adapter

    tokenizer = build_tokenizer()
    model = build_model(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    with torch.no_grad():  # a wider tied embedding gives confident logits: greedy choices are clear-cut
        model.model.embed_tokens.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    folder = tmp_path_factory.mktemp("serve-model")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    adapters = tmp_path_factory.mktemp("serve-adapters")
    for i, name in enumerate(ADAPTERS):
        add_adapter(model, LoraConfig(r=4, alpha=8, targets=TARGETS), name=name)
        generator = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for key, param in model.named_parameters():
                if f".{name}." in key:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
        save_adapter(model, adapters / name, name=name)
    return Files(model=folder, adapters=adapters)


def load(files: Files, adapters: list[str] = ADAPTERS) -> tuple[Any, Any]:
    """A fresh copy of the tiny model with `adapters` loaded under their names, and its tokenizer."""
    from lorakit import load_adapter
    from lorakit.hf import load_model

    model, tokenizer = load_model(str(files.model), dtype="float32", device="cpu")
    for name in adapters:
        load_adapter(model, files.adapters / name, name=name)
    return model, tokenizer


class Running(BackgroundServer):
    """A server on a thread of the test process; `client()` is the official openai client pointed at it."""

    def client(self, api_key: str = "none", **options: Any) -> Any:
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, **options)


def start(engine: Any, api_key: str | None = None) -> Running:
    """Serve `engine` with uvicorn in a thread on a free port of 127.0.0.1."""
    return Running(engine, api_key=api_key)


def make_engine(files: Files, **options: Any) -> Any:
    from lorakit.serve.engine import Engine

    model, tokenizer = load(files, adapters=[])
    adapters = {name: str(files.adapters / name) for name in ADAPTERS}
    return Engine(model, tokenizer, "tiny", adapters, adapter_dir=files.adapters, **options)


@pytest.fixture(scope="session")
def served(files: Files) -> Iterator[Running]:
    """One server for the module's tests: base "tiny", adapters a0..a7, --adapter-dir the adapters' folder."""
    running = start(make_engine(files, max_batch=16, max_queue=64))
    yield running
    running.stop()


@pytest.fixture(scope="session")
def reference(files: Files) -> Any:
    """`lorakit generate`'s answer (generate_text, greedy) for (adapter or None, prompt, max tokens, chat)."""
    from lorakit import disable_adapters, set_adapter
    from lorakit.hf import generate_text

    model, tokenizer = load(files)
    answers: dict[tuple[str | None, str, int, bool], str] = {}

    def answer(adapter: str | None, prompt: str, max_tokens: int, chat: bool = True) -> str:
        key = (adapter, prompt, max_tokens, chat)
        if key not in answers:
            if adapter is None:
                with disable_adapters(model):
                    answers[key] = generate_text(model, tokenizer, [prompt], max_tokens, chat=chat)[0]
            else:
                set_adapter(model, adapter)
                answers[key] = generate_text(model, tokenizer, [prompt], max_tokens, chat=chat)[0]
        return answers[key]

    return answer
