"""GGML block dequantization: milliseconds per tensor, lorakit's torch ops beside gguf-py's numpy.

    .venv/bin/python -m benchmarks.gguf_dequant [--repeats 7] [--device cpu|cuda] [--no-reference]

A GGUFLinear dequantizes its weight twice per training step (forward and backward), so this is the
price of training on a GGUF file's own blocks. For each type, a 576 x 1536 tensor (the default
model's MLP) and a 4096 x 14336 one (an 8B model's MLP) of random bytes are dequantized to fp32 by
`lorakit.quant.gguf_blocks.dequantize` and by `gguf.quants.dequantize` (the reference it equals bit
for bit); each figure is the median of --repeats runs. The "fp32 write" row is the floor: making and
filling a fresh fp32 tensor of that shape, which every dequantizer has to do. On a CPU shared with
other work, figures of a few ms jump by several ms whenever a torch thread waits for a core.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from benchmarks.common import machine
from lorakit.quant.gguf_blocks import FORMATS, dequantize

SHAPES = ((576, 1536), (4096, 14336))


def median_ms(run: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median wall time of `run` in ms, after one untimed warm-up run."""
    run()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-reference", action="store_true", help="skip gguf-py's numpy dequantizer")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    info = machine()
    print(f"{info['cpu']}, {info['torch_threads']} torch threads, device {device}, "
          f"load average {info['load_average_start']:.2f}; median of {args.repeats} runs, ms")
    header = " | ".join(f"{rows}x{cols} lorakit | gguf-py" for rows, cols in SHAPES)
    print(f"| type | {header} |")
    print("|---|" + "---:|---:|" * len(SHAPES))
    floor = [median_ms(lambda shape=shape: torch.empty(shape, device=device).fill_(1.0), args.repeats, device)
             for shape in SHAPES]
    print("| fp32 write | " + " | ".join(f"{ms:.2f} | " for ms in floor) + "|")
    rng = np.random.default_rng(0)
    for name, fmt in FORMATS.items():
        cells = []
        for rows, cols in SHAPES:
            raw = rng.integers(0, 256, size=(rows, fmt.row_bytes(cols)), dtype=np.uint8)
            data = torch.from_numpy(raw).to(device)
            ours = median_ms(lambda: dequantize(data, name, (rows, cols)), args.repeats, device)  # noqa: B023
            theirs = "" if args.no_reference else f"{reference_ms(raw, name, args.repeats):.1f}"
            cells.append(f"{ours:.2f} | {theirs}")
        print(f"| {name} | " + " | ".join(cells) + " |")


def reference_ms(raw: np.ndarray, name: str, repeats: int) -> float:
    """gguf-py's numpy dequantizer on the same bytes (fewer runs: seconds each at 8B sizes)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    qtype = GGMLQuantizationType[name]
    with np.errstate(all="ignore"):  # random fp16 scales include inf and NaN
        return median_ms(lambda: gguf_dequantize(raw, qtype), max(1, repeats // 3), torch.device("cpu"))

if __name__ == "__main__":
    main()
