"""The fused SwiGLU: the MLP's own values and gradients, less kept for backward."""

import torch

from lorakit import LoraConfig, add_adapter, fuse_gated_mlps
from lorakit.core.swiglu import SwiGLUFunction, swiglu
from tests.models import MLP, randomize_adapters, tiny_gpt2, tiny_llama, tokens


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
    for a, b in zip(torch.autograd.grad(ours, (gate, up), grad), torch.autograd.grad(theirs, (gate, up), grad),
                    strict=True):
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
        ids = tokens()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
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
