import pytest
import torch

import lorakit
from lorakit import LoraConfig, add_adapter, merge, merge_and_unload, unmerge
from lorakit.core.layers import LoraLinear
from tests.models import MLP, MODEL_BUILDERS, logits, randomize_adapters, tiny_gpt2, tiny_llama, tokens


def adapted(builder, **config):
    model = builder()
    add_adapter(model, LoraConfig(r=4, alpha=8, **config))
    randomize_adapters(model)
    return model


def assert_relative_close(actual, expected, rel):
    assert (actual - expected).abs().max() <= rel * expected.abs().max()


@pytest.mark.parametrize("arch", sorted(MODEL_BUILDERS))
def test_merged_equals_unmerged_and_unmerge_restores(arch):
    model = adapted(MODEL_BUILDERS[arch])
    original = {k: v.clone() for k, v in model.state_dict().items() if ".base." in k}
    ids = tokens()
    unmerged = logits(model, ids)
    merge(model)
    assert_relative_close(logits(model, ids), unmerged, 1e-5)
    unmerge(model)
    for key, value in model.state_dict().items():
        if key in original:
            torch.testing.assert_close(value, original[key], rtol=0, atol=1e-6)
    assert_relative_close(logits(model, ids), unmerged, 1e-5)


def test_merge_twice_is_merge_once():
    model = adapted(tiny_llama)
    ids = tokens()
    merge(model)
    once = logits(model, ids)
    weight = model.model.layers[0].self_attn.q_proj.base.weight.clone()
    merge(model)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.base.weight, weight)
    assert torch.equal(logits(model, ids), once)


def test_merge_and_unload_restores_classes_and_keys():
    base = tiny_gpt2()
    keys = set(base.state_dict())
    model = adapted(tiny_gpt2, targets=["c_attn", "c_fc", "wpe"])
    ids = tokens()
    expected = logits(model, ids)
    result = merge_and_unload(model)
    assert result is model
    assert set(model.state_dict()) == keys
    assert type(model.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    assert not any("lorakit" in type(m).__module__ for m in model.modules())
    assert not any(k.startswith("lorakit") for k in vars(model))
    assert_relative_close(logits(model, ids), expected, 1e-5)


def test_merge_and_unload_keeps_modules_to_save_copy():
    from tests.models import tiny_bert

    model = tiny_bert()
    add_adapter(model, LoraConfig(r=2, targets=["query"], modules_to_save=["classifier"]))
    randomize_adapters(model)
    with torch.no_grad():
        model.classifier.modules_to_save["default"].weight.add_(1.0)
    ids = tokens()
    expected = logits(model, ids)
    merge_and_unload(model)
    assert set(model.state_dict()) == set(tiny_bert().state_dict())
    assert_relative_close(logits(model, ids), expected, 1e-5)


def test_safe_merge_refuses_non_finite_and_changes_nothing():
    model = adapted(tiny_llama, targets=["q_proj", "v_proj"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.lora_B["default"].weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"adapter 'default' into 'model.layers.1.self_attn.v_proj'"):
        merge(model)
    assert lorakit.merged_adapters(model) == []
    for key, value in model.state_dict().items():
        if "lora_B" not in key:
            assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_merge_computes_delta_in_fp32(dtype):
    model = MLP().to(dtype)
    add_adapter(model, LoraConfig(r=2, targets=["up"]))
    layer = model.up
    assert isinstance(layer, LoraLinear) and layer.lora_A["default"].weight.dtype == torch.float32
    randomize_adapters(model)
    expected = (layer.base.weight.float() + layer.delta_weight("default")).to(dtype)
    merge(model)
    assert torch.equal(layer.base.weight, expected)


def test_merge_names_and_unknown_name():
    model = tiny_llama()
    add_adapter(model, LoraConfig(r=2, targets=["q_proj"]), name="a")
    add_adapter(model, LoraConfig(r=2, targets=["q_proj"]), name="b")
    randomize_adapters(model)
    lorakit.set_adapter(model, ["a", "b"])
    ids = tokens()
    expected = logits(model, ids)
    merge(model, ["a", "b"])
    assert_relative_close(logits(model, ids), expected, 1e-5)
    with pytest.raises(ValueError, match="unknown adapter 'c'"):
        merge(model, ["c"])


def test_merging_into_a_tied_embedding_is_refused():
    model = adapted(tiny_gpt2, targets=["wte"])  # GPT-2 ties wte to lm_head
    with pytest.raises(ValueError, match="its weight is tied to lm_head.weight"):
        merge(model)
    assert lorakit.merged_adapters(model) == []
