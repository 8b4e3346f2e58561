"""`lorakit train`: flags for the common options, or --config FILE.yaml with the same keys."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

EXAMPLES = """examples:
  lorakit train --data train.jsonl --output-dir runs/mine
  lorakit train --data train.jsonl --val-fraction 0.05 --r 16 --alpha 32 --lr 2e-4 --epochs 3
  lorakit train --data train.jsonl --quantize nf4            # QLoRA: 4-bit frozen base
  lorakit train --data train.jsonl --dora --loraplus-ratio 16  # DoRA, B trained 16x faster (LoRA+)
  lorakit train --config run.yaml --lr 1e-4                  # flags override the file
  lorakit train --config run.yaml --resume                   # continue after a crash
  lorakit train --data train.jsonl --nproc 2                 # 2 processes (DDP), started for you
  lorakit train --data train.jsonl --nproc 4 --distributed fsdp --global-batch-size 32
  torchrun --nproc-per-node 8 -m lorakit train --distributed fsdp --config run.yaml

YAML keys are the TrainConfig fields: data, model, output_dir, val_data, val_fraction, format,
max_length, pack, r, alpha, dropout, targets, learning_rate, epochs, max_steps, batch_size,
grad_accum, global_batch_size, warmup_steps, save_every, eval_every, seed, quantize, optimizer, ...
and a distributed: section (strategy: ddp|fsdp, nproc, backend: auto|gloo|nccl, timeout_s); docs/distributed.md.
"""

# (flag, key of the YAML distributed: section, type, help)
DISTRIBUTED_FLAGS: list[tuple[str, str, Any, str]] = [
    ("--distributed", "strategy", str, "ddp or fsdp: train on several processes (under torchrun, or with --nproc)"),
    ("--nproc", "nproc", int, "start this many processes on this machine (re-launches under torchrun; "
                              "default strategy ddp)"),
]

# (flag, TrainConfig field, type, help); booleans are store_true flags.
FLAGS: list[tuple[str, str, Any, str]] = [
    ("--data", "data", str, "training JSONL (chat, alpaca, completion or text records)"),
    ("--model", "model", str, "base model: default, a .gguf file or a transformers folder"),
    ("--output-dir", "output_dir", str, "where the adapter, checkpoints, metrics.jsonl and loss.png go"),
    ("--val-data", "val_data", str, "validation JSONL"),
    ("--val-fraction", "val_fraction", float, "hold out this share of the training data for validation"),
    ("--format", "format", str, "auto, chat, alpaca, completion or text"),
    ("--skip-bad-lines", "skip_bad_lines", bool, "skip and count malformed lines"),
    ("--max-length", "max_length", int, "longest example in tokens"),
    ("--pack", "pack", bool, "pack several examples per row"),
    ("--train-on-prompt", "train_on_prompt", bool, "also compute the loss on prompt tokens"),
    ("--r", "r", int, "LoRA rank"),
    ("--alpha", "alpha", float, "LoRA alpha (scale alpha / r)"),
    ("--dropout", "dropout", float, "dropout on the adapter input"),
    ("--targets", "targets", str, "all-linear, a regex, or comma-separated module names (q_proj,v_proj)"),
    ("--rslora", "use_rslora", bool, "scale by alpha / sqrt(r)"),
    ("--dora", "use_dora", bool, "DoRA: also train a magnitude per output row (linear targets)"),
    ("--init", "init", str, "adapter init: kaiming, gaussian, pissa, pissa_niter_N (e.g. pissa_niter_4) or olora"),
    ("--separate-dropout-masks", "share_dropout_mask", "off", "each module draws its own dropout mask, as PEFT "
                                                             "does (default: q/k/v and gate/up share one)"),
    ("--quantize", "quantize", str, "nf4: train on a 4-bit frozen base (QLoRA)"),
    ("--lr", "learning_rate", float, "peak learning rate"),
    ("--warmup-steps", "warmup_steps", int, "linear warm-up steps"),
    ("--weight-decay", "weight_decay", float, "AdamW weight decay"),
    ("--loraplus-ratio", "loraplus_ratio", float, "LoRA+: B's learning rate = this x A's (e.g. 16)"),
    ("--loraplus-lr-embedding", "loraplus_lr_embedding", float, "LoRA+: learning rate of embedding adapters"),
    ("--optim", "optimizer", str, "adamw, or paged_adamw (bitsandbytes, CUDA)"),
    ("--epochs", "epochs", int, "passes over the data"),
    ("--max-steps", "max_steps", int, "stop after this many optimizer steps"),
    ("--batch-size", "batch_size", int, "rows per micro-batch"),
    ("--grad-accum", "grad_accum", int, "micro-batches per optimizer step"),
    ("--global-batch-size", "global_batch_size", int, "rows per optimizer step over all processes "
                                                      "(sets the micro-batches per step)"),
    ("--max-grad-norm", "max_grad_norm", float, "gradient clipping norm"),
    ("--gradient-checkpointing", "gradient_checkpointing", bool, "recompute activations to save memory"),
    ("--seed", "seed", int, "random seed"),
    ("--eval-every", "eval_every", int, "validation loss every N steps"),
    ("--eval-exact-match", "eval_exact_match", int, "exact match on up to N validation records at the end"),
    ("--save-every", "save_every", int, "checkpoint every N steps"),
    ("--keep-last", "keep_last", int, "checkpoints kept"),
    ("--resume", "resume", bool, "continue the run in --output-dir from its newest checkpoint (same settings)"),
    ("--overwrite", "overwrite", bool, "delete the previous run in --output-dir first (its adapter/, checkpoints, "
                                       "metrics.jsonl, loss.png, run.json; other files stay)"),
    ("--dtype", "dtype", str, "float32, bfloat16 or float16 (default: fp32 on CPU, bf16 on CUDA)"),
    ("--device", "device", str, "auto, cpu, cuda or cuda:N"),
    ("--no-progress", "progress", "off", "hide the progress bar"),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lorakit.train.config import TrainConfig

    parser.add_argument("--config", help="YAML file with TrainConfig keys; flags given override it")
    # Flags default to None (so that only the flags given override the YAML file); the help shows
    # the default a run gets when neither sets the value.
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    for flag, field, kind, text in FLAGS:
        shown = defaults.get(field, MISSING)
        if kind in (bool, "off") or shown in (MISSING, None):
            help_text = text
        else:
            help_text = f"{text} (default: {shown})"
        if kind is bool:
            parser.add_argument(flag, dest=field, action="store_true", default=None, help=help_text)
        elif kind == "off":
            parser.add_argument(flag, dest=field, action="store_false", default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=field, type=kind, default=None, help=help_text)
    for flag, key, kind, text in DISTRIBUTED_FLAGS:
        parser.add_argument(flag, dest=f"distributed_{key}", type=kind, default=None, help=text)


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """The YAML file's keys, then every flag that was given on top."""
    values: dict[str, Any] = {}
    if args.config:
        values.update(read_yaml(Path(args.config)))
    for _, field, _, _ in FLAGS:
        if getattr(args, field) is not None:
            values[field] = getattr(args, field)
    given = {key: getattr(args, f"distributed_{key}") for _, key, _, _ in DISTRIBUTED_FLAGS
             if getattr(args, f"distributed_{key}", None) is not None}
    if given:
        section = values.get("distributed")
        values["distributed"] = {**(section if isinstance(section, dict) else {}), **given}
    if "data" not in values:
        raise ValueError("no training data: give --data FILE.jsonl (or 'data:' in --config)")
    return values


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML file of TrainConfig keys, with errors that name the file and the line."""
    import yaml

    if not path.is_file():
        raise ValueError(f"--config {path}: {'is a folder; give a YAML file' if path.is_dir() else 'no such file'}")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except UnicodeDecodeError:
        raise ValueError(f"--config {path} is not UTF-8 text; give a YAML file") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ValueError(f"{path} is not valid YAML{where}: {problem}") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a mapping of TrainConfig keys, got {type(loaded).__name__}")
    return loaded


def command_line(args: argparse.Namespace) -> list[str]:
    """The `train ...` arguments that give these settings again (for the ranks that --nproc starts)."""
    argv = ["train"] + (["--debug"] if getattr(args, "debug", False) else [])
    if args.config:
        argv += ["--config", args.config]
    for flag, field, kind, _ in FLAGS:
        value = getattr(args, field)
        if value is None:
            continue
        argv += [flag] if kind in (bool, "off") else [flag, str(value)]
    for flag, key, _, _ in DISTRIBUTED_FLAGS:
        value = getattr(args, f"distributed_{key}", None)
        if value is not None:
            argv += [flag, str(value)]
    return argv


def run(args: argparse.Namespace) -> int:
    from lorakit.train import TrainConfig, train
    from lorakit.train.distributed import OtherRankFailed, launch, under_torchrun

    config = TrainConfig.from_dict(settings(args))
    nproc = config.distributed.nproc if config.distributed is not None else None
    if nproc is not None and not under_torchrun():
        config.accumulation(nproc)  # a global batch that does not split: one line, before any process starts
        return launch(nproc, command_line(args))  # each rank runs this command under torchrun
    rank = int(os.environ["RANK"]) if under_torchrun() else 0
    try:
        result = train(config)
    except OtherRankFailed:
        return 1  # rank 0 has said why
    except ValueError:
        if rank == 0:
            raise
        return 1  # bad settings: every rank has the same (their hash is compared), rank 0 says it once
    except Exception as err:  # a failure of this rank alone: say which rank
        if rank == 0 or getattr(args, "debug", False):
            raise
        print(f"lorakit train: error on rank {rank}: {err}", file=sys.stderr)
        return 1
    if rank != 0:
        return 0
    print(f"\ntrained {result.steps} steps in {result.seconds:.0f} s; final train loss {result.train_loss:.4f}"
          + (f", validation loss {result.val_loss:.4f}" if result.val_loss is not None else "")
          + (f", exact match {result.exact_match.score:.1%}" if result.exact_match else ""))
    print(f"adapter: {result.adapter_dir}\nmetrics: {result.metrics_path}\nloss curve: {result.plot_path}")
    return 0
