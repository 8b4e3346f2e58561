"""The model as the ranks train it: plain (one process), DDP, or FSDP2 (`fully_shard`).

Why the gradients are *summed* over the ranks, never averaged:

    The step's loss is the mean over every label token of the global batch,
        L = (1 / T) * sum_{ranks r} sum_{micro-batches m} S_{r,m},    T = sum_{r,m} t_{r,m},
    where S_{r,m} is the summed token cross-entropy of micro-batch m on rank r and t_{r,m} its
    label-token count. Each rank computes its micro-losses as S_{r,m} / T (T is one all_reduce of
    the token counts at the start of the step), so its local gradient is
        g_r = (1 / T) * sum_m dS_{r,m}/dw,   and   dL/dw = sum_r g_r.
    The gradient of the global loss is the SUM of the ranks' gradients. DDP and FSDP2 average by
    default (sum / N), which would be right only if every rank had the same T_r = T / N; with
    padding or packing ranks hold different token counts. So: DDP gets a communication hook that
    all-reduces with SUM and divides by nothing, and FSDP2 gets a gradient divide factor of 1 with
    SUM-only collectives (this also sidesteps gloo's missing AVG, pytorch issue 162338, which
    summed where it should have averaged). The result equals one process's gradient on the same
    global batch, whatever the world size and padding.

Gradient clipping then sees the global gradient: DDP's gradients are identical on every rank after
the all-reduce, and FSDP2's are DTensor shards whose norm `clip_grad_norm_` reduces over the ranks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lorakit.train.chunked_loss import causal_lm_loss
from lorakit.train.distributed import World


class TrainingModule(nn.Module):
    """A causal LM and its loss as one module.

    DDP and FSDP2 work through a module's `forward`; the chunked loss reads the output head's
    weight outside the model's own forward, so the loss itself must run inside the wrapped forward.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: dict[str, Any], num_items: int | None = None) -> torch.Tensor:
        """The loss of one micro-batch, divided by `num_items` label tokens (default: its own count)."""
        return causal_lm_loss(self.model, inputs, num_items=num_items)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The model's `generate` (under FSDP2 registered as a forward method, so the weights gather)."""
        return self.model.generate(*args, **kwargs)  # type: ignore[operator]


def wrap(model: nn.Module, world: World) -> nn.Module:
    """`model` (adapters already added) as the ranks train it: a TrainingModule, under DDP or FSDP2."""
    unit = TrainingModule(model)
    if world.strategy is None:
        return unit
    _same_adapters_everywhere(model)
    if world.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [world.device.index] if world.device.type == "cuda" else None
        # init_sync=False: every rank loaded the same base; the adapters were just broadcast.
        ddp = DistributedDataParallel(unit, device_ids=ids, init_sync=False)
        ddp.register_comm_hook(None, _sum_hook)
        return ddp
    return _fully_shard(unit, model)


def no_sync(wrapped: nn.Module, skip: bool) -> contextlib.AbstractContextManager[Any]:
    """Skip the gradient reduction for this backward (all micro-batches of a step but the last)."""
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    if skip and isinstance(wrapped, DistributedDataParallel):
        return wrapped.no_sync()
    if isinstance(wrapped, FSDPModule):  # FSDP2: reduce-scatter only after the last micro-batch
        wrapped.set_requires_gradient_sync(not skip)
    return contextlib.nullcontext()


def base_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes this rank holds, bytes of the whole) of the frozen base: parameters and buffers."""
    from torch.distributed.tensor import DTensor

    local = whole = 0
    seen: set[int] = set()
    tensors = [p for p in model.parameters() if not p.requires_grad] + list(model.buffers())
    for tensor in tensors:
        if id(tensor) in seen:  # tied weights count once
            continue
        seen.add(id(tensor))
        size = tensor.element_size()
        whole += tensor.numel() * size
        local += (tensor.to_local().numel() if isinstance(tensor, DTensor) else tensor.numel()) * size
    return local, whole


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on this rank, detached (a collective for an FSDP2 shard: call on every rank)."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        return tensor.full_tensor().detach()
    return tensor.detach()


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` laid out as `like` is: this rank's shard for an FSDP2 DTensor (no communication)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(like, DTensor):
        full = full.to(device=like.device, dtype=like.dtype)
        return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)
    return full


@contextlib.contextmanager
def whole_trainables(model: nn.Module, tensors: dict[str, torch.Tensor]) -> Iterator[None]:
    """Within: the FSDP2-sharded parameters named in `tensors` are those whole tensors (to save the
    adapter without gathering the base); afterwards the shards are back. Plain parameters stay."""
    from torch.distributed.tensor import DTensor

    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    try:
        for name, tensor in tensors.items():
            owner_path, _, leaf = name.rpartition(".")
            owner = model.get_submodule(owner_path)
            if not isinstance(owner._parameters[leaf], DTensor):
                continue
            swapped.append((owner, leaf, owner._parameters[leaf]))  # type: ignore[arg-type]
            owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=True)
        yield
    finally:
        for owner, leaf, original in reversed(swapped):
            owner._parameters[leaf] = original


def _same_adapters_everywhere(model: nn.Module) -> None:
    # Every rank seeded the adapters alike; broadcasting them makes sure (they are small).
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                dist.broadcast(param.data, src=0)


def _sum_hook(state, bucket):  # type: ignore[no-untyped-def]
    """DDP communication hook: all-reduce with SUM, no division (see the module's docstring).

    Unannotated on purpose: DDP compares the annotation with dist.GradBucket, and postponed
    annotations are strings.
    """
    work = dist.all_reduce(bucket.buffer(), async_op=True)
    assert work is not None
    return work.get_future().then(lambda done: done.value()[0])


def _fully_shard(unit: TrainingModule, model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

    layers = _decoder_layers(model)
    for layer in layers:  # one unit per decoder layer: one layer's weights whole at a time
        fully_shard(layer)
    fully_shard(unit)  # the rest (embeddings, final norm, head) with the loss
    register_fsdp_forward_method(unit, "generate")
    for module in unit.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    return unit


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    from lorakit.hf.decoder import decoder_layers

    try:
        return decoder_layers(model)[1]
    except ValueError as err:
        raise ValueError(f"--distributed fsdp shards a transformers decoder layer by layer, and {err}; "
                         "use --distributed ddp") from None
