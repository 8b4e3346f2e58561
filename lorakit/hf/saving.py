"""Saving a (merged) model as a transformers folder that from_pretrained loads."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any


def drop_gguf_marks(model: Any) -> None:
    """Forget that a model came from a GGUF file.

    Its weights are plain float tensors once loaded, but the model still carries the GGUF
    quantizer, and save_pretrained refuses ("quantized with gguf and is not serializable").
    """
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def save_merged(model: Any, tokenizer: Any, output: Path) -> None:
    """save_pretrained of model and tokenizer into a new folder, atomically."""
    drop_gguf_marks(model)
    # Written beside the target and renamed, so an interrupted save leaves no half model behind.
    partial = output.with_name(f".partial-{output.name}-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    os.replace(partial, output)
