"""DoRA (weight-decomposed LoRA, Liu et al. 2024): a learned magnitude per output row.

For a frozen weight W (out x in) and an adapter (A, B, s), DoRA computes

    y = g * (W x + s B A dropout(x)) + (1 - g) * bias        g = m / ||W + s B A||_row   (out,)

`m` (out,) is trained and starts as the row norms of W (B = 0 then), so a fresh DoRA adapter
changes nothing. The norm is taken per output row of W + s B A and detached from the graph, as
the paper's section 4.3 and PEFT do: it reflects the current A and B but gets no gradient.
Written with the bias: W x + bias comes from the base module as is (a Linear, Conv1D or 4-bit
base alike), and g * (W x + bias) + (1 - g) bias = g W x + bias.

Dropout: the update term sees dropout(x), the magnitude scales the clean base output. Without
dropout, and always in eval mode, this is PEFT's forward exactly. In training with dropout PEFT
computes W x + (g - 1) W dropout(x) + g s B A dropout(x), a second base matmul on the dropped-out
copy of x; lorakit computes g W x + g s B A dropout(x) instead, which has the same expectation,
keeps no copy of x for the base term and runs no second base matmul.

Several live adapters on one layer add up as in PEFT: a DoRA adapter adds
(g - 1) W x + g s B A dropout(x), so it rescales the base output, not the other adapters.

The norm is computed once per optimizer step, not once per forward: it depends only on W, A, B
and s, so each `Magnitude` keeps the last norm with the version counters of the tensors it came
from. An optimizer step (or any in-place write) bumps a version and the next forward computes it
again; the micro-batches of one step, evaluation and a checkpointed block's recompute reuse it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class Magnitude(nn.Module):
    """DoRA's magnitude vector m (out,) of one adapter, PEFT's `lora_magnitude_vector.<name>.weight`.

    Also keeps the adapter's last row norm (detached) and, while merged, the norm it was merged with.
    Neither is part of the state dict.
    """

    def __init__(self, magnitude: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(magnitude)
        self._norm: torch.Tensor | None = None
        self._norm_key: tuple[object, ...] | None = None
        self.merged_norm: torch.Tensor | None = None

    def norm(self, weight: Callable[[], torch.Tensor], a: torch.Tensor, b: torch.Tensor, scale: float,
             sources: list[torch.Tensor]) -> torch.Tensor:
        """||W + s B A||_row (out,), detached; recomputed only when A, B or a tensor in `sources` changed.

        `weight` gives W (out x in) and is called only then (a 4-bit base is dequantized once per step).
        """
        if torch.compiler.is_compiling():  # no Python-side state inside a compiled graph
            return row_norm(weight(), a, b, scale)
        key = (scale, *((t.data_ptr(), t._version, t.dtype) for t in (a, b, *sources)))
        if self._norm is None or key != self._norm_key:
            self._norm = row_norm(weight(), a, b, scale)
            self._norm_key = key
        return self._norm


def row_norm(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """||W + s B A|| per output row, detached, in the adapter's dtype (at least fp32).

    W: (out, in), A: (r, in), B: (out, r). One (out x in) temporary; x plays no part.
    """
    dtype = torch.promote_types(a.dtype, torch.float32)
    with torch.no_grad():
        full = torch.addmm(weight.to(dtype), b.detach().to(dtype), a.detach().to(dtype), alpha=scale)
        return torch.linalg.vector_norm(full, dim=1)


def dora_output(z: torch.Tensor, magnitude: torch.Tensor, norm: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
    """g * z + (1 - g) * bias with g = m / norm, for z = W x + bias + s B A dropout(x) (..., out)."""
    g = (magnitude / norm).to(z.dtype)  # (out,), gradient to m only: the norm is detached
    if bias is None:
        return z * g
    return torch.addcmul(bias.to(z.dtype) * (1 - g), z, g)


def dora_delta(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float,
               magnitude: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(delta, norm): the merged weight is W + delta = g (W + s B A), in fp32 at least, (out x in).

    delta = (g - 1) W + g s B A, which is what the adapter adds to the output for any x.
    """
    dtype = torch.promote_types(a.dtype, torch.float32)
    norm = row_norm(weight, a, b, scale)
    g = (magnitude.detach().to(dtype) / norm)[:, None]
    update = (b.detach().to(dtype) @ a.detach().to(dtype)) * scale
    return (g - 1) * weight.to(dtype) + g * update, norm


