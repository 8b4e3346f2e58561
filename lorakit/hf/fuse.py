"""fuse_for_training: what lorakit.train does to a model with adapters before its first step.

Three module swaps, each with the same values (outputs bit for bit, gradients to float rounding)
and less work or memory in backward:

1. fuse_gated_mlps: SwiGLU MLPs through SwiGLUFunction / SwiGLULoraFunction (it refuses an MLP
   with hooks of its own, so it runs first: a refusal leaves the model as it was);
2. fuse_rms_norms: Llama-style RMSNorms through RMSNormFunction (a four-pass backward);
3. group_attention_inputs: q, k and v's A sides as one GEMM.

The MLPs and q/k/v groups mark the norms beside them for rebuilding; a fused norm keeps its mark.
Benchmarks and tests that mean "as lorakit.train does" call this.
"""

from __future__ import annotations

from torch import nn

from lorakit.hf.fused_attention import group_attention_inputs
from lorakit.hf.fused_mlp import fuse_gated_mlps
from lorakit.hf.fused_norms import fuse_rms_norms


def fuse_for_training(model: nn.Module) -> dict[str, int]:
    """Fuse `model`'s gated MLPs and norms and group its q/k/v inputs; returns how many of each.

    Calling it again fuses nothing more (the q/k/v groups are made anew, the same).

    Raises:
        ValueError: an MLP carries hooks of its own (see fuse_gated_mlps); nothing is changed then.
    """
    mlps = fuse_gated_mlps(model)
    norms = fuse_rms_norms(model)
    return {"gated MLPs": mlps, "norms": norms, "attention blocks": group_attention_inputs(model)}
