"""The real default model (SmolLM2-135M-Instruct) served with two adapters: answers equal
`lorakit generate`."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from tests.serve.conftest import start

pytestmark = pytest.mark.slow

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_default_model_served_with_two_adapters_equals_generate(tmp_path):
    from lorakit import LoraConfig, add_adapter, disable_adapters, save_adapter, set_adapter
    from lorakit.hf import generate_text, load_model
    from lorakit.serve.engine import Engine

    model, tokenizer = load_model("default", dtype="float32", device="cpu")
    for i, name in enumerate(("x", "y")):
        add_adapter(model, LoraConfig(r=8, targets=TARGETS), name=name)
        generator = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for key, param in model.named_parameters():
                if f".{name}." in key:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.08)
        save_adapter(model, tmp_path / name, name=name)
    prompts = ["Name a colour.", "What is 2 + 2?"]
    expected = {}
    for name in ("x", "y", None):
        for prompt in prompts:
            if name is None:
                with disable_adapters(model):
                    expected[name, prompt] = generate_text(model, tokenizer, [prompt], 12)[0]
            else:
                set_adapter(model, name)
                expected[name, prompt] = generate_text(model, tokenizer, [prompt], 12)[0]
    assert len({expected[n, prompts[0]] for n in ("x", "y", None)}) > 1, "the adapters must change the answer"

    served_model, _ = load_model("default", dtype="float32", device="cpu")
    engine = Engine(served_model, tokenizer, "default", {n: str(tmp_path / n) for n in ("x", "y")})
    running = start(engine)
    try:
        client = running.client()

        def ask(job):
            name, prompt = job
            reply = client.chat.completions.create(model=name or "default", temperature=0, max_tokens=12,
                                                   messages=[{"role": "user", "content": prompt}])
            return reply.choices[0].message.content

        jobs = list(expected)
        with ThreadPoolExecutor(len(jobs)) as pool:
            assert list(pool.map(ask, jobs)) == [expected[job] for job in jobs]
    finally:
        running.stop()
