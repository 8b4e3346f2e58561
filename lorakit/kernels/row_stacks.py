"""Per-row adapters as batched matmuls: every row's update in two `bmm`s, whatever the adapters.

core's per-row forward (contract.LoraLayer.forward_rows) runs one adapter's rows at a time through
`update`; these compute the same sums for a whole batch at once (tests/core/test_per_row.py checks
them against it), with autograd (`gather_rows`) or, without it, from stacks kept between forwards
(`StackedFactors`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lorakit.core.rows import RowAdapters

# StackedFactors' choice of route: moving one factor element through memory costs about as long as
# this many multiply-adds (a matmul rate of ~50 GFLOP/s over ~10 GB/s of bandwidth, 4-byte elements).
MOVE_COST = 10


def gather_rows(x: torch.Tensor, result: torch.Tensor,
                factors: Sequence[tuple[torch.Tensor, torch.Tensor] | None],
                scales: Sequence[float], in_place: bool) -> torch.Tensor:
    """result + s_i B_i A_i x_i for every row i, in two batched matmuls whatever the number of adapters.

    The BGMV idea of Punica, S-LoRA and vLLM, in plain torch ops: each row's A (r x in) and B
    (out x r) are gathered into one stack in row order, then x_i A_i^T and (x_i A_i^T) B_i^T run as
    two `bmm`s over the batch. A Python loop over distinct adapters would issue ~4 ops per adapter
    per layer; here a layer issues ~5 ops in all. Ranks that differ are padded with zero rows and
    columns of A and B, which add exact zeros; a row without an adapter in this layer (None) gets
    zero factors. The stacks are views of the live parameters for autograd, so gradients reach
    each row's own A and B. Without autograd, `StackedFactors` keeps the stacks from step to step.

    Args:
        x: (N, ..., in) the layer's input, one batch row per entry of `factors`.
        result: (N, ..., out) the base's output, updated in place when `in_place`.
        factors: per row, the (A, B) of its adapter in this layer, or None.
        scales: per row, its adapter's scale s (ignored for None rows).
        in_place: whether `result` may be written (no autograd through it).
    """
    present = [f for f in factors if f is not None]
    a0, _ = present[0]
    rank = max(a.shape[0] for a, _ in present)
    # Rows without an adapter here read zero factors (made only when such a row exists).
    zero_a = a0.new_zeros(rank, x.shape[-1]) if len(present) < len(factors) else a0
    zero_b = a0.new_zeros(result.shape[-1], rank) if len(present) < len(factors) else a0
    a_rows = torch.stack([_padded(f[0], rank, 0) if f is not None else zero_a for f in factors])  # (N, r, in)
    b_rows = torch.stack([_padded(f[1], rank, 1) if f is not None else zero_b
                          for f in factors])  # (N, out, r)
    live = [s for s, f in zip(scales, factors, strict=True) if f is not None]
    row_scales: float | torch.Tensor = live[0]
    if any(s != live[0] for s in live):  # mixed scales: one multiply on the small (N, L, r) side
        row_scales = torch.tensor([s if f is not None else 0.0 for s, f in zip(scales, factors, strict=True)],
                                  dtype=a0.dtype, device=a0.device)
    return add_batched(x, result, a_rows, b_rows, row_scales, in_place)


@dataclass
class SlotPlan:
    """Where each row of a plan goes in one layer's slots; made once per block, shared by layers.

    rows, row_scales: per row, its slot and s (slot 0 and s = 0 for a row without an adapter here).
    by_slot, slot_scales: the rows grouped by slot, `per_slot` places per slot (the most rows any
        slot has): place j of slot k holds row by_slot[k * per_slot + j] with s slot_scales[...];
        an empty place holds row 0 with s = 0.
    """

    rows: torch.Tensor
    row_scales: torch.Tensor
    by_slot: torch.Tensor
    slot_scales: torch.Tensor
    per_slot: int


class StackedFactors:
    """One layer's adapters, A and B stacked once, for per-row forwards without autograd.

    `gather_rows` stacks the rows' factors anew in every forward, which at decode shapes costs
    more than the two matmuls (the stack copies every row's A and B). A server runs the same
    adapters step after step, so without autograd the layer keeps this copy of all its adapters,
    one slot each (vLLM keeps its LoRA slots the same way): A as (slots, r, in) and B transposed,
    (slots, r, out). The copy costs as much memory as the adapters themselves. It is current while
    the layer holds the same adapters with the same scales and their factors keep their version
    counters, dtype and device: an optimizer step, `set_factors` or loading new weights bumps the
    counters, and the next forward restacks.

    A forward takes one of two routes, both exact, whichever `_by_slot_pays`:
    - by slot: the rows' inputs (small) are grouped by slot, padded to the fullest slot, and two
      `bmm`s run over the slots as they lie: each factor is read once, nothing of it is copied.
      Idle slots and padding cost matmul work, so this wins while slots are few and evenly used.
    - by row: each row's A and B picked with `index_select`, then two `bmm`s over the rows
      (`add_batched`): no wasted work, but a copy of each row's factors.
    """

    def __init__(self, factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
                 scaling: dict[str, float]) -> None:
        pairs = list(factors.values())
        self._sources = [t for pair in pairs for t in pair]
        self._versions = [t._version for t in self._sources]
        self._scaling = tuple(scaling.items())
        self.slot = {name: i for i, name in enumerate(factors)}
        rank = max(a.shape[0] for a, _ in pairs)
        with torch.no_grad():
            self.a = torch.stack([_padded(a, rank, 0) for a, _ in pairs])  # (slots, r, in)
            self.b_t = torch.stack([_padded(b, rank, 1).T for _, b in pairs])  # (slots, r, out)
        self._scales = [scaling[name] for name in factors]

    def is_current(self, scaling: dict[str, float]) -> bool:
        """Whether the stacks still equal the layer's adapters (see the class doc)."""
        first = self._sources[0]
        return (tuple(scaling.items()) == self._scaling and first.dtype == self.a.dtype
                and first.device == self.a.device and [t._version for t in self._sources] == self._versions)

    def add_rows(self, x: torch.Tensor, result: torch.Tensor, plan: RowAdapters,
                 in_place: bool) -> torch.Tensor:
        """result + s_i B_i A_i x_i for every row i of `plan` (rows of adapters not held here add zero)."""
        slots = self._slot_plan(plan)
        batch = x.shape[0]
        tokens = x.numel() // (batch * x.shape[-1])  # per row
        if not _by_slot_pays(len(self._scales), slots.per_slot, batch, tokens):
            return add_batched(x, result, self.a.index_select(0, slots.rows),
                               self.b_t.index_select(0, slots.rows),
                               slots.row_scales, in_place, b_transposed=True)
        places = x.reshape(batch, tokens, -1).index_select(0, slots.by_slot).to(self.a.dtype)
        places = places.view(len(self._scales), slots.per_slot * tokens, -1)  # (slots, places * tokens, in)
        xa = torch.bmm(places, self.a.transpose(1, 2))  # (slots, places * tokens, r)
        xa = xa.view(-1, tokens, xa.shape[-1]) * slots.slot_scales.view(-1, 1, 1)  # empty places: exact 0
        update = torch.bmm(xa.view(len(self._scales), -1, xa.shape[-1]),
                           self.b_t)  # (slots, places * tokens, out)
        update = update.view(-1, tokens, update.shape[-1]).to(result.dtype)
        out = result.reshape(batch, tokens, -1)  # a view of the contiguous base output
        if in_place and out.data_ptr() == result.data_ptr():
            out.index_add_(0, slots.by_slot, update)
            return result
        return out.index_add(0, slots.by_slot, update).view(result.shape)

    def _slot_plan(self, plan: RowAdapters) -> SlotPlan:
        """This layer's `SlotPlan` for `plan`, shared by the layers holding the same adapters."""
        key = (self._scaling, self.a.dtype, self.a.device)
        if key not in plan.shared:
            plan.shared[key] = _place_rows([self.slot.get(n) if n is not None else None for n in plan.names],
                                           self._scales, self.a.dtype, self.a.device)
        return plan.shared[key]


def _place_rows(slots: list[int | None], scales: list[float], dtype: torch.dtype,
                device: torch.device) -> SlotPlan:
    per_slot_rows: list[list[int]] = [[] for _ in scales]
    for row, slot in enumerate(slots):
        if slot is not None:
            per_slot_rows[slot].append(row)
    per_slot = max(1, *(len(rows) for rows in per_slot_rows))
    by_slot = [rows[j] if j < len(rows) else 0 for rows in per_slot_rows for j in range(per_slot)]
    slot_scales = [scales[k] if j < len(rows) else 0.0
                   for k, rows in enumerate(per_slot_rows) for j in range(per_slot)]
    return SlotPlan(rows=torch.tensor([0 if s is None else s for s in slots], device=device),
                    row_scales=torch.tensor([0.0 if s is None else scales[s] for s in slots], dtype=dtype,
                                            device=device),
                    by_slot=torch.tensor(by_slot, device=device),
                    slot_scales=torch.tensor(slot_scales, dtype=dtype, device=device), per_slot=per_slot)


def _by_slot_pays(slots: int, per_slot: int, rows: int, tokens: int) -> bool:
    """Whether the by-slot route costs less than the by-row one, counting matmul work and factor bytes.

    Per element of r (in + out): by slot multiplies slots * per_slot * tokens inputs and reads
    each slot's factors once; by row multiplies rows * tokens inputs and reads each row's factors
    three times (the copy's read and write, then the matmul); MOVE_COST prices an element moved.
    """
    by_slot = slots * per_slot * tokens + MOVE_COST * slots
    by_row = rows * tokens + MOVE_COST * 3 * rows
    return by_slot <= by_row


def add_batched(x: torch.Tensor, result: torch.Tensor, a_rows: torch.Tensor, b_rows: torch.Tensor,
                row_scales: float | torch.Tensor, in_place: bool, b_transposed: bool = False) -> torch.Tensor:
    """result + s_i B_i A_i x_i as two batched matmuls: A (N, r, in), B (N, out, r) or, with
    `b_transposed`, B^T (N, r, out); s one float or (N,)."""
    batch = x.shape[0]
    xa = torch.bmm(x.reshape(batch, -1, x.shape[-1]).to(a_rows.dtype), a_rows.transpose(1, 2))  # (N, L, r)
    alpha = 1.0
    if isinstance(row_scales, torch.Tensor):
        xa = xa * row_scales.view(-1, 1, 1)
    else:
        alpha = row_scales
    out = result.reshape(batch, -1, result.shape[-1])  # a view: writing it writes result
    b_t = b_rows if b_transposed else b_rows.transpose(1, 2)
    if xa.dtype == out.dtype:
        if in_place:
            out.baddbmm_(xa, b_t, alpha=alpha)
            return result
        return torch.baddbmm(out, xa, b_t, alpha=alpha).reshape(result.shape)
    update = (torch.bmm(xa, b_t) * alpha).to(out.dtype)
    return (out.add_(update) if in_place else out + update).reshape(result.shape)


def _padded(factor: torch.Tensor, rank: int, dim: int) -> torch.Tensor:
    """A factor with zeros appended along its rank dimension `dim` up to `rank` (itself when already
    there)."""
    missing = rank - factor.shape[dim]
    if missing == 0:
        return factor
    return torch.nn.functional.pad(factor, (0, missing) if dim == 1 else (0, 0, 0, missing))
