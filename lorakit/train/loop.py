"""train(): LoRA fine-tuning from a JSONL file to a PEFT-layout adapter, resumable at any moment.

One process, or several under torchrun (DDP or FSDP2, see distributed.py and parallel.py): each
rank reads its own share of every step, the loss is the mean over all label tokens of the global
batch, and rank 0 alone claims the output folder, prints and writes.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from tqdm.auto import tqdm

from lorakit.core.adapters import trainable_parameters_line
from lorakit.core.config import LoraConfig, is_svd_init
from lorakit.core.inject import add_adapter
from lorakit.data import (
    DataPosition,
    TokenizedDataset,
    batches,
    build_dataset,
    eval_pairs,
    load_records,
    split_validation,
    steps_per_epoch,
)
from lorakit.data.jsonl import FormatChoice
from lorakit.fusion.fuse import fuse_for_training
from lorakit.hf.checkpointing import enable_checkpointing
from lorakit.train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from lorakit.train.config import TrainConfig
from lorakit.train.distributed import World, broadcast, on_main, start
from lorakit.train.evaluate import ExactMatch, evaluation_loss, exact_match_score
from lorakit.train.metrics import MetricsLog, plot_losses
from lorakit.train.optimizer import build_optimizer
from lorakit.train.parallel import base_bytes, full_tensor, no_sync, whole_trainables, wrap
from lorakit.train.run_folder import claim_run_folder, run_settings
from lorakit.train.schedule import warmup_cosine

ADAPTER_NAME = "default"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass(frozen=True)
class TrainResult:
    adapter_dir: Path
    metrics_path: Path
    plot_path: Path
    steps: int
    train_loss: float
    val_loss: float | None
    exact_match: ExactMatch | None
    seconds: float


def train(config: TrainConfig, model: nn.Module | None = None, tokenizer: Any = None) -> TrainResult:
    """Fine-tune a LoRA adapter as `config` says and write it to `config.output_dir/adapter`.

    Args:
        config: the run's settings.
        model, tokenizer: an already loaded base model and its tokenizer; by default
            `config.model` is loaded.

    Returns:
        Where the adapter, metrics and plot are, and the final figures.

    Raises:
        TrainingDiverged: the loss became NaN/inf (the last good checkpoint stays on disk).
    """
    started = time.perf_counter()
    world = start(config)  # one process unless torchrun started this one
    return _claim_and_run(config, world, model, tokenizer, started)


def _claim_and_run(config: TrainConfig, world: World, model: nn.Module | None, tokenizer: Any,
                   started: float) -> TrainResult:
    lora = config.lora_config()
    accumulation = config.accumulation(world.world_size)  # a global batch that does not split: an error now
    records, val_records = _records(config)  # data problems show before any slow work
    folder = on_main(world, lambda: claim_run_folder(config, _say, world.world_size))
    resume_from = broadcast(world, folder.resume_from if folder is not None else None)
    try:
        result = _run(config, world, Path(config.output_dir), resume_from, accumulation, lora, records,
                      val_records, model, tokenizer, started)
    except KeyboardInterrupt:
        if folder is not None:
            kept = list_checkpoints(folder.path)
            _say(f"interrupted; {kept[-1]} is kept: run the same command with --resume to continue from it" if kept
                 else "interrupted before the first checkpoint (--save-every N keeps progress); a rerun starts over")
            folder.release(failed=True)
        raise
    except BaseException:
        if folder is not None:
            folder.release(failed=True)
        raise
    world.barrier()  # every rank is done before rank 0 gives the folder back
    if folder is not None:
        folder.release()
    return result


def _run(config: TrainConfig, world: World, output_dir: Path, resume_from: Path | None, accumulation: int,
         lora: LoraConfig, records: list, val_records: list, model: nn.Module | None, tokenizer: Any,
         started: float) -> TrainResult:
    torch.manual_seed(config.seed)
    if model is None or tokenizer is None:
        from lorakit.hf import load_model

        device_name = str(world.device) if world.distributed else config.device
        model, tokenizer = load_model(config.model, dtype=config.dtype, device=device_name)
    if world.distributed:
        model.to(world.device)
    device = next(model.parameters()).device

    train_set, val_set, pairs = _datasets(config, tokenizer, records, val_records)
    if config.quantize:
        from lorakit.quant import quantize_model

        quantize_model(model, config.quantize)
    add_adapter(model, lora)
    fuse_for_training(model)  # MLPs and q/k/v's A sides as fused functions: same values, less work
    if config.gradient_checkpointing:
        enable_checkpointing(model)
    if world.is_main:
        _announce(model, config, train_set)
    wrapped = wrap(model, world)  # the loss module, under DDP or FSDP2 when distributed
    if world.distributed:
        _say(f"{world.strategy} on {world.world_size} ranks ({world.device.type}): {config.batch_size} rows x "
             f"{accumulation} micro-batch(es) x {world.world_size} ranks = {config.global_batch(world.world_size)} "
             "rows per step")
    if world.strategy == "fsdp":
        local, whole = base_bytes(model)
        _say(f"base weights per rank: {local / 2**30:.3f} GiB (of {whole / 2**30:.3f}; {local:,d} of {whole:,d} bytes)")
    # Evaluation and generation run on every rank alike: under FSDP2 every forward gathers weights.
    evaluated: Any = wrapped if world.strategy == "fsdp" else model

    params = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = build_optimizer(config, model, params)  # LoRA+ groups when config.loraplus_ratio is set
    per_epoch = math.ceil(steps_per_epoch(len(train_set), config.batch_size, world.world_size) / accumulation)
    total_steps = config.max_steps or config.epochs * per_epoch
    scheduler = warmup_cosine(optimizer, config.warmup_steps, total_steps, config.min_lr_ratio)

    step, position = 0, DataPosition()
    if resume_from is not None:
        restored = load_checkpoint(resume_from, model, optimizer, scheduler, world)
        step, position = restored.step, DataPosition.from_dict(restored.data_position)
        _say(f"resumed from {restored.path} (step {step})")
    metrics = (MetricsLog(output_dir / "metrics.jsonl", resume_step=step if resume_from else None, say=_say)
               if world.is_main else None)

    micro_batches = batches(train_set, config.batch_size, seed=config.seed, start=position,
                            epochs=None if config.max_steps else config.epochs, rank=world.rank,
                            world_size=world.world_size)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    model.train()
    bar = tqdm(total=total_steps, initial=step, desc="training", unit="step",
               disable=not config.progress or not world.is_main, dynamic_ncols=True)
    # A run resumed at its last step trains no more: its loss is the last one recorded.
    events = metrics.events() if metrics is not None else []
    train_loss = next((e["loss"] for e in reversed(events) if e.get("kind") == "train"), float("nan"))
    val_loss: float | None = None
    while step < total_steps:
        # Every rank gets the same number of micro-batches (the sampler sees to it).
        window = [b.to(device) for b in _take(micro_batches, accumulation)]
        if not window:
            break  # the data ran out (epochs done)
        tick = time.perf_counter()
        # The step's label tokens over all ranks and micro-batches: each micro-loss is a share of
        # the global token mean, so ranks with more padding do not weigh more (parallel.py).
        label_tokens = int(world.sum(sum(b.num_label_tokens for b in window)))
        loss_value = 0.0
        for index, batch in enumerate(window):
            # Gradients are reduced over the ranks once per step, after the last micro-batch.
            with no_sync(wrapped, skip=index < len(window) - 1), autocast:
                loss = wrapped(batch.inputs, num_items=label_tokens)
            loss.backward()
            loss_value += float(loss.detach())
        loss_value = world.sum(loss_value)  # the same value, and the same decision below, on every rank
        if not math.isfinite(loss_value):
            kept = list_checkpoints(output_dir)
            raise TrainingDiverged(
                f"loss became {loss_value} at step {step + 1}; stopped. Last good checkpoint: "
                f"{kept[-1] if kept else 'none (set save_every)'}. Try a lower learning rate.")
        extra = {}
        if config.max_grad_norm is not None:
            # The norm of the global gradient (FSDP2: a DTensor reduced over the shards).
            norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            extra["grad_norm"] = float(full_tensor(norm))
        lr = scheduler.get_last_lr()[0]  # the rate this step used (A's, with LoRA+)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        train_loss = loss_value
        seconds = time.perf_counter() - tick
        tokens = int(world.sum(sum(int(b.inputs["input_ids"].numel()) for b in window)))
        if metrics is not None:
            metrics.write(kind="train", step=step, loss=loss_value, lr=lr, tokens_per_s=tokens / seconds,
                          seconds=seconds, **extra)
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens / seconds:.0f}")
        bar.update(1)
        if val_set is not None and config.eval_every and step % config.eval_every == 0:
            val_loss = evaluation_loss(evaluated, val_set, config.batch_size, device)
            if metrics is not None:
                metrics.write(kind="eval", step=step, val_loss=val_loss)
                bar.write(f"step {step}: validation loss {val_loss:.4f}")
        if config.save_every and step % config.save_every == 0:
            save_checkpoint(output_dir, step, model, optimizer, scheduler, window[-1].position.to_dict(),
                            ADAPTER_NAME, config.keep_last, settings=run_settings(config, world.world_size),
                            world=world)
    bar.close()

    if val_set is not None and (val_loss is None or not config.eval_every or step % config.eval_every):
        val_loss = evaluation_loss(evaluated, val_set, config.batch_size, device)
        if metrics is not None:
            metrics.write(kind="eval", step=step, val_loss=val_loss)
    match = None
    if pairs:
        match = exact_match_score(evaluated, tokenizer, pairs, config.max_new_tokens)
        if metrics is not None:
            metrics.write(kind="exact_match", step=step, exact_match=match.score, n=len(pairs))
    adapter_dir = output_dir / "adapter"
    metrics_path = output_dir / "metrics.jsonl"
    plot_path = output_dir / "loss.png"
    _save_adapter(model, adapter_dir, world, convert_to_lora=is_svd_init(config.init))
    if metrics is not None:
        plot_path = plot_losses(metrics.events(), plot_path)
    return TrainResult(adapter_dir=adapter_dir, metrics_path=metrics_path, plot_path=plot_path, steps=step,
                       train_loss=train_loss, val_loss=val_loss, exact_match=match,
                       seconds=time.perf_counter() - started)


def _save_adapter(model: nn.Module, folder: Path, world: World, convert_to_lora: bool = False) -> None:
    """Rank 0 writes the whole adapter (under FSDP2 every rank first helps gather its shards).

    A PiSSA/OLoRA adapter is written for the original base (`convert_to_lora`, rank 2r), so the
    run's adapter/ works with `lorakit eval`/`generate` on the model as loaded; its checkpoints
    keep the trained rank-r factors, which resume needs.
    """
    from lorakit.formats.io import save_adapter

    whole = {n: full_tensor(p) for n, p in model.named_parameters() if p.requires_grad}
    if world.is_main:
        with whole_trainables(model, whole):
            save_adapter(model, folder, name=ADAPTER_NAME, convert_to_lora=convert_to_lora)


def _records(config: TrainConfig) -> tuple[list, list]:
    """The training and validation records, read and checked before anything slow happens."""
    data_format = cast(FormatChoice, config.format)  # checked by TrainConfig
    records, report = load_records(config.data, format=data_format, skip_bad=config.skip_bad_lines)
    if report.num_skipped:
        _say(f"skipped {report.num_skipped} bad line(s) in {config.data}")
    if config.val_data:
        val_records, _ = load_records(config.val_data, format=data_format, skip_bad=config.skip_bad_lines)
    elif config.val_fraction:
        records, val_records = split_validation(records, config.val_fraction, seed=config.seed)
    else:
        val_records = []
    return records, val_records


def _datasets(config: TrainConfig, tokenizer: Any, records: list,
              val_records: list) -> tuple[TokenizedDataset, TokenizedDataset | None, list]:
    train_set, build = build_dataset(records, tokenizer, max_length=config.max_length,
                                     train_on_prompt=config.train_on_prompt, pack=config.pack)
    _say(build.summary())
    val_set = None
    if val_records:
        val_set, _ = build_dataset(val_records, tokenizer, max_length=config.max_length,
                                   train_on_prompt=config.train_on_prompt)
    pairs = eval_pairs(val_records[: config.eval_exact_match], tokenizer) if config.eval_exact_match else []
    return train_set, val_set, pairs


def _announce(model: nn.Module, config: TrainConfig, train_set: TokenizedDataset) -> None:
    from lorakit.estimate.footprint import estimate_for_model

    _say(trainable_parameters_line(model))
    estimate = estimate_for_model(model, batch_size=config.batch_size, seq_len=config.max_length,
                                  gradient_checkpointing=config.gradient_checkpointing)
    _say(f"estimated memory: {estimate.summary()}")


def _take(iterator: Any, count: int) -> list:
    taken = []
    for _ in range(count):
        item = next(iterator, None)
        if item is None:
            break
        taken.append(item)
    return taken


def _is_main() -> bool:
    return not torch.distributed.is_available() or not torch.distributed.is_initialized() or \
        torch.distributed.get_rank() == 0


def _say(message: str) -> None:
    if _is_main():
        tqdm.write(message)
