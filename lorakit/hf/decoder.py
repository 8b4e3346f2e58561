"""The decoder layer list of a transformers model: the units FSDP2 shards one at a time."""

from __future__ import annotations

from torch import nn


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(path, list) of the decoder's layer list, e.g. ("model.layers", ModuleList of 32 layers).

    Raises:
        ValueError: the model has no `get_decoder()` holding a list of `num_hidden_layers` layers.
    """
    decoder = getattr(model, "get_decoder", lambda: None)()
    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if isinstance(decoder, nn.Module):
        for child in decoder.children():
            if isinstance(child, nn.ModuleList) and (count is None or len(child) == count):
                path = next(name for name, module in model.named_modules() if module is child)
                return path, child
    raise ValueError(f"{type(model).__name__} has no decoder layer list (a transformers decoder's "
                     "get_decoder() holding num_hidden_layers layers)")
