"""The DoRA training step against the LoRA step, lorakit and PEFT side by side; PiSSA init time.

    .venv/bin/python -m benchmarks.variants [--steps 3] [--warmup 1] [--batch 4 --seq 256 ...] [--json PATH]

Four models in one process (the default model unless --model says otherwise): lorakit LoRA,
lorakit DoRA, PEFT LoRA and PEFT DoRA, each with r=16, alpha=32, dropout 0.05 on the seven
linear kinds and AdamW. Steps (forward with the loss, backward, optimizer step) run in turns,
one per model per round, so a change in the machine's load falls on all four alike; the table
gives each model's median step time. Target (issue 15): lorakit DoRA at most 1.3x lorakit LoRA,
and faster than PEFT DoRA.

Then the PiSSA initialisation of the same adapter on the default model: init="pissa" (full SVD
of each weight) against "pissa_niter_4" (torch.svd_lowrank), median of `--init-repeats` runs.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.common import (
    TARGETS,
    Setting,
    add_setting_args,
    batch_ids,
    build_model,
    machine,
    setting_from_args,
)
from lorakit import LoraConfig, add_adapter, fuse_for_training
from lorakit.train.chunked_loss import causal_lm_loss

CONFIGS = ("lorakit LoRA", "lorakit DoRA", "PEFT LoRA", "PEFT DoRA")
TARGET_RATIO = 1.3


def adapted(base: nn.Module, name: str, setting: Setting) -> nn.Module:
    """A copy of `base` with the adapter of configuration `name`."""
    model = copy.deepcopy(base)
    dora = name.endswith("DoRA")
    if name.startswith("lorakit"):
        add_adapter(model, LoraConfig(r=setting.r, alpha=setting.alpha, dropout=setting.dropout,
                                      targets=list(TARGETS), use_dora=dora))
        fuse_for_training(model)  # as lorakit.train does
        return model
    import peft

    config = peft.LoraConfig(r=setting.r, lora_alpha=setting.alpha, lora_dropout=setting.dropout,
                             target_modules=list(TARGETS), use_dora=dora)
    return peft.get_peft_model(model, config)  # type: ignore[return-value]


def step(model: nn.Module, name: str, ids: torch.Tensor,
         optimizer: torch.optim.Optimizer) -> tuple[float, float]:
    """(seconds, loss) of one training step: forward with the loss, backward, optimizer step."""
    start = time.perf_counter()
    if name.startswith("lorakit"):
        loss = causal_lm_loss(model, {"input_ids": ids, "labels": ids})  # lorakit.train's loss
    else:
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start, float(loss.detach())


def step_times(setting: Setting, warmup: int, steps: int) -> dict[str, dict[str, Any]]:
    base = build_model(setting)
    vocab = int(base.config.vocab_size)  # type: ignore[union-attr]
    models = {name: adapted(base, name, setting) for name in CONFIGS}
    optimizers = {name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=setting.lr)
                  for name, m in models.items()}
    for model in models.values():
        model.train()
    times: dict[str, list[float]] = {name: [] for name in CONFIGS}
    losses: dict[str, list[float]] = {name: [] for name in CONFIGS}
    for round_ in range(warmup + steps):
        ids = batch_ids(round_, setting, vocab)
        for name in CONFIGS:
            seconds, loss = step(models[name], name, ids, optimizers[name])
            losses[name].append(loss)
            if round_ >= warmup:
                times[name].append(seconds)
    return {name: {"median_s": statistics.median(times[name]), "steps_s": times[name], "losses": losses[name],
                   "trainable": sum(p.numel() for p in models[name].parameters() if p.requires_grad)}
            for name in CONFIGS}


def pissa_init_times(setting: Setting, repeats: int) -> dict[str, dict[str, Any]]:
    base = build_model(setting)
    found = {}
    for init in ("pissa", "pissa_niter_4"):
        seconds = []
        for _ in range(repeats):
            model = copy.deepcopy(base)
            start = time.perf_counter()
            add_adapter(model, LoraConfig(r=setting.r, alpha=setting.alpha, targets=list(TARGETS), init=init))
            seconds.append(time.perf_counter() - start)
        found[init] = {"median_s": statistics.median(seconds), "runs_s": seconds}
    return found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--init-repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the figures here as JSON")
    add_setting_args(parser)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    setting = setting_from_args(args)
    steps = step_times(setting, args.warmup, args.steps)
    inits = pissa_init_times(setting, args.init_repeats)
    info = machine()
    print(f"\nMachine: {info.get('cpu', '?')}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"model {setting.model}, batch {setting.batch} x {setting.seq}, r={setting.r}, "
          f"dropout {setting.dropout}; "
          f"median of {args.steps} steps after {args.warmup} warm-up, the four models in turns\n")
    print(step_table(steps))
    print()
    print(init_table(inits, setting))
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "setting": setting.to_dict(), "steps": steps,
                                         "pissa_init": inits}, indent=1) + "\n")


def step_table(steps: dict[str, dict[str, Any]]) -> str:
    lora, dora = steps["lorakit LoRA"]["median_s"], steps["lorakit DoRA"]["median_s"]
    peft_dora = steps["PEFT DoRA"]["median_s"]
    lines = ["| configuration | step (median) | vs lorakit LoRA | trainable |", "|---|---:|---:|---:|"]
    for name, found in steps.items():
        lines.append(f"| {name} | {found['median_s']:.2f} s | {found['median_s'] / lora:.2f}x | "
                     f"{found['trainable']:,} |")
    ratio_met = dora / lora <= TARGET_RATIO
    lines.append("")
    lines.append(f"lorakit DoRA / lorakit LoRA = {dora / lora:.2f}x (target <= {TARGET_RATIO}x: "
                 f"{'met' if ratio_met else 'NOT met'}); lorakit DoRA / PEFT DoRA = {dora / peft_dora:.2f}x "
                 f"(target < 1: {'met' if dora < peft_dora else 'NOT met'}); PEFT DoRA / PEFT LoRA = "
                 f"{peft_dora / steps['PEFT LoRA']['median_s']:.2f}x")
    return "\n".join(lines)


def init_table(inits: dict[str, dict[str, Any]], setting: Setting) -> str:
    lines = [f"| PiSSA init, r={setting.r} on {len(TARGETS)} linear kinds | time (median) |", "|---|---:|"]
    lines += [f"| {init} | {found['median_s']:.2f} s |" for init, found in inits.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
