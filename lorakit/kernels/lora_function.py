"""The LoRA linear as one autograd function that keeps only what its backward needs.

    y = x W^T + b + s' ((x * m) A^T) B^T      m = 0/1 keep mask (1 without dropout), s' = s / (1 - p)

Written with autograd ops, the dropout makes a full copy of x (x * m) that backward keeps for
A's gradient, and the sum `base + update` makes another output-sized tensor. Here forward keeps
x (which the model keeps alive anyway), the mask packed a bit per entry (bit_mask.py) and x A^T
(N x r, small); backward unpacks the mask and rebuilds x * m for the one matmul that needs it.
The update is added into the base output by `addmm_` (one pass, no extra tensor). Gradients are
the plain formula's:

    dB = s' g^T (x m A^T)        dA = (s' g B)^T (x m)        dx = g W + m * ((s' g B) A)

Used by LoraLinear for the common case: a plain nn.Linear base with frozen weight and bias, one
active adapter, and W, A and B in one dtype (x too, unless autocast is on), or a 4-bit base whose
W is dequantized in forward and again in backward (base_weight.py); `LoraLinear.path_for` decides.
Under autocast (CPU bf16, CUDA bf16/fp16) the fused functions cast x, W, bias, A and B to
autocast's dtype, as autocast casts a linear's inputs, and run in that dtype; A's and B's
gradients flow back to their own dtype through the casts, as with autocast's own linears.

Dropout draws its keep masks with p rounded to a multiple of 2^-16 (`quantized_dropout`; 0.05
becomes 0.0500031, 3.1e-6 more) and scales by 1 / (1 - that p), so the update stays unbiased;
that rounding lets one 64-bit draw of torch's generator give four mask entries (`draw_keep_mask`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Hashable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.core.attached import shared
from lorakit.kernels.base_weight import BaseWeight, dense, keep, kept
from lorakit.kernels.bit_mask import pack_bits, unpack_bits


class LoraLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: BaseWeight, bias: torch.Tensor | None,
                lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
                mask: torch.Tensor | None) -> torch.Tensor:
        # x: (N, in); weight: (out, in) or a 4-bit base's dequantizer (base_weight.py); lora_a: (r, in);
        # lora_b: (out, r); mask: (N, in) 0/1 uint8 or None.
        # `scale` includes dropout's 1 / (1 - p), so the mask itself stays 0/1.
        y, xa = lora_forward(x, dense(weight, x.dtype), bias, lora_a, lora_b, scale, mask)
        ctx.save_for_backward(x, keep(ctx, weight), lora_a, lora_b, xa,
                              None if mask is None else packed_mask(mask))
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, lora_a, lora_b, xa, bits = ctx.saved_tensors
        mask = None if bits is None else unpack_bits(bits, x.shape, x.dtype)
        need_x, _, _, need_a, need_b = ctx.needs_input_grad[:5]
        grad_x, grad_a, grad_b = lora_backward(grad, x, kept(ctx, weight, grad.dtype) if need_x else None,
                                               lora_a, lora_b, xa, mask, ctx.scale, need_x, need_a, need_b)
        return grad_x, None, None, grad_a, grad_b, None, None


def lora_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                 lora_b: torch.Tensor, scale: float,
                 mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, x m A^T): the layer's output and the rank-r activation backward needs."""
    xa = _masked(x, mask) @ lora_a.T  # (N, r)
    y = F.linear(x, weight, bias)
    y.addmm_(xa, lora_b.T, alpha=scale)
    return y, xa


