"""RMSNormFunction: the plain formula's values and gradients, transformers' forward bit for bit."""

import pytest
import torch

from lorakit.core.rms_norm import RMSNormFunction, rms_norm, rms_norm_function

EPS = 1e-5


def llama_formula(x: torch.Tensor, weight: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """transformers' LlamaRMSNorm.forward, written out with autograd ops."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def float64_formula(x: torch.Tensor, weight: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    return weight * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


def in_float64(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Float64 leaf copies, requiring grad as the originals do."""
    return [t.detach().double().requires_grad_(t.requires_grad) for t in tensors]


def leaves(*shapes: tuple[int, ...], dtype: torch.dtype = torch.float32, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=generator) * 3).to(dtype).requires_grad_() for shape in shapes]


def test_gradcheck_in_float64():
    x, weight = leaves((3, 4, 6), (6,), dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: RMSNormFunction.apply(a, b, EPS), (x, weight))


@pytest.mark.parametrize("weight_trains", [False, True])
def test_values_and_gradients_match_the_float64_formula(weight_trains):
    x, weight = leaves((2, 5, 64), (64,))
    weight.requires_grad_(weight_trains)
    grad = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1))
    x64, weight64 = in_float64(x, weight)
    ours, reference = rms_norm_function(x, weight, EPS), float64_formula(x64, weight64)
    inputs, inputs64 = ((x, weight), (x64, weight64)) if weight_trains else ((x,), (x64,))
    for a, b in zip(torch.autograd.grad(ours, inputs, grad), torch.autograd.grad(reference, inputs64, grad.double()),
                    strict=True):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.double(), reference, rtol=1e-6, atol=1e-6)


def test_only_the_weight_trains():
    x, weight = leaves((4, 8), (8,))
    x.requires_grad_(False)
    (grad_weight,) = torch.autograd.grad(rms_norm_function(x, weight, EPS).sum(), (weight,))
    x64, weight64 = in_float64(x, weight)
    (expected,) = torch.autograd.grad(float64_formula(x64, weight64).sum(), (weight64,))
    torch.testing.assert_close(grad_weight.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("x_dtype", "weight_dtype"), [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                       (torch.bfloat16, torch.float32)])
def test_forward_is_transformers_bit_for_bit_and_gradients_close(x_dtype, weight_dtype):
    x, = leaves((3, 7, 48), dtype=x_dtype)
    weight, = leaves((48,), dtype=weight_dtype, seed=2)
    ours, theirs = rms_norm_function(x, weight, EPS), llama_formula(x, weight)
    assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)
    grad = torch.randn(theirs.shape, generator=torch.Generator().manual_seed(3)).to(theirs.dtype)
    tolerance = 1e-6 if x_dtype == torch.float32 else 2e-2
    for a, b in zip(torch.autograd.grad(ours, (x, weight), grad), torch.autograd.grad(theirs, (x, weight), grad),
                    strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance)


def test_under_cpu_autocast_it_computes_as_transformers_does():
    x, weight = leaves((2, 6, 32), (32,))
    grad = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(4))
    with torch.autocast("cpu", torch.bfloat16):
        ours, theirs = rms_norm_function(x, weight, EPS), llama_formula(x, weight)
    assert ours.dtype == theirs.dtype == torch.float32 and torch.equal(ours, theirs)
    for a, b in zip(torch.autograd.grad(ours, (x, weight), grad), torch.autograd.grad(theirs, (x, weight), grad),
                    strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_without_autograd_it_is_the_same_forward_and_leaves_its_input_alone():
    x, weight = leaves((4, 3, 16), (16,))
    before = x.detach().clone()
    with_graph = rms_norm_function(x, weight, EPS)
    with torch.no_grad():
        plain = rms_norm_function(x, weight, EPS)
    assert plain.grad_fn is None and torch.equal(plain, with_graph) and torch.equal(rms_norm(x, weight, EPS), plain)
    assert torch.equal(x.detach(), before)


def test_a_non_contiguous_input_and_gradient():
    x, weight = leaves((16, 2, 5), (16,))
    view = x.transpose(0, 2)  # (5, 2, 16), not contiguous
    grad = torch.randn(16, 2, 5, generator=torch.Generator().manual_seed(5)).transpose(0, 2)
    x64, weight64 = in_float64(x, weight)
    ours, reference = rms_norm_function(view, weight, EPS), float64_formula(x64.transpose(0, 2), weight64)
    torch.testing.assert_close(ours.double(), reference, rtol=1e-6, atol=1e-6)
    for a, b in zip(torch.autograd.grad(ours, (x, weight), grad),
                    torch.autograd.grad(reference, (x64, weight64), grad.double()), strict=True):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)
