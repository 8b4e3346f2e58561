"""The fused LoRA linear: the plain formula's values and gradients, shared masks, nothing extra kept."""

import pytest
import torch

from lorakit import LoraConfig, add_adapter
from lorakit.kernels import lora_function, paths
from lorakit.kernels.lora_function import (
    LoraLinearFunction,
    LoraUpdateFunction,
    dropout_mask,
    lora_linear,
    lora_update,
    quantized_dropout,
)
from lorakit.quant import quantize_model
from tests.models import MLP, loss_and_grads, randomize_adapters, tiny_llama, tokens


def fused_node(out):
    """The autograd node that made `out`, past the reshape back to x's leading dims."""
    node = out.grad_fn
    while type(node).__name__ in ("ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0"):
        node = node.next_functions[0][0]
    return node


def plain(x, weight, bias, a, b, scale, mask, p):
    """The formula with autograd ops: base + s * B A (x * m / (1 - p)), p as the masks draw it."""
    x_in = x if mask is None else x * mask / (1 - quantized_dropout(p))
    out = x @ weight.T + scale * (x_in @ a.T) @ b.T
    return out if bias is None else out + bias


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("with_bias", [False, True])
def test_values_and_gradients_equal_the_plain_formula(p, with_bias):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 12, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 12, dtype=torch.float64)
    bias = torch.randn(7, dtype=torch.float64) if with_bias else None
    a = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    out = lora_linear(x, weight, bias, a, b, 1.5, p)
    mask = dropout_mask(x, p)  # the cached mask the call used
    if p:
        assert mask is not None and 0 < mask.float().mean() < 1
    expected = plain(x, weight, bias, a, b, 1.5, mask, p)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, a, b), grad)
    want = torch.autograd.grad(expected, (x, a, b), grad)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_gradcheck_with_a_fixed_mask():
    torch.manual_seed(0)
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 5, dtype=torch.float64)
    a = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    mask = (torch.rand(6, 5) > 0.4).to(torch.uint8)
    assert torch.autograd.gradcheck(
        lambda x, a, b: LoraLinearFunction.apply(x, weight, None, a, b, 0.7, mask), (x, a, b))


