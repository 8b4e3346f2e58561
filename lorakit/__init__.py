"""lorakit: LoRA and QLoRA fine-tuning for PyTorch language models.

The core API works on any nn.Module and imports only torch; the model-loading, data and
training parts import transformers lazily, on first use. docs/layers.md draws the packages.
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
from lorakit.core.layers import LoraEmbedding, LoraLayer, LoraLinear
from lorakit.core.merge import merge, merge_and_unload, unmerge
from lorakit.core.per_row import adapters_per_row
from lorakit.formats.inspect_adapter import describe_adapter
from lorakit.formats.io import load_adapter, save_adapter
from lorakit.fusion.fuse import fuse_for_training
from lorakit.fusion.fused_attention import group_attention_inputs
from lorakit.fusion.fused_mlp import fuse_gated_mlps
from lorakit.kernels.dispatch import install as _install_kernels

__version__ = "0.1.0"

# Names whose modules import transformers: loaded on first use, so `import lorakit` stays light.
_LAZY = {
    "load_model": "lorakit.hf",
}

# LoraLinear's fast paths live beside core (lorakit.kernels), which core never imports: this hands
# them to it, so every `import lorakit...` runs the fused functions where they apply.
_install_kernels()


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
