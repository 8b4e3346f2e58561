"""fuse_gated_mlps: run transformers' Llama-style MLPs through lorakit's SwiGLU functions.

A gated MLP computes down(silu(gate(x)) * up(x)). Written with autograd ops it keeps four
(tokens x intermediate) tensors for backward; `FusedGatedMLP` keeps two (lorakit.kernels.swiglu).
It replaces the MLP module in its parent and holds the MLP's own gate_proj, up_proj, down_proj
and act_fn, so parameters, state-dict keys and values stay exactly as they were.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn
from torch.nn.modules import module as torch_module

from lorakit.core.layers import LoraLinear
from lorakit.core.walk import replace_module
from lorakit.fusion.rebuilt_norms import rebuild_sibling_norms
from lorakit.kernels import paths
from lorakit.kernels.lora_function import quantized_dropout
from lorakit.kernels.shared_input import FusedArguments, lora_linears_one_input
from lorakit.kernels.swiglu import swiglu, swiglu_lora

_PARTS = ("gate_proj", "up_proj", "down_proj")


class FusedGatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)), keeping gate's and up's outputs only.   x: (..., hidden) -> (..., hidden)

    With one LoRA adapter on down on its fused path, down's input is not kept either
    (SwiGLULoraFunction recomputes it in backward). Hooks keep working: gate_proj and up_proj
    are called as modules, and when down_proj or act_fn carries hooks, they are called as
    modules too (the unfused arithmetic, same values).
    """

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = (getattr(mlp, n)
                                                                     for n in (*_PARTS, "act_fn"))
        self.fused_from = type(mlp).__name__
        self.training = mlp.training

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self._gate_and_up(x)  # (..., i) each
        down: Any = self.down_proj
        if _has_hooks(self.act_fn):
            return down(self.act_fn(gate) * up)
        name = None
        if isinstance(down, LoraLinear) and not _has_hooks(down):
            name = paths.fused_adapter(down, gate.dtype, torch.is_autocast_enabled(gate.device.type))
        if name is None:
            return down(swiglu(gate, up))
        return swiglu_lora(gate, up, *paths.fused_arguments(down, name))

    def _gate_and_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """gate(x), up(x): with one LoRA adapter each on the fused path, same dropout p and a shared
        mask, their A sides run as one GEMM (kernels/shared_input.py); otherwise each module runs."""
        gate, up, autocast = self.gate_proj, self.up_proj, torch.is_autocast_enabled(x.device.type)
        if (isinstance(gate, LoraLinear) and isinstance(up, LoraLinear)
                and not (_has_hooks(gate) or _has_hooks(up))):
            names = paths.fused_adapter(gate, x.dtype, autocast), paths.fused_adapter(up, x.dtype, autocast)
            if names[0] is not None and names[1] is not None:
                *gate_args, p = paths.fused_arguments(gate, names[0])
                *up_args, p_up = paths.fused_arguments(up, names[1])
                shares = gate.shares_dropout_mask[names[0]] and up.shares_dropout_mask[names[1]]
                if p == p_up and (shares or quantized_dropout(p) == 0):
                    members = [cast(FusedArguments, tuple(gate_args)), cast(FusedArguments, tuple(up_args))]
                    out_gate, out_up = lora_linears_one_input(x, members, p, reader=(self, "gate and up"))
                    return out_gate, out_up
        return self.gate_proj(x), self.up_proj(x)

    def extra_repr(self) -> str:
        return f"fused from {self.fused_from}"


def is_gated_silu_mlp(module: nn.Module) -> bool:
    """A Llama-style MLP: gate_proj, up_proj, down_proj and a SiLU act_fn, forward = down(act(gate) * up)."""
    act = getattr(module, "act_fn", None)
    # transformers' own SiLUActivation (F.silu) is matched by name so that importing this needs no
    # transformers
    silu = isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"
    return (silu and not isinstance(module, FusedGatedMLP)
            and all(isinstance(getattr(module, name, None), nn.Module) for name in _PARTS))


def fuse_gated_mlps(model: nn.Module) -> int:
    """Run every Llama-style SiLU-gated MLP in `model` as a FusedGatedMLP; returns how many.

    Values and gradients are unchanged (the same formula); only what backward keeps shrinks.
    The norms beside each MLP (its input norm) get their outputs rebuilt in backward instead of
    kept, when gate and up run as one group (lorakit.fusion.rebuilt_norms). Fusing twice fuses nothing more.

    Raises:
        ValueError: an MLP carries hooks of its own (they would be lost with the module it replaces);
            nothing is changed then.
    """
    found = [(path, m) for path, m in model.named_modules() if is_gated_silu_mlp(m)]
    hooked = [path or "the model" for path, m in found if _has_hooks(m, global_hooks=False)]
    if hooked:
        raise ValueError(f"fuse_gated_mlps replaces each gated MLP with a FusedGatedMLP, but {hooked[0]!r} "
                         f"(and {len(hooked) - 1} more) has hooks registered on the MLP itself, which would "
                         "be lost; fuse before registering them, or register them on gate_proj, up_proj or "
                         "down_proj")
    if any(path == "" for path, _ in found):
        raise ValueError("fuse_gated_mlps fuses the MLPs inside a model; this model is itself one gated MLP, "
                         "which cannot be replaced in place: use FusedGatedMLP(model) instead")
    for path, mlp in found:
        replace_module(model, path, FusedGatedMLP(mlp))
        rebuild_sibling_norms(model, path)  # the MLP's input norm: gate/up's A side rebuilds its output
    return len(found)


def _has_hooks(module: nn.Module, global_hooks: bool = True) -> bool:
    """Whether calling `module` would run hooks, its own or (with global_hooks) every module's."""
    own = (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
           or module._backward_pre_hooks)
    shared = global_hooks and any(getattr(torch_module, name, None) for name in (
        "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
        "_global_backward_pre_hooks"))
    return bool(own or shared)
