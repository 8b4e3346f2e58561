"""lorakit: LoRA and QLoRA fine-tuning for PyTorch language models.

The core API works on any nn.Module and imports only torch; the model-loading, data and
training parts import transformers lazily, on first use.
"""

import importlib
from typing import Any

from lorakit.core.adapters import (
    active_adapters,
    delete_adapter,
    disable_adapters,
    list_adapters,
    merged_adapters,
    print_trainable_parameters,
    set_adapter,
    trainable_parameters,
)
from lorakit.core.combine import combine_adapters
from lorakit.core.config import LoraConfig
from lorakit.core.inject import add_adapter
from lorakit.core.inspect_adapter import describe_adapter
from lorakit.core.io import load_adapter, save_adapter
from lorakit.core.layers import LoraEmbedding, LoraLayer, LoraLinear
from lorakit.core.merge import merge, merge_and_unload, unmerge
from lorakit.core.per_row import adapters_per_row

__version__ = "0.1.0"

# Names whose modules import transformers: loaded on first use, so `import lorakit` stays light.
_LAZY = {
    "load_model": "lorakit.hf",
    "fuse_gated_mlps": "lorakit.hf.fused_mlp",
    "fuse_for_training": "lorakit.hf.fuse",
    "group_attention_inputs": "lorakit.hf.fused_attention",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lorakit' has no attribute {name!r}")


__all__ = [
    "LoraConfig",
    "LoraEmbedding",
    "LoraLayer",
    "LoraLinear",
    "add_adapter",
    "active_adapters",
    "adapters_per_row",
    "combine_adapters",
    "delete_adapter",
    "describe_adapter",
    "disable_adapters",
    "fuse_for_training",
    "fuse_gated_mlps",
    "group_attention_inputs",
    "list_adapters",
    "load_adapter",
    "load_model",
    "merge",
    "merge_and_unload",
    "merged_adapters",
    "print_trainable_parameters",
    "save_adapter",
    "set_adapter",
    "trainable_parameters",
    "unmerge",
]
