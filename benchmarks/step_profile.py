"""Where one training step's time goes, lorakit beside PEFT and the frozen base: torch.profiler.

    python -m benchmarks.step_profile [--libs lorakit,peft,base] [--warmup 1] [setting flags]

Each configuration runs in its own process (as benchmarks.training builds it), one warm-up step,
then one step under `torch.profiler` with input shapes recorded. Every op's own (self) CPU time
goes to one kind of work, told apart by op name and, for matrix products, by shape:

- matmul, output head: a product with the vocabulary as one dimension, or any product inside
  lorakit's chunked head (`_ChunkedHeadLoss`, which runs the vocabulary in blocks on a CPU);
- matmul, adapters: a product with r, 2r or 3r as one of its matrix dimensions (one A or B, gate
  and up's A stacked, q, k and v's);
- matmul, frozen base: every other product (the base's linears);
- attention: scaled_dot_product_attention's kernels, forward and backward;
- dropout masks: drawing random numbers and comparing them (random_, bernoulli_, rand, ge);
- optimizer: everything inside AdamW's step;
- everything else: elementwise work (norms, rotary, SiLU, the masks' multiplies, softmax, casts)
  and the bookkeeping around it.

It prints one table: seconds per kind of work and configuration (with the matrix products' rate in
GFLOP/s, from their shapes), the profiled sum beside the step's wall time, and what the frozen
base's own work leaves of a step 1.5x faster than PEFT's.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from typing import Any

import torch

from benchmarks.common import (
    add_setting_args,
    batch_ids,
    build_model,
    emit,
    model_shape,
    run_child,
    setting_from_args,
    touch,
)
from benchmarks.training import attach, timed_step

KINDS = ("matmul, frozen base", "matmul, output head", "matmul, adapters", "attention", "dropout masks",
         "optimizer", "everything else")
MATMULS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::matmul",
           "aten::linear"}
MASK_OPS = {"aten::random_", "aten::bernoulli_", "aten::rand", "aten::uniform_", "aten::ge", "aten::lt"}


def kind_of(name: str, shapes: list[list[int]], vocab: int, r: int) -> str:
    """Which kind of work an op with this name and these input shapes is (see the module doc)."""
    if name in MATMULS:
        dims = [d for shape in shapes for d in shape]
        if vocab in dims:
            return "matmul, output head"
        ranks = {r, 2 * r, 3 * r}  # one A or B, gate/up's two A stacked, q/k/v's three
        if any(d in ranks for shape in shapes if len(shape) >= 2 for d in shape[-2:]):
            return "matmul, adapters"
        return "matmul, frozen base"
    if "scaled_dot_product" in name or "flash_attention" in name:
        return "attention"
    if name in MASK_OPS:
        return "dropout masks"
    return "everything else"


def matmul_flops(name: str, shapes: list[list[int]]) -> float:
    """FLOPs of one leaf matrix product (2 per multiply-add); 0 for ops that dispatch to one."""
    operands = {"aten::mm": (0, 1), "aten::bmm": (0, 1), "aten::addmm": (1, 2), "aten::addmm_": (1, 2),
                "aten::baddbmm": (1, 2)}.get(name)
    if operands is None or len(shapes) <= operands[1]:
        return 0.0
    left, right = shapes[operands[0]], shapes[operands[1]]
    batch = left[0] if len(left) == 3 else 1
    return 2.0 * batch * left[-2] * left[-1] * right[-1]


def profile_step(lib: str, setting: Any, warmup: int) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile, record_function

    model = build_model(setting)
    touch(model)
    vocab = model_shape(model)["vocab"]
    model = attach(model, setting, lib)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=setting.lr) if params else None
    model.train()
    for step in range(warmup):
        timed_step(model, batch_ids(step, setting, vocab), optimizer, lib, setting.device, check_grads=False)
    ids = batch_ids(warmup, setting, vocab)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        with record_function("step"):
            start = time.perf_counter()
            record = timed_step(model, ids, optimizer, lib, setting.device, check_grads=False)
            wall = time.perf_counter() - start
    seconds: dict[str, float] = defaultdict(float)
    flops: dict[str, float] = defaultdict(float)
    events = prof.events()
    optimizer_ids = _inside(events, "Optimizer.step")
    head_ids = _inside(events, "_ChunkedHeadLoss")
    for event in events:
        if event.self_cpu_time_total <= 0 or event.name == "step":
            continue
        if event.id in optimizer_ids:
            kind = "optimizer"
        elif event.id in head_ids and event.name in MATMULS:
            kind = "matmul, output head"
        else:
            kind = kind_of(event.name, event.input_shapes or [], vocab, setting.r)
        seconds[kind] += event.self_cpu_time_total / 1e6
        flops[kind] += matmul_flops(event.name, event.input_shapes or [])
    return {"lib": lib, "wall": wall, "record": record, "seconds": {k: seconds.get(k, 0.0) for k in KINDS},
            "gflop": {k: flops[k] / 1e9 for k in KINDS if flops.get(k)}, "threads": torch.get_num_threads()}


def _inside(events: Any, prefix: str) -> set[int]:
    """Ids of every event within (below, in the call tree) an event whose name starts with `prefix`."""
    found: set[int] = set()
    stack = [e for e in events if e.name.startswith(prefix)]
    while stack:
        event = stack.pop()
        for child in event.cpu_children:
            if child.id not in found:
                found.add(child.id)
                stack.append(child)
    return found


def render(results: list[dict[str, Any]]) -> str:
    libs = [r["lib"] for r in results]
    lines = ["| kind of work | " + " | ".join(f"{lib}: s (GFLOP/s)" for lib in libs) + " |",
             "|---|" + "---:|" * len(libs)]

    def cell(result: dict[str, Any], kind: str) -> str:
        seconds, gflop = result["seconds"][kind], result["gflop"].get(kind)
        return f"{seconds:.2f}" + (f" ({gflop / seconds:.0f})" if gflop and seconds > 0 else "")

    for kind in KINDS:
        lines.append(f"| {kind} | " + " | ".join(cell(r, kind) for r in results) + " |")
    lines.append("| profiled ops, sum | "
                 + " | ".join(f"{sum(r['seconds'].values()):.2f}" for r in results) + " |")
    lines.append("| step, wall clock (under the profiler) | "
                 + " | ".join(f"{r['wall']:.2f}" for r in results) + " |")
    by_lib = {r["lib"]: r for r in results}
    if "lorakit" in by_lib and "peft" in by_lib:
        ours, theirs = by_lib["lorakit"], by_lib["peft"]
        base_work = sum(ours["seconds"][k]
                        for k in ("matmul, frozen base", "matmul, output head", "attention"))
        lines += ["", f"lorakit's frozen-base matmuls, output head and attention alone: {base_work:.2f} s; "
                      f"1.5x PEFT's step would be {theirs['wall'] / 1.5:.2f} s, leaving "
                      f"{theirs['wall'] / 1.5 - base_work:+.2f} s for the adapters' matmuls "
                      f"({ours['seconds']['matmul, adapters']:.2f} s here), the masks, the elementwise work "
                      f"({ours['seconds']['everything else']:.2f} s) and AdamW."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--libs", default="lorakit,peft,base")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    add_setting_args(parser)
    args = parser.parse_args()
    setting = setting_from_args(args)
    if args.child:
        emit(profile_step(args.child, setting, args.warmup))
        return
    libs = args.libs.split(",")
    unknown = [lib for lib in libs if lib not in ("lorakit", "peft", "base")]
    if unknown:
        parser.error(f"--libs: unknown {', '.join(unknown)}; choose from lorakit, peft, base")
    results = [run_child("benchmarks.step_profile",
                         ["--child", lib, "--warmup", str(args.warmup), *setting.to_args()])
               for lib in libs]
    print(f"Setting: {setting.to_dict()}; {results[0]['threads']} threads; one profiled step after "
          f"{args.warmup} warm-up step(s), each configuration in its own process.\n")
    print(render(results))


if __name__ == "__main__":
    main()
