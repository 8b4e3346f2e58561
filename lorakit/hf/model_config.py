"""Model configs for estimates: the shipped well-known ones, a config.json, a folder or a GGUF file.

Nothing here loads weights; `meta_model` builds the architecture on the meta device.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import PretrainedConfig

MODEL_CONFIGS = Path(__file__).parent / "model_configs"
DEFAULT_MODEL = "smollm2-135m"


def shipped_models() -> list[str]:
    """Names of the model configs shipped with lorakit (llama-3.1-8b, gpt3-175b, ...)."""
    return sorted(path.stem for path in MODEL_CONFIGS.glob("*.json"))


def resolve_model_config(name_or_path: str | os.PathLike[str]) -> PretrainedConfig:
    """The transformers config of a model, read without touching any weights.

    Args:
        name_or_path: a shipped name (any case; see `shipped_models`), "default" (smollm2-135m),
            a config.json, a model folder holding one, or a .gguf file (its metadata is parsed:
            seconds for a large vocabulary, instant once lorakit has cached the converted model).

    Raises:
        ValueError: an unknown name (the shipped ones are listed), or a file that is no config.
        FileNotFoundError: a folder without config.json.
    """
    spec = os.fspath(name_or_path)
    key = spec.strip().lower()
    key = DEFAULT_MODEL if key == "default" else key
    if key in shipped_models():
        return _config_from_json(MODEL_CONFIGS / f"{key}.json")
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model folder {str(path)!r} has no config.json; pass a folder saved by "
                                    "save_pretrained, a config.json, a .gguf file or a shipped model name")
        return _config_from_json(path / "config.json")
    if path.is_file():
        return _config_from_gguf(path) if path.suffix.lower() == ".gguf" else _config_from_json(path)
    raise ValueError(f"unknown model {spec!r}: not a shipped model ({', '.join(shipped_models())}, "
                     "or 'default') and not an existing config.json, model folder or .gguf file")


def meta_model(config: PretrainedConfig) -> nn.Module:
    """The causal LM `config` describes, built on the meta device: real shapes, no storage."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except ValueError as err:
        raise ValueError(f"estimates need a causal language model; model_type {config.model_type!r} has "
                         f"no AutoModelForCausalLM class ({err})") from err


def _config_from_json(path: Path) -> PretrainedConfig:
    from transformers import AutoConfig

    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read a model config from {str(path)!r}: {err}") from err
    if not isinstance(values, dict) or not isinstance(values.get("model_type"), str):
        raise ValueError(f"{str(path)!r} is not a transformers config.json: it needs a \"model_type\" "
                         "such as \"llama\", \"mistral\", \"qwen2\", \"gpt2\" or \"opt\"")
    model_type = values.pop("model_type")
    try:
        return AutoConfig.for_model(model_type, **values)
    except ValueError as err:
        raise ValueError(f"{str(path)!r} has model_type {model_type!r}, unknown to this transformers "
                         f"version ({err})") from err


def _config_from_gguf(path: Path) -> PretrainedConfig:
    from lorakit.hf.gguf_cache import cache_entry

    cached = cache_entry(path) / "config.json"  # a GGUF loaded once before has its config converted
    if cached.is_file():
        return _config_from_json(cached)
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    except Exception as err:  # the GGUF reader raises many kinds on a bad file; all mean "cannot read"
        raise ValueError(f"cannot read a model config from the GGUF file {str(path)!r}: {err}") from err