def lora_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, lora_a: torch.Tensor,
                  lora_b: torch.Tensor, xa: torch.Tensor, mask: torch.Tensor | None, scale: float,
                  need_x: bool, need_a: bool, need_b: bool, x_is_scratch: bool = False,
                  ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(dx, dA, dB) from dy, each None when not needed; without `weight`, dx is the adapter's part only.

    `mask` is the keep mask in x's dtype (0/1), as `unpack_bits` gives it back. With `x_is_scratch`,
    x is the caller's own rebuilt copy: it is masked in place for dA and then holds dx; otherwise
    the masked copy dA reads holds dx. A fresh activation-sized tensor costs page faults on a CPU,
    each about as long as a pass over it.
    """
    grad_b = torch.mm(grad.T, xa).mul_(scale) if need_b else None
    grad_xa = torch.mm(grad, lora_b).mul_(scale)  # (N, r)
    spare = x if x_is_scratch else None  # an x-shaped tensor of our own, free once dA is computed
    grad_a = None
    if need_a:
        masked = x.mul_(mask) if x_is_scratch and mask is not None else _masked(x, mask)
        grad_a = torch.mm(grad_xa.T, masked)
        spare = spare if mask is None else masked  # x * m is a new tensor unless x was the scratch
    if not need_x:
        return None, grad_a, grad_b
    if weight is None:
        grad_x = torch.mm(grad_xa, lora_a, out=spare)
        return (grad_x if mask is None else grad_x.mul_(mask)), grad_a, grad_b
    grad_x = torch.mm(grad, weight, out=spare)
    if mask is None:
        grad_x.addmm_(grad_xa, lora_a)
    else:  # one pass: m is 0/1, so the product is exact and the sum is the same as mul_ then add_
        grad_x.addcmul_(torch.mm(grad_xa, lora_a), mask)
    return grad_x, grad_a, grad_b


class LoraUpdateFunction(torch.autograd.Function):
    """base_out + s' ((x m) A^T) B^T for a base computed elsewhere (a 4-bit or Conv1D base, or one
    of several adapters): the same savings as LoraLinearFunction without the base's matmul."""

    @staticmethod
    def forward(ctx: Any, base_out: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                scale: float, mask: torch.Tensor | None) -> torch.Tensor:
        # base_out: (N, out); x: (N, in); mask: (N, in) 0/1 uint8 or None; scale includes 1 / (1 - p)
        xa = _masked(x, mask) @ lora_a.T
        ctx.save_for_backward(x, lora_a, lora_b, xa, None if mask is None else packed_mask(mask))
        ctx.scale = scale
        return torch.addmm(base_out, xa, lora_b.T, alpha=scale)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, lora_a, lora_b, xa, bits = ctx.saved_tensors
        mask = None if bits is None else unpack_bits(bits, x.shape, x.dtype)
        need_out, need_x, need_a, need_b = ctx.needs_input_grad[:4]
        grad_x, grad_a, grad_b = lora_backward(grad, x, None, lora_a, lora_b, xa, mask, ctx.scale,
                                               need_x, need_a, need_b)
        return grad if need_out else None, grad_x, grad_a, grad_b, None, None


