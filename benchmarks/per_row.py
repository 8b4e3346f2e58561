"""Per-row adapters at decode shapes: one mixed batch, side by side with one adapter and PEFT.

    .venv/bin/python -m benchmarks.per_row [--model default] [--rows 16] [--seq 1] [--adapters 16]
                                           [--runs 7] [--threads N] [--json PATH]

The default model (SmolLM2-135M, 30 layers) or, with `--model random --layers N`, a random
Llama of its widths, carries `adapters` adapters (r=16, alpha=32, on all seven linear kinds).
A batch of `rows` rows x `seq` tokens (16 x 1: one decode step of 16 requests) gives row i
adapter i mod `adapters`. Timed, each with the median of several runs after warm-up:

- lorakit per-row: one forward inside `adapters_per_row` (gathered A/B stacks, two batched
  matmuls per layer: `lorakit.kernels.row_stacks.gather_rows`);
- PEFT: one forward with `adapter_names=[...]` (its mixed-batch path);
- one adapter for every row (the target is per-row <= 1.3x this) and the base alone.

Each forward keeps the logits of the last position only, as a server does. The position is
given as a tensor: `logits_to_keep=1` slices the hidden states into a non-contiguous view that
PyTorch's CPU matmul runs about 4x slower. The outputs of lorakit and PEFT are checked to agree
with the rows computed one by one. The adapters are made by lorakit, saved, and loaded into PEFT
from the files, so the comparison also exercises the file format.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

from benchmarks.common import cpu_model, parse_with_threads

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# A row computed alone and inside a batch of 16 go through differently blocked matmuls; over 30
# layers that moves logits of size ~20 by ~2e-4 (PEFT's mixed batch moves them as much).
TOLERANCE = 1e-3
PER_ROW, PEFT, ONE, BASE = ("lorakit per-row (`adapters_per_row`)", "PEFT `adapter_names=`",
                            "lorakit, one adapter for every row", "base model, no adapters")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["default", "random"], default="default")
    parser.add_argument("--layers", type=int, default=4, help="layers of the random model")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--seq", type=int, default=1)
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    args = parse_with_threads(parser)
    warnings.filterwarnings("ignore")

    import peft

    from lorakit import set_adapter
    from lorakit.core.per_row import adapters_per_row
    from lorakit.formats.io import load_adapter

    base = _base_model(args.model, args.layers)
    names = [f"a{i}" for i in range(args.adapters)]
    with tempfile.TemporaryDirectory() as tmp:
        write_random_adapters(base, names, tmp)
        ours = copy.deepcopy(base)
        for name in names:
            load_adapter(ours, f"{tmp}/{name}", name=name)
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), f"{tmp}/{names[0]}",
                                                adapter_name=names[0])
        for name in names[1:]:
            theirs.load_adapter(f"{tmp}/{name}", adapter_name=name)
        theirs.eval()

    vocab = base.config.vocab_size  # type: ignore[union-attr]
    rows = [names[i % len(names)] for i in range(args.rows)]
    ids = torch.randint(0, vocab, (args.rows, args.seq), generator=torch.Generator().manual_seed(0))
    last = torch.tensor([args.seq - 1])

    def per_row() -> torch.Tensor:
        with adapters_per_row(ours, rows):
            return ours(input_ids=ids, logits_to_keep=last).logits

    def peft_mixed() -> torch.Tensor:
        return theirs(input_ids=ids, adapter_names=rows, logits_to_keep=last).logits

    def one_adapter() -> torch.Tensor:
        return ours(input_ids=ids, logits_to_keep=last).logits

    def base_only() -> torch.Tensor:
        return base(input_ids=ids, logits_to_keep=last).logits

    methods: dict[str, Callable[[], torch.Tensor]] = {PER_ROW: per_row, PEFT: peft_mixed, ONE: one_adapter,
                                                      BASE: base_only}
    with torch.no_grad():
        set_adapter(ours, names[0])
        expected = torch.cat([_alone(ours, name, ids[i:i + 1], last) for i, name in enumerate(rows)])
        set_adapter(ours, names[0])
        outputs = {label: run() for label, run in methods.items()}
        times = _timed(methods, args.warmup, args.runs)

    ms = {label: statistics.median(times[label]) * 1e3 for label in methods}
    diffs = {label: (outputs[label] - expected).abs().max().item() for label in (PER_ROW, PEFT)}
    agree = all(d < TOLERANCE for d in diffs.values())
    effect = (expected - outputs[BASE]).abs().max().item()
    params = sum(p.numel() for p in base.parameters()) / 1e6
    print(f"Per-row adapters: {args.rows} rows x {args.seq} token(s), {args.adapters} adapters "
          "(r=16, all 7 linear kinds), "
          f"{'the default model (SmolLM2-135M)' if args.model == 'default' else 'a random Llama'} "
          f"({params:.1f}M parameters, {base.config.num_hidden_layers} layers), fp32.\n")  # type: ignore[union-attr]
    print("| forward | median ms | vs one adapter | max abs diff to rows one by one |")
    print("|---|---:|---:|---:|")
    for label in methods:
        diff = f"{diffs[label]:.1e}" if label in diffs else "-"
        print(f"| {label} | {ms[label]:.1f} | {ms[label] / ms[ONE]:.2f}x | {diff} |")
    over_one, peft_over = ms[PER_ROW] / ms[ONE], ms[PEFT] / ms[PER_ROW]
    print(f"\nTargets: per-row <= 1.3x one adapter: {over_one:.2f}x "
          f"({'met' if over_one <= 1.3 else 'NOT met'}); "
          f"per-row >= 3x faster than PEFT: {peft_over:.2f}x ({'met' if peft_over >= 3 else 'NOT met'}).")
    print(f"Outputs agree with the rows one by one (max abs diff < {TOLERANCE:g}): "
          f"{'yes' if agree else 'NO'}; the adapters "
          f"move the logits by up to {effect:.2f} from the base model's.")
    print(f"Machine: {cpu_model()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), peft {peft.__version__}, load average "
          f"{os.getloadavg()[0]:.1f} at the end; median of {args.runs} runs after {args.warmup} warm-up.")
    if args.json:
        figures = dict(setting=vars(args) | {"json": str(args.json)}, median_ms=ms, max_abs_diff=diffs,
                       per_row_over_one_adapter=over_one, peft_over_per_row=peft_over, outputs_agree=agree)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    if not agree:
        raise SystemExit(1)


def _base_model(which: str, layers: int) -> nn.Module:
    """The frozen base: the default model, or a random Llama of its widths with `layers` layers."""
    if which == "default":
        from lorakit.hf.loading import load_model

        model, _ = load_model("default", dtype="float32", device="cpu")
        return model.eval().requires_grad_(False)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval().requires_grad_(False)


def write_random_adapters(base: nn.Module, names: list[str], folder: str, r: int = 16) -> None:
    """Save one adapter per name under folder/name: r=16 on the seven linear kinds, random A and B
    (each its own seed), so every adapter moves the output its own way."""
    from lorakit import LoraConfig, add_adapter
    from lorakit.formats.io import save_adapter

    maker = copy.deepcopy(base)
    for i, name in enumerate(names):
        add_adapter(maker, LoraConfig(r=r, alpha=2 * r, targets=TARGETS), name=name)
        generator = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for param_name, param in maker.named_parameters():
                if f".{name}." in param_name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
        save_adapter(maker, f"{folder}/{name}", name=name)


def _alone(model: nn.Module, name: str, ids: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    from lorakit import set_adapter

    set_adapter(model, name)
    return model(input_ids=ids, logits_to_keep=last).logits


def _timed(methods: dict[str, Callable[[], torch.Tensor]], warmup: int, runs: int) -> dict[str, list[float]]:
    """Seconds per run; the methods take turns, so a change in machine load hits all of them alike."""
    times: dict[str, list[float]] = {label: [] for label in methods}
    for i in range(warmup + runs):
        for label, run in methods.items():
            start = time.perf_counter()
            run()
            if i >= warmup:
                times[label].append(time.perf_counter() - start)
    return times


if __name__ == "__main__":
    main()
