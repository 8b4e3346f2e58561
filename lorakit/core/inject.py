"""add_adapter: find the target modules, wrap them in LoRA layers in place, mark what trains."""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence

from torch import nn

from lorakit.core.adapters import set_adapter
from lorakit.core.bases import SUPPORTED_MODULES, is_quantized, requantize_problem
from lorakit.core.config import ALL_LINEAR, LoraConfig, is_svd_init, path_matches
from lorakit.core.contract import LoraLayer, base_kind, in_out, layer_class
from lorakit.core.full_copies import ModulesToSave
from lorakit.core.layers import LINEAR_KINDS, wrap
from lorakit.core.registry import adapter_configs, refuse_merged
from lorakit.core.walk import lora_layers, model_modules, output_head, replace_module, unwrapped

# Output heads that "all-linear" leaves alone when the model does not name its own through
# get_output_embeddings() (classification and QA heads of transformers models).
_HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs")


def add_adapter(model: nn.Module, config: LoraConfig, name: str = "default") -> nn.Module:
    """Add a LoRA adapter to `model` in place and make it the active, trainable one.

    The model keeps its class. Every parameter outside the new adapter is frozen, except the
    biases `config.bias` names and the `modules_to_save` copies. Other adapters stay in place.

    Args:
        model: any nn.Module, e.g. a transformers model.
        config: the adapter's settings.
        name: the adapter's name; must be new to this model.

    Returns:
        The same model object; for a model that is itself one adaptable module (a bare
        nn.Linear), the LoRA layer that now wraps it.

    Raises:
        ValueError: the name is taken, a target matches nothing, or r exceeds a module's size.
        TypeError: a target names a module lorakit cannot adapt.
    """
    _check_name(model, name)
    refuse_merged(model, "before adding another adapter")
    targets = find_targets(model, config)
    _check_ranks(targets, config)
    _check_variants(targets, config)
    save_paths = _modules_to_save(model, config)

    # Everything is validated above: from here on the model changes and nothing raises.
    for path, module in targets:
        layer = module if isinstance(module, LoraLayer) else wrap(module, path)
        if layer is not module and path:
            replace_module(model, path, layer)
        elif layer is not module:
            model = layer  # the model is itself the one target: its layer stands in for it
        layer.add(name, config.rank_for(path), config.scale_for(path), config.dropout, config.init,
                  config.share_dropout_mask, config.use_dora)
    for path in save_paths:
        holder = model.get_submodule(path)
        if not isinstance(holder, ModulesToSave):
            holder = ModulesToSave(holder, path)
            replace_module(model, path, holder)
        holder.add(name)

    _report_requantization(lora_layers(model), name)
    adapter_configs(model)[name] = config
    model.requires_grad_(False)
    set_adapter(model, name)  # marks the new adapter's A/B (and copies) trainable
    _mark_biases(model, config)
    return model


def find_targets(model: nn.Module, config: LoraConfig) -> list[tuple[str, nn.Module]]:
    """(path, module) of every module `config` adapts, checked to be of a supported kind."""
    heads = _output_heads(model)
    found: list[tuple[str, nn.Module]] = []
    for path, module in model_modules(model):
        if isinstance(module, ModulesToSave) or not _selected(config, path, module, heads):
            continue
        if base_kind(unwrapped(module)) is None:
            raise TypeError(
                f"target {path!r} is a {type(module).__name__}, which lorakit cannot adapt; "
                f"supported modules: {SUPPORTED_MODULES}"
            )
        found.append((path, module))
    if not isinstance(config.targets, str):
        # Every name in a list must match: a typo among good names would otherwise go unnoticed.
        unmatched = [key for key in config.targets
                     if not any(path_matches((key,), p) for p, _ in model_modules(model))]
        if unmatched:
            raise ValueError(f"target(s) {', '.join(map(repr, unmatched))} matched no module; "
                             "linear modules in this model: "
                             f"{', '.join(linear_module_names(model)) or 'none'}")
    if not found:
        raise ValueError(
            f"targets {_describe(config.targets)} matched no module"
            f"{' in layers ' + str(list(config.layers)) if config.layers is not None else ''}; "
            f"linear modules in this model: {', '.join(linear_module_names(model)) or 'none'}"
        )
    return found


def linear_module_names(model: nn.Module) -> list[str]:
    """The distinct last names of the model's adaptable linear modules (q_proj, k_proj, ...)."""
    names = [path.rsplit(".", 1)[-1] for path, m in model_modules(model)
             if base_kind(unwrapped(m)) in LINEAR_KINDS]
    return list(dict.fromkeys(names))


def layer_index(path: str) -> int | None:
    """The block index of a module: the first number in its path (model.layers.3.mlp -> 3)."""
    match = re.search(r"(?:^|\.)(\d+)(?:\.|$)", path)
    return int(match.group(1)) if match else None


def _selected(config: LoraConfig, path: str, module: nn.Module, heads: list[nn.Module]) -> bool:
    if config.targets == ALL_LINEAR:
        base = unwrapped(module)
        chosen = base_kind(base) in LINEAR_KINDS and not any(base is head for head in heads)
    else:
        chosen = path_matches(config.targets, path)
    if not chosen or (config.exclude is not None and path_matches(config.exclude, path)):
        return False
    if config.modules_to_save and any(path_matches(config.modules_to_save, p) for p in _prefixes(path)):
        return False  # a module trained in full is never also adapted (nor anything inside it)
    return config.layers is None or layer_index(path) in config.layers