def test_backward_keeps_the_input_itself_and_no_copy_of_it():
    x = torch.randn(8, 16, requires_grad=True)
    layer = add_adapter(MLP(), LoraConfig(r=2, dropout=0.5, targets=["up"])).up
    layer.train()
    out = layer(x)
    node = fused_node(out)
    assert type(node).__name__ == "LoraLinearFunctionBackward"
    saved = node.saved_tensors
    input_sized = [t for t in saved if t.shape == x.shape]
    # x itself (same storage) and the mask at a bit per entry: no dropped-out float copy, no byte mask
    assert [str(t.dtype) for t in input_sized] == ["torch.float32"]
    assert input_sized[0].untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    assert [(t.dtype, t.numel()) for t in saved if t.dtype == torch.uint8] == [(torch.uint8, x.numel() // 8)]


def test_q_k_v_share_one_dropout_mask_and_layers_do_not(monkeypatch):
    model = tiny_llama()
    add_adapter(model, LoraConfig(r=4, dropout=0.3))
    model.train()
    masks = []
    original = lora_function.dropout_mask
    monkeypatch.setattr(lora_function, "dropout_mask",
                        lambda x, p, *reader: masks.append(original(x, p, *reader)) or masks[-1])
    model(input_ids=tokens())
    q0, k0, v0, o0, gate0, up0, down0, q1 = masks[:8]
    assert torch.equal(q0, k0) and torch.equal(q0, v0) and torch.equal(gate0, up0)  # k and v unpack q's
    assert not torch.equal(q1, q0) and not torch.equal(o0, q0) and not torch.equal(down0, gate0)
    assert (q0 == 0).any() and (q0 == 1).any()  # dropout did run


def test_dropout_keeps_each_value_with_probability_1_minus_p():
    torch.manual_seed(0)
    x = torch.randn(400, 500)
    kept = dropout_mask(x, 0.05).float().mean().item()
    assert abs(kept - 0.95) < 0.002  # 200,000 draws: the standard error is 0.0005


@pytest.mark.parametrize("case", ["bf16 base", "two active adapters", "trainable bias"])
def test_other_cases_take_the_general_path(case):
    model = MLP()
    if case == "bf16 base":
        model = model.to(torch.bfloat16)
    add_adapter(model, LoraConfig(r=2, targets=["up"]), name="a")
    if case == "two active adapters":
        add_adapter(model, LoraConfig(r=2, targets=["up"]), name="b")
        model.up.active_adapters = ["a", "b"]
    if case == "trainable bias":
        model.up.base.bias.requires_grad_(True)
    randomize_adapters(model)
    x = torch.randn(3, 16, dtype=next(model.parameters()).dtype)
    out = model.up(x)
    assert type(fused_node(out)).__name__ != "LoraLinearFunctionBackward"
    layer = model.up
    expected = layer.base(x).float()
    for name in layer.active_adapters:
        expected = (expected + layer.scaling[name] * (x.float() @ layer.a(name).weight.float().T)
                    @ layer.b(name).weight.float().T)
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)


def test_a_frozen_adapter_gets_no_gradient_and_x_still_does():
    layer = add_adapter(MLP(), LoraConfig(r=2, targets=["up"])).up
    for param in (layer.a("default").weight, layer.b("default").weight):
        param.requires_grad_(False)
    x = torch.randn(4, 16, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and layer.a("default").weight.grad is None


def test_bad_dropout_is_refused():
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\), got 1.0"):
        dropout_mask(torch.zeros(2), 1.0)


def test_the_fused_layer_trains_like_the_general_one(monkeypatch):
    # same adapter, same batch, dropout 0: the fused and general paths give the same loss and grads
    results = []
    for fused in (True, False):
        model = tiny_llama()
        add_adapter(model, LoraConfig(r=4))
        randomize_adapters(model)
        model.train()
        if not fused:
            monkeypatch.setattr(paths, "fused_adapter", lambda *args: None)
        q_proj = model.model.layers[0].self_attn.q_proj
        assert (type(fused_node(q_proj(torch.randn(2, 32)))).__name__
                == "LoraLinearFunctionBackward") == fused
        results.append(loss_and_grads(model, tokens()))
    (loss_f, grads_f), (loss_g, grads_g) = results
    torch.testing.assert_close(loss_f, loss_g, rtol=1e-6, atol=1e-6)
    for name in grads_f:
        torch.testing.assert_close(grads_f[name], grads_g[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_the_update_function_equals_the_plain_formula(p):
    torch.manual_seed(0)
    base_out = torch.randn(10, 7, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    a = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    out = lora_update(base_out.reshape(2, 5, 7), x, a, b, 1.5, p)
    mask = dropout_mask(x, p)
    x_in = x if mask is None else x * mask / (1 - quantized_dropout(p))
    expected = base_out.reshape(2, 5, 7) + 1.5 * (x_in @ a.T) @ b.T
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(out)
    for g, w in zip(torch.autograd.grad(out, (base_out, x, a, b), grad),
                    torch.autograd.grad(expected, (base_out, x, a, b), grad), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    fixed = None if mask is None else mask.reshape(10, 12)
    assert torch.autograd.gradcheck(
        lambda o, x, a, b: LoraUpdateFunction.apply(o, x, a, b, 0.7, fixed),
        (base_out, x.detach().reshape(10, 12).requires_grad_(), a, b))


def test_a_4bit_base_keeps_no_dropped_out_copy_and_no_dense_weight():
    model = MLP()
    quantize_model(model)
    layer = add_adapter(model, LoraConfig(r=2, dropout=0.5, targets=["up"])).up
    layer.train()
    x = torch.randn(8, 16, requires_grad=True)
    out = layer(x)
    node = fused_node(out)
    # the fused path, W dequantized again in backward
    assert type(node).__name__ == "LoraLinearFunctionBackward"
    assert not [t for t in node.saved_tensors if t is not None and t.shape == (layer.out_features, 16)]
    input_sized = [t for t in node.saved_tensors if t is not None and t.shape == x.shape]
    assert [str(t.dtype) for t in input_sized] == ["torch.float32"]
    assert [t.numel() for t in node.saved_tensors
            if t is not None and t.dtype == torch.uint8] == [x.numel() // 8]
    out.sum().backward()
    assert x.grad is not None and layer.a("default").weight.grad is not None


def test_without_autograd_the_same_values_come_out():
    layer = add_adapter(MLP(), LoraConfig(r=2, targets=["up"])).up
    randomize_adapters(layer)
    x = torch.randn(3, 4, 16)
    with torch.no_grad():
        quick = layer(x)
    assert quick.grad_fn is None
    torch.testing.assert_close(quick, layer(x).detach(), rtol=0, atol=0)


def test_dropout_is_rounded_to_a_multiple_of_2_to_the_minus_16():
    assert quantized_dropout(0.05) == 3277 / 65536  # 0.0500031: 3.1e-6 above
    assert quantized_dropout(0.0) == 0.0 and quantized_dropout(5e-6) == 0.0  # below 2^-17: no dropout
    assert quantized_dropout(0.999999) == 65535 / 65536  # never 1: the scale 1 / (1 - p) stays finite
    assert dropout_mask(torch.zeros(3, 4), 5e-6) is None


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_every_mask_entry_is_kept_with_probability_1_minus_the_rounded_p(p):
    # one int64 draw gives four entries: each of the four lanes must have the same keep rate
    torch.manual_seed(0)
    mask = lora_function.draw_keep_mask(torch.empty(1000, 4000), p)
    assert mask.dtype == torch.uint8 and mask.shape == (1000, 4000) and set(mask.unique().tolist()) == {0, 1}
    keep = 1 - quantized_dropout(p)
    lanes = mask.reshape(-1, 4).double().mean(dim=0)  # 1,000,000 entries per lane
    sigma = (keep * (1 - keep) / 1_000_000) ** 0.5
    assert ((lanes - keep).abs() < 5 * sigma).all(), (lanes, keep)
    # neighbours are independent: P(both kept) = keep^2
    pairs = (mask[:, :-1] & mask[:, 1:]).double().mean().item()
    assert abs(pairs - keep**2) < 5 * (keep**2 * (1 - keep**2) / mask[:, 1:].numel()) ** 0.5


def test_the_same_rng_state_draws_the_same_mask():
    x = torch.empty(33, 17)  # 561 entries: not a multiple of 4
    torch.manual_seed(3)
    first = lora_function.draw_keep_mask(x, 0.3)
    torch.manual_seed(3)
    assert torch.equal(first, lora_function.draw_keep_mask(x, 0.3))
    assert not torch.equal(first, lora_function.draw_keep_mask(x, 0.3))
