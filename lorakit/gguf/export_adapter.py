"""A lorakit (or PEFT) adapter folder -> a llama.cpp LoRA adapter GGUF file.

The file, as llama.cpp's loader (src/llama-adapter.cpp) reads it:
- metadata `general.type` = "adapter", `adapter.type` = "lora", `adapter.lora.alpha` (float32),
  and `general.architecture` equal to the base model's (a mismatch is refused at load);
- per adapted weight `blk.N.<kind>.weight`, two tensors `.lora_a` (numpy r x in, GGUF ne [in, r])
  and `.lora_b` (numpy out x r, GGUF ne [r, out]); the loader checks a.ne[0] == weight.ne[0],
  b.ne[1] == weight.ne[1] and a.ne[1] == b.ne[0];
- llama.cpp adds (alpha / rank) * B A x, with rank = b.ne[0], or B A x when alpha is 0.

One alpha per file cannot express every adapter lorakit trains: rsLoRA scales by alpha / sqrt(r),
and rank_pattern / alpha_pattern give modules their own rank and alpha. The file's alpha is the
one that fits most pairs (scale * rank equal to it); every other pair gets the rest of its scale
folded into B, so each weight's update is exactly scale * B A.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lorakit.gguf.base_model import describe_base
from lorakit.gguf.encode import encode, parse_outtype
from lorakit.gguf.lora_pairs import LoraPair, gguf_rows, read_lora_pairs
from lorakit.gguf.write import check_output, write_gguf_atomically

ADAPTER_OUTTYPES = ("f32", "f16", "bf16", "q8_0")


@dataclass(frozen=True)
class ExportReport:
    """What export_adapter wrote."""

    path: Path
    architecture: str
    pairs: int
    alpha: float
    """`adapter.lora.alpha` in the file."""
    folded: int
    """Pairs whose scale differs from alpha / rank, folded into their B."""
    types: dict[str, int]
    """GGML type name -> tensors written in it."""
    size: int


def export_adapter(adapter: str | os.PathLike[str], output: str | os.PathLike[str], base: str = "default",
                   outtype: str = "f16") -> ExportReport:
    """Write `adapter` as a llama.cpp LoRA adapter GGUF for `base`.

    Args:
        adapter: an adapter folder (PEFT layout) or a training run's folder.
        output: the .gguf file to write (replaced atomically when it exists).
        base: the base model: "default", a .gguf file or a transformers folder; gives the
            architecture, the head counts for the q/k row permutation and the shapes checked.
        outtype: f32, f16, bf16 or q8_0 (Q8_0 needs rows of 32: a B of smaller rank is written F16).

    Returns:
        What was written.

    Raises:
        ValueError: an unknown outtype, an output folder, an unsupported architecture or module,
            DoRA, trained biases, modules_to_save, embedding adapters, or a shape mismatch with the
            base; all checked before anything is written.
    """
    from gguf import GGUFWriter

    qtype = parse_outtype(outtype, ADAPTER_OUTTYPES)
    check_output(output)  # a folder or a file that is no GGUF: refused before the base is read
    info = describe_base(base)
    path = check_output(output, info.gguf_path)  # and never over the base GGUF itself
    pairs = read_lora_pairs(adapter, info, "export")
    alpha = file_alpha(pairs)
    writer = GGUFWriter(None, info.arch.gguf_name)
    writer.add_type("adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", alpha)
    types: Counter[str] = Counter()
    folded = 0
    for pair in pairs:
        fold = folding(pair, alpha)
        folded += not np.isclose(fold, 1.0, rtol=1e-6, atol=0.0)
        for suffix, values in (("lora_a", pair.a), ("lora_b", gguf_rows(pair, pair.b * fold, info))):
            data, used = encode(values, qtype)
            writer.add_tensor(f"{pair.gguf_name}.{suffix}", data, raw_dtype=used)
            types[used.name] += 1
    size = write_gguf_atomically(writer, path)
    return ExportReport(path, info.arch.gguf_name, len(pairs), alpha, folded, dict(types), size)


def file_alpha(pairs: list[LoraPair]) -> float:
    """The `adapter.lora.alpha` that leaves the most pairs unfolded, rounded to float32 as stored.

    llama.cpp scales a pair by alpha / rank, so a pair needs no folding when its scale * rank
    equals the file's alpha (plain LoRA: its alpha; rsLoRA: alpha * sqrt(r)).
    """
    wanted = Counter(float(np.float32(pair.scale * pair.rank)) for pair in pairs)
    return wanted.most_common(1)[0][0]


def folding(pair: LoraPair, alpha: float) -> float:
    """The factor B is multiplied by so that llama.cpp's (alpha / rank) * B A equals scale * B A."""
    return pair.scale * pair.rank / alpha
