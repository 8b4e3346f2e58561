"""Writing a GGUF file atomically (formats/atomic.py): to a temporary file beside the target, then renamed."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lorakit.formats.atomic import write_file_atomically


def check_output(path: str | os.PathLike[str], *sources: Path | None) -> Path:
    """The output path, refused when it is a folder, one of the files being read, or a file not a GGUF.

    Raises:
        ValueError: `path` is an existing folder, an existing file that is not a GGUF file and
            not named .gguf (an adapter's safetensors, a data file: replacing it would lose it), or
            the same file as one of `sources`.
    """
    output = Path(path).expanduser()
    if output.is_dir():
        raise ValueError(f"output {output} is a folder; give a file path such as {output / 'model.gguf'}")
    if output.is_file() and output.suffix.lower() != ".gguf" and not _starts_as_gguf(output):
        raise ValueError(f"output {output} exists and is not a GGUF file; lorakit replaces only .gguf "
                         "files, so choose another path such as adapter.gguf")
    for source in sources:
        if source is not None and output.exists() and output.resolve() == source.resolve():
            raise ValueError(f"output {output} is the file being read; give another path")
    return output


def _starts_as_gguf(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            return handle.read(4) == b"GGUF"
    except OSError:
        return False


def write_gguf_atomically(writer: Any, path: Path) -> int:
    """Write `writer`'s (a filled `gguf.GGUFWriter` without a path) header, metadata and tensors to `path`.

    A reader sees the old file or the complete new one, never a partial file; an interrupted
    write leaves no file at `path` (or the old one) and removes its temporary file.

    Returns:
        The size of the file written, in bytes.
    """
    def write(tmp: Path) -> None:
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    write_file_atomically(path, write)
    return path.stat().st_size
