"""Norm outputs rebuilt in backward: bit for bit the forward's, the plain formula's gradients, the
norm's input kept instead of its output."""

import pytest
import torch
from torch import nn

from lorakit import LoraConfig, add_adapter, fuse_gated_mlps
from lorakit.fusion.fused_attention import group_attention_inputs
from lorakit.kernels.lora_function import dropout_mask, quantized_dropout
from lorakit.kernels.rebuild import rebuild, rebuild_outputs, rebuild_source
from lorakit.kernels.shared_input import lora_linears_one_input
from tests.models import autograd_nodes, loss_and_grads, randomize_adapters, tiny_llama, tokens


def norms():
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    out = [LlamaRMSNorm(12), GemmaRMSNorm(12), nn.LayerNorm(12), nn.RMSNorm(12)]  # Gemma: (1 + w) offset
    with torch.no_grad():
        for norm in out:
            for p in norm.parameters():
                p.normal_()
    return out


@pytest.mark.parametrize("norm", norms(), ids=lambda m: type(m).__name__)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_rebuilt_output_is_the_forward_output_bit_for_bit(norm, dtype):
    norm = norm.to(dtype)
    rebuild_outputs(norm)
    x = torch.randn(4, 7, 12, dtype=dtype, requires_grad=True)
    y = norm(x)
    source = rebuild_source(y)
    assert source is not None and source[0] is norm and source[1] is x
    assert torch.equal(rebuild(*source), y)


def test_only_outputs_made_under_autograd_and_without_other_hooks_are_marked():
    norm = nn.LayerNorm(12)
    rebuild_outputs(norm)
    rebuild_outputs(norm)  # idempotent: one hook
    assert len(norm._forward_hooks) == 1
    x = torch.randn(3, 12)
    with torch.no_grad():
        assert rebuild_source(norm(x)) is None
    assert rebuild_source(norm(x)) is not None
    handle = norm.register_forward_hook(lambda module, args, output: output * 2)
    assert rebuild_source(norm(x)) is None  # a hook that may change the output: nothing to rebuild from
    handle.remove()
    norm.register_forward_pre_hook(lambda module, args: (args[0] * 2,))
    assert rebuild_source(norm(x)) is None


class OffsetRMSNorm(nn.Module):
    """Gemma's RMSNorm (weight applied as 1 + w) in the input's dtype (Gemma's own computes in fp32)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.eps = 1e-6
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight)


def test_an_output_or_input_changed_in_place_is_not_rebuilt():
    norm = nn.LayerNorm(12)
    rebuild_outputs(norm)
    x = torch.randn(3, 12)
    y = norm(x)
    with torch.no_grad():
        y.mul_(2)  # the model changed the output after the norm: the norm would not give it back
    assert rebuild_source(y) is None
    y = norm(x)
    x.add_(1)  # the input changed: the norm would give something else back
    assert rebuild_source(y) is None


def members():
    out = []
    for width, r, s in ((7, 4, 1.5), (3, 2, 0.5)):
        weight = torch.randn(width, 12, dtype=torch.float64)
        a = torch.randn(r, 12, dtype=torch.float64, requires_grad=True)
        b = torch.randn(width, r, dtype=torch.float64, requires_grad=True)
        out.append((weight, None, a, b, s))
    return out


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_an_a_side_on_a_marked_norm_has_the_plain_formulas_values_and_gradients(p):
    torch.manual_seed(0)
    norm = OffsetRMSNorm(12).double()
    with torch.no_grad():
        norm.weight.normal_()
    rebuild_outputs(norm)
    x = torch.randn(3, 5, 12, dtype=torch.float64, requires_grad=True)
    linears = members()
    y = norm(x)
    ours = lora_linears_one_input(y, linears, p)
    mask = dropout_mask(y, p)  # the mask the call drew
    # the plain formula, norm included, with autograd ops
    plain_y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * (1 + norm.weight)
    y_in = plain_y if mask is None else plain_y * mask / (1 - quantized_dropout(p))
    theirs = [plain_y @ w.T + s * (y_in @ a.T) @ b.T for w, _, a, b, s in linears]
    leaves = (x, norm.weight, *[t for _, _, a, b, _ in linears for t in (a, b)])
    grads = [torch.randn_like(t) for t in theirs]
    for o, t in zip(ours, theirs, strict=True):
        torch.testing.assert_close(o, t, rtol=1e-12, atol=1e-12)
    for g, w in zip(torch.autograd.grad(ours, leaves, grads), torch.autograd.grad(theirs, leaves, grads),
                    strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_a_marked_module_that_hands_back_its_input_is_not_masked_in_place():
    # backward masks a rebuilt x in place; a "norm" whose forward returns its input gives back the
    # kept tensor itself, which must stay as it was
    class PassThrough(nn.Module):
        def forward(self, x):
            return x

    torch.manual_seed(0)
    module = PassThrough()
    rebuild_outputs(module)
    hidden = torch.randn(3, 5, 12, dtype=torch.float64, requires_grad=True)
    x = hidden * 1.0  # not a leaf, as a norm's input in a model
    kept = x.detach().clone()
    linears = members()
    ours = lora_linears_one_input(module(x), linears, 0.3)
    mask = dropout_mask(x, 0.3)
    theirs = [x @ w.T + s * ((x * mask / (1 - quantized_dropout(0.3))) @ a.T) @ b.T
              for w, _, a, b, s in linears]
    leaves = (hidden, *[t for _, _, a, b, _ in linears for t in (a, b)])
    grads = [torch.randn_like(t) for t in theirs]
    ours_grads = torch.autograd.grad(ours, leaves, grads, retain_graph=True)  # the two graphs share x
    for g, w in zip(ours_grads, torch.autograd.grad(theirs, leaves, grads), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    assert torch.equal(x, kept)


def llama(mark):
    model = tiny_llama()
    add_adapter(model, LoraConfig(r=4, dropout=0.3))
    randomize_adapters(model)
    fuse_gated_mlps(model)
    group_attention_inputs(model)
    if not mark:
        for module in model.modules():
            module._forward_hooks.clear()
    model.train()
    return model


def test_a_llama_trains_bit_for_bit_as_when_the_norm_outputs_are_kept():
    results = []
    for mark in (False, True):
        model = llama(mark)
        torch.manual_seed(0)
        results.append(loss_and_grads(model, tokens()))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name


def a_side_node(out):
    """The SharedASideFunction node behind one member's output."""
    found = [n for n in autograd_nodes(out) if type(n).__name__ == "SharedASideFunctionBackward"]
    assert found, "no shared A side"
    return found[0]


def test_the_a_sides_keep_the_norms_input_and_not_its_output():
    model = llama(True)
    layer = model.model.layers[0]
    assert not model.model.norm._forward_hooks  # the final norm feeds no group: left alone
    x = torch.randn(2, 3, 32, requires_grad=True)
    attention = layer.self_attn
    for norm, block in ((layer.input_layernorm, lambda y: attention.q_proj(y)),
                        (layer.post_attention_layernorm, lambda y: layer.mlp._gate_and_up(y)[0])):
        assert len(norm._forward_hooks) == 1
        y = norm(x)
        saved = a_side_node(block(y)).saved_tensors
        storages = {t.untyped_storage().data_ptr() for t in saved if t is not None}
        assert x.untyped_storage().data_ptr() in storages  # the norm's input (which the norm keeps anyway)
        assert y.untyped_storage().data_ptr() not in storages  # not its output
