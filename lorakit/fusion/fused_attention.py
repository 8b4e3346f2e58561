"""group_attention_inputs: an attention block's q, k and v LoRA layers run their A sides as one GEMM.

q_proj, k_proj and v_proj read the same hidden states; transformers calls them one after another.
Grouped (lorakit.kernels.shared_input.InputGroup), the first of them to run computes x A^T for all
three in one GEMM and one pass of the dropout mask, and the backward of those A sides is one
GEMM for dA and one for their share of dx. The norm in front of the block is marked so that
those A sides keep its input, not its output (lorakit.fusion.rebuilt_norms). Values and gradients are
the same formula's.
"""

from __future__ import annotations

from torch import nn

from lorakit.core.layers import LoraLinear
from lorakit.fusion.rebuilt_norms import rebuild_sibling_norms
from lorakit.kernels.shared_input import InputGroup

_PROJECTIONS = ("q_proj", "k_proj", "v_proj")


def group_attention_inputs(model: nn.Module) -> int:
    """Group the q_proj, k_proj and v_proj LoRA layers of every attention block; returns how many blocks.

    A block counts when all three are LoraLinear layers (any adapters: a member whose adapters do
    not allow the fused path runs alone at that step). Grouping again makes new groups, same result.
    The norms beside each block (the layer's input norm) get their outputs rebuilt in backward
    instead of kept (lorakit.fusion.rebuilt_norms).
    """
    count = 0
    for path, module in model.named_modules():
        layers = [getattr(module, name, None) for name in _PROJECTIONS]
        if all(isinstance(layer, LoraLinear) for layer in layers):
            members = [layer for layer in layers if isinstance(layer, LoraLinear)]
            group = InputGroup(members)
            for member in members:
                member.input_group = group
            if path:
                rebuild_sibling_norms(model, path)  # the input norm: its output is rebuilt, not kept
            count += 1
    return count
