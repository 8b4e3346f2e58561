"""Atomic folder writes, the temporary folders they use, and cleaning up after a killed writer.

A folder that matters (an adapter, a merged model) is written into a temporary folder beside its
target, named `.NAME.KIND-PID-HEX` (the writer's PID, then a random suffix), flushed to disk and
renamed into place, so a reader sees the old folder or the new one, never a mix. A writer killed
mid-way leaves its temporary folder behind; `remove_stale_temps` deletes those whose writer is gone
and never one whose writer still runs. Files and folders get the modes the umask asks for
(0o666 / 0o777 minus the umask), since safetensors creates its files private (0600).

Only the standard library is imported here, so every layer can use it.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from collections.abc import Callable, Collection, Sequence
from pathlib import Path

# The temporary folders lorakit writers create, each with the writer's PID in a named group:
_TEMP_PATTERNS = (
    # write_folder_atomically: `.adapter.tmp-1234-9f8e7d6c`, `.adapter.old-1234-9f8e7d6c`
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
    if not re.fullmatch(r"[a-z]+", kind):
        raise ValueError(f"temporary folder kind must be lowercase letters, got {kind!r}")
    fresh = folder.parent / f".{folder.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"
    fresh.mkdir()
    return fresh


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
                raise ValueError(f"{name + ' ' if name else ''}{path} cannot be created: {parent} is a file, not a "
                                 "folder; choose a path in a folder")
            return


def write_folder_atomically(folder: Path, write: Callable[[Path], None], *,
                            replaceable: Collection[str] | None = None, merge_order: Sequence[str] = ()) -> None:
    """Run `write` into a fresh temporary folder beside `folder`, then move the result into place.

    Before the move, every file is flushed to disk and given the umask's normal mode. Then:
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
    check_parent(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = fresh_temp_folder(folder, "tmp")
    try:
        write(tmp)
        apply_umask(tmp)
        for path in sorted(tmp.rglob("*"), reverse=True):  # files before the folders holding them
            fsync_path(path)
        fsync_path(tmp)
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
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
    """Delete the temporary folders in `parent` that writers killed mid-way left behind.

    A folder counts as temporary when its name is one lorakit writers use (`.NAME.KIND-PID-HEX`,
    `.tmp-checkpoint-N-PID`, `.partial-NAME-PID`), and as stale when process PID is no longer
    running. A folder whose writer still runs (or may: a PID this user cannot signal) is kept.
    An `.NAME.old-*` folder still holding `NAME` while `parent/NAME` is missing is the previous
    version of a folder whose replacement was interrupted: it is moved back to `parent/NAME`.
    PIDs are those of this machine: a writer on another host sharing the folder is not seen.

    Args:
        parent: the folder to clean (nothing happens when it does not exist).
        name: only the temporary folders of `parent/name`; None: all of them.

    Returns:
        The folders deleted (or restored), sorted.
    """
    if not parent.is_dir():
        return []
    removed = []
    for entry in sorted(parent.iterdir()):
        match = _temp_match(entry.name)
        if (match is None or (name is not None and match["name"] != name) or not entry.is_dir()
                or entry.is_symlink() or _is_running(int(match["pid"]))):
            continue
        target = match["name"]
        if match.groupdict().get("kind") == "old" and (entry / target).is_dir() and not (parent / target).exists():
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
