"""Loading a safetensors model straight into 4-bit NF4, one tensor at a time.

Loading, then quantizing (`from_pretrained`, then `quantize_model`) holds the whole full-precision
model before the first layer is quantized: its peak memory is the full model. Here the model is
built with its parameters on the meta device (no memory), then filled from the safetensors files
one tensor at a time. Each linear that `quantize_model` would quantize is read, cast to the model's
dtype and replaced by its `NF4Linear` through the same `quantize_layer`, and its full-precision
weight is dropped before the next is read; every other tensor is copied in, in the model's dtype.
Peak = the 4-bit model + one tensor (and `quantize_nf4`'s temporaries for that tensor).

Buffers are not put on meta: the model's own `__init__` computes them (rotary `inv_freq` is never
saved), then the persistent ones are overwritten from the file. Each tensor is read through its own
`safe_open`, because safetensors hands out tensors that point into a memory map of the file: a
map held open for the whole load would keep every page read so far resident in this process.

After the weights, this does what `from_pretrained` does after its own, in its order: tie the
weights, eval mode, hub kernels, generation config. The result equals load-then-quantize bit for
bit (tests/hf/test_load_quantized.py). A checkpoint this path cannot fill key for key (tensors that
transformers renames or converts while loading, missing or extra tensors, fp32-kept modules, a
pre-quantized config) raises `NotStreamable` before any weight is read, and `load_model` falls back
to load-then-quantize.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lorakit.hf.offline import hub_offline
from lorakit.quant.quantize_model import check_quantizable, quantize_layer

if TYPE_CHECKING:
    from transformers import PreTrainedModel

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class NotStreamable(ValueError):
    """A model folder this path cannot fill tensor by tensor yet; load it, then quantize it."""


def load_quantized(folder: Path, dtype: torch.dtype, device: torch.device,
                   method: str = "nf4") -> PreTrainedModel:
    """Build the model in `folder` with its linears in 4-bit, never holding its full-precision weights.

    Args:
        folder: a checked transformers folder (config.json and safetensors weights).
        dtype: the dtype of everything left in full precision, and of the weights before quantizing.
        device: where the weights go; each linear is quantized there, as `quantize_model` does after
            `model.to(device)`.
        method: a `quantize_model` method ("nf4").

    Returns:
        The model in eval mode, equal to `from_pretrained` + `quantize_model` (every tensor, buffer,
        the config and the generation config), with buffers still on the CPU (`.to(device)` them).

    Raises:
        NotStreamable: the checkpoint is one this path does not read yet (the reason is in the message).
        ValueError: `method` is unknown, or the model has no linear layer to quantize.
    """
    shapes, files = checkpoint_index(folder)
    with hub_offline():
        model = empty_model(folder, dtype)
        expected = model.state_dict()  # meta parameters, real buffers: shapes and dtypes to fill
        targets = check_quantizable(model, method)
        missing = _check_streamable(model, expected, shapes, targets)
        in_targets = {f"{name}.{part}" for name in targets for part, _ in
                      model.get_submodule(name).named_parameters(recurse=False)}
        with torch.no_grad():
            for name in targets:  # the big tensors first, each quantized as soon as it is read
                _quantize_from_files(model, name, files, device)
            for key in expected:
                if key not in in_targets and key not in missing:
                    _copy_from_file(model, key, files[key], device)
        model.tie_weights(missing_keys=missing, recompute_mapping=False)
        tensors = (*model.named_parameters(), *model.named_buffers())
        left = [name for name, tensor in tensors if tensor.is_meta]
        if left:
            raise NotStreamable(f"tensors {', '.join(left[:3])} were not filled from {folder}")
        model.eval()
        _finish_as_from_pretrained(model, folder)
    return model


def checkpoint_index(folder: Path) -> tuple[dict[str, list[int]], dict[str, Path]]:
    """Each tensor's shape and file, read from the safetensors headers (no weight is read).

    The files are those `from_pretrained` reads: model.safetensors, else the shards that
    model.safetensors.index.json names.
    """
    from safetensors import safe_open

    if (folder / SINGLE_FILE).is_file():
        names = [SINGLE_FILE]
    elif (folder / INDEX_FILE).is_file():
        try:
            names = sorted(set(json.loads((folder / INDEX_FILE).read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise NotStreamable(f"{folder / INDEX_FILE} has no readable weight_map: {error!r}") from error
    else:
        raise NotStreamable(f"{folder} has neither {SINGLE_FILE} nor {INDEX_FILE}")
    shapes: dict[str, list[int]] = {}
    files: dict[str, Path] = {}
    for name in names:
        with safe_open(str(folder / name), framework="pt") as handle:
            for key in handle.keys():
                shapes[key] = list(handle.get_slice(key).get_shape())
                files[key] = folder / name
    return shapes, files


def empty_model(folder: Path, dtype: torch.dtype) -> PreTrainedModel:
    """The model `from_pretrained(folder, dtype=dtype)` would build, with its parameters on meta."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        config.name_or_path = str(folder)  # as from_pretrained records it
        with parameters_on_meta():
            return AutoModelForCausalLM.from_config(config, dtype=dtype)
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"could not load a causal language model from {folder}: {error}") from error


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built in this block register their parameters on the meta device; buffers stay real.

    A module creates its parameter, then registers it: the tensor moves to meta at once, before
    anything writes to it, so its pages are never touched. The buffers (a few small tensors, some
    never saved, as rotary `inv_freq`) keep the values the module's `__init__` computes. This is
    accelerate's `init_empty_weights(include_buffers=False)`, which transformers 5 no longer ships.
    """
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def _check_streamable(model: nn.Module, expected: dict[str, torch.Tensor], shapes: dict[str, list[int]],
                      targets: list[str]) -> set[str]:
    """The keys the files lack but tying fills; NotStreamable unless every other key is in the files
    with the model's shape, and nothing else is there."""
    config = model.config
    half = (torch.float16, torch.bfloat16)
    # from_pretrained loads these modules in float32 (its "dtype plan"); this path does not yet.
    keep_fp32 = ((getattr(model, "_keep_in_fp32_modules", None) and config.dtype == torch.float16)
                 or (getattr(model, "_keep_in_fp32_modules_strict", None) and config.dtype in half))
    problems = []
    if getattr(config, "quantization_config", None) is not None:
        problems.append("its config.json names a quantization_config (a pre-quantized checkpoint)")
    if keep_fp32:
        problems.append(f"{type(model).__name__} keeps some modules in float32 when loaded in {config.dtype}")
    unexpected = sorted(shapes.keys() - expected.keys())
    if unexpected:
        problems.append(f"the files hold tensors the model does not name ({_some(unexpected)}), which "
                        "transformers renames or converts as it loads")
    tied: dict[str, str] = getattr(model, "all_tied_weights_keys", None) or {}
    tied_keys = set(tied) | set(tied.values())
    missing = expected.keys() - shapes.keys()
    if untied := sorted(missing - tied_keys):
        problems.append(f"the files lack {_some(untied)}, which transformers would initialize at random")
    mismatched = [f"{key} {shapes[key]} (the model has {list(expected[key].shape)})"
                  for key in sorted(shapes.keys() & expected.keys())
                  if shapes[key] != list(expected[key].shape)]
    if mismatched:
        problems.append(f"shapes differ: {_some(mismatched)}")
    if tied_targets := [name for name in targets if f"{name}.weight" in tied_keys]:
        problems.append(f"quantized linears share their weight with another module ({_some(tied_targets)})")
    if problems:
        raise NotStreamable("; ".join(problems))
    return missing


