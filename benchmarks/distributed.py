"""Training on several processes: tokens/s and memory per rank, one process against DDP and FSDP2.

    .venv/bin/python -m benchmarks.distributed [--steps 4] [--warmup 1] [--batch 4] [--seq 128]
                                               [--section cpu|cuda|all] [--json PATH]

CPU (the default model, SmolLM2-135M, LoRA r=16 on the seven linear kinds, fp32): the same global
batch of `--batch` rows per step, trained by 1 process with 2 threads (and with 1), then by 2
processes with 1 thread each (torchrun, gloo) under DDP, FSDP2 (also without lorakit's fixed mmap
threshold, to show what it saves), and QLoRA (NF4 base) under FSDP2. Each run is its
own process group, started fresh, through lorakit's own `parallel.wrap` (the model `lorakit train`
trains). A step is forward + backward + clipping + AdamW step over the global batch; the figure
is the median step after `--warmup` steps. Memory per rank: peak RSS (it includes loading the
whole model, which every rank does before FSDP2 shards it), RSS with the model loaded and
adapted, after wrapping (DDP/FSDP2) and after the steps, and the base weights the rank holds
(measured from its local shards).

CUDA (skipped without a GPU): every GPU of the machine as one run each of 1..N ranks (DDP), and
an ~8B-shaped random Llama (Llama-3.1-8B's widths) in QLoRA + FSDP2 on all of them: tokens/s,
scaling against 1 GPU, and memory per GPU (torch.cuda.max_memory_allocated during the steps,
and the base weights held). `--cuda-shape llama-tiny` runs that code path on the CPU in seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import time
from typing import Any

import torch

from benchmarks.common import TARGETS, emit, machine, median, peak_rss_bytes, rss_bytes, run_child

# Llama-3.1-8B's widths with random weights (the CUDA section's QLoRA + FSDP2 model).
SHAPES: dict[str, dict[str, int]] = {
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256),
    "llama-tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=8,
                       num_key_value_heads=2, vocab_size=32000),
}


# ---- one rank (or the single process) -----------------------------------------------------------

def build(model_name: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    if model_name == "default":
        from lorakit.hf import load_model

        model, _ = load_model("default", dtype="float32", device=str(device))
        return model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[model_name], max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype: an 8B model in fp32 would need 32 GB first
    try:
        with torch.device(device):
            return LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)


def worker(args: argparse.Namespace) -> None:
    """Train `args.steps + args.warmup` steps as this rank; rank 0 emits every rank's figures."""
    import torch.distributed as dist

    from lorakit import LoraConfig, add_adapter, fuse_for_training
    from lorakit.hf.checkpointing import enable_checkpointing
    from lorakit.train.distributed import World
    from lorakit.train.parallel import base_bytes, wrap

    torch.set_num_threads(args.threads)
    strategy = None if args.strategy == "none" else args.strategy
    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if strategy is not None:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if strategy == "fsdp" and device.type == "cpu" and args.malloc == "fixed":
        from lorakit.train.distributed import return_gathered_memory_promptly

        return_gathered_memory_promptly()  # as lorakit train does
    rank = dist.get_rank() if strategy is not None else 0
    world = World(rank=rank, world_size=ranks, local_rank=local, strategy=strategy, device=device)

    model = build(args.model, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.quant == "nf4":
        from lorakit.quant import quantize_model

        quantize_model(model)
    torch.manual_seed(0)
    add_adapter(model, LoraConfig(r=16, alpha=32, dropout=0.0, targets=list(TARGETS)))
    fuse_for_training(model)  # as lorakit.train does
    if args.gc:
        enable_checkpointing(model)
    gc.collect()
    rss_loaded = rss_bytes()
    wrapped = wrap(model, world)
    gc.collect()
    rss_wrapped = rss_bytes()
    held, whole = base_bytes(model)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    vocab = int(model.config.vocab_size)
    rows = args.batch // ranks  # this rank's share of the global batch
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for step in range(args.warmup + args.steps):
        ids = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(step))
        mine = ids[rank * rows:(rank + 1) * rows].to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        tick = time.perf_counter()
        with (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
              else contextlib.nullcontext()):
            loss = wrapped({"input_ids": mine, "labels": mine}, num_items=args.batch * (args.seq - 1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - tick)
        losses.append(float(world.sum(float(loss.detach()))))
    figures = {"rank": rank, "peak_rss": peak_rss_bytes(), "rss_loaded": rss_loaded,
               "rss_wrapped": rss_wrapped, "rss_after": rss_bytes(), "base_held": held,
               "base_whole": whole, "seconds": times[args.warmup:],
               "cuda_peak": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None}
    every = [figures]
    if strategy is not None:
        every = [None] * ranks  # type: ignore[list-item]
        dist.all_gather_object(every, figures)
    if rank == 0:
        step_seconds = max(median(r["seconds"]) for r in every)  # the slowest rank sets the pace
        emit({"ranks": every, "losses": losses, "step_seconds": step_seconds,
              "tokens_per_s": args.batch * args.seq / step_seconds})
    if strategy is not None:
        dist.destroy_process_group()


# ---- the driver ---------------------------------------------------------------------------------

def launch(nproc: int, threads: int, args: list[str], timeout: float) -> dict[str, Any]:
    """Run the worker as `nproc` ranks (torchrun; whenever a strategy is given) or as one plain process;
    rank 0's RESULT."""
    worker = ["--worker", "--threads", str(threads), *args]
    env = {"OMP_NUM_THREADS": str(threads)}
    if "--strategy" in args and args[args.index("--strategy") + 1] != "none":
        return run_child("torch.distributed.run", ["--standalone", f"--nproc-per-node={nproc}",
                                                   "-m", "benchmarks.distributed", *worker], timeout, env)
    return run_child("benchmarks.distributed", worker, timeout, env)


def cpu_section(args: argparse.Namespace) -> list[dict[str, Any]]:
    common = ["--model", "default", "--device", "cpu", "--batch", str(args.batch), "--seq", str(args.seq),
              "--steps", str(args.steps), "--warmup", str(args.warmup)]
    # 1 x 1 as well: on a machine shared with other work, 2 threads of one process can wait on each
    # other far more than 2 processes do, and this row shows how much.
    runs = [("1 process x 2 threads", 1, 2, ["--strategy", "none"]),
            ("1 process x 1 thread", 1, 1, ["--strategy", "none"]),
            ("2 ranks x 1 thread, DDP", 2, 1, ["--strategy", "ddp"]),
            ("2 ranks x 1 thread, FSDP2", 2, 1, ["--strategy", "fsdp"]),
            # What FSDP2 costs on a CPU without lorakit's fixed mmap threshold (distributed.py): the
            # gathered weights' buffers stay in the heap.
            ("2 ranks x 1 thread, FSDP2, glibc's own mmap threshold", 2, 1,
             ["--strategy", "fsdp", "--malloc", "glibc"]),
            ("2 ranks x 1 thread, QLoRA + FSDP2", 2, 1, ["--strategy", "fsdp", "--quant", "nf4"])]
    rows = []
    for name, nproc, threads, extra in runs:
        result = launch(nproc, threads, common + extra, args.timeout)
        rows.append({"run": name, "nproc": nproc, **result})
        print(f"  {name}: {result['tokens_per_s']:.0f} tokens/s", file=sys.stderr, flush=True)
    return rows


def cuda_section(args: argparse.Namespace, gpus: int) -> list[dict[str, Any]]:
    device = "cuda" if gpus else "cpu"
    gpus = gpus or 2  # the CPU check of this code path runs 2 ranks
    unit, dtype = (("GPU(s)", "bf16") if device == "cuda"
                   else ("CPU rank(s), a check of the code path", "fp32"))
    rows = []
    common = ["--device", device, "--seq", str(args.seq), "--steps", str(args.steps),
              "--warmup", str(args.warmup)]
    for nproc in sorted({1, 2, 4, 8, gpus} & set(range(1, gpus + 1))):  # DDP scaling, batch per GPU fixed
        result = launch(nproc, 1, common + ["--model", args.cuda_shape,
                                            "--strategy", "ddp" if nproc > 1 else "none",
                                            "--batch", str(args.batch * nproc)], args.timeout)
        rows.append({"run": f"{args.cuda_shape} LoRA {dtype}, {nproc} {unit}, DDP", "nproc": nproc, **result})
    shape = "llama-8b" if device == "cuda" else args.cuda_shape
    result = launch(gpus, 1, common + ["--model", shape, "--strategy", "fsdp", "--quant", "nf4", "--gc",
                                       "--batch", str(args.batch * gpus)], args.timeout)
    rows.append({"run": f"{shape} QLoRA + FSDP2, {gpus} {unit}, gradient checkpointing", "nproc": gpus,
                 **result})
    return rows


def table(rows: list[dict[str, Any]], baseline: float) -> str:
    lines = ["| run | tokens/s | vs first | peak RSS per rank | RSS loaded / wrapped / after the steps | "
             "base weights per rank | GPU peak |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        ranks = row["ranks"]
        gib = [f"{r['peak_rss'] / 2**30:.2f}" for r in ranks]
        after = [f"{r['rss_loaded'] / 2**30:.2f} / {r['rss_wrapped'] / 2**30:.2f} / "
                 f"{r['rss_after'] / 2**30:.2f}"
                 for r in ranks]
        held = [f"{r['base_held'] / 2**30:.3f}" for r in ranks]
        cuda = [f"{r['cuda_peak'] / 2**30:.1f}" for r in ranks if r["cuda_peak"] is not None]
        lines.append(f"| {row['run']} | {row['tokens_per_s']:.0f} | {row['tokens_per_s'] / baseline:.2f}x | "
                     f"{' / '.join(gib)} GiB | {'; '.join(after)} GiB | {' / '.join(held)} of "
                     f"{ranks[0]['base_whole'] / 2**30:.3f} GiB | "
                     f"{' / '.join(cuda) + ' GiB' if cuda else '-'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--section", choices=("cpu", "cuda", "all"), default="all")
    parser.add_argument("--steps", type=int, default=4, help="timed steps (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=4, help="rows per step over all ranks (CUDA: per GPU)")
    parser.add_argument("--seq", type=int, default=128, help="tokens per row")
    parser.add_argument("--cuda-shape", choices=tuple(SHAPES), default="llama-8b",
                        help="model of the CUDA section's scaling runs; llama-tiny runs it on a CPU "
                             "to check it")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    parser.add_argument("--json", default=None, help="also write the figures here as JSON")
    # What torchrun starts: one rank of one run.
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--model", default="default", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", choices=("none", "ddp", "fsdp"), default="none", help=argparse.SUPPRESS)
    parser.add_argument("--quant", choices=("none", "nf4"), default="none", help=argparse.SUPPRESS)
    parser.add_argument("--gc", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--malloc", choices=("fixed", "glibc"), default="fixed", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    about = machine()
    report: dict[str, Any] = {"machine": about, "settings": {k: getattr(args, k) for k in
                                                             ("steps", "warmup", "batch", "seq")}}
    print(f"machine: {about['cpu']}, {about['logical_cpus']} logical CPUs, torch {torch.__version__}"
          + (f", {torch.cuda.device_count()} x {about['gpu']}" if "gpu" in about else ""))
    if args.section in ("cpu", "all"):
        rows = cpu_section(args)
        report["cpu"] = rows
        print(f"\nCPU: the default model, LoRA r=16 (7 linear kinds), fp32, {args.batch} x {args.seq} "
              f"tokens per step, median of {args.steps} steps after {args.warmup} warm-up\n")
        print(table(rows, rows[0]["tokens_per_s"]))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if args.section in ("cuda", "all"):
        if gpus == 0 and args.cuda_shape == "llama-8b":
            print("\nCUDA: skipped (no GPU); `--section cuda --cuda-shape llama-tiny` checks its code path "
                  "on the CPU")
            report["cuda"] = None
        else:
            rows = cuda_section(args, gpus)
            report["cuda"] = rows
            print(f"\nCUDA ({gpus} GPU(s)): {args.batch} x {args.seq} tokens per GPU per step, "
                  "bf16 autocast\n" if gpus
                  else f"\nThe CUDA section's code path on the CPU (no GPU): {args.batch} x {args.seq} "
                  "tokens per rank per step, fp32\n")
            print(table(rows, rows[0]["tokens_per_s"]))
    if args.json:
        from pathlib import Path

        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
