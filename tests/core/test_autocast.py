"""The fused functions under torch.autocast("cpu", torch.bfloat16): the plain formula's values and
gradients under the same autocast, with bf16 tolerances (8 bits of mantissa: about 0.4% per rounding)."""

import pytest
import torch
import torch.nn.functional as F

from lorakit import LoraConfig, add_adapter, fuse_gated_mlps
from lorakit.core.layers import LoraLinear
from lorakit.fusion.fused_attention import group_attention_inputs
from lorakit.kernels import paths
from lorakit.kernels.lora_function import draw_keep_mask, lora_linear, quantized_dropout
from lorakit.kernels.paths import AUTOGRAD, FUSED
from lorakit.kernels.shared_input import lora_linears_one_input
from lorakit.kernels.swiglu import swiglu_lora
from tests.models import autograd_nodes, loss_and_grads, randomize_adapters, tiny_llama, tokens


def bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def assert_close_bf16(ours, theirs):
    """Within 3% of the larger values: a handful of bf16 roundings apart, not a different formula."""
    scale = theirs.float().abs().max().item()
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=3e-2, atol=3e-2 * scale)


def plain(x_in, x, weight, bias, a, b, s):
    """base + s B A x_in with F.linear, which autocast runs in bf16."""
    return F.linear(x, weight, bias) + s * F.linear(F.linear(x_in, a), b)


def factors(out, r, inp):
    weight, bias = torch.randn(out, inp) / inp**0.5, torch.randn(out)
    a = (torch.randn(r, inp) / inp**0.5).requires_grad_()
    b = (torch.randn(out, r) / r**0.5).requires_grad_()
    return weight, bias, a, b


def compare(ours, theirs, leaves):
    assert all(o.dtype == torch.bfloat16 for o in ours)  # autocast's linear output dtype
    for o, t in zip(ours, theirs, strict=True):
        assert_close_bf16(o, t)
    grads = [torch.randn_like(t) for t in theirs]
    for g, w in zip(torch.autograd.grad(ours, leaves, grads), torch.autograd.grad(theirs, leaves, grads),
                    strict=True):
        assert g.dtype == w.dtype  # A's and B's gradients come back in their own dtype (fp32)
        assert_close_bf16(g, w)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_the_fused_linear_under_autocast(p):
    torch.manual_seed(0)
    x = torch.randn(4, 8, 64, requires_grad=True)
    weight, bias, a, b = factors(48, 8, 64)
    with bf16():
        torch.manual_seed(1)
        ours = lora_linear(x, weight, bias, a, b, 2.0, p)
        torch.manual_seed(1)  # the function's one draw is x's keep mask: drawn again from the same state
        x_in = x * draw_keep_mask(x, p) / (1 - quantized_dropout(p)) if p else x
        theirs = plain(x_in, x, weight, bias, a, b, 2.0)
    compare([ours], [theirs], (x, a, b))


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_the_shared_input_linears_under_autocast(p):
    torch.manual_seed(0)
    x = torch.randn(4, 8, 64, requires_grad=True)
    linears = [(*factors(out, 8, 64), 2.0) for out in (64, 16, 16)]
    with bf16():
        torch.manual_seed(1)
        ours = lora_linears_one_input(x, linears, p)
        torch.manual_seed(1)  # one mask for the whole group: drawn again from the same state
        x_in = x * draw_keep_mask(x, p) / (1 - quantized_dropout(p)) if p else x
        theirs = [plain(x_in, x, w, bias, a, b, s) for w, bias, a, b, s in linears]
    compare(ours, theirs, (x, *[t for _, _, a, b, _ in linears for t in (a, b)]))


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_swiglu_with_lora_down_under_autocast(p):
    torch.manual_seed(0)
    gate, up = (torch.randn(32, 96, dtype=torch.bfloat16, requires_grad=True)
                for _ in range(2))  # as linears give
    weight, bias, a, b = factors(64, 8, 96)
    with bf16():
        torch.manual_seed(1)
        ours = swiglu_lora(gate, up, weight, bias, a, b, 2.0, p)
        torch.manual_seed(1)  # swiglu_lora's one draw is down's mask
        keep = draw_keep_mask(gate, p) / (1 - quantized_dropout(p)) if p else 1.0
        h = F.silu(gate) * up
        theirs = plain(h * keep, h, weight, bias, a, b, 2.0)
    compare([ours], [theirs], (gate, up, a, b))


def test_a_layer_under_autocast_takes_the_fused_path():
    layer = LoraLinear(torch.nn.Linear(16, 8), r=4)
    assert paths.path_for(layer, torch.float32, autocast=True) == FUSED
    with bf16():
        out = layer(torch.randn(3, 16))
    node = out.grad_fn
    while type(node).__name__ != "LoraLinearFunctionBackward":
        node = node.next_functions[0][0]
    assert out.dtype == torch.bfloat16


def test_fp32_adapters_beside_a_bf16_base_take_the_fused_path_under_autocast_only():
    layer = LoraLinear(torch.nn.Linear(16, 8).to(torch.bfloat16), r=4)
    assert layer.lora_A["default"].weight.dtype == torch.float32  # adapters train in fp32, as PEFT's do
    assert paths.path_for(layer, torch.bfloat16, autocast=True) == FUSED
    assert paths.path_for(layer, torch.bfloat16, autocast=False) == AUTOGRAD


@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_a_fused_llama_under_autocast_trains_like_the_plain_one(dropout, base_dtype, monkeypatch):
    """Both an fp32 base and a bf16 one with fp32 adapters (how lorakit train runs on a GPU)."""
    results = []
    for fused in (True, False):
        model = tiny_llama().to(base_dtype)
        add_adapter(model, LoraConfig(r=4, dropout=dropout))
        randomize_adapters(model)
        if fused:
            fuse_gated_mlps(model)
            group_attention_inputs(model)
        else:  # the reference: every layer on the autograd path (torch's dropout: same p, its own masks)
            monkeypatch.setattr(paths, "fused_adapter", lambda *args: None)
        model.train()
        torch.manual_seed(0)
        with bf16():
            results.append(loss_and_grads(model, tokens()))
            nodes = {type(node).__name__ for node in autograd_nodes(model(input_ids=tokens()).logits)}
        assert ("LoraLinearFunctionBackward" in nodes and "SharedASideFunctionBackward" in nodes) == fused
    (loss_f, grads_f), (loss_p, grads_p) = results
    if dropout == 0:  # the same formula, bf16 roundings apart
        torch.testing.assert_close(loss_f.float(), loss_p.float(), rtol=2e-2, atol=2e-2)
        for name in grads_f:
            assert_close_bf16(grads_f[name], grads_p[name])
    else:  # different masks: the same loss level only
        torch.testing.assert_close(loss_f.float(), loss_p.float(), rtol=0.1, atol=0.1)
    assert all(torch.isfinite(g).all() for g in grads_f.values())
