"""fuse_rms_norms: run transformers' Llama-style RMSNorm modules through lorakit's RMSNorm function.

A decoder has two norms per layer and one at the end; transformers writes each as autograd ops,
whose backward takes about a dozen passes over the layer's input. `FusedRMSNorm` runs the same
formula through lorakit.core.rms_norm (a four-pass backward), with the norm's own weight and eps,
so parameters, state-dict keys and outputs stay exactly as they were.

A module is taken only when it behaves as that formula: its class name ends in "RMSNorm", it
holds a weight vector and an eps, and its own forward gives bit for bit `rms_norm`'s output on a
probe. Norms with another formula (Gemma's (1 + w), a norm that casts after the weight) fail the
probe and are left alone.
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit.core.rebuild import rebuild_outputs, rebuilds_outputs
from lorakit.core.rms_norm import rms_norm, rms_norm_function
from lorakit.core.walk import replace_module


class FusedRMSNorm(nn.Module):
    """w * x / sqrt(mean(x^2) + eps) over the last dimension.   x: (..., hidden) -> (..., hidden)"""

    weight: nn.Parameter

    def __init__(self, norm: nn.Module) -> None:
        """`norm`: a module `_fusable` accepted (a weight vector and a float eps)."""
        super().__init__()
        self.weight = norm.weight  # type: ignore[assignment]
        self.variance_epsilon: float = _eps(norm) or 0.0
        self.fused_from = type(norm).__name__
        self.training = norm.training

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm_function(x, self.weight, self.variance_epsilon)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}, fused from {self.fused_from}"


def fuse_rms_norms(model: nn.Module) -> int:
    """Run every Llama-style RMSNorm in `model` as a FusedRMSNorm; returns how many.

    Outputs are unchanged bit for bit and gradients to float rounding; only backward's work
    shrinks. A norm marked for rebuilding (lorakit.hf.rebuilt_norms) stays marked. Norms with
    hooks of their own, on the meta device or sharded (FSDP's DTensor weights) are left as they
    are; fuse before sharding. Fusing twice fuses nothing more.
    """
    found = [(path, m) for path, m in model.named_modules() if path and _fusable(m)]
    for path, norm in found:
        fused = FusedRMSNorm(norm)
        replace_module(model, path, fused)
        if rebuilds_outputs(norm):
            rebuild_outputs(fused)
    return len(found)


def _fusable(module: nn.Module) -> bool:
    weight, eps = getattr(module, "weight", None), _eps(module)
    if (isinstance(module, FusedRMSNorm) or not type(module).__name__.endswith("RMSNorm")
            or type(weight) is not nn.Parameter or weight.dim() != 1 or weight.device.type == "meta"
            or eps is None or _has_other_hooks(module)):
        return False
    probe = torch.randn(2, 3, weight.shape[0], generator=torch.Generator().manual_seed(0)).to(weight)
    with torch.no_grad():
        try:
            theirs = module(probe)
        except (TypeError, RuntimeError):  # a forward that cannot take one plain tensor is not this formula
            return False
        return isinstance(theirs, torch.Tensor) and torch.equal(theirs, rms_norm(probe, weight, eps))


def _eps(module: nn.Module) -> float | None:
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    return float(eps) if isinstance(eps, (int, float)) and not isinstance(eps, bool) else None


def _has_other_hooks(module: nn.Module) -> bool:
    """Hooks other than lorakit's rebuild mark (which moves to the fused module)."""
    forward_hooks = len(module._forward_hooks) - (1 if rebuilds_outputs(module) else 0)
    return bool(forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks)
