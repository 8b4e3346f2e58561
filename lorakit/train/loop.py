"""train(): LoRA fine-tuning from a JSONL file to a PEFT-layout adapter, resumable at any moment.

One process, or several under torchrun (DDP or FSDP2, see distributed.py and parallel.py): each
rank reads its own share of every step, the loss is the mean over all label tokens of the global
batch, and rank 0 alone claims the output folder, prints and writes.

The run reads top to bottom: `_plan` checks the settings and reads the data before the output
folder is claimed, `_prepare` builds the model, data and optimizer into a `_Run`, `_steps` trains,
and `_finish` evaluates and saves the adapter.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from tqdm.auto import tqdm

from lorakit.core.adapters import trainable_parameters_line
from lorakit.core.config import LoraConfig, is_svd_init
from lorakit.core.inject import add_adapter
from lorakit.data import (
    Batch,
    DataPosition,
    EvalPair,
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


@dataclass(frozen=True)
class _Plan:
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
class _Data:
    train_set: TokenizedDataset
    val_set: TokenizedDataset | None
    """None without validation records."""
    pairs: list[EvalPair]
    """Prompts and references for exact match: the first eval_exact_match validation records."""


@dataclass(frozen=True)
class _Run:
    """What `_prepare` builds for `_steps` and `_finish`."""

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
    data: _Data
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


@dataclass
class _Progress:
    """How far `_steps` got: `_finish` reports it."""

    step: int
    train_loss: float
    """The last step's loss (NaN before any step; a resumed run starts from the last one recorded)."""
    val_loss: float | None = None
    """The last validation loss, None until one is measured."""


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
    plan = _plan(config, world)
    folder = on_main(world, lambda: claim_run_folder(config, partial(_say, world), world.world_size))
    resume_from = broadcast(world, folder.resume_from if folder is not None else None)
    try:
        run = _prepare(plan, resume_from, model, tokenizer)
        result = _finish(run, _steps(run), started)
    except KeyboardInterrupt:
        if folder is not None:
            kept = list_checkpoints(folder.path)
            if kept:
                _say(world, f"interrupted; {kept[-1]} is kept: run the same command with --resume to "
                     "continue from it")
            else:
                _say(world, "interrupted before the first checkpoint (--save-every N keeps progress); "
                     "a rerun starts over")
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


def _plan(config: TrainConfig, world: World) -> _Plan:
    lora = config.lora_config()
    accumulation = config.accumulation(world.world_size)  # a global batch that does not split: an error now
    records, val_records = _records(config, world)  # data problems show before any slow work
    return _Plan(config=config, world=world, lora=lora, accumulation=accumulation, records=records,
                 val_records=val_records)


def _prepare(plan: _Plan, resume_from: Path | None, model: nn.Module | None, tokenizer: Any) -> _Run:
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
        _say(world, f"resumed from {restored.path} (step {step})")
    output_dir = Path(config.output_dir)
    metrics = (MetricsLog(output_dir / "metrics.jsonl", resume_step=step if resume_from is not None else None,
                          say=partial(_say, world)) if world.is_main else None)
    # Evaluation and generation run on every rank alike: under FSDP2 every forward gathers weights.
    evaluated = wrapped if world.strategy == "fsdp" else model
    return _Run(config=config, world=world, output_dir=output_dir, model=model, tokenizer=tokenizer,
                wrapped=wrapped, evaluated=evaluated, device=device, data=data, params=params,
                optimizer=optimizer, scheduler=scheduler, total_steps=total_steps,
                accumulation=plan.accumulation, first_step=step, position=position, metrics=metrics)


def _load_model(config: TrainConfig, world: World, model: nn.Module | None,
                tokenizer: Any) -> tuple[nn.Module, Any]:
    """The given model and tokenizer, or `config.model` loaded; on this rank's device when distributed."""
    if model is None or tokenizer is None:
        from lorakit.hf import load_model

        device_name = str(world.device) if world.distributed else config.device
        model, tokenizer = load_model(config.model, dtype=config.dtype, device=device_name)
    if world.distributed:
        model.to(world.device)
    return model, tokenizer


