"""train(): LoRA fine-tuning from a JSONL file to a PEFT-layout adapter, resumable at any moment.

One process, or several under torchrun (DDP or FSDP2, see distributed.py and parallel.py): each
rank reads its own share of every step, the loss is the mean over all label tokens of the global
batch, and rank 0 alone claims the output folder, prints and writes.

The run reads top to bottom: `make_plan` checks the settings and reads the data before the output
folder is claimed, `prepare` (prepare.py) builds the model, data and optimizer into a `Run`, `_steps` trains,
and `_finish` evaluates and saves the adapter.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lorakit.core.config import is_svd_init
from lorakit.data import (
    Batch,
    DataPosition,
    batches,
)
from lorakit.train.checkpoint import list_checkpoints, save_checkpoint
from lorakit.train.config import TrainConfig
from lorakit.train.distributed import World, broadcast, on_main, start
from lorakit.train.evaluate import ExactMatch, evaluation_loss, exact_match_score
from lorakit.train.metrics import MetricsLog, plot_losses
from lorakit.train.parallel import full_tensor, no_sync, whole_trainables
from lorakit.train.prepare import Run, make_plan, prepare, say
from lorakit.train.run_folder import claim_run_folder, run_settings

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
    plan = make_plan(config, world)
    folder = on_main(world, lambda: claim_run_folder(config, partial(say, world), world.world_size))
    resume_from = broadcast(world, folder.resume_from if folder is not None else None)
    try:
        run = prepare(plan, resume_from, model, tokenizer)
        result = _finish(run, _steps(run), started)
    except KeyboardInterrupt:
        if folder is not None:
            kept = list_checkpoints(folder.path)
            if kept:
                say(world, f"interrupted; {kept[-1]} is kept: run the same command with --resume to "
                     "continue from it")
            else:
                say(world, "interrupted before the first checkpoint (--save-every N keeps progress); "
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


def _steps(run: Run) -> _Progress:
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


def _backward(run: Run, window: list[Batch], autocast: contextlib.AbstractContextManager[Any]) -> float:
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


def _update(run: Run) -> tuple[float, dict[str, float]]:
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


def _evaluate_and_save(run: Run, progress: _Progress, bar: tqdm[Any], position: DataPosition) -> None:
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


def _finish(run: Run, progress: _Progress, started: float) -> TrainResult:
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


def _take(iterator: Any, count: int) -> list:
    taken = []
    for _ in range(count):
        item = next(iterator, None)
        if item is None:
            break
        taken.append(item)
    return taken
