"""Managing the adapters on a model: list, switch, delete, disable, count parameters."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import nn

from lorakit.core.config import LoraConfig
from lorakit.core.full_copies import ModulesToSave
from lorakit.core.layers import LORA_LAYERS, LoraEmbedding, LoraLinear
from lorakit.core.walk import adapter_modules, lora_layers, model_modules, replace_module

# The adapters' configs (in insertion order) and the active names live on the model object
# itself, so they travel with it through deepcopy and need no global registry; merge_and_unload
# removes both attributes.
_CONFIGS = "lorakit_configs"
_ACTIVE = "lorakit_active"


def adapter_configs(model: nn.Module) -> dict[str, LoraConfig]:
    """The model's adapters by name, with the config each was created from (a live dict)."""
    configs = model.__dict__.get(_CONFIGS)
    if configs is None:
        configs = {}
        model.__dict__[_CONFIGS] = configs
    return configs


def list_adapters(model: nn.Module) -> list[str]:
    """Names of all adapters on the model, in the order they were added."""
    return list(model.__dict__.get(_CONFIGS, {}))


def active_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters that run in forward, in the order set_adapter was given."""
    return list(model.__dict__.get(_ACTIVE, []))


def set_adapter(model: nn.Module, name_or_names: str | Sequence[str]) -> None:
    """Make these adapters the active ones (their outputs add up) and the trainable ones.

    Switching only changes which names each layer runs: nothing is copied or reloaded.

    Raises:
        ValueError: an unknown name (the known ones are listed), or adapters are merged.
    """
    names = [name_or_names] if isinstance(name_or_names, str) else list(name_or_names)
    known = list_adapters(model)
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ValueError(f"unknown adapter {', '.join(map(repr, unknown)) or '(none given)'}; "
                         f"adapters on this model: {', '.join(known) or 'none'}")
    merged = merged_adapters(model)
    if merged and set(merged) != set(names):
        raise ValueError(f"adapters {merged} are merged into the base weights; call unmerge(model) "
                         f"before switching to {names}")
    for module in adapter_modules(model):
        module.active_adapters = [n for n in names if _holds(module, n)]
        for name in _held(module):
            for param in _params_of(module, name):
                param.requires_grad_(name in names)
    model.__dict__[_ACTIVE] = names


def merged_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters currently folded into the base weights."""
    found: list[str] = []
    for layer in lora_layers(model):
        found += [n for n in layer.merged_adapters if n not in found]
    return found


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name` and free its tensors; layers left with no adapter are unwrapped.

    Raises:
        ValueError: the adapter does not exist, or it is merged (unmerge first).
    """
    if name not in list_adapters(model):
        raise ValueError(f"unknown adapter {name!r}; adapters on this model: "
                         f"{', '.join(list_adapters(model)) or 'none'}")
    if name in merged_adapters(model):
        raise ValueError(f"adapter {name!r} is merged into the base weights; call unmerge(model) first")
    for path, module in list(model_modules(model)):
        if not isinstance(module, (*LORA_LAYERS, ModulesToSave)) or not _holds(module, name):
            continue
        module.delete(name)
        if not _held(module):
            original = module.original_module if isinstance(module, ModulesToSave) else module.base
            replace_module(model, path, original)
    del adapter_configs(model)[name]
    model.__dict__[_ACTIVE] = [n for n in active_adapters(model) if n != name]


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Inside the block the model computes exactly the base model; restored on exit, also on errors.

    Merged adapters are unmerged for the block and merged again afterwards.
    """
    from lorakit.core.merge import merge, unmerge  # merge builds on this module

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
    for param in model.parameters():
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    for module in model.modules():
        if callable(getattr(module, "dequantize_weight", None)) and hasattr(module, "in_features"):
            total += int(module.in_features) * int(module.out_features)  # type: ignore[arg-type]
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> None:
    """Print `trainable params: 4,884,480 || all params: 139,399,488 || trainable%: 3.5039`."""
    trainable, total = trainable_parameters(model)
    share = 100 * trainable / total if total else 0.0
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {share:.4f}")


def _held(module: LoraLinear | LoraEmbedding | ModulesToSave) -> list[str]:
    if isinstance(module, ModulesToSave):
        return list(module.modules_to_save)
    return list(module.lora_A)


def _holds(module: LoraLinear | LoraEmbedding | ModulesToSave, name: str) -> bool:
    return name in _held(module)


def _params_of(module: LoraLinear | LoraEmbedding | ModulesToSave, name: str) -> list[nn.Parameter]:
    if isinstance(module, ModulesToSave):
        return list(module.modules_to_save[name].parameters())
    if isinstance(module, LoraEmbedding):
        return [module.lora_embedding_A[name], module.lora_embedding_B[name]]
    return [module.lora_A[name].weight, module.lora_B[name].weight]  # type: ignore[list-item]
