"""One run per output folder: an exclusive lock that the operating system drops when its holder dies.

The lock is `flock` on `<output_dir>/.lock`. The file also records who holds it (PID and host), so
a second run names the holder, and a run that finds the file left behind by a killed run (the OS
has dropped that run's lock) says so and takes it over.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from pathlib import Path

LOCK_FILE = ".lock"


class RunFolderBusy(RuntimeError):
    """Another live run holds the output folder."""


class RunLock:
    """Held from `acquire()` to `release()`; a context manager too."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock, or raise RunFolderBusy naming the holder.

        Returns:
            A note when the lock file of a run that died without releasing it was taken over.
        """
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as err:
                raise ValueError(f"cannot write in output folder {self.folder}: "
                                 f"{err.strerror or err}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _describe(_read(fd))
                os.close(fd)
                raise RunFolderBusy(f"output folder {self.folder} is in use by another lorakit run "
                                    f"({holder}); wait for it to finish, or choose another "
                                    "--output-dir") from None
            if _same_file(fd, self.path):
                break
            os.close(fd)  # the previous holder removed the file between our open and our lock: again
        previous = _read(fd)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
        self._fd = fd
        if previous:
            return (f"took over the lock of an earlier run ({_describe(previous)}) that ended without "
                    "releasing it")
        return None

    def release(self) -> None:
        if self._fd is None:
            return
        # Unlink before unlocking: a run waiting on this file then retries on a fresh one.
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 4096).decode(errors="replace")
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return {"raw": text.strip()} if text.strip() else {}
    return value if isinstance(value, dict) else {}


def _describe(holder: dict) -> str:
    if "pid" in holder:
        return f"PID {holder['pid']} on {holder.get('host', 'an unknown host')}"
    return "holder unknown"


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False
