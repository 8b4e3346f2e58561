"""Walking a model's modules the way lorakit sees them, and replacing one in place."""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from lorakit.core.full_copies import ModulesToSave
from lorakit.core.layers import LORA_LAYERS, LoraEmbedding, LoraLinear

ADAPTER_MODULES = (*LORA_LAYERS, ModulesToSave)


def model_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(path, module) for every module, not descending into lorakit wrappers.

    A wrapper stands for the module it wraps, so its path is the original module's path and
    its inner A/B linears are never mistaken for targets.
    """

    def walk(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]]:
        for name, child in module.named_children():
            path = f"{prefix}.{name}" if prefix else name
            yield path, child
            if not isinstance(child, ADAPTER_MODULES):
                yield from walk(child, path)

    return walk(model, "")


def lora_layers(model: nn.Module) -> list[LoraLinear | LoraEmbedding]:
    return [module for _, module in model_modules(model) if isinstance(module, LORA_LAYERS)]


def adapter_modules(model: nn.Module) -> list[LoraLinear | LoraEmbedding | ModulesToSave]:
    return [module for _, module in model_modules(model) if isinstance(module, ADAPTER_MODULES)]


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child_name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child_name, new)
