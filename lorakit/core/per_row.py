"""Per-row adapters: one batch where each row runs its own adapter (or none), in one forward.

A server holding one base model and many adapters can then answer requests for different
adapters together. Rows are grouped by adapter; each LoRA layer gathers a group's rows
(index_select), runs that adapter's B A on them only, and adds the result back at the same rows
(index_add). The Python loop runs over the distinct adapters, never over rows, and the base
weight is used once for the whole batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lorakit.core.adapters import list_adapters, merged_adapters
from lorakit.core.full_copies import ModulesToSave
from lorakit.core.layers import LoraEmbedding, LoraLinear, base_device
from lorakit.core.walk import adapter_modules

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


@contextmanager
def adapters_per_row(model: nn.Module, names: Sequence[str | None]) -> Iterator[None]:
    """Inside the block, row i of every batch runs adapter `names[i]` (None: the base model).

    Works for plain forward calls and for `model.generate` (greedy or sampled, without beam
    expansion). The adapters set with set_adapter are ignored inside the block and back in force
    after it, also when the block raises.

    Example:
        >>> with adapters_per_row(model, ["a", "b", None, "a"]):
        ...     out = model.generate(ids, max_new_tokens=20)  # ids has 4 rows

    Args:
        model: a model holding the named adapters (none of them merged).
        names: one adapter name (or None) per batch row.

    Raises:
        ValueError: on entry for an unknown name, an empty list or merged adapters; inside the
            block when a forward sees a batch of another size than len(names).
    """
    names = list(names)
    _check(model, names)
    plans: dict[torch.device, RowAdapters] = {}
    modules = adapter_modules(model)
    previous: list[tuple[LoraLinear | LoraEmbedding | ModulesToSave, Any]] = []
    hooks: list[RemovableHandle] = []
    try:
        for module in modules:
            device = base_device(module.original_module if isinstance(module, ModulesToSave) else module.base)
            plan = plans.setdefault(device, RowAdapters(names, device))
            if isinstance(module, ModulesToSave):
                previous.append((module, module.active_adapters))
                module.active_adapters = []  # the original runs on every row; the hook swaps rows in
                hooks.append(module.register_forward_hook(_copies_per_row(plan), with_kwargs=True))
            else:
                previous.append((module, module.row_adapters))
                module.row_adapters = plan
        yield
    finally:
        for handle in hooks:
            handle.remove()
        for held, state in previous:
            if isinstance(held, ModulesToSave):
                held.active_adapters = state
            else:
                held.row_adapters = state


def _check(model: nn.Module, names: list[str | None]) -> None:
    known = list_adapters(model)
    unknown = sorted({n for n in names if n is not None and n not in known}, key=str)
    if not names or unknown:
        raise ValueError(f"adapters_per_row needs one adapter name (or None) per row; unknown: "
                         f"{', '.join(map(repr, unknown)) or '(empty list)'}; adapters on this model: "
                         f"{', '.join(known) or 'none'}")
    if any(getattr(m, "row_adapters", None) is not None for m in adapter_modules(model)):
        raise ValueError("adapters_per_row is already in force on this model; blocks cannot be nested")
    merged = merged_adapters(model)
    if merged:
        raise ValueError(f"adapters {merged} are merged into the base weights, so every row would get them; "
                         "call unmerge(model) before adapters_per_row")


def _copies_per_row(plan: RowAdapters) -> Any:
    """A forward hook for ModulesToSave: rows of an adapter with its own copy take that copy's output."""

    def hook(module: ModulesToSave, args: tuple, kwargs: dict, output: Any) -> Any:
        if module.disabled:
            return output
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"adapters_per_row supports modules_to_save only for modules returning one tensor; "
                            f"{module.path!r} returned {type(output).__name__}")
        batch = output.shape[0]
        for name, rows in plan.groups(batch, module.path):
            if name not in module.modules_to_save:
                continue
            copy = module.modules_to_save[name]
            if rows is None:
                output = copy(*args, **kwargs)
                continue
            pick = [_rows_of(a, rows, batch) for a in args]
            picked_kwargs = {k: _rows_of(v, rows, batch) for k, v in kwargs.items()}
            output = output.index_copy(0, rows, copy(*pick, **picked_kwargs).to(output.dtype))
        return output

    return hook


def _rows_of(value: Any, rows: torch.Tensor, batch: int) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
        return value.index_select(0, rows)
    return value
