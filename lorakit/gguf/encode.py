"""Tensor types a GGUF file is written in (`--outtype`), and turning float arrays into them."""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType, LlamaFileType, QuantError, quants

OUTTYPES = {"f32": GGMLQuantizationType.F32, "f16": GGMLQuantizationType.F16,
            "bf16": GGMLQuantizationType.BF16, "q8_0": GGMLQuantizationType.Q8_0}
"""--outtype value -> the GGML type matrices are written in (vectors stay F32, as llama.cpp's converter
does)."""

FILE_TYPES = {GGMLQuantizationType.F32: LlamaFileType.ALL_F32,
              GGMLQuantizationType.F16: LlamaFileType.MOSTLY_F16,
              GGMLQuantizationType.BF16: LlamaFileType.MOSTLY_BF16,
              GGMLQuantizationType.Q8_0: LlamaFileType.MOSTLY_Q8_0}
"""The `general.file_type` a model file written in that type declares."""


def parse_outtype(text: str, accepted: tuple[str, ...] = tuple(OUTTYPES)) -> GGMLQuantizationType:
    """The GGML type for an --outtype value.

    Raises:
        ValueError: a value not in `accepted`.
    """
    if text not in accepted:
        raise ValueError(f"unknown --outtype {text!r}; accepted: {', '.join(accepted)}")
    return OUTTYPES[text]


def encode(values: np.ndarray, qtype: GGMLQuantizationType) -> tuple[np.ndarray, GGMLQuantizationType]:
    """`values` (out x in, any float dtype) in `qtype`, and the type actually used.

    Q8_0 packs rows in blocks of 32; a row of another length (a LoRA B of rank 16, say) is written
    in F16 instead, as llama.cpp's converter does.
    """
    values = np.ascontiguousarray(values, dtype=np.float32)
    if qtype == GGMLQuantizationType.F32 or values.ndim == 1:
        return values, GGMLQuantizationType.F32
    try:
        return quants.quantize(values, qtype), qtype
    except QuantError:
        return quants.quantize(values, GGMLQuantizationType.F16), GGMLQuantizationType.F16


def decode(data: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """A tensor read from a GGUF file (any type gguf can dequantize) as float32, numpy's shape order."""
    return np.asarray(quants.dequantize(data, qtype), dtype=np.float32)
