"""The PEFT adapter layout: which tensor keys and config entries an adapter file holds.

Keys are `base_model.model.<module path>.<tensor>` with the adapter's name left out:
`lora_A.weight` (r x in) and `lora_B.weight` (out x r) for linear layers (and DoRA's magnitude
`lora_magnitude_vector` (out)), `lora_embedding_A`
(r x num_embeddings) and `lora_embedding_B` (dim x r) for embeddings, `<path>.<key>` for each
tensor of a module trained in full (`modules_to_save`), and biases when `bias` is not "none"
(`<path>.base_layer.bias` for an adapted module, `<path>.bias` for any other). This module maps
an adapter on a model to those keys both ways; io.py reads and writes the files.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from lorakit.core.bases import is_quantized
from lorakit.core.config import ALL_LINEAR, LoraConfig, is_svd_init, path_matches
from lorakit.core.contract import LoraLayer, in_out, layer_class
from lorakit.core.full_copies import ModulesToSave
from lorakit.core.inject import find_targets
from lorakit.core.layers import DORA_KEY, LAYER_KINDS
from lorakit.core.registry import adapter_configs
from lorakit.core.walk import ADAPTER_MODULES, lora_layers, model_modules, unwrapped

PREFIX = "base_model.model."


def a_suffixes() -> tuple[str, ...]:
    """How A's keys end, for every layer kind (registered ones too): .lora_A.weight, .lora_embedding_A, ..."""
    return tuple(dict.fromkeys("." + kind.peft_keys[0] for kind in LAYER_KINDS))


def b_suffixes() -> tuple[str, ...]:
    """How B's keys end, for every layer kind."""
    return tuple(dict.fromkeys("." + kind.peft_keys[1] for kind in LAYER_KINDS))
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"

BASE_QUANTIZATION = "lorakit.base_quantization"
"""Key in the weights file's safetensors metadata recording the base the adapter was trained on:
"nf4" (its adapted layers' bases were 4-bit NF4) or "none". Not in adapter_config.json: PEFT
refuses unknown config keys (before 0.13) or warns that the reader should upgrade PEFT (since),
while every reader (PEFT, vLLM, TGI, llama.cpp's converter) ignores safetensors metadata."""

# PEFT LoRA options that change the maths; lorakit refuses a file using them rather than
# silently computing something else.
_UNSUPPORTED = {
    "lora_bias": "a LoRA bias on B (lora_bias)",
    "target_parameters": "LoRA on raw parameters (target_parameters)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "layer_replication": "layer replication (layer_replication)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "arrow_config": "Arrow routing (arrow_config)",
}


# --- tensors -------------------------------------------------------------------------------------

def adapter_state(model: nn.Module, name: str, bias: str) -> dict[str, torch.Tensor]:
    """PEFT key -> the live tensor (parameter or buffer) of adapter `name` on `model`."""
    state: dict[str, torch.Tensor] = {}
    for path, module in model_modules(model):
        if isinstance(module, ADAPTER_MODULES) and name in module.adapter_names():
            state.update({f"{PREFIX}{path}.{key}": tensor for key, tensor in module.peft_state(name).items()})
    adapted, copied = adapter_paths(model, name)
    state.update(bias_tensors(model, bias, adapted, copied))
    return state


def adapter_paths(model: nn.Module, name: str) -> tuple[set[str], set[str]]:
    """(paths of the LoRA layers, paths of the modules_to_save copies) holding adapter `name`."""
    adapted = {p for p, m in model_modules(model) if isinstance(m, LoraLayer) and name in m.scaling}
    copied = {p for p, m in model_modules(model)
              if isinstance(m, ModulesToSave) and name in m.modules_to_save}
    return adapted, copied


def planned_paths(model: nn.Module, config: LoraConfig) -> tuple[set[str], set[str]]:
    """adapter_paths of a new adapter with `config`, found without changing the model."""
    adapted = {path for path, _ in find_targets(model, config)}
    return adapted, set(modules_to_save_paths(model, config.modules_to_save or ()))


