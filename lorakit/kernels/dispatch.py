"""The fast paths core's LoRA layers take, chosen here so that core's forward stays the formula.

`install()` (run by `import lorakit`) sets `LoraLayer.kernels` to this module. A layer's forward
then asks `forward` (or, inside adapters_per_row, `forward_rows`) first; each returns None where
no fast path applies, and the layer computes its reference instead. Every path gives the
reference's values and gradients (tests/core/test_contract.py, tests/kernels).
"""

from __future__ import annotations

import sys
from typing import cast

import torch
from torch import nn

from lorakit.core.contract import LoraLayer
from lorakit.core.layers import LoraLinear
from lorakit.kernels import paths
from lorakit.kernels.lora_function import lora_forward, lora_linear, lora_update, quantized_dropout
from lorakit.kernels.row_stacks import StackedFactors, gather_rows


def install() -> None:
    """Hand these fast paths to every LoRA layer kind (idempotent)."""
    LoraLayer.kernels = sys.modules[__name__]  # type: ignore[assignment]


def forward(layer: LoraLayer, x: torch.Tensor) -> torch.Tensor | None:
    """`layer`'s output for x by a fast path, or None to run its reference forward."""
    if not isinstance(layer, LoraLinear):
        return None
    if not torch.is_grad_enabled():
        out = inference(layer, x)
        if out is not None:
            return out
    path = paths.path_for(layer, x.dtype, torch.is_autocast_enabled(x.device.type))
    if path == paths.FUSED:  # the base and the one adapter in one autograd function (lora_function.py)
        # with q, k and v: all three A sides as one GEMM when the first of them runs (shared_input.py)
        grouped = layer.input_group.output(layer, x) if layer.input_group is not None else None
        if grouped is not None:
            return grouped
        name = layer.live_adapters()[0]
        return lora_linear(x, *paths.fused_arguments(layer, name), layer.shares_dropout_mask[name],
                           reader=(layer, name))
    if path == paths.UPDATE:  # start + s B A dropout(x) in one autograd function per adapter
        def update(name: str, start: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            a, b = layer.factors(name)
            return lora_update(start, x, a, b, layer.scaling[name], layer.dropout_p(name),
                               layer.shares_dropout_mask[name], reader=(layer, name))
        return layer.forward_adapters(x, update)
    return None


def inference(layer: LoraLinear, x: torch.Tensor) -> torch.Tensor | None:
    """W0 x + bias + s B A x without autograd, for one plain adapter on a linear base with no
    dropout, all in x's dtype and autocast off; None otherwise (forward then decides as usual).

    The same maths as the fused path without its autograd function. Generation runs this once per
    layer per token, where the matmuls take tens of microseconds and Python's checks are no longer
    small beside them: each is made once here, straight from the dicts, rather than through
    path_for's general questions, and a grouped q/k/v (InputGroup) does not pay at one token.
    """
    live = layer.live_adapters()
    if len(live) != 1 or layer.kind != "linear":
        return None
    name = live[0]
    dropout = layer.lora_dropout[name]
    if name in layer.lora_magnitude_vector or (dropout.training and isinstance(dropout, nn.Dropout)
                                               and quantized_dropout(dropout.p) > 0):
        return None
    base = cast(nn.Linear, layer.base)
    weight, bias = base.weight, base.bias
    a, b = cast(nn.Linear, layer.lora_A[name]).weight, cast(nn.Linear, layer.lora_B[name]).weight
    if not (x.dtype == weight.dtype == a.dtype == b.dtype) or torch.is_autocast_enabled(x.device.type):
        return None
    flat = x.reshape(-1, x.shape[-1])
    y, _ = lora_forward(flat, weight, bias, a, b, layer.scaling[name], None)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def forward_rows(layer: LoraLayer, x: torch.Tensor, result: torch.Tensor,
                 groups: list[tuple[str, torch.Tensor | None]]) -> torch.Tensor | None:
    """Every row's update as two batched matmuls (row_stacks.py), or None to run them one adapter
    at a time: when the batch uses one adapter, or the layer cannot batch them (live dropout)."""
    plan = layer.row_adapters
    assert plan is not None
    held = [name for name, _ in groups if name in layer.scaling]
    if len(groups) < 2 or not held or not layer.batches_rows(held):
        return None
    # Without autograd the base output is ours to update in place, saving a copy.
    in_place = not result.requires_grad
    if not torch.is_grad_enabled():
        return stacked_factors(layer).add_rows(x, result, plan, in_place)
    factors = [layer.factors(n) if n in layer.scaling else None for n in plan.names]
    return gather_rows(x, result, factors, [layer.scaling.get(n or "", 0.0) for n in plan.names], in_place)


def stacked_factors(layer: LoraLayer) -> StackedFactors:
    """Every held adapter's A and B stacked for per-row forwards without autograd, kept on the layer
    while current (the layer drops them when it deletes an adapter)."""
    stacks = layer._row_stacks
    if stacks is None or not stacks.is_current(layer.scaling):
        layer._row_stacks = None  # free the old copy before making the new one
        stacks = layer._row_stacks = StackedFactors({n: layer.factors(n) for n in layer.scaling},
                                                    layer.scaling)
    return cast(StackedFactors, stacks)
