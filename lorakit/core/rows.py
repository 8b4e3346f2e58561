"""Which adapter each batch row runs: the plan `adapters_per_row` hands to every adapter module."""

from __future__ import annotations

from collections.abc import Sequence

import torch

_EXPANDED_HINT = (
    "generate() with num_beams > 1 or num_return_sequences > 1 expands the batch; give one adapter "
    "per expanded row (e.g. repeat each entry num_beams times) or decode without expansion"
)


class RowAdapters:
    """Which adapter each batch row uses, grouped: (adapter, row indices) per distinct adapter.

    Row indices live on one device; a group covering every row carries None instead, so a batch
    that uses one adapter throughout costs no gather at all.
    """

    def __init__(self, names: Sequence[str | None], device: torch.device) -> None:
        self.names = list(names)
        grouped: dict[str, list[int]] = {}
        for row, name in enumerate(self.names):
            if name is not None:
                grouped.setdefault(name, []).append(row)
        self._groups = [
            (name, None if len(rows) == len(self.names) else torch.tensor(rows, device=device))
            for name, rows in grouped.items()
        ]

    def groups(self, batch: int, path: str) -> list[tuple[str, torch.Tensor | None]]:
        """The (adapter, rows) groups, after checking the batch has one row per given adapter."""
        if batch != len(self.names):
            raise ValueError(
                f"adapters_per_row was given {len(self.names)} rows, but {path or 'the model'} saw a batch of "
                f"{batch}; {_EXPANDED_HINT}"
            )
        return self._groups


def add_rows(result: torch.Tensor, rows: torch.Tensor | None, update: torch.Tensor, scale: float,
             in_place: bool) -> torch.Tensor:
    """result[rows] += scale * update (all rows when `rows` is None); the scale rides along as alpha."""
    if rows is None:
        return result.add_(update, alpha=scale) if in_place else result.add(update, alpha=scale)
    if in_place:
        return result.index_add_(0, rows, update, alpha=scale)
    return result.index_add(0, rows, update, alpha=scale)


def gather_rows(x: torch.Tensor, result: torch.Tensor, factors: Sequence[tuple[torch.Tensor, torch.Tensor] | None],
                scales: Sequence[float], in_place: bool) -> torch.Tensor:
    """result + s_i B_i A_i x_i for every row i, in two batched matmuls whatever the number of adapters.

    The BGMV idea of Punica, S-LoRA and vLLM, in plain torch ops: each row's A (r x in) and B
    (out x r) are gathered into one stack in row order, then x_i A_i^T and (x_i A_i^T) B_i^T run as
    two `bmm`s over the batch. A Python loop over distinct adapters would issue ~4 ops per adapter
    per layer; here a layer issues ~5 ops in all. Ranks that differ are padded with zero rows and
    columns of A and B, which add exact zeros; a row without an adapter in this layer (None) gets
    zero factors. The stacks are views of the live parameters for autograd, so gradients reach
    each row's own A and B.

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
    b_rows = torch.stack([_padded(f[1], rank, 1) if f is not None else zero_b for f in factors])  # (N, out, r)
    batch = x.shape[0]
    xa = torch.bmm(x.reshape(batch, -1, x.shape[-1]).to(a0.dtype), a_rows.transpose(1, 2))  # (N, L, r)
    live = [s for s, f in zip(scales, factors, strict=True) if f is not None]
    alpha = live[0]
    if any(s != alpha for s in live):  # mixed scales: one multiply on the small (N, L, r) side
        xa = xa * torch.tensor([s if f is not None else 0.0 for s, f in zip(scales, factors, strict=True)],
                               dtype=xa.dtype, device=xa.device).view(-1, 1, 1)
        alpha = 1.0
    out = result.reshape(batch, -1, result.shape[-1])  # a view: writing it writes result
    b_t = b_rows.transpose(1, 2)
    if xa.dtype == out.dtype:
        if in_place:
            out.baddbmm_(xa, b_t, alpha=alpha)
            return result
        return torch.baddbmm(out, xa, b_t, alpha=alpha).reshape(result.shape)
    update = (torch.bmm(xa, b_t) * alpha).to(out.dtype)
    return (out.add_(update) if in_place else out + update).reshape(result.shape)


def _padded(factor: torch.Tensor, rank: int, dim: int) -> torch.Tensor:
    """A factor with zeros appended along its rank dimension `dim` up to `rank` (itself when already there)."""
    missing = rank - factor.shape[dim]
    if missing == 0:
        return factor
    return torch.nn.functional.pad(factor, (0, missing) if dim == 1 else (0, 0, 0, missing))
