"""The LoRA layer's forward: the plain formula, dropout modes (the fused path: test_lora_function.py)."""

import pytest
import torch

import lorakit
from lorakit import LoraConfig, add_adapter
from tests.models import MLP, logits, randomize_adapters, tiny_llama, tokens


def test_forward_is_the_plain_formula_for_a_bf16_base():
    model = MLP().to(torch.bfloat16)
    add_adapter(model, LoraConfig(r=2, alpha=6, targets=["up"]))
    randomize_adapters(model)
    layer = model.up
    x = torch.randn(5, 16, dtype=torch.bfloat16)
    a, b = layer.a("default").weight, layer.b("default").weight
    expected = layer.base(x) + (3.0 * x.float() @ a.T @ b.T).to(torch.bfloat16)
    torch.testing.assert_close(layer(x), expected, rtol=1e-2, atol=1e-2)


def test_dropout_follows_the_model_mode_when_added():
    model = tiny_llama().eval()
    add_adapter(model, LoraConfig(r=4, dropout=0.5))
    randomize_adapters(model)
    ids = tokens()
    assert torch.equal(logits(model, ids), logits(model, ids))  # eval: no dropout
    model.train()
    assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)


def test_add_adapter_on_a_merged_model_is_refused_before_any_change():
    model = tiny_llama()
    add_adapter(model, LoraConfig(r=2, targets=["q_proj"]), name="a")
    lorakit.merge(model)
    keys = set(model.state_dict())
    with pytest.raises(ValueError, match="unmerge"):
        add_adapter(model, LoraConfig(r=2, targets=["v_proj"]), name="b")
    assert set(model.state_dict()) == keys and lorakit.list_adapters(model) == ["a"]
