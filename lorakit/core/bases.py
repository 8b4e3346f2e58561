"""What lorakit knows of the modules it wraps: their kinds, sizes' dtype and device, and how a new
adapter's factors start. Duck typing throughout: core imports no transformers and no quantization
code, so a Conv1D is known by its class name and a quantized base by the questions it answers.
"""

from __future__ import annotations

import math

import torch
from torch import nn

SUPPORTED_MODULES = "nn.Linear, transformers' Conv1D, nn.Embedding and lorakit's NF4Linear"


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2): a linear storing its weight in x out. Matched by class name,
    so core never imports transformers."""
    return type(module).__name__ == "Conv1D" and isinstance(getattr(module, "weight", None), torch.Tensor)


def is_quantized(module: nn.Module) -> bool:
    """Whether `module` is a quantized base (a 4-bit linear such as NF4Linear): the one test of that."""
    return builtin_kind(module) == "quantized"


def builtin_kind(module: nn.Module) -> str | None:
    """The kinds of base lorakit's own layer kinds wrap: "linear", "conv1d", "embedding", "quantized".

    The one place that tells these apart; "quantized" is any module with `in_features`,
    `out_features` and `dequantize_weight()`, such as lorakit's NF4Linear (duck typing: core
    imports no quantization code).
    """
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if is_conv1d(module):
        return "conv1d"
    if callable(getattr(module, "dequantize_weight", None)) and hasattr(module, "in_features"):
        return "quantized"
    return None


def adapter_dtype(base: nn.Module) -> torch.dtype:
    """Adapters train in fp32 beside half-precision or quantized bases, otherwise in the base dtype."""
    weight = getattr(base, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dtype in (torch.float32, torch.float64):
        return weight.dtype
    return torch.float32


def base_device(base: nn.Module) -> torch.device:
    """The device of a module's first parameter or buffer (CPU for a module holding none)."""
    for tensor in [*base.parameters(), *base.buffers()]:
        return tensor.device
    return torch.device("cpu")


def init_factors(a: torch.Tensor, b: torch.Tensor, init: str) -> None:
    """Initialise A (r x in) and B (out x r) in place; B = 0 unless init is "random"."""
    with torch.no_grad():
        if init == "kaiming":
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # the reference implementation's choice
        elif init == "gaussian":
            nn.init.normal_(a, std=1 / a.shape[0])
        elif init == "random":
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            nn.init.kaiming_uniform_(b, a=math.sqrt(5))
            return
        elif init == "zeros":
            a.zero_()
        else:
            raise ValueError(f"unknown init {init!r}")
        b.zero_()


def requantize_problem(module: nn.Module) -> str | None:
    """Why the quantized base `module` cannot quantize a new weight again (its own answer to
    `requantize_problem()`, e.g. a block type the installed library cannot write), or None.

    Asked before anything changes, so a merge or a PiSSA start that cannot finish changes nothing.
    """
    ask = getattr(module, "requantize_problem", None)
    return ask() if callable(ask) else None