def planned_shapes(model: nn.Module, config: LoraConfig) -> dict[str, tuple[int, ...]]:
    """PEFT key -> shape of every tensor a new adapter with `config` would have on `model`.

    Computed without changing the model, so a file can be checked before anything is added.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    adapted, copied = planned_paths(model, config)
    for path in sorted(adapted):
        base = unwrapped(model.get_submodule(path))
        rank, (fan_in, fan_out) = config.rank_for(path), in_out(base)
        key_a, key_b = layer_class(base).peft_keys  # type: ignore[union-attr]
        shapes[f"{PREFIX}{path}.{key_a}"] = (rank, fan_in)  # A: r x in
        shapes[f"{PREFIX}{path}.{key_b}"] = (fan_out, rank)  # B: out x r
        if config.use_dora:
            shapes[f"{PREFIX}{path}.{DORA_KEY}"] = (fan_out,)  # m: out
    for path in sorted(copied):
        for key, tensor in unwrapped(model.get_submodule(path)).state_dict().items():
            shapes[f"{PREFIX}{path}.{key}"] = tuple(tensor.shape)
    for key, tensor in bias_tensors(model, config.bias, adapted, copied).items():
        shapes[key] = tuple(tensor.shape)
    return shapes


def optional_shapes(model: nn.Module, adapted: set[str], copied: set[str],
                    bias: str) -> dict[str, tuple[int, ...] | None]:
    """Extra keys PEFT may write beside an adapter, which a reader accepts (None: any shape).

    PEFT saves a targeted embedding or output layer in full (`<path>.base_layer.weight`), and with
    bias="all" also `<path>.modules_to_save.bias` and `<path>.original_module.bias`.
    """
    shapes: dict[str, tuple[int, ...] | None] = {}
    for path in adapted:
        weight = getattr(unwrapped(model.get_submodule(path)), "weight", None)
        if isinstance(weight, torch.Tensor):
            shapes[f"{PREFIX}{path}.base_layer.weight"] = tuple(weight.shape)
    if bias == "all":
        for path in copied:
            shapes[f"{PREFIX}{path}.modules_to_save.bias"] = \
                shapes[f"{PREFIX}{path}.original_module.bias"] = None
    return shapes


def base_quantization(model: nn.Module, paths: Iterable[str]) -> str:
    """"nf4" when a module at one of `paths` (or the base inside its LoRA layer) is 4-bit, else "none"."""
    for path in paths:
        if is_quantized(unwrapped(model.get_submodule(path))):
            return "nf4"
    return "none"


def rank_problems(config: LoraConfig, shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
    """Where the file's LoRA tensors disagree with its config's rank (r, or rank_pattern's entry).

    A is (r x in) and B is (out x r), for linear and embedding layers alike. One message per kind
    of disagreement, e.g. "8 modules hold rank-2 tensors where the config gives r=8: ...".
    """
    ranks: dict[str, set[int]] = {}
    for key, shape in shapes.items():
        for suffix, axis in (*((s, 0) for s in a_suffixes()), *((s, 1) for s in b_suffixes())):
            if key.startswith(PREFIX) and key.endswith(suffix) and len(shape) == 2:
                ranks.setdefault(key[len(PREFIX):-len(suffix)], set()).add(shape[axis])
    wrong: dict[tuple[str, int], list[str]] = {}
    for path, found in sorted(ranks.items()):
        if found != {config.rank_for(path)}:
            wrong.setdefault((" and ".join(map(str, sorted(found))), config.rank_for(path)), []).append(path)
    return [f"{len(paths)} module(s) hold rank-{got} tensors where the config gives r={want}: {_few(paths)}"
            for (got, want), paths in wrong.items()]


def bias_tensors(model: nn.Module, bias: str, adapted: set[str], copied: set[str]) -> dict[str, torch.Tensor]:
    """The biases an adapter with this `bias` mode trains, under their PEFT keys.

    `adapted` are the paths of the adapter's LoRA layers (their bias is `base_layer.bias`),
    `copied` those of its modules_to_save, whose biases already travel inside the copy.
    """
    found: dict[str, torch.Tensor] = {}
    if bias == "none":
        return found
    for path, module in model_modules(model):
        if path in copied:
            continue
        inner = unwrapped(module)
        if path in adapted:
            if isinstance(inner._parameters.get("bias"), torch.Tensor):
                found[f"{PREFIX}{path}.base_layer.bias"] = inner._parameters["bias"]  # type: ignore[assignment]
        elif bias == "all":
            if isinstance(inner._parameters.get("bias"), torch.Tensor):
                found[f"{PREFIX}{path}.bias"] = inner._parameters["bias"]  # type: ignore[assignment]
    return found


def modules_to_save_paths(model: nn.Module, names: Iterable[str]) -> list[str]:
    """Paths of the modules whose path is, or ends with, one of `names` (the PEFT suffix rule)."""
    names = tuple(names)
    return [path for path, _ in model_modules(model) if path_matches(names, path)]


# --- config --------------------------------------------------------------------------------------

def config_to_json(model: nn.Module, name: str, config: LoraConfig | None = None) -> dict[str, Any]:
    """adapter_config.json for adapter `name` (with `config` instead of its own, when given).

    Holds the keys PEFT, vLLM and TGI read. A PiSSA/OLoRA adapter records its init as PEFT does
    (`init_lora_weights: "pissa"`): it applies to the residual base, not to the original one.
    """
    config = config or adapter_configs(model)[name]
    layers = [layer for layer in lora_layers(model) if name in layer.scaling]
    targets, exclude, layer_indices = _target_modules(model, config, {layer.path for layer in layers})
    data: dict[str, Any] = {
        "peft_type": "LORA",
        "r": config.r,
        "lora_alpha": _plain_number(config.alpha),
        "lora_dropout": config.dropout,
        "target_modules": targets,
        "bias": config.bias,
        "use_rslora": config.use_rslora,
        "fan_in_fan_out": any(layer.fan_in_fan_out for layer in layers),
        "task_type": task_type(model),
        "base_model_name_or_path": base_model_name(model),
        "rank_pattern": dict(config.rank_pattern),
        "alpha_pattern": {k: _plain_number(v) for k, v in config.alpha_pattern.items()},
        "modules_to_save": list(config.modules_to_save) if config.modules_to_save else None,
        "inference_mode": True,
        "init_lora_weights": config.init if config.init == "gaussian" or is_svd_init(config.init) else True,
        "use_dora": config.use_dora,
    }
    if exclude is not None:
        data["exclude_modules"] = exclude
    if layer_indices is not None:
        data["layers_to_transform"] = layer_indices
    return data


def config_from_json(data: object, source: str) -> LoraConfig:
    """A LoraConfig from a PEFT adapter_config.json's content; `source` names the file in errors.

    Raises:
        ValueError: not a LoRA config, a PEFT option lorakit does not implement, or a value out of range.
    """
    if not isinstance(data, dict):
        raise ValueError(f"{source} must hold a JSON object, got {type(data).__name__}")
    if data.get("peft_type") != "LORA":
        raise ValueError(f"{source} has peft_type {data.get('peft_type')!r}; lorakit loads LoRA adapters "
                         'only (peft_type "LORA")')
    used = [what for key, what in _UNSUPPORTED.items() if data.get(key)]
    if used:
        raise ValueError(f"{source} uses {', '.join(used)}, which lorakit does not implement; "
                         "only plain LoRA adapters can be loaded")
    problems = []
    for key in ("r", "target_modules"):
        if data.get(key) is None:
            problems.append(f"{key} is missing")
    r, alpha, dropout = data.get("r", 8), data.get("lora_alpha", 8), data.get("lora_dropout", 0.0)
    if r is not None and not (isinstance(r, int) and not isinstance(r, bool) and r >= 1):
        problems.append(f"r must be an integer >= 1, got {r!r}")
    if not (_is_number(alpha) and alpha > 0):
        problems.append(f"lora_alpha must be a number > 0, got {alpha!r}")
    if not (_is_number(dropout) and 0 <= dropout < 1):
        problems.append(f"lora_dropout must be in [0, 1), got {dropout!r}")
    if problems:
        raise ValueError(f"{source} has invalid settings:\n  " + "\n  ".join(problems))
    layers = data.get("layers_to_transform")
    try:
        return LoraConfig(
            r=r, alpha=alpha, dropout=dropout, targets=data["target_modules"],
            exclude=data.get("exclude_modules"),
            layers=[layers] if isinstance(layers, int) else layers,
            rank_pattern=data.get("rank_pattern") or {}, alpha_pattern=data.get("alpha_pattern") or {},
            bias=data.get("bias", "none"), use_rslora=bool(data.get("use_rslora", False)),
            modules_to_save=data.get("modules_to_save"), init="zeros",
            use_dora=bool(data.get("use_dora", False)),
        )
    except (ValueError, TypeError) as err:
        raise ValueError(f"{source} has invalid settings: {err}") from None


def fit_modules_to_save(model: nn.Module, config: LoraConfig) -> LoraConfig:
    """Drop modules_to_save entries that match no module, as PEFT does.

    PEFT writes its task defaults (e.g. ["classifier", "score"] for SEQ_CLS) whether or not the
    model has them; a file holding tensors for a missing module still fails the key check.
    """
    if not config.modules_to_save:
        return config
    kept = tuple(key for key in config.modules_to_save if modules_to_save_paths(model, (key,)))
    return replace(config, modules_to_save=kept or None)


def task_type(model: nn.Module) -> str | None:
    name = type(model).__name__
    return "CAUSAL_LM" if name.endswith(("ForCausalLM", "LMHeadModel")) else None


def base_model_name(model: nn.Module) -> str | None:
    name = (getattr(model, "name_or_path", None)
            or getattr(getattr(model, "config", None), "_name_or_path", None))
    return str(name) if name else None


def _target_modules(model: nn.Module, config: LoraConfig, paths: set[str]) -> tuple[Any, Any, Any]:
    """(target_modules, exclude_modules, layers_to_transform) that make PEFT adapt exactly `paths`.

    A list of names or a regex is written as given. "all-linear" is not: PEFT's rule for it
    differs from lorakit's (lorakit also skips classification heads), so it becomes the module
    names that select the same layers; PEFT also refuses a regex with layers_to_transform.
    When names cannot select exactly these modules, the full paths are written.
    """
    exclude = (config.exclude if config.exclude is None or isinstance(config.exclude, str)
               else list(config.exclude))
    layers = None if config.layers is None else list(config.layers)
    if isinstance(config.targets, tuple) or (config.targets != ALL_LINEAR and layers is None):
        return config.targets if isinstance(config.targets, str) else list(config.targets), exclude, layers
    names = sorted({path.rsplit(".", 1)[-1] for path in paths})
    try:
        same = {path for path, _ in find_targets(model, replace(config, targets=tuple(names)))} == paths
    except (ValueError, TypeError):
        same = False
    return (names, exclude, layers) if same else (sorted(paths), None, None)


def _plain_number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else float(value)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_keys(expected: Mapping[str, tuple[int, ...]], optional: Mapping[str, tuple[int, ...] | None],
               found: Mapping[str, tuple[int, ...]], source: str, trained_on: str | None) -> None:
    """Raise one ValueError listing missing keys, unexpected keys and shapes that do not fit."""
    other_base = ("; the adapter was probably trained on another base model"
                  + (f" (its config names {trained_on!r})" if trained_on else ""))
    problems = []
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected) - set(optional))
    if missing:
        problems.append(f"{len(missing)} tensor(s) this model needs are missing from the file: "
                        f"{_few(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} tensor(s) in the file fit no module of this model: "
                        f"{_few(unexpected)}")
    wrong = [(key, found[key], want) for key, want in {**optional, **expected}.items()
             if key in found and want is not None and tuple(found[key]) != tuple(want)]
    for key, got, want in wrong[:5]:
        module, _, tensor = key[len(PREFIX):].rpartition(".lora_") if ".lora_" in key else (key, "", "")
        label = f"module {module!r}, lora_{tensor}" if tensor else f"tensor {key!r}"
        problems.append(f"{label}: the file has shape {tuple(got)}, this model needs {tuple(want)}")
    if len(wrong) > 5:
        problems.append(f"... and {len(wrong) - 5} more shape mismatches")
    if problems:
        hint = other_base if wrong or unexpected else ""
        raise ValueError(f"adapter {source} does not fit this model{hint}:\n  " + "\n  ".join(problems))


def _few(keys: list[str]) -> str:
    shown = ", ".join(k.removeprefix(PREFIX) for k in keys[:4])
    return shown + (f", ... ({len(keys) - 4} more)" if len(keys) > 4 else "")
