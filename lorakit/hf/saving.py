"""Saving a (merged) model as a transformers folder that from_pretrained loads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorakit.formats.atomic import remove_stale_temps, write_folder_atomically


def drop_gguf_marks(model: Any) -> None:
    """Forget that a model came from a GGUF file.

    Its weights are plain float tensors once loaded, but the model still carries the GGUF
    quantizer, and save_pretrained refuses ("quantized with gguf and is not serializable").
    """
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def save_merged(model: Any, tokenizer: Any, output: Path) -> None:
    """save_pretrained of model and tokenizer into a new folder, atomically.

    Written into a temporary folder beside `output` and renamed, so an interrupted save leaves
    no half model behind (and the next save removes what a killed one left). Files and folders
    get the umask's usual permissions, readable by a server running as another user.

    Raises:
        FileExistsError: `output` exists and is not empty.
    """
    drop_gguf_marks(model)

    def write(target: Path) -> None:
        model.save_pretrained(target)
        tokenizer.save_pretrained(target)

    remove_stale_temps(output.parent, output.name)
    write_folder_atomically(output, write, replaceable=())
