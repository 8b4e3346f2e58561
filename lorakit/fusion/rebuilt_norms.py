"""The norms in front of grouped q/k/v and fused gate/up: backward rebuilds their outputs.

A decoder layer's q/k/v (gate/up) read a norm's output. Their shared A side keeps that output for
dA; marked with lorakit.kernels.rebuild, it keeps the norm's input instead (the residual stream, kept
by the norm anyway) and runs the norm again in backward. group_attention_inputs and
fuse_gated_mlps mark the norms beside the blocks they change; the final norm and others are left
alone. Values and gradients do not change: the rebuilt output is bit for bit the forward's.
"""

from __future__ import annotations

from torch import nn

from lorakit.kernels.rebuild import rebuild_outputs


def is_norm(module: nn.Module) -> bool:
    """A norm layer: torch's LayerNorm or RMSNorm, or a transformers *RMSNorm / *LayerNorm class
    (Gemma's (1 + w) offset and the like are their own forward, which the rebuild calls as is)."""
    return (isinstance(module, (nn.LayerNorm, nn.RMSNorm))
            or type(module).__name__.endswith(("RMSNorm", "LayerNorm")))


def rebuild_sibling_norms(model: nn.Module, path: str) -> None:
    """Mark the norms beside the module at `path` (its parent's norm children) for rebuilding."""
    parent = model.get_submodule(path.rpartition(".")[0])
    for child in parent.children():
        if is_norm(child):
            rebuild_outputs(child)
