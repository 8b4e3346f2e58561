"""Walking a model's modules the way lorakit sees them, and replacing one in place."""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from lorakit.core.contract import LoraLayer, base_kind
from lorakit.core.full_copies import ModulesToSave
from lorakit.core.protocols import AdapterModule

ADAPTER_MODULES = (LoraLayer, ModulesToSave)
"""The classes that implement `AdapterModule`: what the walk stops at."""


def model_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(path, module) for every module, not descending into lorakit wrappers.

    A wrapper stands for the module it wraps, so its path is the original module's path and
    its inner A/B linears are never mistaken for targets. A model that is itself a wrapper, or
    itself one module lorakit can adapt (a bare nn.Linear), comes first with the path "".
    """

    def walk(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]]:
        for name, child in module.named_children():
            path = f"{prefix}.{name}" if prefix else name
            yield path, child
            if not isinstance(child, ADAPTER_MODULES):
                yield from walk(child, path)

    if isinstance(model, ADAPTER_MODULES):
        return iter([("", model)])
    if base_kind(model) is not None:
        return iter([("", model), *walk(model, "")])
    return walk(model, "")


def lora_layers(model: nn.Module) -> list[LoraLayer]:
    """Every LoRA layer of the model, in module order."""
    return [module for _, module in model_modules(model) if isinstance(module, LoraLayer)]


def adapter_modules(model: nn.Module) -> list[AdapterModule]:
    """Every lorakit wrapper of the model: LoRA layers and modules_to_save holders."""
    return [module for _, module in model_modules(model) if isinstance(module, ADAPTER_MODULES)]  # type: ignore[misc]


def unwrapped(module: nn.Module) -> nn.Module:
    """The module a lorakit wrapper stands for (a LoRA layer's base, a holder's original), else itself."""
    return module.original() if isinstance(module, ADAPTER_MODULES) else module


def output_head(model: nn.Module) -> nn.Module | None:
    """The model's output projection as transformers names it (`get_output_embeddings`), else None.

    The one home of this rule: "all-linear" targets, quantize_model and the estimate skip it.
    """
    getter = getattr(model, "get_output_embeddings", None)
    if not callable(getter):
        return None
    try:
        head = getter()
    except (NotImplementedError, AttributeError):
        return None
    return head if isinstance(head, nn.Module) else None


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put `new` where the module at `path` is (not for the model itself, path "")."""
    assert path, "the model itself cannot be replaced in place"
    parent_path, _, child_name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child_name, new)
