"""Outputs that backward rebuilds from their module's input instead of keeping them.

A LoRA A side needs its input y for dA = g^T (y m). In a decoder layer y is a norm's output,
y = norm(x), and x (the residual stream) is kept anyway, by the norm's own backward. Keeping y as
well costs one (tokens x hidden) tensor per norm: 135 MiB per step for SmolLM2-135M at 4 x 256
tokens in fp32 (q/k/v's input and gate/up's input in 30 layers). `rebuild_outputs(module)` marks
the module's outputs with where they came from; a function that would keep such an output keeps
x instead and calls the module on it again in backward (one norm forward, a few passes over x).

    keep y = norm(x)            ->      keep x;  backward: y = norm(x) again

The rebuilt tensor is bit for bit the kept one: the same module's forward on the same input, the
same kernels, autocast off as it was (the functions that rebuild run only outside autocast).
Only a module whose output depends on its input and its own parameters alone qualifies (a norm:
no dropout, no state), and only while no other hook runs around it (a hook could change the
output or the input). The module's parameters must not change between forward and backward, as
with any parameter an autograd graph reads. An output or input changed in place after the module
ran is not rebuilt (their version counters tell); the input is saved with save_for_backward, so a
later in-place change is caught there, and checkpointing or offloading hooks see it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as torch_module

from lorakit.core.attached import tag, tag_of

_SOURCE = "rebuild_from"


def rebuild_outputs(module: nn.Module) -> None:
    """Mark `module`'s outputs with how to rebuild them (the module and its input); idempotent.

    `module` must compute its output from its one positional input and its parameters alone,
    deterministically (a norm). Functions that find the mark (`rebuild_source`) keep the input.
    """
    if not rebuilds_outputs(module):
        module.register_forward_hook(_mark, with_kwargs=True)


def rebuilds_outputs(module: nn.Module) -> bool:
    """Whether `rebuild_outputs` marked `module`."""
    return any(hook is _mark for hook in module._forward_hooks.values())


def _mark(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
    if (torch.compiler.is_compiling() or not torch.is_grad_enabled() or kwargs or len(args) != 1
            or not isinstance(args[0], torch.Tensor) or not isinstance(output, torch.Tensor)):
        return
    if len(module._forward_hooks) != 1 or module._forward_pre_hooks or _global_forward_hooks():
        return  # another hook may have changed the input or the output: nothing to rebuild from
    tag(output, _SOURCE, (module, args[0], args[0]._version, output._version))


def _global_forward_hooks() -> bool:
    return bool(getattr(torch_module, "_global_forward_hooks", None)
                or getattr(torch_module, "_global_forward_pre_hooks", None))


def rebuild_source(y: torch.Tensor) -> tuple[nn.Module, torch.Tensor] | None:
    """(module, x) with y == module(x) bit for bit, when y is a marked module's output; else None.

    None too when y or x changed in place since the module ran (their version counters moved).
    """
    source = tag_of(y, _SOURCE)
    if source is None:
        return None
    module, x, x_version, y_version = source
    return (module, x) if (x._version, y._version) == (x_version, y_version) else None


def rebuild(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """module(x) again, without autograd, hooks or autocast: the output its forward gave."""
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        return module.forward(x)  # type: ignore[no-any-return]
