"""The fused SwiGLU: the MLP's own values and gradients, less kept for backward."""

import pytest
import torch

from lorakit import LoraConfig, add_adapter, fuse_gated_mlps
from lorakit.kernels.swiglu import SwiGLUFunction, SwiGLULoraFunction, swiglu
from tests.models import MLP, loss_and_grads, randomize_adapters, tiny_gpt2, tiny_llama, tokens


def test_gradcheck():
    gate = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    up = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(SwiGLUFunction.apply, (gate, up))


def test_values_and_gradients_equal_silu_times_up():
    gate = torch.randn(4, 9, requires_grad=True)
    up = torch.randn(4, 9, requires_grad=True)
    grad = torch.randn(4, 9)
    ours = swiglu(gate, up)
    theirs = torch.nn.functional.silu(gate) * up
    assert torch.equal(ours, theirs)
    for a, b in zip(torch.autograd.grad(ours, (gate, up), grad),
                    torch.autograd.grad(theirs, (gate, up), grad), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_a_llama_with_fused_mlps_trains_exactly_like_the_original():
    results = []
    for fuse in (False, True):
        model = tiny_llama()
        add_adapter(model, LoraConfig(r=4))
        randomize_adapters(model)
        model.train()
        if fuse:
            assert fuse_gated_mlps(model) == 2  # one per layer
            assert fuse_gated_mlps(model) == 0  # already done
        results.append(loss_and_grads(model, tokens()))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-6, atol=1e-6)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-7)


def test_backward_keeps_gate_and_up_only():
    model = tiny_llama()
    fuse_gated_mlps(model)
    mlp = model.model.layers[0].mlp
    x = torch.randn(2, 3, 32, requires_grad=True)
    out = mlp(x)
    node = out.grad_fn.next_functions[0][0]  # down_proj's input
    while type(node).__name__ != "SwiGLUFunctionBackward":
        node = next(f for f, _ in node.next_functions if f is not None)
    assert len(node.saved_tensors) == 2


def test_models_without_a_silu_gated_mlp_are_left_alone():
    assert fuse_gated_mlps(tiny_gpt2()) == 0
    assert fuse_gated_mlps(MLP()) == 0
    model = tiny_llama()
    model.model.layers[0].mlp.act_fn = torch.nn.GELU()
    assert fuse_gated_mlps(model) == 1


@pytest.mark.parametrize("with_mask", [False, True])
def test_swiglu_with_lora_down_equals_the_plain_formula(with_mask):
    torch.manual_seed(0)
    gate, up = (torch.randn(6, 10, dtype=torch.float64, requires_grad=True) for _ in range(2))
    weight, bias = torch.randn(4, 10, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    a = torch.randn(3, 10, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    mask = (torch.rand(6, 10) > 0.3).to(torch.uint8) if with_mask else None
    ours = SwiGLULoraFunction.apply(gate, up, weight, bias, a, b, 0.7, mask)
    h = torch.nn.functional.silu(gate) * up
    h_in = h if mask is None else h * mask
    theirs = h @ weight.T + bias + 0.7 * (h_in @ a.T) @ b.T
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(ours)
    for g, w in zip(torch.autograd.grad(ours, (gate, up, a, b), grad),
                    torch.autograd.grad(theirs, (gate, up, a, b), grad), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda g, u, a, b: SwiGLULoraFunction.apply(g, u, weight, bias, a, b, 0.7, mask), (gate, up, a, b))


@pytest.mark.parametrize("trainable", ["gate", "up", "a", "b", "gate up"])
def test_swiglu_with_lora_down_gives_each_gradient_alone(trainable):
    """Backward reuses its buffers in place (silu for d up, h for h m): each gradient is still
    right when it is the only one asked for, and the inputs, the mask included, are left as given."""
    torch.manual_seed(1)
    names = trainable.split()
    tensors = {"gate": torch.randn(6, 10, dtype=torch.float64), "up": torch.randn(6, 10, dtype=torch.float64),
               "a": torch.randn(3, 10, dtype=torch.float64), "b": torch.randn(4, 3, dtype=torch.float64)}
    for name in names:
        tensors[name].requires_grad_(True)
    weight = torch.randn(4, 10, dtype=torch.float64)
    mask = (torch.rand(6, 10) > 0.3).to(torch.uint8)
    before = {name: t.detach().clone() for name, t in tensors.items()} | {"mask": mask.clone()}
    gate, up, a, b = (tensors[n] for n in ("gate", "up", "a", "b"))
    ours = SwiGLULoraFunction.apply(gate, up, weight, None, a, b, 0.7, mask)
    theirs = (torch.nn.functional.silu(gate) * up) @ weight.T + 0.7 * (
        (torch.nn.functional.silu(gate) * up * mask) @ a.T) @ b.T
    grad = torch.randn_like(ours)
    wanted = [tensors[n] for n in names]
    for g, w in zip(torch.autograd.grad(ours, wanted, grad), torch.autograd.grad(theirs, wanted, grad),
                    strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    for name, value in before.items():
        assert torch.equal((tensors | {"mask": mask})[name], value), name


def test_with_lora_on_down_the_mlp_keeps_gate_and_up_but_not_downs_input():
    model = tiny_llama()
    add_adapter(model, LoraConfig(r=4, dropout=0.2))
    fuse_gated_mlps(model)
    model.train()
    mlp = model.model.layers[0].mlp
    out = mlp(torch.randn(2, 3, 32, requires_grad=True))
    node = out.grad_fn
    while type(node).__name__ != "SwiGLULoraFunctionBackward":
        node = node.next_functions[0][0]
    wide = [t for t in node.saved_tensors if t.shape == (6, 64)]  # (tokens, intermediate)
    assert [str(t.dtype) for t in wide] == ["torch.float32", "torch.float32"]  # gate, up
    assert [t.numel() for t in node.saved_tensors
            if t.dtype == torch.uint8] == [6 * 64 // 8]  # the packed mask