def _quantize_from_files(model: nn.Module, name: str, files: dict[str, Path], device: torch.device) -> None:
    """Read the linear at `name` (weight, bias) into its meta module, and replace it by its NF4Linear."""
    linear = model.get_submodule(name)
    for part, param in list(linear.named_parameters(recurse=False)):
        key = f"{name}.{part}"
        # Cast, then quantize where the model will live: what from_pretrained + .to + quantize_model do.
        value = read_tensor(files[key], key).to(device=device, dtype=param.dtype)
        setattr(linear, part, nn.Parameter(value, requires_grad=False))
    quantize_layer(model, name)  # the full-precision weight goes with `linear` when this returns


def _copy_from_file(model: nn.Module, key: str, file: Path, device: torch.device) -> None:
    """Fill parameter or buffer `key` from `file`, in its own memory, in the dtype the model built it in."""
    module_name, _, tensor_name = key.rpartition(".")
    module = model.get_submodule(module_name)
    placeholder = getattr(module, tensor_name)
    # copy=True: a tensor in the file's dtype would otherwise keep pointing into the file's memory map.
    value = read_tensor(file, key).to(device=device, dtype=placeholder.dtype, copy=True)
    if tensor_name in module._parameters:
        # from_pretrained's rule: floating parameters train, others (integer tables) cannot.
        setattr(module, tensor_name, nn.Parameter(value, requires_grad=value.is_floating_point()))
    else:
        module._buffers[tensor_name] = value


def read_tensor(file: Path, key: str) -> torch.Tensor:
    """One tensor from a safetensors file, as a view of the file's memory map until it is copied.

    The map closes when the last tensor read from it is freed, so at most the pages of the tensors
    still alive stay resident.
    """
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as handle:
        return handle.get_tensor(key)


def _finish_as_from_pretrained(model: Any, folder: Path) -> None:
    """What from_pretrained does after the weights: hub kernels, then the folder's generation config."""
    from transformers.integrations import hub_kernels

    # from_pretrained records the key conversions it used, which save_pretrained undoes; none were
    # (_check_streamable accepts only files whose keys are the model's).
    model._weight_conversions = []
    kernels_enabled = getattr(hub_kernels, "_kernels_enabled", None)  # USE_HUB_KERNELS, default on
    if kernels_enabled is not None:
        model.set_use_kernels(kernels_enabled())
    if model.can_generate() and hasattr(model, "adjust_generation_fn"):
        # generation_config.json, or one made from config.json when the folder has none.
        model.adjust_generation_fn(
            generation_config=None, from_auto_class=True, from_pipeline=None,
            pretrained_model_name_or_path=folder, cache_dir=None, force_download=False, proxies=None,
            local_files_only=True, token=None, revision=None, subfolder="", trust_remote_code=False,
        )


def _some(items: list[str], limit: int = 3) -> str:
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")
