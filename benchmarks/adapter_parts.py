"""What the adapters add to one decoder layer, part by part, at the default model's training shapes.

    .venv/bin/python -m benchmarks.adapter_parts [--tokens 1024] [--runs 15] [--threads N] [--json PATH]

SmolLM2-135M's widths (hidden 576, q 576, k and v 192, intermediate 1536), r=16, dropout 0.05,
`tokens` = batch x seq (4 x 256). Each part is timed forward + backward (a random output gradient),
all parts in turn inside every run (A B C ... A B C ...), medians over the runs:

- q, k and v with no adapter (the frozen base), with LoRA one layer at a time
  (LoraLinearFunction each, one shared mask), and with their A sides as one GEMM
  (lora_linears_one_input); the masks are drawn inside each part, as in a step;
- a keep mask of one input (tokens x 576), drawn as `rand >= p` and as lorakit draws it;
- one linear (tokens x 576 @ 576 x 1536) in fp32 and in bf16: whether bf16 pays on this CPU.

Prints a markdown table naming the machine and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from benchmarks.common import machine, parse_with_threads
from lorakit.kernels.lora_function import LoraLinearFunction, draw_keep_mask, quantized_dropout
from lorakit.kernels.shared_input import lora_linears_one_input

HIDDEN, WIDTHS, INTERMEDIATE, RANK, DROPOUT = 576, (576, 192, 192), 1536, 16, 0.05


def parts(tokens: int) -> dict[str, Callable[[], object]]:
    """Each measured part as a function of no arguments; its inputs are made once, here."""
    torch.manual_seed(0)
    x0 = torch.randn(tokens, HIDDEN)
    weights = [torch.randn(out, HIDDEN) / HIDDEN**0.5 for out in WIDTHS]
    factors = [((torch.randn(RANK, HIDDEN) / HIDDEN**0.5).requires_grad_(),
                (torch.randn(out, RANK) * 0.01).requires_grad_())
               for out in WIDTHS]
    grads = [torch.randn(tokens, out) for out in WIDTHS]
    scale = 2.0 / (1 - quantized_dropout(DROPOUT))
    wide = torch.randn(INTERMEDIATE, HIDDEN)

    def base() -> None:
        x = x0.clone().requires_grad_()
        torch.autograd.backward([F.linear(x, w) for w in weights], grads)

    def one_by_one() -> None:
        x = x0.clone().requires_grad_()
        mask = draw_keep_mask(x, DROPOUT)  # shared by the three, as LoraConfig's default
        outs = [LoraLinearFunction.apply(x, w, None, a, b, scale, mask)
                for w, (a, b) in zip(weights, factors, strict=True)]
        torch.autograd.backward(outs, grads)

    def grouped() -> None:
        x = x0.clone().requires_grad_()
        outs = lora_linears_one_input(x, [(w, None, a, b, 2.0)
                                          for w, (a, b) in zip(weights, factors, strict=True)],
                                      DROPOUT)
        torch.autograd.backward(outs, grads)

    return {
        "q, k, v: frozen base only": base,
        "q, k, v: LoRA one layer at a time": one_by_one,
        "q, k, v: LoRA, A sides as one GEMM": grouped,
        "keep mask, rand >= p": lambda: torch.rand_like(x0) >= DROPOUT,
        "keep mask, lorakit (4 per int64 draw)": lambda: draw_keep_mask(x0, DROPOUT),
        "linear 576 -> 1536, fp32": lambda: F.linear(x0, wide),
        "linear 576 -> 1536, bf16": lambda: F.linear(x0.bfloat16(), wide.bfloat16()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=15)
    args = parse_with_threads(parser)
    info = machine()
    measured = parts(args.tokens)
    for run in measured.values():  # warm-up
        run()
    times: dict[str, list[float]] = {name: [] for name in measured}
    for _ in range(args.runs):
        for name, run in measured.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    flags = " ".join(f for f in ("avx512_bf16", "amx_tile") if f in info.get("cpu_flags", []))
    print(f"Machine: {info.get('cpu', '?')} ({flags or 'no avx512_bf16 or amx'}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; load average {info['load_average_start']:.1f} at the start, "
          f"{os.getloadavg()[0]:.1f} at the end; {args.tokens} tokens, r={RANK}, dropout {DROPOUT}, "
          f"median of {args.runs} runs\n")
    print("| part (forward + backward where it has one) | ms | spread (min - max) |")
    print("|---|---:|---:|")
    for name, t in times.items():
        print(f"| {name} | {medians[name]:.2f} | {min(t) * 1e3:.2f} - {max(t) * 1e3:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "tokens": args.tokens, "runs": args.runs,
                                         "median_ms": medians, "seconds": times,
                                         "load_average_end": os.getloadavg()[0]}, indent=1))


if __name__ == "__main__":
    main()
