"""Everything a training run prepares before its first step: the checked plan, the data, the
model with its adapter (quantized, fused, wrapped for the ranks), the optimizer and the schedule,
and, when resuming, the restored state. loop.py runs the steps on what `prepare` returns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from tqdm.auto import tqdm

from lorakit.core.adapters import trainable_parameters_line
from lorakit.core.config import LoraConfig
from lorakit.core.inject import add_adapter
from lorakit.data import (
    DataPosition,
    EvalPair,
    TokenizedDataset,
    build_dataset,
    eval_pairs,
    load_records,
    split_validation,
    steps_per_epoch,
)
from lorakit.data.jsonl import FormatChoice
from lorakit.fusion.fuse import fuse_for_training
from lorakit.hf.checkpointing import enable_checkpointing
from lorakit.train.checkpoint import load_checkpoint
from lorakit.train.config import TrainConfig
from lorakit.train.distributed import World
from lorakit.train.metrics import MetricsLog
from lorakit.train.optimizer import build_optimizer
from lorakit.train.parallel import base_bytes, wrap
from lorakit.train.schedule import warmup_cosine


@dataclass(frozen=True)
class Plan:
    """What is checked and read before the output folder is claimed, so a bad setting fails fast."""

    config: TrainConfig
    world: World
    lora: LoraConfig
    accumulation: int
    """Micro-batches per optimizer step on each rank."""
    records: list
    val_records: list
    """The validation records: val_data's, a val_fraction split off the training data, or none."""


@dataclass(frozen=True)
class Data:
    train_set: TokenizedDataset
    val_set: TokenizedDataset | None
    """None without validation records."""
    pairs: list[EvalPair]
    """Prompts and references for exact match: the first eval_exact_match validation records."""


@dataclass(frozen=True)
class Run:
    """What `prepare` builds for `_steps` and `_finish`."""

    config: TrainConfig
    world: World
    output_dir: Path
    model: nn.Module
    """The base model with the adapter added; checkpoints and the adapter are saved from it."""
    tokenizer: Any
    wrapped: nn.Module
    """The loss module, under DDP or FSDP2 when distributed: what the steps call."""
    evaluated: Any
    """What evaluation and generation call: `wrapped` under FSDP2, else `model`."""
    device: torch.device
    data: Data
    params: list[nn.Parameter]
    """The trainable parameters: what the optimizer steps and the gradient clip sees."""
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    total_steps: int
    accumulation: int
    """Micro-batches per optimizer step on each rank."""
    first_step: int
    """0, or the step of the checkpoint resumed from."""
    position: DataPosition
    """Where in the data the first step starts."""
    metrics: MetricsLog | None
    """metrics.jsonl, on rank 0 only."""


def make_plan(config: TrainConfig, world: World) -> Plan:
    lora = config.lora_config()
    accumulation = config.accumulation(world.world_size)  # a global batch that does not split: an error now
    records, val_records = _records(config, world)  # data problems show before any slow work
    return Plan(config=config, world=world, lora=lora, accumulation=accumulation, records=records,
                 val_records=val_records)


def prepare(plan: Plan, resume_from: Path | None, model: nn.Module | None, tokenizer: Any) -> Run:
    """Load the model, build the data, add and wrap the adapter, build the optimizer; resume if asked."""
    config, world = plan.config, plan.world
    torch.manual_seed(config.seed)
    model, tokenizer = _load_model(config, world, model, tokenizer)
    device = next(model.parameters()).device
    data = _datasets(config, world, tokenizer, plan.records, plan.val_records)
    wrapped = _add_adapter_and_wrap(model, plan)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = build_optimizer(config, model, params)  # LoRA+ groups when config.loraplus_ratio is set
    per_epoch = math.ceil(steps_per_epoch(len(data.train_set), config.batch_size, world.world_size)
                          / plan.accumulation)
    total_steps = config.max_steps or config.epochs * per_epoch
    scheduler = warmup_cosine(optimizer, config.warmup_steps, total_steps, config.min_lr_ratio)
    step, position = 0, DataPosition()
    if resume_from is not None:
        restored = load_checkpoint(resume_from, model, optimizer, scheduler, world)
        step, position = restored.step, DataPosition.from_dict(restored.data_position)
        say(world, f"resumed from {restored.path} (step {step})")
    output_dir = Path(config.output_dir)
    metrics = (MetricsLog(output_dir / "metrics.jsonl", resume_step=step if resume_from is not None else None,
                          say=partial(say, world)) if world.is_main else None)
    # Evaluation and generation run on every rank alike: under FSDP2 every forward gathers weights.
    evaluated = wrapped if world.strategy == "fsdp" else model
    return Run(config=config, world=world, output_dir=output_dir, model=model, tokenizer=tokenizer,
                wrapped=wrapped, evaluated=evaluated, device=device, data=data, params=params,
                optimizer=optimizer, scheduler=scheduler, total_steps=total_steps,
                accumulation=plan.accumulation, first_step=step, position=position, metrics=metrics)


