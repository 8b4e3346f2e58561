"""lorakit: LoRA and QLoRA fine-tuning for PyTorch language models.

The core API works on any nn.Module and imports only torch; the model-loading, data and
training parts import transformers lazily, on first use.
"""

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
from lorakit.core.config import LoraConfig
from lorakit.core.inject import add_adapter
from lorakit.core.merge import merge, merge_and_unload, unmerge

__version__ = "0.1.0"

__all__ = [
    "LoraConfig",
    "add_adapter",
    "active_adapters",
    "delete_adapter",
    "disable_adapters",
    "list_adapters",
    "merge",
    "merge_and_unload",
    "merged_adapters",
    "print_trainable_parameters",
    "set_adapter",
    "trainable_parameters",
    "unmerge",
]