def _masked(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    # A uint8 mask multiplies about 4x faster than a bool one on a CPU (vectorized path).
    return x if mask is None else torch.mul(x, mask)


def lora_linear(x: torch.Tensor, weight: BaseWeight, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scale: float, dropout: float, share_mask: bool = True,
                reader: Hashable | None = None) -> torch.Tensor:
    """base linear + s * B A dropout(x) for x (..., in) -> (..., out), through LoraLinearFunction.

    With `share_mask`, modules reading the same x (q, k and v; gate and up) share one dropout mask.
    `reader` names the caller (layer and adapter) for `shared`.
    """
    flat, mask = _flat_with_mask(x, dropout, share_mask, reader)
    scale = scale / (1.0 - quantized_dropout(dropout))
    dtype = autocast_dtype(x)
    if dtype is not None:  # autocast's linear: every input in its dtype, then the same function
        if not isinstance(weight, torch.Tensor):
            raise ValueError("a 4-bit base runs the fused LoRA linear with autocast off only")
        flat, weight, bias, lora_a, lora_b = cast_all(dtype, flat, weight, bias, lora_a, lora_b)
    with torch.autocast(x.device.type, enabled=False) if dtype is not None else contextlib.nullcontext():
        if torch.is_grad_enabled():
            y = LoraLinearFunction.apply(flat, weight, bias, lora_a, lora_b, scale, mask)
        else:  # inference: the same maths without an autograd node per layer per token
            y, _ = lora_forward(flat, dense(weight, flat.dtype), bias, lora_a, lora_b, scale, mask)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast runs linears in on x's device, or None when autocast is off there."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


def cast_all(dtype: torch.dtype, *tensors: torch.Tensor | None) -> list[Any]:
    """Each tensor in `dtype` (None stays None); casts are autograd ops, so gradients flow back."""
    return [t if t is None or t.dtype == dtype else t.to(dtype) for t in tensors]


def lora_update(base_out: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                scale: float, dropout: float, share_mask: bool = True,
                reader: Hashable | None = None) -> torch.Tensor:
    """base_out + s * B A dropout(x) for x (..., in), base_out (..., out), through LoraUpdateFunction."""
    flat, mask = _flat_with_mask(x, dropout, share_mask, reader)
    out = LoraUpdateFunction.apply(base_out.reshape(-1, base_out.shape[-1]), flat, lora_a, lora_b,
                                   scale / (1.0 - quantized_dropout(dropout)), mask)
    return out.reshape(base_out.shape)


def adapter_input(x: torch.Tensor, dtype: torch.dtype, dropout: nn.Module, share_mask: bool = True,
                  reader: Hashable | None = None) -> torch.Tensor:
    """dropout(x) in the adapter's dtype, for the autograd path; x itself when no copy is needed.

    A cast copy is shared by all adapters reading this x; a dropped-out one only with `share_mask`.
    """
    p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
    cast_needed = x.dtype != dtype and not torch.is_autocast_enabled(x.device.type)
    if not cast_needed and p == 0:
        return x
    if p > 0 and not share_mask:
        return dropout(x.to(dtype) if cast_needed else x)
    return shared(x, ("prepared", dtype, p), lambda: dropout(x.to(dtype) if cast_needed else x), reader)


def _flat_with_mask(x: torch.Tensor, dropout: float, share_mask: bool,
                    reader: Hashable | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x as (N, in) and its keep mask (None without dropout) in the same shape."""
    flat = x.reshape(-1, x.shape[-1])
    if quantized_dropout(dropout) == 0:
        return flat, None
    mask = dropout_mask(x, dropout, reader) if share_mask else draw_keep_mask(x, dropout)
    return flat, None if mask is None else mask.reshape(flat.shape)


def dropout_mask(x: torch.Tensor, p: float, reader: Hashable | None = None) -> torch.Tensor | None:
    """A 0/1 uint8 keep mask for x (1 with probability 1 - quantized_dropout(p)), shared by all readers
    of x; None when that p is 0.

    x keeps the mask packed (a bit per entry): x often lives until backward (a layer keeps its
    input), and a byte per entry would live with it. The reader that draws the mask gets it as
    drawn; later readers get it unpacked.
    """
    if not 0 <= p < 1:
        raise ValueError(f"dropout must be in [0, 1), got {p}")
    if quantized_dropout(p) == 0:
        return None
    drawn: list[torch.Tensor] = []

    def draw() -> torch.Tensor:
        drawn.append(draw_keep_mask(x, p))
        return packed_mask(drawn[0])

    bits = shared(x, ("mask", p), draw, reader)
    if drawn:
        return drawn[0]
    mask = unpack_bits(bits, x.shape, torch.uint8)
    shared(mask, _BITS, lambda: bits)  # already packed
    return mask


_BITS = "packed bits"


def packed_mask(mask: torch.Tensor) -> torch.Tensor:
    """`mask` packed a bit per entry (bit_mask.pack_bits), once per mask: what backward keeps.

    A reshape of a mask (the same entries in the same order) shares the packed bits of the mask it
    views, so the layers that reshape a shared mask do not pack it again.
    """
    owner = mask
    base = mask._base
    if (base is not None and base.is_contiguous() and mask.is_contiguous() and base.numel() == mask.numel()
            and base.data_ptr() == mask.data_ptr()):
        owner = base  # the same entries in the same order
    return shared(owner, _BITS, lambda: pack_bits(mask))


_MASK_BITS = 16  # an int64 draw over its full range holds four uniform 16-bit numbers


def quantized_dropout(p: float) -> float:
    """p rounded to a multiple of 2^-16 (at most 1 - 2^-16): the drop probability the masks really have.

    The fused paths scale by 1 / (1 - this p), so the update's expectation stays exact. p below 2^-17
    rounds to 0: no dropout.
    """
    steps = 1 << _MASK_BITS
    return min(round(p * steps), steps - 1) / steps


def draw_keep_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """A fresh 0/1 uint8 keep mask shaped like x: 1 with probability exactly 1 - quantized_dropout(p).

    torch's CPU generator is serial, and its cost is per draw: `rand` spends one draw per entry. Here
    one int64 draw over the full 64-bit range gives four int16 numbers u, uniform on [-2^15, 2^15),
    and an entry is kept when u >= p * 2^16 - 2^15: one comparison, no float conversion. On other
    devices rand >= p draws the same distribution (p is a multiple of 2^-16, exact in fp32).
    The draws come from torch's generator either way, so a restored RNG state (a checkpointed
    block's recompute, a resumed run) draws the same mask.
    """
    if not 0 < p < 1:
        raise ValueError(f"dropout must be in [0, 1), got {p}")
    p = quantized_dropout(p)
    if x.device.type != "cpu":
        return (torch.rand(x.shape, device=x.device) >= p).view(torch.uint8)
    n = x.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(1 << 63), None)  # all 64 bits uniform
    numbers = words.view(torch.int16)[:n]
    threshold = round(p * (1 << _MASK_BITS)) - (1 << (_MASK_BITS - 1))
    return torch.ge(numbers, threshold).view(torch.uint8).view(x.shape)