def _load_model(config: TrainConfig, world: World, model: nn.Module | None,
                tokenizer: Any) -> tuple[nn.Module, Any]:
    """The given model and tokenizer, or `config.model` loaded; on this rank's device when distributed, and
    with its linears in 4-bit when `config.quantize` asks."""
    if model is None or tokenizer is None:
        from lorakit.hf import load_model

        device_name = str(world.device) if world.distributed else config.device
        # With quantize, read straight into 4-bit where the files allow (hf/load_quantized.py).
        return load_model(config.model, dtype=config.dtype, device=device_name, quantize=config.quantize)
    if world.distributed:
        model.to(world.device)
    if config.quantize:  # a model handed in whole is quantized where it now lies
        from lorakit.quant import quantize_model

        quantize_model(model, config.quantize)
    return model, tokenizer


def _add_adapter_and_wrap(model: nn.Module, plan: Plan) -> nn.Module:
    """Add the adapter to the (already quantized, if asked) base and wrap the model for the ranks; the
    loss module."""
    config, world = plan.config, plan.world
    add_adapter(model, plan.lora)
    fuse_for_training(model)  # MLPs and q/k/v's A sides as fused functions: same values, less work
    if config.gradient_checkpointing:
        enable_checkpointing(model)
    if world.is_main:
        _announce(model, config, world)
    wrapped = wrap(model, world)  # the loss module, under DDP or FSDP2 when distributed
    if world.distributed:
        say(world, f"{world.strategy} on {world.world_size} ranks ({world.device.type}): "
             f"{config.batch_size} rows x {plan.accumulation} micro-batch(es) x {world.world_size} ranks "
             f"= {config.global_batch(world.world_size)} rows per step")
    if world.strategy == "fsdp":
        local, whole = base_bytes(model)
        say(world, f"base weights per rank: {local / 2**30:.3f} GiB (of {whole / 2**30:.3f}; "
             f"{local:,d} of {whole:,d} bytes)")
    return wrapped


def _records(config: TrainConfig, world: World) -> tuple[list, list]:
    """The training and validation records, read and checked before anything slow happens."""
    data_format = cast(FormatChoice, config.format)  # checked by TrainConfig
    records, report = load_records(config.data, format=data_format, skip_bad=config.skip_bad_lines)
    if report.num_skipped:
        say(world, f"skipped {report.num_skipped} bad line(s) in {config.data}")
    if config.val_data:
        val_records, _ = load_records(config.val_data, format=data_format, skip_bad=config.skip_bad_lines)
    elif config.val_fraction:
        records, val_records = split_validation(records, config.val_fraction, seed=config.seed)
    else:
        val_records = []
    return records, val_records


def _datasets(config: TrainConfig, world: World, tokenizer: Any, records: list, val_records: list) -> Data:
    train_set, build = build_dataset(records, tokenizer, max_length=config.max_length,
                                     train_on_prompt=config.train_on_prompt, pack=config.pack)
    say(world, build.summary())
    val_set = None
    if val_records:
        val_set, _ = build_dataset(val_records, tokenizer, max_length=config.max_length,
                                   train_on_prompt=config.train_on_prompt)
    pairs = eval_pairs(val_records[: config.eval_exact_match], tokenizer) if config.eval_exact_match else []
    return Data(train_set=train_set, val_set=val_set, pairs=pairs)


def _announce(model: nn.Module, config: TrainConfig, world: World) -> None:
    from lorakit.estimate.footprint import estimate_for_model

    say(world, trainable_parameters_line(model))
    estimate = estimate_for_model(model, batch_size=config.batch_size, seq_len=config.max_length,
                                  gradient_checkpointing=config.gradient_checkpointing)
    say(world, f"estimated memory: {estimate.summary()}")


def say(world: World, message: str) -> None:
    """Print `message` on rank 0 alone (through tqdm, so an open progress bar stays whole)."""
    if world.is_main:
        tqdm.write(message)
