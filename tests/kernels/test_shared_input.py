"""q, k, v (gate, up) with their A sides as one GEMM: the plain formula's values and gradients."""

import pytest
import torch

from lorakit import LoraConfig, add_adapter, fuse_gated_mlps
from lorakit.fusion.fused_attention import group_attention_inputs
from lorakit.kernels.lora_function import dropout_mask, quantized_dropout
from lorakit.kernels.shared_input import BaseAndBFunction, SharedASideFunction, lora_linears_one_input
from tests.models import loss_and_grads, randomize_adapters, tiny_llama, tokens


def members(with_bias):
    """Three linears of widths 7, 3, 3 reading 12 features, ranks 4, 2, 4, float64."""
    out = []
    for width, r, s in ((7, 4, 1.5), (3, 2, 0.5), (3, 4, 2.0)):
        weight = torch.randn(width, 12, dtype=torch.float64)
        bias = torch.randn(width, dtype=torch.float64) if with_bias else None
        a = torch.randn(r, 12, dtype=torch.float64, requires_grad=True)
        b = torch.randn(width, r, dtype=torch.float64, requires_grad=True)
        out.append((weight, bias, a, b, s))
    return out


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("with_bias", [False, True])
def test_values_and_gradients_equal_the_plain_formula(p, with_bias):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 12, dtype=torch.float64, requires_grad=True)
    linears = members(with_bias)
    ours = lora_linears_one_input(x, linears, p)
    mask = dropout_mask(x, p)  # the shared mask the call drew
    if p:
        assert mask is not None and 0 < mask.float().mean() < 1
    x_in = x if mask is None else x * mask / (1 - quantized_dropout(p))
    theirs = [x @ w.T + (0 if bias is None else bias) + s * (x_in @ a.T) @ b.T
              for w, bias, a, b, s in linears]
    leaves = (x, *[t for _, _, a, b, _ in linears for t in (a, b)])
    grads = [torch.randn_like(y) for y in theirs]
    for o, t in zip(ours, theirs, strict=True):
        torch.testing.assert_close(o, t, rtol=1e-12, atol=1e-12)
    for g, w in zip(torch.autograd.grad(ours, leaves, grads), torch.autograd.grad(theirs, leaves, grads),
                    strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_gradcheck_with_a_fixed_mask():
    torch.manual_seed(0)
    x = torch.randn(6, 12, dtype=torch.float64, requires_grad=True)
    (w1, b1, a1, f1, _), (w2, _, a2, f2, _), _ = members(True)
    mask = (torch.rand(6, 12) > 0.4).to(torch.uint8)

    def two(x, a1, a2, f1, f2):
        xa = SharedASideFunction.apply(x, mask, None, a1, a2)
        s1, s2 = xa.split([a1.shape[0], a2.shape[0]], dim=1)
        return (BaseAndBFunction.apply(x, w1, b1, s1, f1, 0.7),
                BaseAndBFunction.apply(x, w2, None, s2, f2, 1.3))

    assert torch.autograd.gradcheck(two, (x, a1, a2, f1, f2))


def train_step(group, dropout, seed=0):
    model = tiny_llama()
    add_adapter(model, LoraConfig(r=4, dropout=dropout))
    randomize_adapters(model)
    fuse_gated_mlps(model)
    if group:
        assert group_attention_inputs(model) == 2  # one attention block per layer
    model.train()
    torch.manual_seed(seed)
    return model, loss_and_grads(model, tokens())


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_a_grouped_llama_trains_like_the_ungrouped_one(dropout):
    # the group draws the one shared q/k/v mask where q would have: same seed, same masks, same step
    _, (loss_a, grads_a) = train_step(False, dropout)
    model, (loss_b, grads_b) = train_step(True, dropout)
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-6, atol=1e-6)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-6)
    attention, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    x = torch.randn(2, 3, 32, requires_grad=True)
    for y in (attention.q_proj(x), attention.k_proj(x), attention.v_proj(x), *mlp._gate_and_up(x)):
        assert type(y.grad_fn.next_functions[0][0]).__name__ == "BaseAndBFunctionBackward"


def test_each_forward_over_the_same_tensor_computes_again():
    model, _ = train_step(True, 0.5)
    attention = model.model.layers[0].self_attn
    x = torch.randn(2, 3, 32)
    first = attention.q_proj(x), attention.k_proj(x)
    second = attention.q_proj(x), attention.k_proj(x)
    assert not torch.equal(first[0], second[0])  # a new mask for the new forward
    assert not torch.equal(first[1], second[1])


def test_members_that_cannot_join_run_alone():
    model, _ = train_step(True, 0.0)
    attention = model.model.layers[0].self_attn
    attention.k_proj.disabled = True  # the base alone: not on the fused path
    x = torch.randn(2, 3, 32, requires_grad=True)
    q, k = attention.q_proj(x), attention.k_proj(x)
    torch.testing.assert_close(k, attention.k_proj.base(x))
    assert type(q.grad_fn.next_functions[0][0]).__name__ == "BaseAndBFunctionBackward"
    attention.v_proj.disabled = True  # q alone is left: no group
    q = attention.q_proj(torch.randn(2, 3, 32))
    assert type(q.grad_fn.next_functions[0][0]).__name__ == "LoraLinearFunctionBackward"


def test_gradient_checkpointing_recomputes_the_same_masks():
    # the recompute draws q/k/v's shared mask again from the restored RNG state, inside the group
    results = []
    for checkpointing in (False, True):
        model = tiny_llama()
        add_adapter(model, LoraConfig(r=4, dropout=0.3))
        randomize_adapters(model)
        fuse_gated_mlps(model)
        group_attention_inputs(model)
        if checkpointing:
            model.activation_checkpointing_enable()
        model.train()
        torch.manual_seed(0)
        results.append(loss_and_grads(model, tokens()))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-6, atol=1e-6)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-6)


def test_the_group_keeps_no_output_once_handed_over():
    import gc
    import weakref

    model, _ = train_step(True, 0.3)
    attention = model.model.layers[0].self_attn
    x = torch.randn(2, 3, 32, requires_grad=True)
    outputs = [attention.q_proj(x), attention.k_proj(x), attention.v_proj(x)]
    refs = [weakref.ref(y) for y in outputs]
    del outputs
    gc.collect()
    assert all(ref() is None for ref in refs)  # x (kept for backward) does not keep q, k and v alive