def _add_adapter_and_wrap(model: nn.Module, plan: _Plan) -> nn.Module:
    """Quantize the base if asked, add the adapter, and wrap the model for the ranks; the loss module."""
    config, world = plan.config, plan.world
    if config.quantize:
        from lorakit.quant import quantize_model

        quantize_model(model, config.quantize)
    add_adapter(model, plan.lora)
    fuse_for_training(model)  # MLPs and q/k/v's A sides as fused functions: same values, less work
    if config.gradient_checkpointing:
        enable_checkpointing(model)
    if world.is_main:
        _announce(model, config, world)
    wrapped = wrap(model, world)  # the loss module, under DDP or FSDP2 when distributed
    if world.distributed:
        _say(world, f"{world.strategy} on {world.world_size} ranks ({world.device.type}): "
             f"{config.batch_size} rows x {plan.accumulation} micro-batch(es) x {world.world_size} ranks "
             f"= {config.global_batch(world.world_size)} rows per step")
    if world.strategy == "fsdp":
        local, whole = base_bytes(model)
        _say(world, f"base weights per rank: {local / 2**30:.3f} GiB (of {whole / 2**30:.3f}; "
             f"{local:,d} of {whole:,d} bytes)")
    return wrapped


def _steps(run: _Run) -> _Progress:
    """Train from the run's first step to its last, or until the data runs out (epochs done)."""
    config, world = run.config, run.world
    micro_batches = batches(run.data.train_set, config.batch_size, seed=config.seed, start=run.position,
                            epochs=None if config.max_steps else config.epochs, rank=world.rank,
                            world_size=world.world_size)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if run.device.type == "cuda"
                else contextlib.nullcontext())
    run.model.train()
    bar = tqdm(total=run.total_steps, initial=run.first_step, desc="training", unit="step",
               disable=not config.progress or not world.is_main, dynamic_ncols=True)
    progress = _Progress(step=run.first_step, train_loss=_last_train_loss(run.metrics))
    while progress.step < run.total_steps:
        # Every rank gets the same number of micro-batches (the sampler sees to it).
        window = [b.to(run.device) for b in _take(micro_batches, run.accumulation)]
        if not window:
            break  # the data ran out (epochs done)
        tick = time.perf_counter()
        loss = _backward(run, window, autocast)
        if not math.isfinite(loss):  # the same decision on every rank: the loss is summed over them
            kept = list_checkpoints(run.output_dir)
            raise TrainingDiverged(
                f"loss became {loss} at step {progress.step + 1}; stopped. Last good checkpoint: "
                f"{kept[-1] if kept else 'none (set save_every)'}. Try a lower learning rate.")
        lr, extra = _update(run)
        progress.step += 1
        progress.train_loss = loss
        seconds = time.perf_counter() - tick
        tokens = int(world.sum(sum(int(b.inputs["input_ids"].numel()) for b in window)))
        if run.metrics is not None:
            run.metrics.write(kind="train", step=progress.step, loss=loss, lr=lr,
                              tokens_per_s=tokens / seconds, seconds=seconds, **extra)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens / seconds:.0f}")
        bar.update(1)
        _evaluate_and_save(run, progress, bar, window[-1].position)
    bar.close()
    return progress


def _last_train_loss(metrics: MetricsLog | None) -> float:
    """A run resumed at its last step trains no more: its loss is the last one recorded."""
    events = metrics.events() if metrics is not None else []
    return next((e["loss"] for e in reversed(events) if e.get("kind") == "train"), float("nan"))


def _backward(run: _Run, window: list[Batch], autocast: contextlib.AbstractContextManager[Any]) -> float:
    """Forward and backward over one step's micro-batches; the step's loss, summed over the ranks."""
    # The step's label tokens over all ranks and micro-batches: each micro-loss is a share of
    # the global token mean, so ranks with more padding do not weigh more (parallel.py).
    label_tokens = int(run.world.sum(sum(b.num_label_tokens for b in window)))
    loss_value = 0.0
    for index, batch in enumerate(window):
        # Gradients are reduced over the ranks once per step, after the last micro-batch.
        with no_sync(run.wrapped, skip=index < len(window) - 1), autocast:
            loss = run.wrapped(batch.inputs, num_items=label_tokens)
        loss.backward()
        loss_value += float(loss.detach())
    return run.world.sum(loss_value)  # the same value on every rank


def _update(run: _Run) -> tuple[float, dict[str, float]]:
    """Clip the gradient if asked, then step; the learning rate this step used, and the gradient norm."""
    extra = {}
    if run.config.max_grad_norm is not None:
        # The norm of the global gradient (FSDP2: a DTensor reduced over the shards).
        norm = torch.nn.utils.clip_grad_norm_(run.params, run.config.max_grad_norm)
        extra["grad_norm"] = float(full_tensor(norm))
    lr = float(run.scheduler.get_last_lr()[0])  # the rate this step used (A's, with LoRA+)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return lr, extra


