"""Reading GGUF files with gguf's reader, with one-line errors for files that are not GGUF."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

# What a corrupt or truncated file makes the gguf reader raise.
_READ_ERRORS = (ValueError, KeyError, IndexError, EOFError, OSError, struct.error, NotImplementedError)


def open_gguf(path: Path) -> Any:
    """A `gguf.GGUFReader` over `path` (memory-mapped: tensors are read when touched).

    Raises:
        ValueError: the file is not a readable GGUF file.
    """
    from gguf import GGUFReader

    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file: it starts with {magic!r}, expected b'GGUF'")
    try:
        return GGUFReader(path)
    except _READ_ERRORS as err:
        raise ValueError(f"could not read GGUF file {path}: {type(err).__name__}: {err}") from None


def field_value(reader: Any, key: str, path: Path) -> Any:
    """The value of metadata `key` (a number, string or list).

    Raises:
        ValueError: the file has no such key.
    """
    field = reader.get_field(key)
    if field is None:
        raise ValueError(f"GGUF file {path} has no {key!r} metadata; it is not a complete model file")
    return field.contents()
