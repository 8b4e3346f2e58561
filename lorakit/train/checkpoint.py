"""Checkpoints that survive kill -9: written to a temporary folder, then renamed into place.

Files get the umask's normal permissions, like every folder lorakit writes.

A checkpoint folder `checkpoint-<step>` holds:
- `adapter/`: the adapter in the PEFT layout (usable on its own);
- `trainable.safetensors`: every trainable tensor by its name in the model (what resume loads);
- `optimizer.safetensors` + the optimizer's scalar state in `state.json`;
- `rng.safetensors`: the torch RNG states, so dropout continues exactly;
- `state.json`: step, data position, scheduler state and the run's settings (what resume
  checks), written last.
Only safetensors and JSON: nothing is ever unpickled.

A checkpoint does not depend on the world size: under FSDP2 the adapter and optimizer shards are
gathered whole before rank 0 writes them, and on resume rank 0 reads the files and hands them to
every rank, which keeps its own shard. So a run checkpointed on 2 ranks resumes on 1 or 4 (with
the same global batch it continues exactly), and only rank 0's machine needs the output folder.
The RNG states are kept per rank (`cpu` is rank 0's, `rank<N>.cpu` the others'); a rank that has
none in the file (more ranks than before) starts from rank 0's.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lorakit.formats.atomic import write_folder_atomically
from lorakit.train.distributed import World, broadcast
from lorakit.train.parallel import full_tensor, shard_like, whole_trainables

PREFIX = "checkpoint-"
STATE_KEYS = ("step", "data_position", "scheduler", "optimizer")


@dataclass(frozen=True)
class Restored:
    step: int
    data_position: dict[str, int]
    path: Path


def save_checkpoint(output_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, data_position: dict[str, int],
                    adapter_name: str, keep_last: int, settings: dict[str, Any] | None = None,
                    world: World | None = None) -> Path:
    """Write checkpoint-<step> atomically and keep only the newest `keep_last` checkpoints.

    In a distributed run every rank calls this (the shards are gathered); rank 0 alone writes.
    """
    world = world or World()
    trainable = {n: full_tensor(p).cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    tensors, optimizer_meta = _optimizer_to_flat(optimizer)
    rng = _gathered_rng_states(world)
    final = output_dir / f"{PREFIX}{step}"
    if not world.is_main:
        return final
    from lorakit.formats.io import save_adapter

    state = {"step": step, "data_position": data_position, "scheduler": scheduler.state_dict(),
             "optimizer": optimizer_meta, "settings": settings}

    def write(folder: Path) -> None:
        with whole_trainables(model, trainable):
            save_adapter(model, folder / "adapter", name=adapter_name)
        save_file(trainable, str(folder / "trainable.safetensors"))
        save_file(tensors, str(folder / "optimizer.safetensors"))
        save_file(rng, str(folder / "rng.safetensors"))
        (folder / "state.json").write_text(json.dumps(state, indent=1))

    # A resumed run reaching the same step again replaces that checkpoint whole.
    write_folder_atomically(final, write)
    for old in list_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    found = [p for p in output_dir.glob(f"{PREFIX}*")
             if p.name[len(PREFIX):].isdigit() and p.is_dir() and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def read_settings(path: Path) -> dict[str, Any] | None:
    """The settings checkpoint `path` was written with; None for checkpoints that predate the record."""
    settings = _read_state(path).get("settings")
    return settings if isinstance(settings, dict) else None


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, world: World | None = None) -> Restored:
    """Put the model's trainable tensors, the optimizer, scheduler and RNG back as they were.

    In a distributed run every rank calls this: rank 0 reads the files, every rank keeps its part.
    """
    world = world or World()
    files = None
    if world.is_main:
        files = {"state": _read_state(path)}
        for name in ("trainable", "optimizer", "rng"):
            try:
                files[name] = load_file(str(path / f"{name}.safetensors"))
            except (OSError, SafetensorError) as err:
                raise _damaged(path, f"{name}.safetensors: {err}") from None
    files = broadcast(world, files)
    assert files is not None
    state, trainable = files["state"], files["trainable"]
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(trainable) != expected:
        missing, extra = sorted(expected - set(trainable)), sorted(set(trainable) - expected)
        raise ValueError(f"checkpoint {path} does not fit this run's adapter (missing {missing[:3]}, "
                         f"unexpected {extra[:3]}); was it written with other LoRA settings?")
    with torch.no_grad():
        for name, tensor in trainable.items():
            params[name].copy_(shard_like(tensor, params[name]))
    optimizer.load_state_dict(_optimizer_from_flat(files["optimizer"], state["optimizer"], optimizer))
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_states(files["rng"], world.rank)
    return Restored(step=int(state["step"]), data_position=state["data_position"], path=path)


def _read_state(path: Path) -> dict[str, Any]:
    """state.json of checkpoint `path`, with the keys resume reads."""
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as err:  # ValueError: not JSON, or not UTF-8
        raise _damaged(path, f"state.json: {err}") from None
    missing = [key for key in STATE_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise _damaged(path, f"state.json lacks {', '.join(missing)}")
    return state


def _damaged(path: Path, problem: str) -> ValueError:
    """A checkpoint that cannot be read (a disk fault, a hand edit): say which, and the way on."""
    older = [p.name for p in list_checkpoints(path.parent) if p.name != path.name]
    way = f"delete it to resume from {older[-1]}" if older else "delete it to start over"
    return ValueError(f"checkpoint {path} is damaged ({problem}); {way}, or pass --overwrite to start the "
                      "run over")


def _optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    full = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in full["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):  # whole, also from FSDP2 shards (every rank gathers)
                tensors[f"{index}.{key}"] = full_tensor(value).cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": full["param_groups"], "scalars": scalars}


def _optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                         optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        param = params[int(index)] if int(index) < len(params) else None
        # Moments shaped as their parameter take its layout (this rank's shard under FSDP2).
        if param is not None and value.shape == param.shape and value.dim() > 0:
            value = shard_like(value, param)
        state.setdefault(int(index), {})[name] = value
    for index, entry in meta["scalars"].items():
        state.setdefault(int(index), {}).update(entry)
    return {"state": state, "param_groups": meta["param_groups"]}


def _rng_states() -> dict[str, torch.Tensor]:
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            states[f"cuda.{index}"] = cuda_state
    return states


def _gathered_rng_states(world: World) -> dict[str, torch.Tensor]:
    """Rank 0's states under their plain names, rank N's as `rank<N>.<name>` (on rank 0)."""
    if not world.distributed:
        return _rng_states()
    import torch.distributed as dist

    gathered: list[Any] = [None] * world.world_size
    dist.all_gather_object(gathered, _rng_states())
    states = dict(gathered[0])
    for rank, theirs in enumerate(gathered[1:], start=1):
        states.update({f"rank{rank}.{name}": value for name, value in theirs.items()})
    return states


def _set_rng_states(states: dict[str, torch.Tensor], rank: int = 0) -> None:
    prefix = f"rank{rank}."
    if rank and prefix + "cpu" in states:
        states = {name[len(prefix):]: value for name, value in states.items() if name.startswith(prefix)}
    torch.set_rng_state(states["cpu"])
    cuda = [states[k] for k in sorted(states) if k.startswith("cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
