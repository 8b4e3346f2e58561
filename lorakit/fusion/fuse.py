"""fuse_for_training: what lorakit.train does to a model with adapters before its first step.

Two module changes, each with the same values (gradients to float rounding) and less work or
memory in backward:

1. fuse_gated_mlps: SwiGLU MLPs through SwiGLUFunction / SwiGLULoraFunction (it refuses an MLP
   with hooks of its own, so it runs first: a refusal leaves the model as it was);
2. group_attention_inputs: q, k and v's A sides as one GEMM.

Both mark the norms beside them for rebuilding (lorakit.fusion.rebuilt_norms). Benchmarks and tests
that mean "as lorakit.train does" call this, so they cannot drift from it.
"""

from __future__ import annotations

from torch import nn

from lorakit.fusion.fused_attention import group_attention_inputs
from lorakit.fusion.fused_mlp import fuse_gated_mlps


def fuse_for_training(model: nn.Module) -> dict[str, int]:
    """Fuse `model`'s gated MLPs and group its q/k/v inputs; returns how many of each.

    Calling it again fuses nothing more (the q/k/v groups are made anew, the same).

    Raises:
        ValueError: an MLP carries hooks of its own (see fuse_gated_mlps); nothing is changed then.
    """
    return {"gated MLPs": fuse_gated_mlps(model), "attention blocks": group_attention_inputs(model)}
