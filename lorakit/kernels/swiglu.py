"""silu(gate) * up as one autograd function, for gated (SwiGLU) MLPs: down(silu(gate(x)) * up(x)).

Written with autograd ops it keeps three (tokens x intermediate) tensors for backward: gate's
output (for silu's backward), silu(gate) and up's output (for the product's). This function keeps
only gate and up and recomputes silu(gate) in backward, one elementwise pass: 4 bytes per
intermediate channel per token less (180 MiB per step for SmolLM2-135M at 4 x 256 tokens, fp32).

    out = silu(g) * u       d out / d u = silu(g)       d out / d g = u * silu'(g)

lorakit.fusion.fused_mlp runs transformers' gated MLPs through these functions.
When down_proj is a LoRA layer on lorakit's fused path, SwiGLULoraFunction goes one step further:
it runs down's LoRA linear on h = silu(gate) * up and recomputes h in backward, so down's input
is not kept either (another 180 MiB there), and its keep mask is kept a bit per entry (bit_mask.py).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from lorakit.kernels.base_weight import BaseWeight, dense, keep, kept
from lorakit.kernels.bit_mask import unpack_bits
from lorakit.kernels.lora_function import (
    autocast_dtype,
    cast_all,
    draw_keep_mask,
    lora_backward,
    packed_mask,
    quantized_dropout,
)


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        gate, up = ctx.saved_tensors
        need_gate, need_up = ctx.needs_input_grad
        grad_up = grad * F.silu(gate) if need_up else None
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if need_gate else None
        return grad_gate, grad_up


class SwiGLULoraFunction(torch.autograd.Function):
    """down(silu(gate) * up) with LoRA on down: LoraLinearFunction on h = silu(gate) * up, but
    backward recomputes h from gate and up instead of keeping it (one intermediate-wide tensor less)."""

    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor, weight: BaseWeight, bias: torch.Tensor | None,
                lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
                mask: torch.Tensor | None) -> torch.Tensor:
        # gate, up: (N, i); weight: (out, i) or a 4-bit base's dequantizer (base_weight.py);
        # mask: (N, i) 0/1 uint8 or None; scale includes 1 / (1 - p)
        h = F.silu(gate).mul_(up)
        y = F.linear(h, dense(weight, h.dtype), bias)
        xa = (h if mask is None else h.mul_(mask)) @ lora_a.T  # h is not needed again: mask it in place
        y.addmm_(xa, lora_b.T, alpha=scale)
        ctx.save_for_backward(gate, up, keep(ctx, weight), lora_a, lora_b, xa,
                              None if mask is None else packed_mask(mask))
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        gate, up, weight, lora_a, lora_b, xa, bits = ctx.saved_tensors
        mask = None if bits is None else unpack_bits(bits, gate.shape, gate.dtype)
        need_gate, need_up, _, _, need_a, need_b = ctx.needs_input_grad[:6]
        silu = F.silu(gate)
        # h = silu * up, rebuilt: lora_backward masks it in place for dA, then writes dh into it
        need_h = need_gate or need_up
        grad_h, grad_a, grad_b = lora_backward(grad, silu * up,
                                               kept(ctx, weight, grad.dtype) if need_h else None,
                                               lora_a, lora_b, xa, mask, ctx.scale, need_h, need_a, need_b,
                                               x_is_scratch=True)
        grad_gate = grad_up = None
        if grad_h is not None:
            grad_up = silu.mul_(grad_h) if need_up else None  # silu is not needed after this
            if need_gate:
                # silu'(g) * dh * up, written over dh (an elementwise kernel reads each entry first)
                grad_h.mul_(up)
                grad_gate = torch.ops.aten.silu_backward.grad_input(grad_h, gate, grad_input=grad_h)
        return grad_gate, grad_up, None, None, grad_a, grad_b, None, None


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, keeping only gate and up for backward."""
    return SwiGLUFunction.apply(gate, up)


def swiglu_lora(gate: torch.Tensor, up: torch.Tensor, weight: BaseWeight, bias: torch.Tensor | None,
                lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, dropout: float) -> torch.Tensor:
    """down(silu(gate) * up) with one LoRA adapter on down, through SwiGLULoraFunction.

    gate, up: (..., i) -> (..., out). Down's input is read by down alone, so its dropout mask is
    its own (never shared).
    """
    flat_gate, flat_up = gate.reshape(-1, gate.shape[-1]), up.reshape(-1, up.shape[-1])  # (N, i)
    p = quantized_dropout(dropout)
    mask = draw_keep_mask(flat_gate, p) if p > 0 else None
    dtype = autocast_dtype(gate)
    if dtype is None:
        y = SwiGLULoraFunction.apply(flat_gate, flat_up, weight, bias, lora_a, lora_b, scale / (1.0 - p),
                                     mask)
    else:  # as autocast runs down(silu(gate) * up): the product in gate's dtype, down's linear in autocast's
        if not isinstance(weight, torch.Tensor):
            raise ValueError("a 4-bit down_proj runs the fused SwiGLU with autocast off only")
        flat_gate, flat_up, weight, bias, lora_a, lora_b = cast_all(dtype, flat_gate, flat_up, weight, bias,
                                                                    lora_a, lora_b)
        with torch.autocast(gate.device.type, enabled=False):
            y = SwiGLULoraFunction.apply(flat_gate, flat_up, weight, bias, lora_a, lora_b, scale / (1.0 - p),
                                         mask)
    return y.reshape(*gate.shape[:-1], y.shape[-1])
