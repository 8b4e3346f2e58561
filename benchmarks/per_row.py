"""Per-row adapters: one mixed batch, three ways, side by side.

    .venv/bin/python -m benchmarks.per_row [--layers 4] [--rows 16] [--seq 32] [--runs 7] [--threads N]

A random Llama-shaped model with SmolLM2-135M's widths (hidden 576, 9 heads / 3 KV heads,
MLP 1536, vocab 49,152, tied embeddings) but fewer layers, and 4 adapters (r=16 on all seven
linear kinds). A batch of `rows` rows cycles through the 4 adapters (a0, a1, a2, a3, a0, ...),
the worst case for grouping. Timed, each with the median of several runs after warm-up:

- lorakit: one forward inside `adapters_per_row`;
- PEFT: one forward with `adapter_names=[...]` (its mixed-batch path);
- sequential: for each adapter, `set_adapter` and a forward on its rows only.

Each forward is a prefill that keeps the logits of the last position only, as a server does, so
the 49k-wide output head does not drown the adapters' cost. The position is given as a tensor:
`logits_to_keep=1` slices the hidden states into a non-contiguous view, and with a frozen head
PyTorch's matmul then takes a batched path about 4x slower on CPU than the folded one.

The three outputs are checked to agree. The adapters are made by lorakit, saved, and loaded
into PEFT from the files, so the comparison also exercises the file format.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable

import torch

ADAPTERS = ("a0", "a1", "a2", "a3")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's choice); 1 is steadier on a shared machine")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")

    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorakit import LoraConfig, add_adapter, set_adapter
    from lorakit.core.io import load_adapter, save_adapter
    from lorakit.core.per_row import adapters_per_row

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=args.layers,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                         tie_word_embeddings=True)
    base = LlamaForCausalLM(config).eval().requires_grad_(False)  # frozen, like the adapted models

    with tempfile.TemporaryDirectory() as tmp:
        maker = copy.deepcopy(base)
        for i, name in enumerate(ADAPTERS):
            add_adapter(maker, LoraConfig(r=16, alpha=32, targets=TARGETS), name=name)
            generator = torch.Generator().manual_seed(i)
            with torch.no_grad():
                for param_name, param in maker.named_parameters():
                    if f".{name}." in param_name:
                        param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
            save_adapter(maker, f"{tmp}/{name}", name=name)
        del maker

        ours = copy.deepcopy(base)
        for name in ADAPTERS:
            load_adapter(ours, f"{tmp}/{name}", name=name)
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), f"{tmp}/{ADAPTERS[0]}", adapter_name=ADAPTERS[0])
        for name in ADAPTERS[1:]:
            theirs.load_adapter(f"{tmp}/{name}", adapter_name=name)
        theirs.eval()

    rows = [ADAPTERS[i % len(ADAPTERS)] for i in range(args.rows)]
    ids = torch.randint(0, config.vocab_size, (args.rows, args.seq), generator=torch.Generator().manual_seed(0))
    last = torch.tensor([args.seq - 1])
    groups = {name: torch.tensor([i for i, r in enumerate(rows) if r == name]) for name in ADAPTERS}

    def lorakit_per_row() -> torch.Tensor:
        with adapters_per_row(ours, rows):
            return ours(input_ids=ids, logits_to_keep=last).logits

    def peft_mixed() -> torch.Tensor:
        return theirs(input_ids=ids, adapter_names=rows, logits_to_keep=last).logits

    def sequential() -> torch.Tensor:
        out = None
        for name, index in groups.items():
            set_adapter(ours, name)
            part = ours(input_ids=ids[index], logits_to_keep=last).logits
            out = part.new_empty((args.rows, *part.shape[1:])) if out is None else out
            out[index] = part
        assert out is not None
        return out

    def one_adapter() -> torch.Tensor:
        set_adapter(ours, ADAPTERS[0])
        return ours(input_ids=ids, logits_to_keep=last).logits

    def base_only() -> torch.Tensor:
        return base(input_ids=ids, logits_to_keep=last).logits

    methods: dict[str, Callable[[], torch.Tensor]] = {
        "lorakit `adapters_per_row` (one forward)": lorakit_per_row,
        "PEFT `adapter_names=` (one forward)": peft_mixed,
        "lorakit `set_adapter` per group (4 forwards)": sequential,
        "one adapter for every row (reference)": one_adapter,
        "base model, no adapters (reference)": base_only,
    }
    with torch.no_grad():
        outputs = {label: run() for label, run in methods.items()}
        times = _timed(methods, args.warmup, args.runs)

    reference = outputs["lorakit `adapters_per_row` (one forward)"]
    tokens = args.rows * args.seq
    print(f"Per-row adapters: {args.rows} rows x {args.seq} tokens, {len(ADAPTERS)} adapters (r=16, all 7 linear "
          f"kinds), Llama-shaped model with {args.layers} layers, hidden 576, vocab 49,152 "
          f"({sum(p.numel() for p in base.parameters()) / 1e6:.1f}M parameters), fp32.\n")
    print("| method | median ms | tokens/s | vs lorakit per-row | max abs diff to lorakit |")
    print("|---|---:|---:|---:|---:|")
    ours_ms = statistics.median(times[next(iter(methods))]) * 1e3
    for label in methods:
        ms = statistics.median(times[label]) * 1e3
        diff = "-" if "reference" in label else f"{(outputs[label] - reference).abs().max().item():.1e}"
        print(f"| {label} | {ms:.0f} | {tokens / ms * 1e3:,.0f} | {ms / ours_ms:.2f}x | {diff} |")
    effect = (reference - outputs["base model, no adapters (reference)"]).abs().max().item()
    agree = all((outputs[label] - reference).abs().max().item() < 1e-4 for label in methods if "reference" not in label)
    print(f"\nOutputs agree (max abs diff < 1e-4): {'yes' if agree else 'NO'}; the adapters move the logits "
          f"by up to {effect:.2f} from the base model's.")
    print(f"Machine: {_processor()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), peft {peft.__version__}, load average "
          f"{os.getloadavg()[0]:.1f} at the end; median of {args.runs} runs after {args.warmup} warm-up.")
    if not agree:
        raise SystemExit(1)


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


def _processor() -> str:
    name = platform.processor()
    try:
        with open("/proc/cpuinfo") as info:
            name = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), name)
    except OSError:
        pass
    return name or platform.machine()


if __name__ == "__main__":
    main()
