"""The merge fast path: one in-place addmm per adapter, and a finite check proven from a bound.

Checked against W0 + s B A in float64, on every kind of weight layout, and on the inputs where
the bound cannot prove anything (overflow, NaN, huge but finite values, half precision).
"""

import pytest
import torch
from torch import nn

from lorakit import LoraConfig, add_adapter, merge, unmerge
from lorakit.core.layers import LoraEmbedding, LoraLinear
from tests.models import MLP, randomize_adapters, tiny_gpt2


def reference_merged(layer, name="default"):
    """W0 + s B A in float64, laid out like the base weight."""
    a, b = (t.detach().double() for t in layer.factors(name))
    delta = (b @ a) * layer.scaling[name]
    return layer.base.weight.detach().double() + (delta.T if layer.weight_in_by_out else delta)


def test_merge_matches_float64_formula_on_every_layout():
    model = tiny_gpt2()  # Conv1D (in x out) and an embedding (num x dim)
    add_adapter(model, LoraConfig(r=4, alpha=8, targets=["c_attn", "c_fc", "wpe"]))
    randomize_adapters(model)
    linear = LoraLinear(nn.Linear(24, 40), r=3, alpha=5)  # a plain (out x in) linear
    randomize_adapters(linear)
    layers = [linear, model.transformer.h[0].attn.c_attn, model.transformer.h[1].mlp.c_fc,
              model.transformer.wpe]
    assert {type(layer) for layer in layers} == {LoraLinear, LoraEmbedding}
    expected = [reference_merged(layer) for layer in layers]
    originals = [layer.base.weight.detach().clone() for layer in layers]
    merge(model)
    linear.merge(["default"])  # a standalone layer: the layer's own merge
    for layer, want in zip(layers, expected, strict=True):
        torch.testing.assert_close(layer.base.weight.double(), want, rtol=1e-6, atol=1e-6)
    unmerge(model)
    linear.unmerge()
    for layer, original in zip(layers, originals, strict=True):
        torch.testing.assert_close(layer.base.weight, original, rtol=0, atol=1e-6)


def test_delta_bound_bounds_every_entry():
    layer = LoraLinear(nn.Linear(50, 30), r=6, alpha=-12)  # a negative scale too
    randomize_adapters(layer)
    with torch.no_grad():
        layer.lora_B["default"].weight.mul_(100)
    bound = layer.delta_bound("default")
    assert bound is not None
    assert layer.delta_weight("default").abs().max().item() <= bound


def test_delta_bound_is_none_for_dora_and_nan_for_non_finite_factors():
    layer = LoraLinear(nn.Linear(8, 8), r=2)
    layer.add("dora", 2, 1.0, use_dora=True)
    assert layer.delta_bound("dora") is None
    with torch.no_grad():
        layer.lora_A["default"].weight[0, 0] = float("nan")
    assert layer.delta_bound("default") != layer.delta_bound("default")  # NaN


def one_layer(weight_value: float, b_value: float, dtype=torch.float32):
    """A 4 x 4 linear whose weight entry (0, 0) is `weight_value`, with a rank-1 delta s B A
    that adds `b_value` at (0, 0) (A = e0, B = b_value e0, s = 1)."""
    base = nn.Linear(4, 4, bias=False).to(dtype)
    with torch.no_grad():
        base.weight.fill_(0.5)
        base.weight[0, 0] = weight_value
    layer = LoraLinear(base, r=1, alpha=1)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
        layer.lora_B["default"].weight.copy_(torch.tensor([[b_value], [0.0], [0.0], [0.0]]))
    return layer


def test_overflow_of_finite_values_is_refused_and_changes_nothing():
    layer = one_layer(3e38, 1e38)  # both finite, the sum is not
    before = layer.base.weight.clone()
    with pytest.raises(ValueError, match="non-finite weights"):
        layer.merge(["default"])
    assert torch.equal(layer.base.weight, before) and layer.merged_adapters == []


def test_huge_but_finite_merge_is_not_refused():
    layer = one_layer(2e38, -1e38)  # past the bound's margin: checked entry by entry, and finite
    layer.merge(["default"])
    assert layer.merged_adapters == ["default"]
    assert layer.base.weight[0, 0].item() == pytest.approx(1e38, rel=1e-6)


def test_non_finite_base_weight_is_refused():
    layer = one_layer(float("nan"), 1.0)
    with pytest.raises(ValueError, match="non-finite weights"):
        layer.merge(["default"])


def test_half_precision_overflow_is_refused():
    # 60000 + 10000 is finite in fp32 but inf in fp16, the dtype the merged weight is written in.
    layer = one_layer(60000.0, 10000.0, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"inf or NaN in torch.float16"):
        layer.merge(["default"])
    fine = one_layer(60000.0, -10000.0, dtype=torch.float16)  # the same size downwards is fine
    fine.merge(["default"])
    assert fine.base.weight[0, 0] == torch.tensor(50000.0).half()  # rounded once, to fp16


def test_several_adapters_merge_in_order_like_the_formula():
    model = MLP()
    add_adapter(model, LoraConfig(r=2, targets=["up"]), name="a")
    add_adapter(model, LoraConfig(r=3, alpha=9, targets=["up"]), name="b")
    randomize_adapters(model)
    layer = model.up
    want = reference_merged(layer, "a") + reference_merged(layer, "b") - layer.base.weight.double()
    merge(model, ["a", "b"])
    torch.testing.assert_close(layer.base.weight.double(), want, rtol=1e-6, atol=1e-6)
