"""RMSNorm, y = w * x / sqrt(mean(x^2) + eps), as one autograd function with a short backward.

Written with autograd ops (as transformers' Llama, Mistral and Qwen norms are) its backward runs
about a dozen passes over the (tokens x hidden) input: one per op of the forward. Worked out by
hand it takes four. With r = 1 / sqrt(mean(x^2) + eps) per row, h = x r and n = hidden:

    y = w * h                   dx = r (g w) - x r^3 mean((g w) x)          dw = sum over rows of g h

The forward is the transformers formula op for op (in fp32, then cast to x's dtype, then times w),
so its output is bit for bit theirs; gradients agree to float rounding. (fp64 inputs are computed
in fp64, where transformers would drop to fp32.) It keeps what autograd
would keep: x (the residual stream, kept by the layer anyway) and r (one float per row).
lorakit.hf.fused_norms runs transformers' RMSNorm modules through it.
"""

from __future__ import annotations

from typing import Any

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """w * x / sqrt(mean(x^2) + eps) over the last dimension, as transformers' Llama RMSNorm computes it.

    x: (..., n); weight: (n,). With autograd on, use `rms_norm_function` (same values, shorter backward).
    """
    return _forward(x, weight, eps)[0]


def rms_norm_function(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`rms_norm` through RMSNormFunction when a gradient is wanted, else the plain forward."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return RMSNormFunction.apply(x, weight, eps)  # type: ignore[no-any-return]
    return rms_norm(x, weight, eps)


def _forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, r): the norm's output and r = 1 / sqrt(mean(x^2) + eps), (..., 1) in fp32 (or x's wider dtype)."""
    x32 = _widened(x)
    r = x32.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()
    h = (x32 * r).to(x.dtype)
    if weight.dtype == h.dtype and torch.broadcast_shapes(h.shape, weight.shape) == h.shape:
        return h.mul_(weight), r  # w * h in h's buffer: a product is the same either way round
    return weight * h, r


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        y, r = _forward(x, weight, eps)
        ctx.save_for_backward(x, weight, r)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, weight, r = ctx.saved_tensors
        need_x, need_weight = ctx.needs_input_grad[:2]
        # This is fp32 (or wider) work: autocast must not run any of it in half precision.
        with torch.autocast(grad.device.type, enabled=False):
            x32 = _widened(x)
            grad_weight = None
            if need_weight:
                h = (x32 * r).to(x.dtype)
                grad_weight = (grad * h).sum_to_size(weight.shape).to(weight.dtype)
            grad_x = None
            if need_x:
                # d/dh of w * h, cast back through h's casts as autograd would: (g w) in x's dtype, then fp32
                gw = (grad * weight).to(x.dtype).to(x32.dtype)  # a new tensor: written in place below
                dot = torch.linalg.vecdot(gw, x32).unsqueeze(-1)  # (g w) . x per row, (..., 1)
                coef = dot.mul_(r.pow(3)).div_(-x.shape[-1])
                grad_x = gw.mul_(r).addcmul_(x32, coef).to(x.dtype)
        return grad_x, grad_weight, None



def _widened(x: torch.Tensor) -> torch.Tensor:
    """x in fp32, as transformers computes its norms, or as it is when its dtype is wider (fp64)."""
    return x if x.dtype == torch.float64 else x.float()
