"""Several processes, one run: the process group, the few collectives the loop needs, and the launcher.

torchrun (torch.distributed.run) starts the ranks and sets RANK, WORLD_SIZE and LOCAL_RANK; `start`
joins them into one process group (NCCL on CUDA, gloo on CPU). Without those variables nothing
changes: `World()` is one process and every helper here is a no-op. The process group stays until
the process exits.

Rank 0 alone claims the output folder, prints and writes; `on_main` runs such work there and hands
its error to every rank, so a refused folder ends the whole job with rank 0's message, not a hang.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from lorakit.train.config import TrainConfig

T = TypeVar("T")
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


class OtherRankFailed(RuntimeError):
    """Another rank (rank 0) failed and has said why; this rank ends quietly."""


@dataclass(frozen=True)
class World:
    """This process's place in the job; the default is one process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    strategy: str | None = None
    """ddp or fsdp; None for one process."""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """The rank that prints and writes."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.strategy is not None

    def sum(self, value: float) -> float:
        """`value` summed over all ranks (in float64, so token counts stay exact)."""
        if not self.distributed:
            return value
        total = torch.tensor(float(value), dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return float(total)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def under_torchrun() -> bool:
    """True in a process that torchrun (or a launcher setting the same variables) started."""
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def start(config: TrainConfig) -> World:
    """Join the job's process group when torchrun started this process; check the settings agree.

    Raises:
        ValueError: fsdp asked without torchrun, NCCL asked on a machine without CUDA, a bad
            device for this rank, or ranks started with different settings.
    """
    settings = config.distributed
    if not under_torchrun():
        if settings is not None and settings.strategy == "fsdp":
            raise ValueError("--distributed fsdp needs several processes: pass --nproc N (nproc: N in the "
                             "distributed: section), or start with torchrun --nproc-per-node N -m lorakit "
                             "train ...")
        return World(device=_device(config.device, 0))
    _end_with_the_launcher()
    strategy = settings.strategy if settings is not None else "ddp"
    local_rank = int(os.environ["LOCAL_RANK"])
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
    if settings is not None and settings.nproc is not None and settings.nproc != local_size:
        raise ValueError(f"nproc={settings.nproc}, but the launcher started {local_size} processes on this "
                         "machine; drop nproc under torchrun, or make the two agree")
    device = _device(config.device, local_rank)
    backend = settings.backend if settings is not None else "auto"
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ValueError(f"backend 'nccl' needs CUDA GPUs, and this run's device is {device} "
                         f"(CUDA available: {torch.cuda.is_available()}); use backend gloo or auto")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if strategy == "fsdp" and device.type == "cpu":
        return_gathered_memory_promptly()
    timeout = settings.timeout_s if settings is not None else 1800
    if not dist.is_initialized():
        # The group lives until the process ends: a second train() in the same process reuses it
        # (torch could not re-create one on the same rendezvous port after FSDP2 has used it).
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
        atexit.register(_leave)
    world = World(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                  strategy=strategy, device=device)
    check_same_settings(world, config)
    return world


def return_gathered_memory_promptly() -> None:
    """Have glibc's malloc serve every allocation of 1 MiB or more with a mapping of its own (FSDP2 on a CPU).

    FSDP2 gathers each unit's weights into a new buffer before the unit computes and frees it after,
    in forward and again in backward. glibc raises its mmap threshold to the size of the first such
    buffer it frees (up to 32 MiB), so the later ones come from the heap, where they are freed between
    activations that are still alive: the memory stays with the process and the heap grows step after
    step (on the default model, 2 CPU ranks under FSDP2 ended 1 GiB above DDP; docs/distributed.md).
    A fixed threshold, what MALLOC_MMAP_THRESHOLD_ sets, gives each buffer back when it is freed.
    No-op without glibc, or when that variable is set.
    """
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc" or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    m_mmap_threshold = -3  # from <malloc.h>
    ctypes.CDLL(None).mallopt(m_mmap_threshold, 1 << 20)


def _end_with_the_launcher() -> None:
    """Have Linux SIGKILL this rank when the process that started it dies.

    torchrun starts every rank in a session of its own, so a SIGKILL of the launcher (`kill -9` of
    `lorakit train --nproc N`, or of torchrun) would leave the ranks running on their own, still
    training and writing into the output folder, and holding its lock. Elsewhere than Linux: no-op.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1  # from <linux/prctl.h>
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def settings_hash(config: TrainConfig) -> str:
    """A short fingerprint of every setting, the same on every machine for the same settings."""
    text = json.dumps(config.to_dict(), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_same_settings(world: World, config: TrainConfig) -> None:
    """Every rank must run the same settings; a rank that differs is named with each difference.

    Raises:
        ValueError: on every rank, when any rank's settings differ from rank 0's.
    """
    if not world.distributed:
        return
    gathered: list[Any] = [None] * world.world_size
    dist.all_gather_object(gathered, (settings_hash(config), config.to_dict()))
    first_hash, first = gathered[0]
    for rank, (digest, values) in enumerate(gathered):
        if digest != first_hash:
            keys = sorted(k for k in set(first) | set(values) if first.get(k) != values.get(k))
            differences = ", ".join(f"{k}={values.get(k)!r} (rank 0: {first.get(k)!r})" for k in keys)
            raise ValueError(f"ranks started with different settings (hash {digest} vs {first_hash}): "
                             f"rank {rank} has {differences or 'other settings'}; start every rank with the "
                             "same command and files")


def on_main(world: World, work: Callable[[], T]) -> T | None:
    """Run `work` on rank 0 only; an error there is raised on every rank.

    Rank 0 raises the error itself; the other ranks raise OtherRankFailed with its message, so
    that the job ends at once instead of waiting in the next collective. Returns `work`'s result
    on rank 0, None elsewhere.
    """
    result: T | None = None
    error: Exception | None = None
    if world.is_main:
        try:
            result = work()
        except Exception as err:  # handed to the other ranks below, then raised here
            error = err
    if world.distributed:
        box: list[Any] = [None if error is None else f"{type(error).__name__}: {error}"]
        dist.broadcast_object_list(box, src=0)
        if box[0] is not None and not world.is_main:
            raise OtherRankFailed(f"rank 0 failed: {box[0]}")
    if error is not None:
        raise error
    return result


def broadcast(world: World, value: T) -> T:
    """Rank 0's `value` on every rank (any picklable object; sent over the process group, never stored)."""
    if not world.distributed:
        return value
    box: list[Any] = [value if world.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def launch(nproc: int, argv: list[str]) -> int:
    """Start `python -m lorakit <argv>` as `nproc` ranks under torchrun on this machine; its exit code.

    torchrun's agent runs in this process (a separate launcher process would import torch once more,
    seconds of start-up per job); the ranks are its children, and end with it.
    """
    from lorakit.train.launch import main

    return main([str(nproc), *argv])


def _device(asked: str, local_rank: int) -> torch.device:
    """The device of this rank: `auto` is cuda:<local rank> when CUDA is present, else the CPU."""
    if asked == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    from lorakit.hf.devices import resolve_device

    device = resolve_device(asked)  # "cuda:x" is one line naming the accepted spellings, not torch's error
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", local_rank)
    return device
