"""Base GGUF + adapter -> one complete GGUF with the update folded in: GGUF in, fine-tuned GGUF out.

Every metadata entry of the source is kept (architecture, hyperparameters, tokenizer, chat
template) except `general.file_type`, which follows --outtype. Each adapted weight is
dequantized, gets scale * B A added in float64 (with Llama's q/k rows permuted as the source has
them), and is written in the output type. Every other matrix is re-encoded in the output type
too (copied byte for byte when it already has it), and vectors (norms) stay F32, as llama.cpp's
converter writes them. No llama.cpp binary is involved.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lorakit.gguf.base_model import describe_base
from lorakit.gguf.encode import FILE_TYPES, decode, encode, parse_outtype
from lorakit.gguf.lora_pairs import gguf_rows, read_lora_pairs
from lorakit.gguf.write import check_output, write_gguf_atomically

MERGE_OUTTYPES = ("f32", "f16", "q8_0")

# Entries the writer sets itself: the header counts, the architecture, the alignment and the file type.
_REWRITTEN = ("GGUF.", "general.architecture", "general.alignment", "general.file_type")


@dataclass(frozen=True)
class MergeReport:
    """What merge_to_gguf wrote."""

    path: Path
    merged: int
    """Weights that received an update."""
    types: dict[str, int]
    """GGML type name -> tensors written in it."""
    size: int


def merge_to_gguf(source: str | os.PathLike[str], adapter: str | os.PathLike[str] | None,
                  output: str | os.PathLike[str], outtype: str = "f16") -> MergeReport:
    """Write `source` with `adapter` merged into it as a new GGUF file.

    Args:
        source: the base model's GGUF file, or "default".
        adapter: an adapter folder (or a training run's folder) trained on that base; None
            re-encodes the base alone (an F32 copy of a quantized model, say).
        output: the .gguf file to write (replaced atomically when it exists).
        outtype: f32, f16 or q8_0, for every matrix (Q8_0 needs rows of 32; others are written F16).

    Raises:
        ValueError: an unknown outtype, an output folder or the source itself, a source that is
            not a GGUF file, an adapter llama.cpp's layout cannot take or that does not fit;
            all checked before anything is written.
    """
    from gguf import GGUFValueType, GGUFWriter

    qtype = parse_outtype(outtype, MERGE_OUTTYPES)
    info = describe_base(source)
    if info.gguf_path is None:
        raise ValueError(f"base model {source} is a transformers folder, not a GGUF file")
    path = check_output(output, info.gguf_path)
    updates: dict[str, np.ndarray] = {}
    for pair in read_lora_pairs(adapter, info, "merge") if adapter is not None else []:
        updates[pair.gguf_name] = gguf_rows(pair, pair.scale * (pair.b @ pair.a), info)

    reader = info.reader
    writer = GGUFWriter(None, info.arch.gguf_name)
    for key, field in reader.fields.items():
        if not key.startswith(_REWRITTEN):
            kind = field.types[0]
            writer.add_key_value(key, field.contents(), kind,
                                 sub_type=field.types[-1] if kind == GGUFValueType.ARRAY else None)
    writer.add_file_type(FILE_TYPES[qtype])
    types: Counter[str] = Counter()
    for tensor in reader.tensors:
        data, used = _tensor_out(tensor, updates.get(tensor.name), qtype)
        writer.add_tensor(tensor.name, data, raw_dtype=used)
        types[used.name] += 1
    size = write_gguf_atomically(writer, path)
    return MergeReport(path, len(updates), dict(types), size)


def _tensor_out(tensor: Any, update: np.ndarray | None, qtype: Any) -> tuple[np.ndarray, Any]:
    """The tensor's data for the output file and its GGML type."""
    if update is None and (tensor.tensor_type == qtype
                           or len(tensor.shape) == 1 and tensor.tensor_type.name == "F32"):
        return tensor.data, tensor.tensor_type  # already as wanted: byte for byte
    try:
        values = decode(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise ValueError(f"cannot re-encode {tensor.name}: the gguf package cannot dequantize "
                         f"{tensor.tensor_type.name}") from None
    if update is not None:
        values = (values.astype(np.float64) + update).astype(np.float32)
    return encode(values, qtype)
