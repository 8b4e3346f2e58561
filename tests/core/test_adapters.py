import pytest
import torch
from torch import nn

import lorakit
from lorakit import LoraConfig, add_adapter, delete_adapter, disable_adapters, set_adapter
from tests.models import logits, randomize_adapters, tiny_gpt2, tiny_llama, tokens


def two_adapter_llama() -> nn.Module:
    model = tiny_llama()
    add_adapter(model, LoraConfig(r=2, targets=["q_proj", "v_proj"]), name="a")
    add_adapter(model, LoraConfig(r=4, targets=["v_proj", "down_proj"]), name="b")
    randomize_adapters(model)
    return model


def test_set_adapter_switches_outputs_and_trainables():
    model = two_adapter_llama()
    ids = tokens()
    out_b = logits(model, ids)
    set_adapter(model, "a")
    out_a = logits(model, ids)
    assert not torch.allclose(out_a, out_b)
    v = model.model.layers[0].self_attn.v_proj
    assert v.lora_A["a"].weight.requires_grad and not v.lora_A["b"].weight.requires_grad
    set_adapter(model, "b")
    assert torch.equal(logits(model, ids), out_b)


def test_several_active_adapters_add_their_deltas():
    model = two_adapter_llama()
    layer = model.model.layers[0].self_attn.v_proj
    x = torch.randn(3, 32)
    set_adapter(model, ["a", "b"])
    both = layer(x)
    with disable_adapters(model):
        base = layer(x)
    set_adapter(model, "a")
    only_a = layer(x)
    set_adapter(model, "b")
    only_b = layer(x)
    torch.testing.assert_close(both - base, (only_a - base) + (only_b - base), rtol=1e-5, atol=1e-6)


def test_set_adapter_unknown_lists_known():
    model = two_adapter_llama()
    with pytest.raises(ValueError, match="unknown adapter 'c'; adapters on this model: a, b"):
        set_adapter(model, "c")


def test_disable_adapters_gives_base_and_restores_even_on_error():
    base_model = tiny_llama()
    ids = tokens()
    expected_base = logits(base_model, ids)
    model = two_adapter_llama()
    adapted = logits(model, ids)
    with disable_adapters(model):
        assert torch.equal(logits(model, ids), expected_base)
    assert torch.equal(logits(model, ids), adapted)
    with pytest.raises(RuntimeError), disable_adapters(model):
        raise RuntimeError("boom")
    assert torch.equal(logits(model, ids), adapted)


def test_disable_adapters_while_merged():
    model = two_adapter_llama()
    ids = tokens()
    with disable_adapters(model):
        base = logits(model, ids)
    lorakit.merge(model)
    with disable_adapters(model):
        torch.testing.assert_close(logits(model, ids), base, rtol=1e-5, atol=1e-6)
    assert lorakit.merged_adapters(model) == ["b"]


def test_delete_adapter_frees_and_unwraps():
    model = two_adapter_llama()
    ids = tokens()
    set_adapter(model, "a")
    out_a = logits(model, ids)
    delete_adapter(model, "b")
    assert lorakit.list_adapters(model) == ["a"]
    assert not any(".b." in n or n.endswith(".b") for n, _ in model.named_parameters())
    # down_proj only had "b": it is a plain Linear again
    assert isinstance(model.model.layers[0].mlp.down_proj, nn.Linear)
    assert torch.equal(logits(model, ids), out_a)
    delete_adapter(model, "a")
    assert set(model.state_dict()) == set(tiny_llama().state_dict())


def test_delete_unknown_or_merged_adapter_is_an_error():
    model = two_adapter_llama()
    with pytest.raises(ValueError, match="unknown adapter 'zz'"):
        delete_adapter(model, "zz")
    lorakit.merge(model)
    with pytest.raises(ValueError, match="is merged"):
        delete_adapter(model, "b")


def test_switching_while_merged_is_refused():
    model = two_adapter_llama()
    lorakit.merge(model)
    with pytest.raises(ValueError, match="unmerge"):
        set_adapter(model, "a")


def test_dropout_zero_uses_no_copy_and_dropout_applies_in_training():
    model = tiny_gpt2()
    add_adapter(model, LoraConfig(r=2, targets=["c_attn"], dropout=0.0))
    assert isinstance(model.transformer.h[0].attn.c_attn.lora_dropout["default"], nn.Identity)
    model = tiny_gpt2()
    add_adapter(model, LoraConfig(r=2, targets=["c_attn"], dropout=0.5))
    randomize_adapters(model)
    model.train()
    ids = tokens()
    torch.manual_seed(0)
    first = model(input_ids=ids).logits
    second = model(input_ids=ids).logits
    assert not torch.equal(first, second)