def _prefixes(path: str) -> list[str]:
    parts = path.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]



def _output_heads(model: nn.Module) -> list[nn.Module]:
    head = output_head(model)
    heads = [unwrapped(m) for p, m in model_modules(model) if p.rsplit(".", 1)[-1] in _HEAD_NAMES]
    return heads + ([unwrapped(head)] if head is not None else [])


def _describe(targets: str | Sequence[str]) -> str:
    return repr(targets) if isinstance(targets, str) else repr(list(targets))


def _check_name(model: nn.Module, name: str) -> None:
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter name must be a non-empty string without '.', got {name!r}")
    if name in adapter_configs(model):
        raise ValueError(
            f"adapter {name!r} already exists on this model (adapters: {', '.join(adapter_configs(model))}); "
            "choose another name or delete_adapter() it first"
        )


def _check_ranks(targets: list[tuple[str, nn.Module]], config: LoraConfig) -> None:
    too_big = []
    for path, module in targets:
        layer_in, layer_out = in_out(unwrapped(module))
        rank = config.rank_for(path)
        if rank > min(layer_in, layer_out):
            too_big.append(f"{path} ({layer_in} -> {layer_out}): r={rank} > {min(layer_in, layer_out)}")
    if too_big:
        raise ValueError("r must not exceed min(in, out) of the module:\n  " + "\n  ".join(too_big))


def _check_variants(targets: list[tuple[str, nn.Module]], config: LoraConfig) -> None:
    """DoRA and PiSSA/OLoRA work on linear targets; PiSSA/OLoRA on a 4-bit base only when allowed."""
    kinds = {path: layer_class(unwrapped(module)) for path, module in targets}
    no_dora = [path for path, kind in kinds.items() if kind is not None and not kind.supports_dora]
    if config.use_dora and no_dora:
        raise ValueError(f"DoRA (use_dora) works on linear layers (nn.Linear, Conv1D, NF4Linear), not on the "
                         f"embedding(s) {', '.join(no_dora[:3])}; leave them out of targets, "
                         "or use plain LoRA")
    no_svd = [path for path, kind in kinds.items() if kind is not None and not kind.supports_svd_init]
    if is_svd_init(config.init) and no_svd:
        raise ValueError(f"init {config.init!r} works on linear layers, not on the embedding(s) "
                         f"{', '.join(no_svd[:3])}; leave them out of targets, or use init 'kaiming'")
    quantized = [path for path, module in targets if is_quantized(unwrapped(module))]
    if is_svd_init(config.init) and quantized and config.allow_requantize:
        problems = [(path, requantize_problem(unwrapped(module))) for path, module in targets
                    if is_quantized(unwrapped(module))]
        problems = [(path, problem) for path, problem in problems if problem]
        if problems:
            raise ValueError(f"init {config.init!r} requantizes the residual, but {problems[0][0]} (and "
                             f"{len(problems) - 1} more) cannot be requantized: {problems[0][1]}")
    if is_svd_init(config.init) and quantized and not config.allow_requantize:
        raise ValueError(f"init {config.init!r} turns the base weight into the residual W - s B A, but "
                         f"{quantized[0]} (and {len(quantized) - 1} more) is 4-bit: pass "
                         "allow_requantize=True to quantize the residual again (adds a quantization error, "
                         "reported), or initialise on the unquantized model and quantize afterwards")


def _report_requantization(layers: list[LoraLayer], name: str) -> None:
    errors = [layer.requantization_error[name] for layer in layers if name in layer.requantization_error]
    if errors:
        warnings.warn(f"adapter {name!r}: the residual base of {len(errors)} 4-bit layer(s) was quantized "
                      "again, so Q(W - s B A) + s B A differs from Q(W): relative error "
                      f"||.||_F / ||Q(W)||_F mean {sum(errors) / len(errors):.2e}, max {max(errors):.2e}",
                      stacklevel=3)


def _modules_to_save(model: nn.Module, config: LoraConfig) -> list[str]:
    if not config.modules_to_save:
        return []
    paths = [p for p, _ in model_modules(model) if path_matches(config.modules_to_save, p)]
    missing = [key for key in config.modules_to_save if not any(path_matches((key,), p) for p in paths)]
    if missing:
        top = ", ".join(name for name, _ in model.named_children())
        raise ValueError(f"modules_to_save {missing} matched no module; top-level modules: {top}")
    for path in paths:
        if isinstance(model.get_submodule(path), LoraLayer):
            raise ValueError(f"modules_to_save names {path!r}, which already has LoRA adapters")
    return paths


def _mark_biases(model: nn.Module, config: LoraConfig) -> None:
    if config.bias == "all":
        for name, param in model.named_parameters():
            if name == "bias" or name.endswith(".bias"):
                param.requires_grad_(True)
    elif config.bias == "lora_only":
        for _, module in model_modules(model):
            bias = getattr(module.base, "bias", None) if isinstance(module, LoraLayer) else None
            if isinstance(bias, nn.Parameter):
                bias.requires_grad_(True)
