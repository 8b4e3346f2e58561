"""Saving and loading adapters as PEFT-layout folders (adapter_config.json + safetensors).

Loading checks everything first (config values, every key, every shape, finite values) and
only then touches the model, so a refused file leaves the model exactly as it was. Nothing is
ever unpickled. Saving writes a temporary folder beside the target and renames it into place.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from lorakit.core.adapters import adapter_configs, list_adapters, merged_adapters
from lorakit.core.config import LoraConfig
from lorakit.core.inject import add_adapter
from lorakit.core.layers import LORA_LAYERS, LoraLinear
from lorakit.core.peft_format import (
    CONFIG_FILE,
    PICKLE_FILE,
    PREFIX,
    WEIGHTS_FILE,
    adapter_paths,
    adapter_state,
    check_keys,
    config_from_json,
    config_to_json,
    fit_modules_to_save,
    optional_shapes,
    planned_paths,
    planned_shapes,
)
from lorakit.core.walk import lora_layers

# Files a save may replace wholesale; a folder holding anything else gets its files replaced one by one.
_ADAPTER_FILES = {CONFIG_FILE, WEIGHTS_FILE, PICKLE_FILE, "README.md"}


def save_adapter(model: nn.Module, path: str | os.PathLike[str], name: str = "default") -> Path:
    """Write adapter `name` as a PEFT adapter folder that PEFT, vLLM and TGI load.

    Only the adapter's own tensors go into the file: A and B of each adapted module, the
    trained copies of `modules_to_save`, and the biases when its config trains them.
    An existing adapter at `path` is replaced atomically: an interrupted save leaves either
    the old adapter or the new one (or, at worst, none at `path`), never a mix.

    Args:
        model: a model holding adapter `name` (or its torch.compile'd wrapper).
        path: the folder to write (created with its parents when missing).
        name: which adapter to save.

    Returns:
        The folder written.

    Raises:
        ValueError: no adapter of that name, or `path` is an existing file.
    """
    model = _unwrapped(model)
    if name not in list_adapters(model):
        raise ValueError(f"unknown adapter {name!r}; adapters on this model: {', '.join(list_adapters(model)) or 'none'}")
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"cannot save an adapter to {folder}: it is a file, and an adapter is a folder")
    config = adapter_configs(model)[name]
    tensors = {key: t.detach().to("cpu").contiguous() for key, t in adapter_state(model, name, config.bias).items()}
    text = json.dumps(config_to_json(model, name), indent=2, sort_keys=True) + "\n"

    def write(target: Path) -> None:
        # Weights first, config last: a folder with a config always has matching weights.
        save_file(tensors, str(target / WEIGHTS_FILE), metadata={"format": "pt"})
        _fsync(target / WEIGHTS_FILE)
        (target / CONFIG_FILE).write_text(text)
        _fsync(target / CONFIG_FILE)

    _write_folder(folder, write)
    return folder


def load_adapter(model: nn.Module, path: str | os.PathLike[str], name: str | None = None,
                 replace: bool = False) -> str:
    """Load a PEFT-layout LoRA adapter folder into `model`; returns the adapter's name.

    On a plain model the LoRA layers are created from the file's config; on a model that
    already holds adapters this adds one more. The loaded adapter becomes the active one, as
    with add_adapter. With `replace=True` it is a hot swap: the new weights are copied into the
    existing adapter `name` in place (same parameter objects, no module re-created, so a
    torch.compile'd model keeps working); shapes and modules must be the same.

    Everything is checked before the model changes: config values, missing or unexpected
    tensors, shapes, dtypes and finite values. Files saved by PEFT load as they are, including
    rank_pattern/alpha_pattern, use_rslora, Conv1D layers and modules_to_save. Biases a file
    carries (bias "all" or "lora_only") are copied into the model's biases, which all adapters
    share, as PEFT does.

    Args:
        model: the base model the adapter was trained on (possibly holding other adapters), or
            its torch.compile'd wrapper.
        path: the adapter folder.
        name: the adapter's name. None picks "default" if free, else the folder's name (with
            "_2", "_3", ... added until free); with replace=True, None means "default".
        replace: hot swap the weights of the existing adapter `name`.

    Raises:
        FileNotFoundError: the folder or one of its two files is missing.
        ValueError: a pickle-only folder, an invalid or unsupported config, a name already taken
            (without replace) or unknown (with replace), or tensors that do not fit the model.
    """
    model = _unwrapped(model)
    folder = Path(path)
    config, raw = _read_config(folder)
    source = str(folder)
    if merged_adapters(model) and not replace:
        raise ValueError(f"adapters {merged_adapters(model)} are merged into the base weights; call unmerge(model) "
                         "before loading another adapter (the loaded one becomes the active adapter)")
    trained_on = raw.get("base_model_name_or_path")
    config = fit_modules_to_save(model, config)
    if replace:
        name = name or "default"
        adapted, copied = _swap_target(model, name)
        expected = {k: tuple(v.shape) for k, v in adapter_state(model, name, config.bias).items()}
    else:
        name = _new_name(model, name, folder)
        try:
            adapted, copied = planned_paths(model, config)
            expected = planned_shapes(model, config)
        except (ValueError, TypeError) as err:
            where = f" (trained on {trained_on!r})" if trained_on else ""
            raise ValueError(f"adapter {source}{where} does not fit this model: {err}") from None
    optional = optional_shapes(model, adapted, copied, config.bias)
    tensors = _read_tensors(folder / WEIGHTS_FILE, expected, optional, source, trained_on)

    # The file is checked: from here on the model changes. add_adapter still checks the name and
    # ranks, but before it changes anything, so a refusal there leaves the model untouched too.
    if not replace:
        add_adapter(model, config, name)
        for layer in lora_layers(model):
            # New dropout modules start in training mode; follow the mode of the module they adapt.
            if name in layer.lora_A and isinstance(layer, LoraLinear):
                layer.lora_dropout[name].train(layer.base.training)
    else:
        adapter_configs(model)[name] = config
        for layer in lora_layers(model):
            if name in layer.lora_A:
                layer.scaling[name] = config.scale_for(layer.path)
    live = adapter_state(model, name, config.bias)
    with torch.no_grad():
        for key, tensor in live.items():
            tensor.copy_(tensors[key])
    _load_full_layers(model, tensors, optional, source)
    return name


def _unwrapped(model: nn.Module) -> nn.Module:
    # torch.compile wraps the model; its adapters and module paths are those of the original.
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else model


def _read_config(folder: Path) -> tuple[LoraConfig, dict]:
    if not folder.is_dir():
        hint = " (give the adapter's folder, not a file in it)" if folder.is_file() else ""
        raise FileNotFoundError(f"no adapter folder at {folder}{hint}")
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not weights_path.is_file() and (folder / PICKLE_FILE).is_file():
        raise ValueError(
            f"{folder} holds only {PICKLE_FILE}, a pickle, which lorakit never loads (unpickling can run "
            f"code). Convert it once, in that folder:\n  python -c \"import torch; from safetensors.torch "
            f"import save_file; save_file(torch.load('{PICKLE_FILE}', weights_only=True), '{WEIGHTS_FILE}', "
            "metadata={'format': 'pt'})\""
        )
    for needed in (config_path, weights_path):
        if not needed.is_file():
            raise FileNotFoundError(f"{folder} is not an adapter folder: {needed.name} is missing "
                                    f"(an adapter folder holds {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        raw = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_path} is not valid JSON: {err}") from None
    return config_from_json(raw, str(config_path)), raw


def _swap_target(model: nn.Module, name: str) -> tuple[set[str], set[str]]:
    if name not in list_adapters(model):
        raise ValueError(f"replace=True swaps the weights of an existing adapter, but there is no adapter {name!r}; "
                         f"adapters on this model: {', '.join(list_adapters(model)) or 'none'}")
    if name in merged_adapters(model):
        raise ValueError(f"adapter {name!r} is merged into the base weights; call unmerge(model) before swapping it")
    return adapter_paths(model, name)


def _new_name(model: nn.Module, name: str | None, folder: Path) -> str:
    taken = list_adapters(model)
    if name is not None:
        if name in taken:
            raise ValueError(f"adapter {name!r} already exists on this model (adapters: {', '.join(taken)}); "
                             "pass replace=True to swap its weights, or another name")
        return name
    if "default" not in taken:
        return "default"
    stem = folder.resolve().name.replace(".", "_") or "adapter"
    candidate, n = stem, 1
    while candidate in taken:
        n += 1
        candidate = f"{stem}_{n}"
    return candidate


def _read_tensors(file: Path, expected: dict[str, tuple[int, ...]], optional: dict[str, tuple[int, ...] | None],
                  source: str, trained_on: str | None) -> dict[str, torch.Tensor]:
    """The file's tensors, after checking keys and shapes from the header, then dtypes and values."""
    try:
        with safe_open(str(file), framework="pt") as handle:
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
            check_keys(expected, optional, shapes, source, trained_on)
            tensors = {key: handle.get_tensor(key) for key in shapes}
    except SafetensorError as err:
        raise ValueError(f"{file} is not a readable safetensors file: {err}") from None
    for key, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise ValueError(f"tensor {key!r} in {file} has dtype {tensor.dtype}; adapter tensors must be floating point")
        if not torch.isfinite(tensor).all():
            raise ValueError(f"tensor {key!r} in {file} holds inf or NaN values; the adapter is corrupt")
    return tensors


def _load_full_layers(model: nn.Module, tensors: dict[str, torch.Tensor],
                      optional: dict[str, tuple[int, ...] | None], source: str) -> None:
    """Copy the full layers PEFT saves beside targeted embeddings (`base_layer.weight`) into the base.

    Usually they equal the base weights and nothing happens; otherwise they are loaded as PEFT
    does, with a warning, since they change the base model under every adapter.
    """
    for key, tensor in tensors.items():
        if key not in optional or not key.endswith(".base_layer.weight"):
            continue
        layer = model.get_submodule(key[len(PREFIX):-len(".base_layer.weight")])
        assert isinstance(layer, LORA_LAYERS)
        weight = layer.base.weight
        assert isinstance(weight, torch.Tensor)
        if torch.equal(weight.detach().cpu(), tensor.to(weight.dtype)):
            continue
        warnings.warn(f"adapter {source} carries its own {key[len(PREFIX):]}, different from this model's; "
                      "it is loaded into the base model, as PEFT does", stacklevel=3)
        with torch.no_grad():
            weight.copy_(tensor)


def _write_folder(folder: Path, write: Callable[[Path], None]) -> None:
    """Run `write` into a fresh temporary folder beside `folder`, then move the result into place."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = _fresh_folder(folder, "tmp")
    try:
        write(tmp)
        if not folder.exists():
            os.rename(tmp, folder)
        elif {entry.name for entry in folder.iterdir()} <= _ADAPTER_FILES:
            # Renaming over a non-empty folder is not possible: move the old one aside first.
            old = _fresh_folder(folder, "old")
            os.rename(folder, old / folder.name)
            os.rename(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            # The folder holds other files too (e.g. a training checkpoint): replace ours one by one,
            # each with an atomic rename, weights before config.
            for file in (WEIGHTS_FILE, CONFIG_FILE):
                os.replace(tmp / file, folder / file)
        _fsync(folder.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fresh_folder(folder: Path, kind: str) -> Path:
    # Not tempfile.mkdtemp: its folders are private (0700), and this one becomes the adapter.
    fresh = folder.parent / f".{folder.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"
    fresh.mkdir()
    return fresh


def _fsync(path: Path) -> None:
    """Flush a file (or a folder's entries) to disk, so a rename never points at unwritten data."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # folders cannot be fsync'ed on some systems; the rename is still atomic
    finally:
        os.close(fd)
