"""Atomic writes of files and folders, the temporaries they use, and cleaning up after a killed writer.

Every write that matters follows one rule, for a file (`write_file_atomically`: run.json, a GGUF,
metrics.jsonl, the loss plot) or a folder (`write_folder_atomically`: an adapter, a checkpoint, a
merged model): the result is written into a temporary beside its target, named
`.NAME.tmp-PID-HEX` (the writer's PID, then a random suffix), given the modes the umask asks for
(0o666 / 0o777 minus the umask, since safetensors creates its files private, 0600), flushed to disk
and renamed into place, so a reader sees the old version or the new one, never a mix or a part.
A write that fails removes its temporary; a writer killed mid-way leaves it behind, and
`remove_stale_temps` deletes those whose writer is gone and never one whose writer still runs.

Only the standard library is imported here, so every layer can use it.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path

# The temporary folders lorakit writers create, each with the writer's PID in a named group:
_TEMP_PATTERNS = (
    # write_folder_atomically: `.adapter.tmp-1234-9f8e7d6c`, `.adapter.old-1234-9f8e7d6c`;
    # write_file_atomically: `.run.json.tmp-1234-9f8e7d6c` (a file)
    re.compile(r"\.(?P<name>.+)\.(?P<kind>[a-z]+)-(?P<pid>\d+)-[0-9a-f]{8}"),
    # train/checkpoint.py before it used this module: `.tmp-checkpoint-200-1234`
    re.compile(r"\.tmp-(?P<name>checkpoint-\d+)-(?P<pid>\d+)"),
    # hf/saving.py before it used this module: `.partial-merged-1234`
    re.compile(r"\.partial-(?P<name>.+)-(?P<pid>\d+)"),
)


def fresh_temp_folder(folder: Path, kind: str) -> Path:
    """Create and return an empty folder `.NAME.KIND-PID-HEX` beside `folder` (NAME is folder's name).

    Not tempfile.mkdtemp: its folders are private (0700), and this one becomes the result.

    Raises:
        ValueError: `kind` is not lowercase letters (remove_stale_temps could not recognise it).
    """
    fresh = _temp_name(folder, kind)
    fresh.mkdir()
    return fresh


def _temp_name(target: Path, kind: str) -> Path:
    if not re.fullmatch(r"[a-z]+", kind):
        raise ValueError(f"temporary folder kind must be lowercase letters, got {kind!r}")
    return target.parent / f".{target.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def check_parent(path: Path, name: str = "") -> None:
    """Refuse `path` when a folder on its way is a file (`train.jsonl/out`), before any slow work.

    Args:
        path: a file or folder to be created.
        name: how the caller's user named it (e.g. "--output"), for the message.

    Raises:
        ValueError: the nearest existing ancestor of `path` is not a folder.
    """
    for parent in path.parents:
        if os.path.lexists(parent):
            if not parent.is_dir():
                raise ValueError(f"{name + ' ' if name else ''}{path} cannot be created: {parent} is a file, "
                                 "not a folder; choose a path in a folder")
            return


def write_file_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Run `write` into a temporary file beside `path`, then rename it over `path`.

    The temporary file (`.NAME.tmp-PID-HEX`, created empty) is given the umask's normal mode and
    flushed to disk before the rename; a `write` that raises leaves `path` as it was (old content or
    missing) and no temporary file behind.

    Args:
        path: the file to create or replace (its parents are created when missing).
        write: writes the whole file at the path it is given (it may truncate or recreate it);
            what it returns is ignored (so `lambda tmp: tmp.write_text(text)` will do).

    Raises:
        ValueError: a folder on the way to `path` is a file.
    """
    with _temporary_beside(path, folder=False) as tmp:
        write(tmp)
        _make_durable(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)


def write_folder_atomically(folder: Path, write: Callable[[Path], object], *,
                            replaceable: Collection[str] | None = None,
                            merge_order: Sequence[str] = ()) -> None:
    """Run `write` into a fresh temporary folder beside `folder`, then move the result into place.

    The same rule as write_file_atomically: before the move, every file is given the umask's normal
    mode and flushed to disk; a failure removes the temporary folder. Then:
    - `folder` missing: the temporary folder is renamed to it;
    - `folder` holding only names in `replaceable` (None: anything): it is swapped whole (the old
      folder is moved aside, the new one renamed in, the old one deleted);
    - otherwise the files named in `merge_order` are moved in one by one, each with an atomic
      rename, in that order, and the folder's other files are kept.

    Args:
        folder: the folder to create or replace (its parents are created when missing).
        write: writes the result's files into the folder it is given.
        replaceable: names an existing `folder` may hold and still be replaced whole.
        merge_order: files to move into a folder that also holds other files; empty: refuse.

    Raises:
        FileExistsError: `folder` holds other files and `merge_order` is empty.
        ValueError: a folder on the way to `folder` is a file.
    """
    with _temporary_beside(folder, folder=True) as tmp:
        write(tmp)
        _make_durable(tmp)
        if not folder.exists():
            os.rename(tmp, folder)
        elif replaceable is None or {entry.name for entry in folder.iterdir()} <= set(replaceable):
            # Renaming over a non-empty folder is not possible: move the old one aside first.
            # A writer killed between the two renames leaves the old folder inside `.NAME.old-*`,
            # and remove_stale_temps puts it back.
            old = fresh_temp_folder(folder, "old")
            os.rename(folder, old / folder.name)
            os.rename(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        elif merge_order:
            for name in merge_order:
                os.replace(tmp / name, folder / name)
        else:
            others = sorted(entry.name for entry in folder.iterdir())
            raise FileExistsError(f"{folder} already exists and holds {', '.join(others[:4])}"
                                  f"{', ...' if len(others) > 4 else ''}; choose a new folder")
        fsync_path(folder.parent)


@contextlib.contextmanager
def _temporary_beside(target: Path, folder: bool) -> Iterator[Path]:
    """A fresh, empty temporary file or folder beside `target`, removed on the way out (a no-op once
    it has been renamed into place)."""
    check_parent(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if folder:
        tmp = fresh_temp_folder(target, "tmp")
    else:
        # Not tempfile.mkstemp: its files are private (0600). O_EXCL: never a file someone else made.
        tmp = _temp_name(target, "tmp")
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
    finally:
        if folder:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)


def _make_durable(path: Path) -> None:
    """Give `path` (a file, or a folder and all it holds) the umask's modes, then flush it to disk."""
    apply_umask(path)
    if path.is_dir():
        for inner in sorted(path.rglob("*"), reverse=True):  # files before the folders holding them
            fsync_path(inner)
    fsync_path(path)


def fsync_path(path: Path) -> None:
    """Flush a file (or a folder's entries) to disk, so a rename never points at unwritten data."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # folders cannot be fsync'ed on some systems; the rename is still atomic
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process's umask, read without changing it where the system allows.

    Linux reports it in /proc/self/status; elsewhere it is set and restored at once (os.umask can
    only be read by setting it, so another thread creating a file in between could see umask 0).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: Path) -> None:
    """Give `path` and everything under it the umask's normal mode: 0o666 & ~umask for files,
    0o777 & ~umask for folders (safetensors creates its files 0600, unreadable to other users).
    Symbolic links are left alone."""
    mask = current_umask()
    file_mode, folder_mode = 0o666 & ~mask, 0o777 & ~mask
    if path.is_symlink():
        return
    if not path.is_dir():
        os.chmod(path, file_mode)
        return
    for root, dirs, files in os.walk(path):
        os.chmod(root, folder_mode)
        for name in files:
            if not os.path.islink(os.path.join(root, name)):
                os.chmod(os.path.join(root, name), file_mode)
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(root, d))]


def remove_stale_temps(parent: Path, name: str | None = None) -> list[Path]:
    """Delete the temporaries in `parent` that writers killed mid-way left behind.

    A folder counts as temporary when its name is one lorakit writers use (`.NAME.KIND-PID-HEX`,
    `.tmp-checkpoint-N-PID`, `.partial-NAME-PID`), a file when it is named `.NAME.tmp-PID-HEX`
    (write_file_atomically); either is stale when process PID is no longer running. One whose
    writer still runs (or may: a PID this user cannot signal) is kept.
    An `.NAME.old-*` folder still holding `NAME` while `parent/NAME` is missing is the previous
    version of a folder whose replacement was interrupted: it is moved back to `parent/NAME`.
    PIDs are those of this machine: a writer on another host sharing the folder is not seen.

    Args:
        parent: the folder to clean (nothing happens when it does not exist).
        name: only the temporaries of `parent/name`; None: all of them.

    Returns:
        The files and folders deleted (or restored), sorted.
    """
    if not parent.is_dir():
        return []
    removed = []
    for entry in sorted(parent.iterdir()):
        match = _temp_match(entry.name)
        if match is None or (name is not None and match["name"] != name) or entry.is_symlink():
            continue
        kind = match.groupdict().get("kind")
        if not (entry.is_dir() or (kind == "tmp" and entry.is_file())) or _is_running(int(match["pid"])):
            continue
        target = match["name"]
        if entry.is_file():
            with contextlib.suppress(OSError):  # like rmtree(ignore_errors): gone already, or not ours
                entry.unlink()
        else:
            if kind == "old" and (entry / target).is_dir() and not (parent / target).exists():
                os.rename(entry / target, parent / target)
            shutil.rmtree(entry, ignore_errors=True)
        if not entry.exists():
            removed.append(entry)
    return removed


def _temp_match(name: str) -> re.Match[str] | None:
    for pattern in _TEMP_PATTERNS:
        match = pattern.fullmatch(name)
        if match is not None:
            return match
    return None


def _is_running(pid: int) -> bool:
    """Whether process `pid` exists; a PID that cannot be checked counts as running."""
    if pid <= 0:
        return True  # os.kill(0, ...) would signal our own process group: never treat as gone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    except OverflowError:
        return False  # larger than any PID the system can hand out
    except OSError:
        return True
    return True
