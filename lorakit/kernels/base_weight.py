"""The frozen base weight as the fused LoRA functions take it: a tensor, or a 4-bit base's dequantizer.

The fused functions (lora_function.py, shared_input.py, swiglu.py) use the base weight W (out, in)
twice: x W^T in forward and g W in backward. A plain linear hands them W itself, which they keep
for backward (a parameter: keeping it costs nothing). A 4-bit base (lorakit.quant.NF4Linear) hands
them its `dequantize_weight`: W is made in forward, dropped, and made again in backward, as
NF4Linear's own autograd function does, so no dense copy of W lives in between.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

BaseWeight = torch.Tensor | Callable[[torch.dtype], torch.Tensor]
"""W (out, in) itself, or a function giving it in a dtype (a new tensor per call)."""


def dense(weight: BaseWeight, dtype: torch.dtype) -> torch.Tensor:
    """W as a tensor: the tensor itself, or the dequantizer's result in `dtype`."""
    return weight if isinstance(weight, torch.Tensor) else weight(dtype)


def keep(ctx: Any, weight: BaseWeight) -> torch.Tensor | None:
    """What forward passes to save_for_backward for W: the tensor, or None with the dequantizer kept
    on ctx."""
    ctx.dequantize = None if isinstance(weight, torch.Tensor) else weight
    return weight if isinstance(weight, torch.Tensor) else None


def kept(ctx: Any, saved: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """W in backward: the saved tensor, or made again by the dequantizer `keep` put on ctx."""
    if ctx.dequantize is not None:
        return ctx.dequantize(dtype)  # type: ignore[no-any-return]
    assert saved is not None
    return saved
