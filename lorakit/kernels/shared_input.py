"""LoRA linears that read one input (q, k and v; gate and up): their A projections as one GEMM.

    y_i = x W_i^T + b_i + s_i ((x m) A_i^T) B_i^T        i = 1..k, one x, one keep mask m

Run one by one (LoraLinearFunction each), every adapter masks x, runs its own skinny (N x r) GEMM,
and in backward masks x again for dA and masks its own share of dx. Here the A side runs once:

    xa = (x m) [A_1; ...; A_k]^T        (N, k r): one GEMM, one pass of x * m
    dA = dxa^T (x m), split by rows     dx_adapters = m * (dxa [A_1; ...; A_k]): one GEMM, one mask pass

and each member keeps only its base and B side (BaseAndBFunction):

    y_i = x W_i^T + b_i + s_i xa_i B_i^T     dx_i = g_i W_i     dB_i = s_i g_i^T xa_i     dxa_i = s_i g_i B_i

Fewer passes over x-sized tensors: 1 mask pass forward and 3 backward (mask, x * m, dx share)
for the whole group instead of 3 per member, plus the autograd sum. `benchmarks/adapter_parts.py`
times q, k and v both ways.

The members share one dropout mask (LoraConfig.share_dropout_mask, the default); modules with their
own masks run one by one. `InputGroup` lets an attention block's q_proj, k_proj and v_proj, which
the model calls one after another, find each other (lorakit.fusion.fused_attention sets it up);
lorakit.fusion.fused_mlp calls `lora_linears_one_input` for gate and up directly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Hashable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.core.layers import LoraLinear
from lorakit.kernels import paths
from lorakit.kernels.base_weight import BaseWeight, dense, keep, kept
from lorakit.kernels.bit_mask import unpack_bits
from lorakit.kernels.lora_function import (
    autocast_dtype,
    cast_all,
    dropout_mask,
    packed_mask,
    quantized_dropout,
    shared,
)
from lorakit.kernels.rebuild import rebuild, rebuild_source

FusedArguments = tuple[BaseWeight, torch.Tensor | None, torch.Tensor, torch.Tensor, float]
"""(W, bias, A, B, s) of one member: W (out, in) or a 4-bit base's dequantizer, bias (out,) or None,
A (r, in), B (out, r)."""


class SharedASideFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, mask: torch.Tensor | None,
                source: tuple[nn.Module, torch.Tensor] | None, *factors_a: torch.Tensor) -> torch.Tensor:
        # x: (N, in); mask: (N, in) 0/1 uint8 or None; factors_a: A_i (r_i, in) -> xa: (N, sum r_i)
        # source: (norm, its input) when x is a view of norm(input) (kernels/rebuild.py): that input is
        # kept instead of x, and backward rebuilds x from it
        a_all = torch.cat(factors_a)  # (sum r_i, in), small
        xa = _masked(x, mask) @ a_all.T
        ctx.save_for_backward(x if source is None else source[1], None if mask is None else packed_mask(mask),
                              a_all)
        ctx.norm = None if source is None else source[0]
        ctx.ranks = [a.shape[0] for a in factors_a]
        return xa

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, bits, a_all = ctx.saved_tensors
        rebuilt = False
        if ctx.norm is not None:
            source, x = x, rebuild(ctx.norm, x).reshape(-1, a_all.shape[1])
            # a new tensor (not the kept input handed back) is this function's own to change
            rebuilt = x.untyped_storage().data_ptr() != source.untyped_storage().data_ptr()
        need_x, _, _, *need_a = ctx.needs_input_grad
        # unpacked in x's dtype: a float mask multiplies several times faster than a uint8 one; used twice
        mask = None if bits is None else unpack_bits(bits, x.shape, x.dtype)
        grad_a: Sequence[torch.Tensor | None] = [None] * len(need_a)
        if any(need_a):
            # a rebuilt x is this function's own: masked in place, with no new tensor to fault in
            masked = x.mul_(mask) if rebuilt and mask is not None else _masked(x, mask)
            grad_a = torch.mm(grad.T, masked).split(ctx.ranks)
        grad_x = None
        if need_x:
            grad_x = torch.mm(grad, a_all, out=x if rebuilt else None)  # dA has read x: reuse it
            grad_x = grad_x if mask is None else grad_x.mul_(mask)
        return grad_x, None, None, *(g if need else None for g, need in zip(grad_a, need_a, strict=True))


class BaseAndBFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: BaseWeight, bias: torch.Tensor | None, xa: torch.Tensor,
                lora_b: torch.Tensor, scale: float) -> torch.Tensor:
        # x: (N, in); weight: (out, in) or a 4-bit base's dequantizer (base_weight.py); xa: (N, r) (a column
        # slice of the shared A side); lora_b: (out, r)
        y = F.linear(x, dense(weight, x.dtype), bias)
        y.addmm_(xa, lora_b.T, alpha=scale)
        ctx.save_for_backward(keep(ctx, weight), xa, lora_b)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        weight, xa, lora_b = ctx.saved_tensors
        need_x, _, _, need_xa, need_b = ctx.needs_input_grad[:5]
        grad_x = torch.mm(grad, kept(ctx, weight, grad.dtype)) if need_x else None
        grad_xa = torch.mm(grad, lora_b).mul_(ctx.scale) if need_xa else None
        grad_b = torch.mm(grad.T, xa).mul_(ctx.scale) if need_b else None
        return grad_x, None, None, grad_xa, grad_b, None


def _masked(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return x if mask is None else torch.mul(x, mask)


def lora_linears_one_input(x: torch.Tensor, members: Sequence[FusedArguments], dropout: float,
                           reader: Hashable | None = None) -> list[torch.Tensor]:
    """[x W_i^T + b_i + s_i B_i A_i dropout(x)] for each member, the A sides as one GEMM.

    x: (..., in) -> one (..., out_i) per member. `dropout` is every member's p; the members share
    one mask (`dropout_mask`, shared with any other reader of x that shares masks). `reader` names
    the caller for `shared`.
    """
    flat = x.reshape(-1, x.shape[-1])  # (N, in)
    mask = dropout_mask(x, dropout, reader)
    mask = None if mask is None else mask.reshape(flat.shape)
    keep_scale = 1.0 / (1.0 - quantized_dropout(dropout))
    dtype = autocast_dtype(x)
    if dtype is not None:  # autocast's linears: every input in its dtype
        flat = flat.to(dtype)
        tensors = [(weight, bias, a, b, s) for weight, bias, a, b, s in members
                   if isinstance(weight, torch.Tensor)]
        if len(tensors) != len(members):
            raise ValueError("a 4-bit base runs the grouped A sides with autocast off only")
        members = [(*cast_all(dtype, weight, bias, a, b), s) for weight, bias, a, b, s in tensors]
    with torch.autocast(x.device.type, enabled=False) if dtype is not None else contextlib.nullcontext():
        source = rebuild_source(x) if dtype is None else None  # under autocast flat is a cast copy
        xa = SharedASideFunction.apply(flat, mask, source, *(a for _, _, a, _, _ in members))  # (N, sum r_i)
        shares = xa.split([a.shape[0] for _, _, a, _, _ in members], dim=1)
        outputs = []
        for share, (weight, bias, _, b, scale) in zip(shares, members, strict=True):
            y = BaseAndBFunction.apply(flat, weight, bias, share, b, scale * keep_scale)
            outputs.append(y.reshape(*x.shape[:-1], y.shape[-1]))
    return outputs


class InputGroup:
    """LoRA layers that read one input, such as an attention block's q_proj, k_proj and v_proj.

    The model calls them one after another; the first called on an x runs all their A sides
    (`lora_linears_one_input`), the others take their outputs. Only members on their fused path
    with the caller's dropout p and shared masks join; the rest run alone. Called on different
    inputs (cross-attention reads k and v from the encoder), values stay right: each input gets
    its own computation, at the cost of the other members' skinny A GEMM. Not under autograd
    (inference) or torch.compile, each layer runs alone.
    """

    def __init__(self, layers: Sequence[LoraLinear]) -> None:
        self.layers = tuple(layers)

    def output(self, layer: LoraLinear, x: torch.Tensor) -> torch.Tensor | None:
        """`layer`'s output for x, computed with the group's; None when `layer` runs alone."""
        if not torch.is_grad_enabled() or torch.compiler.is_compiling():
            return None
        outputs = shared(x, ("input group", self), lambda: self._run(layer, x), reader=layer)
        # handed over, not kept: x lives until backward, and its cache must not hold q, k and v with it
        return outputs.pop(layer, None)

    def _run(self, caller: LoraLinear, x: torch.Tensor) -> dict[LoraLinear, torch.Tensor]:
        """Every joining member's output, by member; empty when fewer than two can join."""
        autocast = torch.is_autocast_enabled(x.device.type)

        def setting(layer: LoraLinear) -> tuple[float, bool] | None:
            name = paths.fused_adapter(layer, x.dtype, autocast)
            if name is None:
                return None
            p = layer.dropout_p(name)
            return (p, layer.shares_dropout_mask[name] or quantized_dropout(p) == 0)

        wanted = setting(caller)
        if wanted is None or not wanted[1]:
            return {}
        members = [m for m in self.layers if setting(m) == wanted]
        if len(members) < 2:
            return {}
        arguments = []
        for m in members:
            weight, bias, a, b, s, _ = paths.fused_arguments(m, m.live_adapters()[0])
            arguments.append((weight, bias, a, b, s))
        outputs = lora_linears_one_input(x, arguments, wanted[0], reader=("input group", self))
        return dict(zip(members, outputs, strict=True))
