"""Per-row adapters: one batch where each row runs its own adapter (or none), in one forward.

A server holding one base model and many adapters can then answer requests for different
adapters together. The base weight is used once for the whole batch. A linear layer whose rows
use several adapters gathers each row's A and B into stacks and runs two batched matmuls
(`lorakit.kernels.row_stacks.gather_rows`, the BGMV scheme of Punica, S-LoRA and vLLM), however
many adapters the rows use. Otherwise (one adapter for the batch, embeddings, live dropout) rows
are grouped by adapter: the layer gathers a group's rows (index_select), runs that adapter's B A on them only,
and adds the result back at the same rows (index_add), looping over distinct adapters.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from lorakit.core.bases import base_device
from lorakit.core.config import LoraConfig
from lorakit.core.registry import (
    adapter_configs,
    list_adapters,
    merged_adapters,
    merged_error,
    unknown_adapter_error,
)
from lorakit.core.rows import RowAdapters
from lorakit.core.walk import adapter_modules


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
    try:
        for module in modules:
            device = base_device(module.original())
            if device not in plans:  # one plan per device, shared by its layers
                plans[device] = RowAdapters(names, device)
            module.row_adapters = plans[device]
        yield
    finally:
        for module in modules:
            module.row_adapters = None


def _check(model: nn.Module, names: list[str | None]) -> None:
    known = list_adapters(model)
    unknown = sorted({n for n in names if n is not None and n not in known}, key=str)
    if not names or unknown:
        raise unknown_adapter_error(model, unknown,
                                    lead="adapters_per_row needs one adapter name (or None) per row; "
                                    "unknown: ", empty="(empty list)")
    if any(m.row_adapters is not None for m in adapter_modules(model)):
        raise ValueError("adapters_per_row is already in force on this model; blocks cannot be nested")
    merged = merged_adapters(model)
    if merged:
        raise merged_error(merged, "before adapters_per_row (merged adapters would apply to every row)")
    refused = not_per_row(model, names)
    if refused:
        raise ValueError(f"adapter(s) {', '.join(map(repr, refused))} use DoRA, which per-row adapters "
                         "do not support yet (each row would need its own weight norm); use them one at a "
                         "time with set_adapter, or merge them")


def runs_per_row(config: LoraConfig) -> bool:
    """Whether an adapter made from `config` can run per row: the one rule, which serve asks too.

    Not a DoRA adapter: its rescaling needs one adapter's weight norm for the whole batch.
    """
    return not config.use_dora


def not_per_row(model: nn.Module, names: Sequence[str | None]) -> list[str]:
    """The adapters among `names` that cannot run per row (`runs_per_row`)."""
    configs = adapter_configs(model)
    return sorted({n for n in names if n is not None and n in configs and not runs_per_row(configs[n])})
