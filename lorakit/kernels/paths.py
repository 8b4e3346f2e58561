"""Which computation a LoRA linear runs for an input: the one place that decides.

- "fused": `LoraLinearFunction`, the base matmul and the one live adapter as one autograd
  function that keeps x (which the model keeps anyway), x A^T and a 1-byte dropout mask.
  Needs exactly one live, plain (not DoRA) adapter and either a frozen nn.Linear base with
  x, W, A and B in one dtype or any dtypes under autocast (all then run in autocast's dtype,
  so fp32 adapters beside a bf16 base take this path under autocast),
  or a 4-bit base with x, its compute dtype, A and B in one dtype and autocast off (W is
  dequantized in forward and again in backward; base_weight.py) (`fused_adapter`).
- "update": `LoraUpdateFunction` per adapter, added to the base's output with the same
  savings: a Conv1D base, a 4-bit base in another dtype, or several adapters. Needs x and
  every live adapter in one dtype, autocast off.
- "autograd": core's reference forward (LoraLinear.forward_adapters with its reference update),
  the formula in autograd ops that every fast path is tested against: it keeps A's input, a cast
  copy of x where the dtypes differ and a dropped-out copy with dropout. Adapters in fp32 beside a
  16-bit base with autocast off, and a Conv1D, 4-bit or multi-adapter layer under autocast.

The estimator (lorakit/estimate/activations.py) asks `path_for` too, to know what each layer keeps
for backward; the fused MLP and the q/k/v groups ask `fused_adapter`. Tests force a path by
replacing these functions (call them through this module, as the kernels do).
"""

from __future__ import annotations

from typing import Any

import torch

from lorakit.core.layers import LoraLinear
from lorakit.kernels.base_weight import BaseWeight

FUSED, UPDATE, AUTOGRAD = "fused", "update", "autograd"


def path_for(layer: LoraLinear, dtype: torch.dtype, autocast: bool) -> str:
    """FUSED, UPDATE or AUTOGRAD: what `layer` runs for input of `dtype` (see the module doc)."""
    if fused_adapter(layer, dtype, autocast) is not None:
        return FUSED
    if not autocast and all(layer.factors(n)[0].dtype == dtype for n in layer.live_adapters()):
        return UPDATE
    return AUTOGRAD


def fused_adapter(layer: LoraLinear, dtype: torch.dtype, autocast: bool) -> str | None:
    """The one adapter LoraLinearFunction would run for input of `dtype`, or None (see the module doc)."""
    if layer.disabled or layer.row_adapters is not None or layer.kind not in ("linear", "quantized"):
        return None
    live = layer.live_adapters()
    # A variant (DoRA) rescales the output after the update: not a plain fused LoRA.
    if len(live) != 1 or layer.variant(live[0]) is not None:
        return None
    a, b = layer.factors(live[0])
    base: Any = layer.base
    if layer.kind == "quantized":
        # NF4Linear: x, its compute dtype, its bias, A and B in one dtype, no autocast
        bias = getattr(base, "bias", None)
        plain_bias = bias is None or (not bias.requires_grad and bias.dtype == dtype)
        same = dtype == getattr(base, "compute_dtype", None) == a.dtype == b.dtype
        return live[0] if plain_bias and same and not autocast else None
    frozen = not base.weight.requires_grad and (base.bias is None or not base.bias.requires_grad)
    # Under autocast the function casts x, W, the bias, A and B to autocast's dtype, as autocast's own
    # linears do, so their dtypes need not agree: fp32 adapters beside a bf16 base (lorakit train on a GPU).
    same_dtype = autocast or base.weight.dtype == a.dtype == b.dtype == dtype
    return live[0] if frozen and same_dtype else None


def fused_arguments(layer: LoraLinear, name: str) -> tuple[BaseWeight, torch.Tensor | None, torch.Tensor,
                                                           torch.Tensor, float, float]:
    """(W, bias, A, B, s, dropout p) of adapter `name` for the fused functions; p = 0 in eval mode.

    W is the weight itself, or for a 4-bit base its dequantizer (base_weight.py)."""
    base: Any = layer.base
    weight = base.dequantize_weight if layer.kind == "quantized" else base.weight
    return (weight, base.bias, *layer.factors(name), layer.scaling[name], layer.dropout_p(name))
