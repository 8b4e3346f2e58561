"""Managing the adapters on a model: list, switch, delete, disable, count parameters.

Every function here talks to the adapter modules through their contract (contract.py and
full_copies.py): `set_active`, `delete`, `adapter_names`, `original`, `disabled`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import nn

from lorakit.core.bases import is_quantized
from lorakit.core.merge import merge, unmerge
from lorakit.core.registry import (
    active_adapters,
    adapter_configs,
    check_known,
    list_adapters,
    merged_adapters,
    merged_error,
    record_active,
    unknown_adapter_error,
)
from lorakit.core.walk import ADAPTER_MODULES, adapter_modules, model_modules, replace_module

__all__ = ["active_adapters", "adapter_configs", "delete_adapter", "disable_adapters", "list_adapters",
           "merged_adapters", "print_trainable_parameters", "set_adapter", "trainable_parameters",
           "trainable_parameters_line"]


def set_adapter(model: nn.Module, name_or_names: str | Sequence[str]) -> None:
    """Make these adapters the active ones (their outputs add up) and the trainable ones.

    Switching only changes which names each layer runs: nothing is copied or reloaded.

    Raises:
        ValueError: an unknown name (the known ones are listed), or adapters are merged.
    """
    names = [name_or_names] if isinstance(name_or_names, str) else list(name_or_names)
    check_known(model, names)
    merged = merged_adapters(model)
    if merged and set(merged) != set(names):
        raise merged_error(merged, f"before switching to {names}")
    for module in adapter_modules(model):
        module.set_active(names)
    record_active(model, names)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name` and free its tensors; layers left with no adapter are unwrapped.

    (A model that is itself one LoRA layer stays that layer, now without adapters.)

    Raises:
        ValueError: the adapter does not exist, or it is merged (unmerge first).
    """
    if name not in list_adapters(model):
        raise unknown_adapter_error(model, [name])
    if name in merged_adapters(model):
        raise merged_error(name, "first")
    for path, module in list(model_modules(model)):
        if not isinstance(module, ADAPTER_MODULES) or name not in module.adapter_names():
            continue
        module.delete(name)
        if not module.adapter_names() and path:
            replace_module(model, path, module.original())
    del adapter_configs(model)[name]
    record_active(model, [n for n in active_adapters(model) if n != name])


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Inside the block the model computes exactly the base model; restored on exit, also on errors.

    Merged adapters are unmerged for the block and merged again afterwards.
    """
    modules = adapter_modules(model)
    merged = merged_adapters(model)
    if merged:
        unmerge(model)
    for module in modules:
        module.disabled = True
    try:
        yield
    finally:
        for module in modules:
            module.disabled = False
        if merged:
            merge(model, merged)


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a 4-bit base weight counts as its in x out values."""
    trainable = total = 0
    storage: set[int] = set()  # a quantized weight's codes and scales (parameters, so FSDP2 shards them)
    for module in model.modules():
        if is_quantized(module):
            total += int(module.in_features) * int(module.out_features)  # type: ignore[arg-type]
            storage |= {id(p) for p in module.parameters() if p is not getattr(module, "bias", None)}
    for param in model.parameters():
        if id(param) not in storage:
            total += param.numel()
            trainable += param.numel() if param.requires_grad else 0
    return trainable, total


def trainable_parameters_line(model: nn.Module) -> str:
    """`trainable params: 4,884,480 || all params: 139,399,488 || trainable%: 3.5039`, as PEFT prints it."""
    trainable, total = trainable_parameters(model)
    return format_trainable(trainable, total)


def format_trainable(trainable: int, total: int) -> str:
    """The trainable-parameters line for these counts (the one place its wording lives)."""
    share = 100 * trainable / total if total else 0.0
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {share:.4f}"


def print_trainable_parameters(model: nn.Module) -> None:
    """Print `trainable params: 4,884,480 || all params: 139,399,488 || trainable%: 3.5039`."""
    print(trainable_parameters_line(model))
