"""A safetensors cache for models that arrive as GGUF files.

transformers reads a GGUF by parsing it twice (tokenizer, then weights) and dequantizing every
tensor: about 30 s for the 135M default model on two CPU cores. We pay that once, save the
dequantized model and its tokenizer as an ordinary transformers folder, and load that folder
(about a second) every later time.

Layout: `<cache root>/models/<file stem>-<12 hex digits>`, where the digits hash the GGUF's
absolute path, size and modification time, so an edited or replaced file gets a fresh entry.
The cache root is `$LORAKIT_CACHE_DIR` if set, else `$XDG_CACHE_HOME/lorakit`, else
`~/.cache/lorakit`.

Entries are written atomically (formats/atomic.py): the conversion saves into a temporary folder
beside the final one and renames it into place, so a folder with the final name is always complete.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import struct
import time
from pathlib import Path

import torch

from lorakit.formats.atomic import write_folder_atomically
from lorakit.hf.offline import hub_offline
from lorakit.hf.saving import drop_gguf_marks

CACHE_ENV_VAR = "LORAKIT_CACHE_DIR"
GGUF_MAGIC = b"GGUF"
# Temporary folders of a conversion are `.NAME.tmp-PID-HEX` (write_folder_atomically), or
# `.partial-NAME-XXXXXXXX` when left by lorakit versions that wrote with tempfile.mkdtemp.
PARTIAL_PREFIX = ".partial-"
# A temporary folder this old cannot belong to a conversion still running (they take ~30 s);
# it was left by a killed process and only wastes disk. Age, not the writer's PID: a cache on a
# shared home folder may be converting on another host.
STALE_PARTIAL_SECONDS = 3600.0

# What a corrupt or truncated GGUF makes the gguf reader raise (struct.error for a cut header,
# ValueError for short tensor data or a bad version, KeyError for missing metadata).
_READ_ERRORS = (ValueError, KeyError, IndexError, EOFError, OSError, struct.error, NotImplementedError)

logger = logging.getLogger(__name__)


def cache_root() -> Path:
    """Return lorakit's cache root (not created).

    Returns:
        `$LORAKIT_CACHE_DIR` if set, else `$XDG_CACHE_HOME/lorakit`, else `~/.cache/lorakit`.
    """
    override = os.environ.get(CACHE_ENV_VAR)
    if override:
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "lorakit"


def cache_entry(gguf_path: str | Path) -> Path:
    """Return the cache folder that holds (or will hold) the converted `gguf_path`.

    Args:
        gguf_path: An existing GGUF file.

    Returns:
        `<cache root>/models/<stem>-<hash of absolute path, size and mtime>`.
    """
    path = Path(gguf_path).resolve()
    stat = path.stat()
    key = f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()
    return cache_root() / "models" / f"{path.stem}-{hashlib.sha256(key).hexdigest()[:12]}"


def is_complete(folder: Path) -> bool:
    """Whether `folder` holds a model config, safetensors weights and a tokenizer."""
    has_weights = (folder / "model.safetensors").is_file() or (
        folder / "model.safetensors.index.json"
    ).is_file()
    return (folder / "config.json").is_file() and (folder / "tokenizer_config.json").is_file() and has_weights


def check_gguf_header(gguf_path: Path) -> None:
    """Raise ValueError unless `gguf_path` starts with the GGUF magic bytes.

    This catches a renamed or wrongly downloaded file before transformers spends time on it.
    """
    with gguf_path.open("rb") as handle:
        magic = handle.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        raise ValueError(
            f"{gguf_path} is not a GGUF file: it starts with {magic!r}, expected {GGUF_MAGIC!r}; "
            "pass a .gguf model file, a transformers model folder, or 'default'"
        )


def ensure_cached(gguf_path: str | Path) -> Path:
    """Return the cache folder for `gguf_path`, converting the GGUF first if needed.

    Args:
        gguf_path: An existing GGUF file with a model architecture transformers can read.

    Returns:
        A transformers folder (config.json, model.safetensors in float32, tokenizer files).

    Raises:
        ValueError: If the file is not a GGUF, is corrupt or truncated, or holds an
            architecture transformers cannot load.
    """
    path = Path(gguf_path).resolve()
    entry = cache_entry(path)
    if is_complete(entry):
        return entry
    if entry.exists():
        # Atomic writes never leave this; someone deleted files by hand. Rebuild it.
        logger.warning("cache folder %s is incomplete; rebuilding it from %s", entry, path)
        shutil.rmtree(entry)

    check_gguf_header(path)
    entry.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(entry)
    logger.info("converting %s to a safetensors cache at %s (once; ~30 s for a 135M model)", path, entry)
    started = time.perf_counter()
    try:
        # replaceable=(): an entry that appeared meanwhile is never replaced (a reader may be using it).
        write_folder_atomically(entry, lambda target: _convert(path, target), replaceable=())
    except OSError:  # FileExistsError, or the rename losing a race
        # Another process (say a second torchrun rank) finished first; its copy is as good.
        if not is_complete(entry):
            raise
    logger.info("cached %s in %.1f s", path.name, time.perf_counter() - started)
    return entry


def _convert(gguf_path: Path, target: Path) -> None:
    """Dequantize `gguf_path` with transformers and save model + tokenizer into `target`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = gguf_path.parent, gguf_path.name
    try:
        with hub_offline():
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
            # float32 keeps the dequantized values exact; load_model casts to the asked dtype later.
            model = AutoModelForCausalLM.from_pretrained(
                folder, gguf_file=name, dtype=torch.float32, local_files_only=True
            )
    except _READ_ERRORS as error:
        raise ValueError(
            f"could not read GGUF file {gguf_path}: {type(error).__name__}: {error}; "
            "the file may be truncated or corrupt, or hold an architecture transformers cannot load"
        ) from error

    drop_gguf_marks(model)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)


def _remove_stale_partials(entry: Path) -> None:
    """Delete temporary folders for `entry` that a killed conversion left behind."""
    now = time.time()
    for pattern in (f".{entry.name}.tmp-*", f"{PARTIAL_PREFIX}{entry.name}-*"):
        for leftover in entry.parent.glob(pattern):
            try:
                if now - leftover.stat().st_mtime > STALE_PARTIAL_SECONDS:
                    shutil.rmtree(leftover, ignore_errors=True)
            except FileNotFoundError:
                pass  # another process removed it first