def _evaluate_and_save(run: _Run, progress: _Progress, bar: tqdm[Any], position: DataPosition) -> None:
    """Measure the validation loss every eval_every steps; write a checkpoint every save_every steps."""
    config, step, val_set = run.config, progress.step, run.data.val_set
    if val_set is not None and config.eval_every and step % config.eval_every == 0:
        progress.val_loss = evaluation_loss(run.evaluated, val_set, config.batch_size, run.device)
        if run.metrics is not None:
            run.metrics.write(kind="eval", step=step, val_loss=progress.val_loss)
            bar.write(f"step {step}: validation loss {progress.val_loss:.4f}")
    if config.save_every and step % config.save_every == 0:
        save_checkpoint(run.output_dir, step, run.model, run.optimizer, run.scheduler, position.to_dict(),
                        ADAPTER_NAME, config.keep_last, settings=run_settings(config, run.world.world_size),
                        world=run.world)


def _finish(run: _Run, progress: _Progress, started: float) -> TrainResult:
    """The final validation loss (unless the last step measured it) and exact match; save the adapter."""
    config, step, val_set, val_loss = run.config, progress.step, run.data.val_set, progress.val_loss
    if val_set is not None and (val_loss is None or not config.eval_every or step % config.eval_every):
        val_loss = evaluation_loss(run.evaluated, val_set, config.batch_size, run.device)
        if run.metrics is not None:
            run.metrics.write(kind="eval", step=step, val_loss=val_loss)
    match = None
    if run.data.pairs:
        match = exact_match_score(run.evaluated, run.tokenizer, run.data.pairs, config.max_new_tokens)
        if run.metrics is not None:
            run.metrics.write(kind="exact_match", step=step, exact_match=match.score, n=len(run.data.pairs))
    adapter_dir = run.output_dir / "adapter"
    plot_path = run.output_dir / "loss.png"
    _save_adapter(run.model, adapter_dir, run.world, convert_to_lora=is_svd_init(config.init))
    if run.metrics is not None:
        plot_path = plot_losses(run.metrics.events(), plot_path)
    return TrainResult(adapter_dir=adapter_dir, metrics_path=run.output_dir / "metrics.jsonl",
                       plot_path=plot_path, steps=step, train_loss=progress.train_loss, val_loss=val_loss,
                       exact_match=match, seconds=time.perf_counter() - started)


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


def _records(config: TrainConfig, world: World) -> tuple[list, list]:
    """The training and validation records, read and checked before anything slow happens."""
    data_format = cast(FormatChoice, config.format)  # checked by TrainConfig
    records, report = load_records(config.data, format=data_format, skip_bad=config.skip_bad_lines)
    if report.num_skipped:
        _say(world, f"skipped {report.num_skipped} bad line(s) in {config.data}")
    if config.val_data:
        val_records, _ = load_records(config.val_data, format=data_format, skip_bad=config.skip_bad_lines)
    elif config.val_fraction:
        records, val_records = split_validation(records, config.val_fraction, seed=config.seed)
    else:
        val_records = []
    return records, val_records


def _datasets(config: TrainConfig, world: World, tokenizer: Any, records: list, val_records: list) -> _Data:
    train_set, build = build_dataset(records, tokenizer, max_length=config.max_length,
                                     train_on_prompt=config.train_on_prompt, pack=config.pack)
    _say(world, build.summary())
    val_set = None
    if val_records:
        val_set, _ = build_dataset(val_records, tokenizer, max_length=config.max_length,
                                   train_on_prompt=config.train_on_prompt)
    pairs = eval_pairs(val_records[: config.eval_exact_match], tokenizer) if config.eval_exact_match else []
    return _Data(train_set=train_set, val_set=val_set, pairs=pairs)


def _announce(model: nn.Module, config: TrainConfig, world: World) -> None:
    from lorakit.estimate.footprint import estimate_for_model

    _say(world, trainable_parameters_line(model))
    estimate = estimate_for_model(model, batch_size=config.batch_size, seq_len=config.max_length,
                                  gradient_checkpointing=config.gradient_checkpointing)
    _say(world, f"estimated memory: {estimate.summary()}")


def _take(iterator: Any, count: int) -> list:
    taken = []
    for _ in range(count):
        item = next(iterator, None)
        if item is None:
            break
        taken.append(item)
    return taken


def _say(world: World, message: str) -> None:
    """Print `message` on rank 0 alone (through tqdm, so an open progress bar stays whole)."""
    if world.is_main:
        tqdm.write(message)
