"""Turning on transformers' activation (gradient) checkpointing under either of its names.

transformers 5.x renamed `gradient_checkpointing_enable` to `activation_checkpointing_enable` and
warns that the old name goes in v6; lorakit supports transformers >= 5.0, where the new name may
not exist yet. One call site asks for whichever the installed version has.
"""

from __future__ import annotations

from typing import Any

from torch import nn


def enable_checkpointing(model: nn.Module, use_reentrant: bool | None = None) -> None:
    """Recompute each decoder layer's activations in backward instead of keeping them.

    `use_reentrant` goes to torch.utils.checkpoint (None: transformers' default, non-reentrant).
    """
    kwargs: dict[str, Any] | None = None if use_reentrant is None else {"use_reentrant": use_reentrant}
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)  # type: ignore[operator]