def unmerged_weight(merged: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float,
                    magnitude: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """W from the merged g (W + s B A): W = merged / g - s B A, with the norm kept at merge time."""
    dtype = torch.promote_types(a.dtype, torch.float32)
    g = (magnitude.detach().to(dtype) / norm.to(dtype))[:, None]
    return merged.to(dtype) / g - (b.detach().to(dtype) @ a.detach().to(dtype)) * scale


class Dora:
    """DoRA as a variant of an adapter: the hooks a LoRA linear calls for an adapter that has one.

    The layer keeps the magnitude in its `lora_magnitude_vector` (PEFT's key); this object holds no
    state, so one instance, `DORA`, serves every layer. Each hook takes the layer and the adapter's
    name, as PEFT's `LoraVariant` does.
    """

    merges_first = True
    """The merged weight g (W0 + s B A) needs W0 itself: nothing may be merged before it."""

    def start(self, layer: Any, name: str) -> None:
        """Make adapter `name` a DoRA adapter (again): m = ||W + s B A||_row of the current W, A and B."""
        a, b = layer.factors(name)
        layer.lora_magnitude_vector[name] = Magnitude(
            row_norm(layer.weight_rows(), a, b, layer.scaling[name]).to(a.dtype))

    def norm(self, layer: Any, name: str) -> torch.Tensor:
        """||W + s B A||_row of adapter `name`, detached: computed once per change of W, A or B."""
        sources = [*layer.base.parameters(recurse=False), *layer.base.buffers(recurse=False)]
        return layer.magnitude(name).norm(layer.weight_rows, *layer.factors(name), layer.scaling[name],
                                          sources)

    def output(self, layer: Any, name: str, z: torch.Tensor, h: torch.Tensor,
               base_out: torch.Tensor) -> torch.Tensor:
        """The layer's output so far once adapter `name` ran: z = W0 x + bias + s B A dropout(x) is its
        update on the base output alone, h the output before it."""
        bias = getattr(layer.base, "bias", None)
        rescaled = dora_output(z, layer.magnitude(name).weight, self.norm(layer, name),
                               bias if isinstance(bias, torch.Tensor) else None)
        if h is base_out:  # the first adapter: h is exactly its output
            return rescaled
        return h + (rescaled - base_out)  # add what DoRA changes: (g - 1) W0 x + g s B A dropout(x)

    def delta_weight(self, layer: Any, name: str) -> torch.Tensor:
        """(g - 1) W0 + g s B A, fp32, laid out like the base weight (so that W0 + delta = g (W0 + s B A))."""
        a, b = layer.factors(name)
        delta, _ = dora_delta(layer.weight_rows(), a, b, layer.scaling[name], layer.magnitude(name).weight)
        return delta.T if layer.weight_in_by_out else delta

    def add_delta(self, layer: Any, name: str, sign: float) -> None:
        """W0 -> g (W0 + s B A) (sign > 0), keeping the norm to undo it exactly; and back (sign < 0)."""
        weight = layer._base_weight()
        a, b = layer.factors(name)
        magnitude, scale = layer.magnitude(name), layer.scaling[name]
        with torch.no_grad():
            if sign > 0:
                delta, magnitude.merged_norm = dora_delta(layer.weight_rows(), a, b, scale, magnitude.weight)
                rows = layer.weight_rows().to(delta.dtype) + delta
            else:
                assert magnitude.merged_norm is not None, "a merged DoRA adapter keeps its norm"
                rows = unmerged_weight(layer.weight_rows(), a, b, scale, magnitude.weight,
                                       magnitude.merged_norm)
                magnitude.merged_norm = None
            weight.copy_((rows.T if layer.weight_in_by_out else rows).to(weight.dtype))


DORA = Dora()
