"""LoraLinear's inference path (no autograd, one plain adapter, no dropout): the plain formula, and
taken only where it applies; everywhere else forward decides as it does with autograd on."""

import pytest
import torch
from torch import nn

from lorakit import LoraConfig, add_adapter, disable_adapters, set_adapter
from lorakit.core.layers import LoraLinear
from lorakit.fusion.fused_attention import group_attention_inputs
from lorakit.kernels import dispatch
from tests.models import randomize_adapters, tiny_llama, tokens


def one_layer(dropout: float = 0.0, bias: bool = True, dtype: torch.dtype = torch.float32) -> LoraLinear:
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(12, 10, bias=bias, dtype=dtype), "proj", r=4, alpha=8, dropout=dropout)
    with torch.no_grad():
        for factor in layer.factors("default"):
            factor.normal_()
    return layer


def formula(layer: LoraLinear, x: torch.Tensor, names: list[str]) -> torch.Tensor:
    """W0 x + bias + sum of s B A x in float64: the reference."""
    base = layer.base
    out = x.double() @ base.weight.double().T + (0 if base.bias is None else base.bias.double())
    for name in names:
        a, b = (t.double() for t in layer.factors(name))
        out = out + layer.scaling[name] * (x.double() @ a.T) @ b.T
    return out


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(5, 12), (2, 3, 12), (1, 1, 12)])
def test_eval_output_is_the_formula_and_equals_the_autograd_forward(bias, shape):
    layer = one_layer(dropout=0.1, bias=bias).eval()
    x = torch.randn(*shape)
    with torch.no_grad():
        assert dispatch.inference(layer, x) is not None
        fast = layer(x)
    slow = layer(x)  # autograd on: the fused autograd function
    assert fast.shape == (*shape[:-1], 10)
    torch.testing.assert_close(fast.double(), formula(layer, x, ["default"]), rtol=1e-5, atol=1e-5)
    assert torch.equal(fast, slow.detach())


def test_training_mode_without_dropout_takes_it_and_with_dropout_does_not():
    x = torch.randn(6, 12)
    with torch.no_grad():
        assert dispatch.inference(one_layer(dropout=0.0).train(), x) is not None
        layer = one_layer(dropout=0.5).train()
        assert dispatch.inference(layer, x) is None
        torch.manual_seed(3)
        dropped = layer(x)
    # dropout still applies: the output is not the formula without it
    assert not torch.allclose(dropped.double(), formula(layer, x, ["default"]), atol=1e-3)


def test_other_cases_fall_back_to_the_general_paths():
    x = torch.randn(4, 12)
    layer = one_layer().eval()
    with torch.no_grad():
        layer.add("second", r=2, scale=1.5)
        layer.set_active(["default", "second"])
        torch.nn.init.normal_(layer.factors("second")[1])
        assert dispatch.inference(layer, x) is None  # two live adapters
        torch.testing.assert_close(layer(x).double(), formula(layer, x, ["default", "second"]),
                                   rtol=1e-5, atol=1e-5)
        layer.set_active(["default"])
        assert dispatch.inference(layer, x.double()) is None  # x in another dtype than W, A and B
        with torch.autocast("cpu", torch.bfloat16):
            assert dispatch.inference(layer, x) is None
        layer.add("dora", r=2, scale=1.0, use_dora=True)
        layer.set_active(["dora"])
        assert dispatch.inference(layer, x) is None
        layer.set_active([])
        assert dispatch.inference(layer, x) is None
        torch.testing.assert_close(layer(x).double(), formula(layer, x, []), rtol=1e-6, atol=1e-6)


def test_a_16_bit_layer_runs_in_its_dtype():
    layer = one_layer(dtype=torch.bfloat16).eval()
    x = torch.randn(3, 12, dtype=torch.bfloat16)
    with torch.no_grad():
        # fp32 adapters beside a 16-bit base: the autograd path's casts
        assert dispatch.inference(layer, x) is None
        layer.to(torch.bfloat16)
        assert dispatch.inference(layer, x) is not None
        out = layer(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), formula(layer, x, ["default"]), rtol=2e-2, atol=5e-2)


def test_a_whole_model_without_autograd_equals_it_with_autograd_grouped_or_not():
    torch.manual_seed(0)
    model = tiny_llama()
    add_adapter(model, LoraConfig(r=4, alpha=8, dropout=0.1), name="a")
    add_adapter(model, LoraConfig(r=2, alpha=2), name="b")
    randomize_adapters(model)
    model.eval()
    ids = tokens()
    for grouped in (False, True):
        if grouped:
            group_attention_inputs(model)
        for name in ("a", "b"):
            set_adapter(model, name)
            with torch.no_grad():
                fast = model(input_ids=ids).logits
            torch.testing.assert_close(fast, model(input_ids=ids).logits.detach(), rtol=1e-5, atol=1e-5)
    with disable_adapters(model), torch.no_grad():
        plain = model(input_ids=ids).logits
    assert not torch.allclose(plain, fast, atol=1e-3)  # the adapter did change the output
