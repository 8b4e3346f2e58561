"""Saving and loading adapters as PEFT-layout folders (adapter_config.json + safetensors).

Loading checks everything first (config values, every key, every shape, finite values) and
only then touches the model, so a refused file leaves the model exactly as it was. Nothing is
ever unpickled. Saving writes a temporary folder beside the target and renames it into place.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from lorakit.core.config import LoraConfig, is_svd_init
from lorakit.core.init_methods import convert_to_lora as convert_to_lora_config
from lorakit.core.init_methods import converted_factors
from lorakit.core.inject import add_adapter
from lorakit.core.registry import (
    adapter_configs,
    list_adapters,
    merged_adapters,
    merged_error,
    refuse_merged,
    unknown_adapter_error,
)
from lorakit.core.walk import lora_layers, unwrapped
from lorakit.formats.adapter_folder import (
    Header,
    check_adapter_files,
    dtype_problems,
    find_adapter_folder,
    read_config_json,
    read_header,
)
from lorakit.formats.atomic import remove_stale_temps, write_folder_atomically
from lorakit.formats.peft_format import (
    BASE_QUANTIZATION,
    CONFIG_FILE,
    PICKLE_FILE,
    PREFIX,
    WEIGHTS_FILE,
    adapter_paths,
    adapter_state,
    base_quantization,
    check_keys,
    config_from_json,
    config_to_json,
    fit_modules_to_save,
    optional_shapes,
    planned_paths,
    planned_shapes,
    rank_problems,
)

# Files a save may replace wholesale; a folder holding anything else gets its files replaced one by one.
_ADAPTER_FILES = {CONFIG_FILE, WEIGHTS_FILE, PICKLE_FILE, "README.md"}


def save_adapter(model: nn.Module, path: str | os.PathLike[str], name: str = "default",
                 convert_to_lora: bool = False) -> Path:
    """Write adapter `name` as a PEFT adapter folder that PEFT, vLLM and TGI load.

    Only the adapter's own tensors go into the file: A and B of each adapted module, the
    trained copies of `modules_to_save`, and the biases when its config trains them.
    An existing adapter at `path` is replaced atomically: an interrupted save leaves either
    the old adapter or the new one, never a mix (and temporary folders that a killed save of
    the same folder left behind are removed first). Files and folders get the umask's usual
    permissions. The weights file's metadata records whether the adapted layers' bases are
    4-bit, so loading onto another kind of base warns.

    Args:
        model: a model holding adapter `name` (or its torch.compile'd wrapper).
        path: the folder to write (created with its parents when missing).
        name: which adapter to save.
        convert_to_lora: for a PiSSA/OLoRA adapter (which applies to the residual base W - s B0 A0),
            write instead the plain rank-2r LoRA that applies to the original base: A' = [A; A0],
            B' = [B, -B0], alpha doubled (core/init_methods.py). Without it the config records
            the init, and loading onto a plain base warns.

    Returns:
        The folder written.

    Raises:
        ValueError: no adapter of that name, `path` is an existing file, or `convert_to_lora`
            for an adapter without initial factors.
    """
    model = _unwrapped(model)
    if name not in list_adapters(model):
        raise unknown_adapter_error(model, [name])
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"cannot save an adapter to {folder}: it is a file, and an adapter is a folder")
    config = adapter_configs(model)[name]
    tensors = {key: t.detach().to("cpu").contiguous()
               for key, t in adapter_state(model, name, config.bias).items()}
    if convert_to_lora:
        config = _converted(model, name, config, tensors)
    text = json.dumps(config_to_json(model, name, config), indent=2, sort_keys=True) + "\n"
    metadata = {"format": "pt", BASE_QUANTIZATION: base_quantization(model, adapter_paths(model, name)[0])}

    def write(target: Path) -> None:
        save_file(tensors, str(target / WEIGHTS_FILE), metadata=metadata)
        (target / CONFIG_FILE).write_text(text)

    remove_stale_temps(folder.parent, folder.name)
    # A folder holding other files too (a training checkpoint) gets ours moved in one by one,
    # weights before config: a folder with a config always has matching weights.
    write_folder_atomically(folder, write, replaceable=_ADAPTER_FILES,
                            merge_order=(WEIGHTS_FILE, CONFIG_FILE))
    return folder


def _converted(model: nn.Module, name: str, config: LoraConfig,
               tensors: dict[str, torch.Tensor]) -> LoraConfig:
    """Turn `tensors` of PiSSA/OLoRA adapter `name` into the rank-2r plain LoRA for the original base."""
    layers = [layer for layer in lora_layers(model) if name in layer.scaling]
    missing = [layer.path for layer in layers if name not in layer.initial_factors]
    if missing:
        raise ValueError(f"convert_to_lora needs the initial factors A0, B0 of adapter {name!r}, which "
                         f"{missing[0]} (and {len(missing) - 1} more) does not hold: only an adapter "
                         "initialised with init pissa/pissa_niter_N/olora in this process has them "
                         f"(its init: {config.init!r})")
    for layer in layers:
        a, b = (t.detach().to("cpu") for t in layer.factors(name))
        a0, b0 = layer.initial_factors[name]
        key_a, key_b = (f"{PREFIX}{layer.path}.{key}" for key in layer.peft_keys)
        tensors[key_a], tensors[key_b] = (t.contiguous() for t in converted_factors(a, b, a0.cpu(), b0.cpu()))
    return convert_to_lora_config(config)


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
        path: the adapter folder, or a training run's output folder (its `adapter/` is loaded).
        name: the adapter's name. None picks "default" if free, else the name of the folder given (with
            "_2", "_3", ... added until free); with replace=True, None means "default".
        replace: hot swap the weights of the existing adapter `name`.

    Warns (UserWarning) when the file records a base of another kind than this model's: trained
    on a 4-bit NF4 base and loaded onto an unquantized one, or the reverse.

    Raises:
        FileNotFoundError: the folder or one of its two files is missing.
        ValueError: a pickle-only folder, an invalid or unsupported config, tensors whose ranks
            disagree with the config, a name already taken (without replace) or unknown (with
            replace), or tensors that do not fit the model.
    """
    model = _unwrapped(model)
    folder = find_adapter_folder(path)
    config, raw, header = read_adapter(folder)
    source = str(folder)
    if not replace:
        refuse_merged(model, "before loading another adapter (the loaded one becomes the active adapter)")
    trained_on = raw.get("base_model_name_or_path")
    config = fit_modules_to_save(model, config)
    if replace:
        name = name or "default"
        adapted, copied = _swap_target(model, name)
        expected = {k: tuple(v.shape) for k, v in adapter_state(model, name, config.bias).items()}
    else:
        name = _new_name(model, name, Path(path))  # a run folder names its adapter
        try:
            adapted, copied = planned_paths(model, config)
            expected = planned_shapes(model, config)
        except (ValueError, TypeError) as err:
            where = f" (trained on {trained_on!r})" if trained_on else ""
            raise ValueError(f"adapter {source}{where} does not fit this model: {err}") from None
    optional = optional_shapes(model, adapted, copied, config.bias)
    check_keys(expected, optional, header.shapes, source, trained_on)
    tensors = _read_tensors(folder / WEIGHTS_FILE)
    mismatch = _base_mismatch(source, header.metadata.get(BASE_QUANTIZATION),
                              base_quantization(model, adapted))
    mismatch = mismatch or _residual_mismatch(source, raw.get("init_lora_weights"), model)

    # The file is checked: from here on the model changes. add_adapter still checks the name and
    # ranks, but before it changes anything, so a refusal there leaves the model untouched too.
    if not replace:
        add_adapter(model, config, name)  # its dropout follows the mode of the module it adapts
    else:
        adapter_configs(model)[name] = config
        for layer in lora_layers(model):
            if name in layer.scaling:
                layer.scaling[name] = config.scale_for(layer.path)
    live = adapter_state(model, name, config.bias)
    with torch.no_grad():
        for key, tensor in live.items():
            tensor.copy_(tensors[key])
    _load_full_layers(model, tensors, optional, source)
    if mismatch:
        warnings.warn(mismatch, stacklevel=2)
    return name


def read_adapter(folder: Path) -> tuple[LoraConfig, dict, Header]:
    """The config (checked), raw config JSON and weights header of the adapter folder `folder`.

    Every check that needs no model runs here: both files present (never a pickle), the config
    valid and supported, tensor dtypes floating point, tensor ranks equal to the config's.

    Raises:
        FileNotFoundError: a file is missing.
        ValueError: any other problem, naming the file and the value.
    """
    check_adapter_files(folder)
    raw = read_config_json(folder)
    config = config_from_json(raw, str(folder / CONFIG_FILE))
    header = read_header(folder / WEIGHTS_FILE)
    problems = dtype_problems(header.dtypes, folder / WEIGHTS_FILE)
    if problems:
        raise ValueError(problems[0])
    problems = rank_problems(config, header.shapes)
    if problems:
        raise ValueError(f"adapter {folder} contradicts itself: tensor ranks differ from its "
                         f"{CONFIG_FILE}:\n  "
                         + "\n  ".join(problems))
    assert isinstance(raw, dict)  # config_from_json refuses anything else
    return config, raw, header


def _unwrapped(model: nn.Module) -> nn.Module:
    # torch.compile wraps the model; its adapters and module paths are those of the original.
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else model


def _base_mismatch(source: str, recorded: str | None, actual: str) -> str | None:
    """The warning for an adapter trained on another kind of base than this model's, if any."""
    if recorded not in ("nf4", "none") or recorded == actual:
        return None  # nothing (or something unknown) recorded: PEFT's files, older lorakit files
    if recorded == "nf4":
        return (f"adapter {source} was trained on a 4-bit NF4 base, but this model's adapted layers are not "
                "quantized, so it will not behave as in training; quantize the base as in training "
                "(--quantize nf4 on eval, generate and merge; lorakit.quant.quantize_model in Python)")
    return (f"adapter {source} was trained on an unquantized base, but this model's adapted layers are 4-bit "
            "NF4, so it will not behave as in training; load the base without --quantize nf4")


def _residual_mismatch(source: str, init: object, model: nn.Module) -> str | None:
    """The warning for a PiSSA/OLoRA adapter loaded onto a base that is not its residual base, if any."""
    if not is_svd_init(init) or any(layer.initial_factors for layer in lora_layers(model)):
        return None  # not such an adapter, or this model's base was turned into a residual in this process
    return (f"adapter {source} was trained with init {init!r} on the residual base W - s B0 A0, "
            "not on this model's original weights, so it will not behave as in training; save it with "
            "save_adapter(..., convert_to_lora=True) for the original base")


def _swap_target(model: nn.Module, name: str) -> tuple[set[str], set[str]]:
    if name not in list_adapters(model):
        raise unknown_adapter_error(model, [name],
                                    lead="replace=True swaps the weights of an existing adapter, "
                                    "but there is no adapter ")
    if name in merged_adapters(model):
        raise merged_error(name, "before swapping it")
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


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    """The file's tensors (whose header read_adapter and check_keys have checked), all finite."""
    try:
        with safe_open(str(file), framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except SafetensorError as err:
        raise ValueError(f"{file} is not a readable safetensors file: {err}") from None
    for key, tensor in tensors.items():
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
        weight = unwrapped(model.get_submodule(key[len(PREFIX):-len(".base_layer.weight")])).weight
        assert isinstance(weight, torch.Tensor)
        if torch.equal(weight.detach().cpu(), tensor.to(weight.dtype)):
            continue
        warnings.warn(f"adapter {source} carries its own {key[len(PREFIX):]}, different from this model's; "
                      "it is loaded into the base model, as PEFT does", stacklevel=3)
        with torch.no_grad():
            weight.copy_(tensor)
