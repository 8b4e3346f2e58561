"""The output folder of a training run: claimed by one run, never mixed with another run's work.

At the start, `claim_run_folder`:
- refuses a path that is a file, and takes the folder's lock (a second live run is refused);
- removes temporary folders left by interrupted writes whose writer is gone;
- decides what happens to a previous run found there: `--resume` continues it when the settings
  that shape the adapter, the optimizer and the data order are the same (each difference is
  named); `--overwrite` deletes it; otherwise the folder is refused;
- records this run's settings in `run.json`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorakit.formats.atomic import check_parent, remove_stale_temps, write_file_atomically
from lorakit.train.checkpoint import list_checkpoints, read_settings
from lorakit.train.config import TrainConfig
from lorakit.train.run_lock import RunLock

RUN_FILE = "run.json"
# What a run writes; --overwrite deletes exactly these (other files in the folder stay).
RUN_OUTPUTS = ("adapter", "metrics.jsonl", "loss.png", RUN_FILE)
# Settings a checkpoint must share with the run that resumes it: they shape the adapter and the
# optimizer state (r, targets, ...) or decide which examples come next (data, global batch, seed, ...).
# The global batch (rows per optimizer step over all ranks) is compared, not its factors: 2 ranks x
# batch 4 resumes as 1 rank x batch 8 or x batch 4 x accumulation 2, and continues exactly.
RESUME_SETTINGS = ("model", "quantize", "r", "alpha", "dropout", "targets", "use_rslora",
                   "share_dropout_mask", "use_dora", "init", "optimizer", "loraplus_ratio",
                   "loraplus_lr_embedding",
                   "data", "val_data", "val_fraction", "format", "max_length", "pack", "train_on_prompt",
                   "global_batch", "seed")
# Recorded too, for people reading run.json, but free to change on resume.
RECORDED_ONLY = ("batch_size", "grad_accum", "world_size")


@dataclass
class RunFolder:
    """A claimed output folder; `release()` gives it back."""

    path: Path
    created: bool
    """The folder did not exist before this run."""
    resume_from: Path | None
    """The checkpoint to continue from, when resuming."""
    lock: RunLock

    def release(self, failed: bool = False) -> None:
        """Give the folder back; after a failure that left nothing of use, leave no trace of this run."""
        if failed and not list_checkpoints(self.path) and not (self.path / "adapter").exists():
            metrics = self.path / "metrics.jsonl"
            if not metrics.exists() or not metrics.read_text().strip():
                for name in (RUN_FILE, "metrics.jsonl"):
                    (self.path / name).unlink(missing_ok=True)
        self.lock.release()
        if failed and self.created and not any(self.path.iterdir()):
            self.path.rmdir()


def run_settings(config: TrainConfig, world_size: int = 1) -> dict[str, Any]:
    """The settings a checkpoint records, as JSON values, for a run on `world_size` ranks."""
    values = {**config.to_dict(), "global_batch": config.global_batch(world_size), "world_size": world_size}
    return json.loads(json.dumps({key: values[key] for key in RESUME_SETTINGS + RECORDED_ONLY}))


def claim_run_folder(config: TrainConfig, say: Callable[[str], None], world_size: int = 1) -> RunFolder:
    """Take `config.output_dir` for this run on `world_size` ranks (see the module's docstring).

    Only one process claims the folder: in a distributed run, rank 0.

    Raises:
        ValueError: the path is a file or cannot be created; the folder holds another run and
            neither resume nor overwrite was asked; resume with other settings.
        RunFolderBusy: another live run holds the folder.
    """
    path = Path(config.output_dir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"output_dir {path} is a file; give a folder (it is created when missing)")
    # data.jsonl/sub: merge's and export's words, not mkdir's "Not a directory"
    check_parent(path, "output_dir")
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"cannot create output_dir {path}: {err.strerror or err}") from None
    lock = RunLock(path)
    try:
        note = lock.acquire()
    except BaseException:
        if created:
            # rmdir, never rmtree: the run holding the lock may have created the folder just now.
            with contextlib.suppress(OSError):
                path.rmdir()
        raise
    folder = RunFolder(path=path, created=created, resume_from=None, lock=lock)
    try:
        if note:
            say(note)
        for temp in remove_stale_temps(path):
            say(f"removed {temp.name}, left by an interrupted write")
        folder.resume_from = _settle_previous_run(path, config, say, world_size)
        _write_json(path / RUN_FILE, {"settings": run_settings(config, world_size), "pid": os.getpid()})
    except BaseException:
        folder.release(failed=True)
        raise
    return folder


def _previous_run_outputs(path: Path) -> list[Path]:
    """What an earlier run left in `path`: its adapter, checkpoints, metrics, plot and settings."""
    found = [path / name for name in RUN_OUTPUTS if (path / name).exists()]
    return found + sorted(path.glob("checkpoint-*"))


def _settle_previous_run(path: Path, config: TrainConfig, say: Callable[[str], None],
                         world_size: int) -> Path | None:
    found = _previous_run_outputs(path)
    if config.overwrite:
        for item in found:
            shutil.rmtree(item) if item.is_dir() and not item.is_symlink() else item.unlink()
        if found:
            say(f"--overwrite: deleted the previous run in {path} ({_describe(found)})")
        return None
    checkpoints = list_checkpoints(path)
    if config.resume:
        source = checkpoints[-1] if checkpoints else path / RUN_FILE
        recorded = read_settings(source) if checkpoints else _read_run_settings(path / RUN_FILE)
        if recorded is None and checkpoints:
            say(f"{source.name} records no settings (written by an older lorakit); they are not checked")
        differences = _differences(recorded or {}, run_settings(config, world_size))
        if differences:
            raise ValueError(f"cannot resume the run in {path}: " + "; ".join(
                f"{source.name} has {key}={old!r}, this run asks {key}={new!r}"
                for key, old, new in differences)
                + ". Resume with the same settings, or pass --overwrite to start over")
        if not checkpoints and (path / "adapter").exists():
            # Starting fresh would replace a finished run's adapter with a new one.
            raise ValueError(f"cannot resume the run in {path}: it has no checkpoint (it was trained "
                             "without --save-every), only its finished adapter/, which a fresh start would "
                             "replace. Pass --overwrite to start over, or choose another --output-dir")
        if not checkpoints:
            say(f"--resume: no checkpoint in {path}; starting fresh")
        return checkpoints[-1] if checkpoints else None
    if found:
        raise ValueError(f"output folder {path} holds another run ({_describe(found)}); pass --resume to "
                         "continue it, --overwrite to delete it and start over, or choose another "
                         "--output-dir")
    return None


def _differences(recorded: dict[str, Any], asked: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    if "global_batch" not in recorded and "batch_size" in recorded and "grad_accum" in recorded:
        # Written before runs had several ranks: one process.
        recorded = {**recorded, "global_batch": recorded["batch_size"] * recorded["grad_accum"]}
    return [(key, recorded[key], asked[key]) for key in RESUME_SETTINGS
            if key in recorded and recorded[key] != asked[key]]


def _read_run_settings(file: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(file.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    settings = value.get("settings") if isinstance(value, dict) else None
    return settings if isinstance(settings, dict) else None


def _describe(found: list[Path]) -> str:
    checkpoints = [p for p in found if p.name.startswith("checkpoint-")]
    names = [p.name + ("/" if p.is_dir() else "") for p in found if p not in checkpoints]
    if checkpoints:
        names.append(f"{len(checkpoints)} checkpoint(s)")
    return ", ".join(names)


def _write_json(file: Path, value: dict[str, Any]) -> None:
    # Atomic: a reader sees the old file or the new one, never half of one.
    text = json.dumps(value, indent=1) + "\n"
    write_file_atomically(file, lambda tmp: tmp.write_text(text))

