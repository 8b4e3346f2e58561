"""The QLoRA training step against lorakit's own fp32 LoRA step, alternating in one process.

    .venv/bin/python -m benchmarks.qlora_step [--rounds 3] [--warmup 1] [--batch 4] [--seq 256]
                                              [--threads N] [--json PATH]

The default model (SmolLM2-135M) twice: as loaded (fp32) and with every linear but the tied head
quantized to NF4 (`quantize_model(model, "nf4")`), each with the same LoRA adapter (r=16,
alpha=32, dropout 0.05, all seven linear kinds) and its own AdamW, set up as `benchmarks.training`
sets up lorakit (fused gated MLPs, grouped attention inputs, the chunked loss). Each round runs
one step of each on the same batch, the order swapped every round, so load on a shared machine
falls on both alike. Also timed: dequantizing every NF4 weight once (a QLoRA step does it twice,
forward and backward).

The target (issue 16) is QLoRA s/step <= 1.2x the fp32 LoRA step.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

from benchmarks.common import (
    Setting,
    adapter_tensors,
    add_lorakit,
    batch_ids,
    build_model,
    copy_adapter,
    cpu_model,
    parse_with_threads,
    touch,
)

FP32, NF4 = "LoRA, fp32 base", "QLoRA, NF4 base"
TARGET = 1.2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    args = parse_with_threads(parser)
    warnings.filterwarnings("ignore")
    load = os.getloadavg()[0]
    setting = Setting(batch=args.batch, seq=args.seq)
    steps = training_steps(setting)
    times = alternate(steps, setting, args.rounds, args.warmup)
    dequant = dequantization_seconds(steps.quantized_model, args.rounds)
    print_table(times, dequant, setting, args.rounds, load)
    if args.json:
        figures = dict(setting=vars(args) | {"json": str(args.json)}, step_seconds=times,
                       dequantize_all_seconds=dequant, load_average_at_start=load, machine=machine())
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


class TrainingSteps:
    """The two models, their optimizers, and one step function per configuration."""

    def __init__(self, models: dict[str, nn.Module], quantized_model: nn.Module) -> None:
        self.models = models
        self.quantized_model = quantized_model
        self.optimizers = {name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
                           for name, m in models.items()}

    def step(self, name: str, ids: torch.Tensor) -> dict[str, float]:
        """One forward (chunked loss) + backward + AdamW step; seconds of each part and the loss."""
        from lorakit.train.chunked_loss import causal_lm_loss

        model, optimizer = self.models[name], self.optimizers[name]
        start = time.perf_counter()
        loss = causal_lm_loss(model, {"input_ids": ids, "labels": ids})
        forward = time.perf_counter()
        loss.backward()
        backward = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        end = time.perf_counter()
        return {"seconds": end - start, "forward": forward - start, "backward": backward - forward,
                "optimizer": end - backward, "loss": loss.item()}


def training_steps(setting: Setting) -> TrainingSteps:
    """The fp32 and the NF4 model with the same adapter, prepared as lorakit trains."""
    from lorakit import fuse_for_training
    from lorakit.quant import quantize_model

    base = build_model(setting)
    touch(base)  # the weights are a memory map: read them once before copying
    quantized = copy.deepcopy(base)
    quantize_model(quantized, "nf4")
    models = {FP32: add_lorakit(base, setting), NF4: add_lorakit(quantized, setting)}
    copy_adapter(models[NF4], adapter_tensors(models[FP32]))
    for model in models.values():
        fuse_for_training(model)  # lorakit.train does this too
        model.train()
    return TrainingSteps(models, quantized)


def alternate(steps: TrainingSteps, setting: Setting, rounds: int,
              warmup: int) -> dict[str, list[dict[str, float]]]:
    """Per configuration, the measured steps (warm-up steps dropped), the order swapped every round."""
    names = list(steps.models)
    times: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for i in range(warmup + rounds):
        ids = batch_ids(i, setting, vocab=49152)
        for name in names if i % 2 == 0 else names[::-1]:
            record = steps.step(name, ids)
            if i >= warmup:
                times[name].append(record)
    return times


def dequantization_seconds(model: nn.Module, rounds: int) -> list[float]:
    """Seconds to dequantize every NF4 weight of the model once (to its compute dtype), per round."""
    from lorakit.quant import NF4Linear

    layers = [m for m in model.modules() if isinstance(m, NF4Linear)]
    out = []
    for _ in range(rounds):
        start = time.perf_counter()
        for layer in layers:
            layer.dequantize_weight(layer.compute_dtype)
        out.append(time.perf_counter() - start)
    return out


def print_table(times: dict[str, list[dict[str, float]]], dequant: list[float], setting: Setting, rounds: int,
                load: float) -> None:
    median: Callable[[list[float]], float] = statistics.median
    seconds = {name: median([r["seconds"] for r in records]) for name, records in times.items()}
    print(f"QLoRA step vs fp32 LoRA step: the default model (SmolLM2-135M), batch {setting.batch} x "
          f"{setting.seq}, r={setting.r}, alpha={setting.alpha}, dropout {setting.dropout}, "
          f"all 7 linear kinds; median of {rounds} rounds, the two alternating.\n")
    print("| configuration | s/step | per round | forward / backward / optimizer s |")
    print("|---|---:|---|---|")
    for name, records in times.items():
        parts = " / ".join(f"{median([r[p] for r in records]):.2f}"
                           for p in ("forward", "backward", "optimizer"))
        rounds_text = ", ".join(f"{r['seconds']:.2f}" for r in records)
        print(f"| {name} | {seconds[name]:.2f} | {rounds_text} | {parts} |")
    ratio = seconds[NF4] / seconds[FP32]
    per_round = [q["seconds"] / f["seconds"] for q, f in zip(times[NF4], times[FP32], strict=True)]
    print(f"\nQLoRA / fp32 LoRA: {ratio:.2f}x (per round {', '.join(f'{r:.2f}' for r in per_round)}); "
          f"target <= {TARGET}x: {'met' if ratio <= TARGET else 'NOT met'}.")
    print(f"Dequantizing every NF4 weight once: {median(dequant):.3f} s (per round "
          f"{', '.join(f'{d:.3f}' for d in dequant)}); a step dequantizes twice (forward and backward).")
    print(f"Machine: {machine()}; load average {load:.2f} at the start.")


def machine() -> str:
    """The processor's model name, CPUs, torch and its threads."""
    return (f"{cpu_model()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
