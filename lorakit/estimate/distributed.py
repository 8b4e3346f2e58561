"""Memory per device when N ranks train together: DDP keeps everything on every rank, FSDP2 shards.

What each rank holds (W: all weights, G: gradients, O: AdamW state, as one process needs them;
a unit's bytes are its weights whole; docs/distributed.md works two examples):

    DDP:   weights W          gradients 2 G (DDP's buckets copy them)    optimizer O    activations A
    FSDP2: weights W / N + root + 2 x layer     gradients G / N + root's + layer's     optimizer O / N
           activations A (of the rank's own micro-batch)

FSDP2 (as lorakit wraps it: one unit per decoder layer, the root unit for the rest) keeps each
rank's 1/N shard of everything and gathers units whole while they compute: the root unit
(embeddings, final norm, head) stays gathered from its forward to the end of backward, and about
two decoder layers are gathered at a time (the one computing, the next one prefetched). Gradients
are reduce-scattered from a unit's whole gradients to the rank's shard.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from lorakit.core.checks import is_positive_int
from lorakit.hf.decoder import decoder_layers

STRATEGIES = ("ddp", "fsdp")


@dataclass(frozen=True)
class Units:
    """Bytes of FSDP2's units for one training method: weights and gradients, whole."""

    layer: int
    """Weights of the largest decoder layer."""
    layer_gradients: int
    """Gradients of the largest decoder layer's trainable parameters."""
    root: int
    """Weights outside the decoder layers: embeddings, final norm, head."""
    root_gradients: int
    """Gradients of the root unit's trainable parameters."""


def check_distributed(nproc: object, distributed: object) -> list[str]:
    """The problems with these settings (empty when they are fine)."""
    problems = []
    if not is_positive_int(nproc):
        problems.append(f"nproc must be an integer >= 1, got {nproc!r}")
    if distributed is not None and distributed not in STRATEGIES:
        problems.append(f"distributed must be one of {', '.join(STRATEGIES)} or None, got {distributed!r}")
    elif distributed == "fsdp" and nproc == 1:
        problems.append("distributed 'fsdp' shards over several devices: give nproc >= 2")
    return problems


def units(model: nn.Module, weight_bytes: Callable[[str, int], int], trains: Callable[[str], bool],
          gradient_bytes: int) -> Units:
    """The units of `model` (on the meta device is fine) for one method.

    Args:
        model: the (adapted) model as FSDP2 would shard it.
        weight_bytes: bytes of the parameter of this name with this many values.
        trains: whether the parameter of this name trains.
        gradient_bytes: bytes per gradient value.
    """
    prefix, layers = decoder_layers(model)
    per_layer = [[0, 0] for _ in layers]
    total = [0, 0]
    for name, param in model.named_parameters():  # tied weights appear once
        values = param.numel()
        weights, gradients = weight_bytes(name, values), values * gradient_bytes if trains(name) else 0
        total[0] += weights
        total[1] += gradients
        if name.startswith(prefix + "."):
            index = int(name[len(prefix) + 1:].split(".")[0])
            per_layer[index][0] += weights
            per_layer[index][1] += gradients
    layer, layer_gradients = max(per_layer)
    return Units(layer=layer, layer_gradients=layer_gradients, root=total[0] - sum(w for w, _ in per_layer),
                 root_gradients=total[1] - sum(g for _, g in per_layer))


def per_device(weights: int, gradients: int, optimizer: int, unit: Units, nproc: int,
               distributed: str) -> dict[str, int]:
    """One process's weights, gradients and optimizer bytes as one of `nproc` ranks holds them under
    `distributed` (ddp or fsdp); activations do not change (each rank runs its own micro-batch)."""
    if distributed == "ddp":
        return {"weights": weights, "gradients": 2 * gradients, "optimizer": optimizer}
    return {"weights": -(-weights // nproc) + unit.root + 2 * unit.layer,
            "gradients": -(-gradients // nproc) + unit.root_gradients + unit.layer_gradients,
            "optimizer": -(-optimizer // nproc)}


def describe(nproc: int, distributed: str) -> str:
    """The line under the settings: what the figures are per device of."""
    how = ("DDP: the whole model and its optimizer on every device" if distributed == "ddp" else
           "FSDP2: 1/N of everything per device, plus the root unit and 2 decoder layers gathered whole")
    return f"per device, {nproc} ranks, {how}"
