"""`lorakit train`: flags for the common options, or --config FILE.yaml with the same keys."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from lorakit.cli.common import field_help

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
and a distributed: section (strategy: ddp|fsdp, nproc, backend: auto|gloo|nccl, timeout_s); \
docs/distributed.md.
"""

# (flag, key of the YAML distributed: section, type, help); help None: DistributedConfig's field docstring.
DISTRIBUTED_FLAGS: list[tuple[str, str, Any, str | None]] = [
    ("--distributed", "strategy", str, None),
    ("--nproc", "nproc", int, None),
]

# (flag, TrainConfig field, type, help); booleans are store_true flags, "off" ones store_false.
# Help None: the field's docstring, the one description of the setting (YAML and flag alike). An
# "off" flag says what turning the setting off does, so it has its own words.
FLAGS: list[tuple[str, str, Any, str | None]] = [
    ("--data", "data", str, None),
    ("--model", "model", str, None),
    ("--output-dir", "output_dir", str, None),
    ("--val-data", "val_data", str, None),
    ("--val-fraction", "val_fraction", float, None),
    ("--format", "format", str, None),
    ("--skip-bad-lines", "skip_bad_lines", bool, None),
    ("--max-length", "max_length", int, None),
    ("--pack", "pack", bool, None),
    ("--train-on-prompt", "train_on_prompt", bool, None),
    ("--r", "r", int, None),
    ("--alpha", "alpha", float, None),
    ("--dropout", "dropout", float, None),
    ("--targets", "targets", str, None),
    ("--rslora", "use_rslora", bool, None),
    ("--dora", "use_dora", bool, None),
    ("--init", "init", str, None),
    ("--separate-dropout-masks", "share_dropout_mask", "off",
     "each module draws its own dropout mask, as PEFT does (default: q/k/v and gate/up share one)"),
    ("--quantize", "quantize", str, None),
    ("--lr", "learning_rate", float, None),
    ("--warmup-steps", "warmup_steps", int, None),
    ("--weight-decay", "weight_decay", float, None),
    ("--loraplus-ratio", "loraplus_ratio", float, None),
    ("--loraplus-lr-embedding", "loraplus_lr_embedding", float, None),
    ("--optim", "optimizer", str, None),
    ("--epochs", "epochs", int, None),
    ("--max-steps", "max_steps", int, None),
    ("--batch-size", "batch_size", int, None),
    ("--grad-accum", "grad_accum", int, None),
    ("--global-batch-size", "global_batch_size", int, None),
    ("--max-grad-norm", "max_grad_norm", float, None),
    ("--gradient-checkpointing", "gradient_checkpointing", bool, None),
    ("--seed", "seed", int, None),
    ("--eval-every", "eval_every", int, None),
    ("--eval-exact-match", "eval_exact_match", int, None),
    ("--save-every", "save_every", int, None),
    ("--keep-last", "keep_last", int, None),
    ("--resume", "resume", bool, None),
    ("--overwrite", "overwrite", bool, None),
    ("--dtype", "dtype", str, None),
    ("--device", "device", str, None),
    ("--no-progress", "progress", "off", "hide the progress bar"),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lorakit.train.config import TrainConfig
    from lorakit.train.distributed_config import DistributedConfig

    parser.add_argument("--config", help="YAML file with TrainConfig keys; flags given override it")
    # Flags default to None (so that only the flags given override the YAML file); the help shows
    # the default a run gets when neither sets the value.
    flag_of = {field: flag for flag, field, _, _ in FLAGS}  # `output_dir` in a docstring reads --output-dir
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    for flag, field, kind, text in FLAGS:
        text = text or field_help(TrainConfig, field, flag_of)
        help_text = _with_default(text, kind, defaults.get(field, MISSING))
        if kind is bool:
            parser.add_argument(flag, dest=field, action="store_true", default=None, help=help_text)
        elif kind == "off":
            parser.add_argument(flag, dest=field, action="store_false", default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=field, type=kind, default=None, help=help_text)
    group = parser.add_argument_group("several processes (YAML's distributed: section; docs/distributed.md)")
    defaults = {f.name: f.default for f in fields(DistributedConfig)}
    for flag, key, kind, text in DISTRIBUTED_FLAGS:
        help_text = _with_default(text or field_help(DistributedConfig, key, flag_of), kind, defaults[key])
        group.add_argument(flag, dest=f"distributed_{key}", type=kind, default=None, help=help_text)


def _with_default(text: str, kind: Any, default: Any) -> str:
    """`text`, then the value a run gets when the flag is not given (switches and unset fields say none)."""
    return text if kind in (bool, "off") or default in (MISSING, None) else f"{text} (default: {default})"


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
        raise ValueError(f"--config {path}: "
                         f"{'is a folder; give a YAML file' if path.is_dir() else 'no such file'}")
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
    print(f"\ntrained {result.steps} steps in {result.seconds:.0f} s; "
          f"final train loss {result.train_loss:.4f}"
          + (f", validation loss {result.val_loss:.4f}" if result.val_loss is not None else "")
          + (f", exact match {result.exact_match.score:.1%}" if result.exact_match else ""))
    print(f"adapter: {result.adapter_dir}\nmetrics: {result.metrics_path}\nloss curve: {result.plot_path}")
    return 0
