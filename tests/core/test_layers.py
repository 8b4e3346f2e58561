"""The LoRA layer's forward: the plain formula, shared prepared inputs, dropout modes."""

import pytest
import torch

import lorakit
from lorakit import LoraConfig, add_adapter
from tests.models import MLP, logits, randomize_adapters, tiny_llama, tokens


def captured_adapter_inputs(model, names):
    seen = {}
    handles = [model.get_submodule(path).lora_A["default"].register_forward_pre_hook(
        lambda module, args, path=path: seen.setdefault(path, args[0])) for path in names]
    return seen, handles


def test_q_k_v_share_one_dropout_mask_and_layers_do_not():
    model = tiny_llama()
    add_adapter(model, LoraConfig(r=4, dropout=0.3))
    model.train()
    paths = [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "k_proj", "v_proj")]
    seen, handles = captured_adapter_inputs(model, paths)
    model(input_ids=tokens())
    for handle in handles:
        handle.remove()
    q0, k0, v0, q1 = (seen[p] for p in paths[:4])
    assert q0 is k0 is v0
    assert q1 is not q0
    assert (q0 == 0).any()  # dropout did run


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
