"""quantize_model: turn every linear layer of a model into a frozen NF4Linear, in place (QLoRA's base)."""

from __future__ import annotations

import torch
from torch import nn

from lorakit.core.bases import is_conv1d
from lorakit.core.config import path_matches
from lorakit.core.walk import output_head
from lorakit.quant.linear4bit import NF4Linear

METHODS = ("nf4",)
"""Quantization methods quantize_model knows."""


def _examples(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def quantize_model(
    model: nn.Module,
    method: str = "nf4",
    skip: tuple[str, ...] | list[str] = ("lm_head",),
    compute_dtype: torch.dtype | None = None,
    block_size: int = 64,
    double_quant: bool = True,
) -> nn.Module:
    """Replace every ``nn.Linear`` and transformers ``Conv1D`` of ``model`` with an :class:`NF4Linear`.

    The output head stays in full precision: any layer named in ``skip``, and the module that
    ``model.get_output_embeddings()`` returns (transformers models). Quantize before adding LoRA
    adapters; the adapters then train on top of the frozen 4-bit base.

    Args:
        model: the model, edited in place (it keeps its class, so ``generate`` etc. still work).
        method: only ``"nf4"``.
        skip: module names to keep, matched as a dotted suffix: ``"lm_head"`` matches
            ``lm_head`` and ``model.lm_head``, not ``xlm_head``.
        compute_dtype: matmul dtype of every quantized layer; defaults to each layer's own dtype.
        block_size: values per NF4 scale, a power of two from 32 to 4096.
        double_quant: quantize the scales too (4.127 instead of 4.5 bits per parameter).

    Returns:
        ``model`` itself.

    Raises:
        ValueError: unknown ``method``; the model is already quantized or already has LoRA
            layers; or there was no linear layer left to quantize.
    """
    targets = check_quantizable(model, method, skip)
    # Replace one layer at a time, so the full-precision weight can be freed before the next.
    for name in targets:
        quantize_layer(model, name, compute_dtype=compute_dtype, block_size=block_size,
                       double_quant=double_quant)
    _own_remaining_parameters(model)
    return model


def check_quantizable(
    model: nn.Module, method: str = "nf4", skip: str | tuple[str, ...] | list[str] = ("lm_head",)
) -> list[str]:
    """The paths quantize_model would quantize, after checking that it may (the errors it raises).

    The model's weights are never read, so a model built on the meta device can be asked (the
    streaming load in lorakit.hf picks its layers this way, before any weight is in memory).

    Raises:
        ValueError: unknown ``method``; the model is already quantized or already has LoRA
            layers; or there is no linear layer to quantize.
    """
    if method not in METHODS:
        raise ValueError(f"quantization method must be one of {', '.join(METHODS)}; got {method!r}")
    skip = (skip,) if isinstance(skip, str) else tuple(skip)
    quantized = [name for name, m in model.named_modules() if isinstance(m, NF4Linear)]
    if quantized:
        raise ValueError(
            f"model is already quantized: {len(quantized)} NF4Linear layers, e.g. {_examples(quantized)}"
        )
    with_lora = [name for name, m in model.named_modules() if hasattr(m, "lora_A")]  # lorakit's or PEFT's
    if with_lora:
        raise ValueError(
            f"model already has LoRA layers ({_examples(with_lora)}); quantize the base model first, "
            "then add adapters"
        )

    targets = quantizable_linears(model, skip)
    if "" in targets:
        raise ValueError("model is itself a linear layer; use NF4Linear.from_linear(model) instead")
    if not targets:
        raise ValueError(
            f"found no nn.Linear or Conv1D layer to quantize (skip={skip!r}, output head excluded)"
        )
    return targets


def quantize_layer(
    model: nn.Module,
    name: str,
    compute_dtype: torch.dtype | None = None,
    block_size: int = 64,
    double_quant: bool = True,
) -> NF4Linear:
    """Replace the linear at path ``name`` of ``model`` with its :class:`NF4Linear`, keeping its train/eval
    mode; the one step quantize_model and the streaming load share, so both give the same bits."""
    parent_name, _, child_name = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    original = parent.get_submodule(child_name)
    layer = NF4Linear.from_linear(
        original,
        compute_dtype=compute_dtype,
        block_size=block_size,
        double_quant=double_quant,
    )
    layer.train(original.training)  # a model in eval mode stays in eval mode
    setattr(parent, child_name, layer)
    return layer


def quantizable_linears(model: nn.Module, skip: tuple[str, ...] | list[str] = ("lm_head",)) -> list[str]:
    """Paths of the layers quantize_model quantizes: every nn.Linear and Conv1D but the output head
    and the modules named in `skip` (dotted suffixes)."""
    head = output_head(model)
    return [name for name, module in model.named_modules()
            if (isinstance(module, nn.Linear) or is_conv1d(module)) and module is not head
            and not path_matches(tuple(skip), name)]


def _own_remaining_parameters(model: nn.Module) -> None:
    """Copy the full-precision parameters left (embeddings, norms, head) into our own memory.

    transformers memory-maps safetensors files. While one tensor still points into the mapping,
    every page of it read so far (the fp32 weights just quantized) stays resident, so the 4-bit
    base would save little memory. Tied parameters stay tied: each is copied once.
    """
    copies: dict[int, nn.Parameter] = {}
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, NF4Linear):  # its tensors were made by quantizing, never mapped
                continue
            for name, param in list(module._parameters.items()):
                if param is None or param.device.type != "cpu":
                    continue
                if id(param) not in copies:
                    copies[id(param)] = nn.Parameter(param.detach().clone(),
                                                     requires_grad=param.requires_grad)
                module._parameters[name] = copies[id(param)]
