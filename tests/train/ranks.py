"""Real ranks for the distributed tests: N processes with torchrun's variables, one gloo group, many jobs.

Starting a rank costs far more than training the tiny model: importing torch and transformers takes
about 9 CPU-seconds per process. So the ranks are forked from a forkserver that imports them once
(never forked from the threaded test process, whose thread pools a fork can leave locked), and
each start of N ranks runs a whole list of jobs, one after another:

- `Together(values)`: every rank calls `train` on these TrainConfig values (or `values[rank]`);
- `Alone(values)`: each rank trains as one process of its own (torchrun's variables hidden), on
  `values[rank]`, or sits this job out where that is None: one-process runs side by side;
- a picklable function of the rank (module-level, or a functools.partial of one) returning a line.

Each job's outcome on each rank is "ok" or the error's one line, plus what the rank printed.
"""

from __future__ import annotations

import contextlib
import faulthandler
import io
import multiprocessing as mp
import os
import queue
import socket
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

# What every rank imports: loaded once in the forkserver, shared by every rank forked from it.
# (Not matplotlib.pyplot: it would pick its backend here, before lorakit asks for Agg.)
PRELOAD = ["tests.train.ranks", "tests.train.helpers", "transformers.models.llama.modeling_llama",
           "torch.distributed.fsdp", "torch.nn.parallel", "lorakit.quant", "lorakit.formats.io"]
JOB_HANG_S = 90  # a job that takes longer has hung: the rank prints where it is, then ends
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Together:
    """One distributed run: every rank trains on `values` (a TrainConfig dict, or a list by rank)."""

    values: dict[str, Any] | list[dict[str, Any]]
    plot: bool = False
    """Draw loss.png (0.5 s of matplotlib on rank 0; test_train_loop checks the plot itself)."""


@dataclass(frozen=True)
class Alone:
    """One-process runs side by side: rank r trains `values[r]` alone, or sits this job out where it
    is None."""

    values: list[dict[str, Any] | None]


@dataclass(frozen=True)
class Outcome:
    status: str
    """"ok", the error's `Type: message`, or the line a function job returned."""
    printed: str


def run_ranks(world: int, jobs: list[Any]) -> list[list[Outcome]]:
    """Run `jobs` one after another on `world` forked ranks; outcomes[rank][job]."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)  # (no effect once the forkserver runs: it keeps its modules)
    results = context.Queue()
    processes = [context.Process(target=_rank_main, args=(rank, world, port, jobs, results))
                 for rank in range(world)]
    for process in processes:
        process.start()
    outcomes: dict[int, Any] = {}
    try:
        while len(outcomes) < world:
            try:
                rank, outcome = results.get(timeout=5)
                outcomes[rank] = outcome
            except queue.Empty:
                # A rank that died without reporting (faulthandler's exit, a crash in C) ends the wait.
                dead = [r for r, p in enumerate(processes)
                        if p.exitcode not in (None, 0) and r not in outcomes]
                assert not dead, f"rank(s) {dead} died (exit codes {[processes[r].exitcode for r in dead]})"
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():  # a hung rank must not outlive the test
                process.kill()
    for rank, outcome in outcomes.items():
        assert isinstance(outcome, list), f"rank {rank} crashed: {outcome}"
    return [outcomes[rank] for rank in range(world)]


def _rank_main(rank: int, world: int, port: int, jobs: list[Any], results: Any) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    outcomes = []
    try:
        for job in jobs:
            faulthandler.dump_traceback_later(JOB_HANG_S, exit=True)  # a hung rank shows where, then ends
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                status = _run_job(job, rank)
            outcomes.append(Outcome(status, printed.getvalue()))
        faulthandler.cancel_dump_traceback_later()
        results.put((rank, outcomes))
    except BaseException:
        results.put((rank, "crash: " + traceback.format_exc()))


def _run_job(job: Any, rank: int) -> str:
    from lorakit.train.distributed import OtherRankFailed

    if isinstance(job, Together):
        values = job.values[rank] if isinstance(job.values, list) else job.values
        plot = job.plot
    elif isinstance(job, Alone):
        values, plot = job.values[rank], False
        if values is None:
            return "sat out"
    else:
        return str(job(rank))
    try:
        with _hidden(TORCHRUN_VARIABLES if isinstance(job, Alone) else ()), _plots(plot):
            _train(values)
    except (ValueError, OtherRankFailed) as err:
        return f"{type(err).__name__}: {err}"
    return "ok"


def _train(values: dict[str, Any]) -> None:
    from lorakit.train import TrainConfig, train
    from tests.train.helpers import tiny_model_and_tokenizer

    model, tokenizer = tiny_model_and_tokenizer()
    # NF4 takes 16/32-bit inputs: a QLoRA run trains in float32, every other one in float64.
    train(TrainConfig(**values), model if values.get("quantize") else model.double(), tokenizer)


@contextlib.contextmanager
def _hidden(names: tuple[str, ...]) -> Iterator[None]:
    """Without torchrun's variables `train` is one process (the process group stays, unused)."""
    saved = {name: os.environ.pop(name) for name in names if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


@contextlib.contextmanager
def _plots(plot: bool) -> Iterator[None]:
    import lorakit.train.loop as loop

    real: Callable[..., Any] = loop.plot_losses
    if not plot:
        loop.plot_losses = lambda events, path: path  # type: ignore[assignment]
    try:
        yield
    finally:
        loop.plot_losses = real  # type: ignore[assignment]
