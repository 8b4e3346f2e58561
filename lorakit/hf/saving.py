"""Saving a (merged) model as a transformers folder that from_pretrained loads."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any


def save_merged(model: Any, tokenizer: Any, output: Path) -> None:
    """save_pretrained of model and tokenizer; GGUF-loaded models lose their quantizer marks first,
    since transformers refuses to serialize a model it believes is GGUF-quantized."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # Written beside the target and renamed, so an interrupted save leaves no half model behind.
    partial = output.with_name(f".partial-{output.name}-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    os.replace(partial, output)
