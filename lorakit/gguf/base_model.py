"""What a GGUF export needs to know about the base model: its architecture, head counts and weight shapes.

The base is named as everywhere in lorakit: "default", a `.gguf` file or a transformers folder.
Only metadata is read (the GGUF header, or config.json and the safetensors headers), never the
weights, so checking an adapter against its base costs milliseconds.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.gguf.architectures import Architecture, architecture, gguf_weight_name


@dataclass(frozen=True)
class BaseModel:
    """The facts about a base model that decide how an adapter is written for it."""

    source: str
    """How the base was named (for messages)."""
    arch: Architecture
    heads: dict[str, int]
    """"head_count" and "head_count_kv" (the q/k row permutation splits rows by these)."""
    shapes: dict[str, tuple[int, int]]
    """GGUF weight name (`blk.0.attn_q.weight`) -> (out, in), for every weight LoRA can go on."""
    gguf_path: Path | None
    """The GGUF file when the base is one, else None."""
    reader: Any = field(default=None, repr=False, compare=False)
    """The open `gguf.GGUFReader` of that file (parsing a 49k-token vocabulary takes seconds: read it
    once)."""


def describe_base(spec: str | os.PathLike[str]) -> BaseModel:
    """Read the base model's architecture, head counts and adaptable weight shapes.

    Args:
        spec: "default", a `.gguf` file, or a transformers folder (config.json + safetensors).

    Raises:
        FileNotFoundError: nothing at `spec`.
        ValueError: not a GGUF file or a model folder, or an architecture lorakit cannot write.
    """
    if str(spec) == "default":
        from lorakit.hf.default_model import default_model_path

        return _from_gguf(default_model_path(), "default")
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"base model {str(spec)!r} not found; give 'default', a .gguf file or a "
                                "transformers folder")
    if path.is_dir():
        return _from_folder(path)
    if path.suffix.lower() == ".gguf":
        return _from_gguf(path, str(spec))
    raise ValueError(f"base model {str(spec)!r} is a file but not a .gguf file; give 'default', a .gguf "
                     "file or a transformers folder")


def _from_gguf(path: Path, source: str) -> BaseModel:
    from lorakit.gguf.read import field_value, open_gguf

    reader = open_gguf(path)
    name = str(field_value(reader, "general.architecture", path))
    arch = architecture(name, f"base model {source}")
    heads = int(field_value(reader, f"{name}.attention.head_count", path))
    kv_field = reader.get_field(f"{name}.attention.head_count_kv")
    heads_kv = int(kv_field.contents()) if kv_field is not None else heads
    # GGUF lists dimensions fastest first (in, out); numpy's order is (out, in).
    shapes = {t.name: (int(t.shape[1]), int(t.shape[0])) for t in reader.tensors if len(t.shape) == 2}
    return BaseModel(source, arch, {"head_count": heads, "head_count_kv": heads_kv}, shapes, path, reader)


def _from_folder(folder: Path) -> BaseModel:
    from lorakit.formats.adapter_folder import read_header
    from lorakit.hf.loading import check_model_folder

    check_model_folder(folder)
    config = json.loads((folder / "config.json").read_text())
    config = config.get("text_config", config)
    arch = architecture(str(config.get("model_type")), f"base model {folder}")
    heads = int(config.get("num_attention_heads") or config.get("n_head") or 0)
    heads_kv = int(config.get("num_key_value_heads") or heads)
    shapes: dict[str, tuple[int, int]] = {}
    for file in sorted(folder.glob("*.safetensors")):
        for key, shape in read_header(file).shapes.items():
            name = gguf_weight_name(arch, key.removesuffix(".weight")) if key.endswith(".weight") else None
            if name is not None and len(shape) == 2:
                # GPT-2's Conv1D stores in x out; llama.cpp's converter transposes it to out x in.
                shapes[name] = (shape[1], shape[0]) if arch.gguf_name == "gpt2" else (shape[0], shape[1])
    return BaseModel(str(folder), arch, {"head_count": heads, "head_count_kv": heads_kv}, shapes, None)
