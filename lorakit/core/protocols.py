"""The two small protocols the layers answer: what every adapter module shares (model-level code
uses nothing else), and what the fast paths beside core hand the layers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import nn

from lorakit.core.rows import RowAdapters


class AdapterModule(Protocol):
    """What every lorakit wrapper answers (LoraLayer, and ModulesToSave for modules trained in full):
    the one interface set/delete/disable, per-row, save and merge_and_unload use, without asking
    which wrapper it is."""

    path: str
    active_adapters: list[str]
    disabled: bool
    row_adapters: RowAdapters | None

    def adapter_names(self) -> list[str]: ...

    def set_active(self, names: Sequence[str]) -> None: ...

    def delete(self, name: str) -> None: ...

    def peft_state(self, name: str) -> dict[str, torch.Tensor]: ...

    def original(self) -> nn.Module: ...

    def unloaded(self, names: Sequence[str], quantized: str | None) -> nn.Module: ...


class FastPaths(Protocol):
    """What lorakit.kernels hands the layers (`LoraLayer.kernels`): the fast paths, each answering
    None where it does not apply, so the reference computation here runs instead."""

    def forward(self, layer: Any, x: torch.Tensor) -> torch.Tensor | None: ...

    def forward_rows(self, layer: Any, x: torch.Tensor, result: torch.Tensor,
                     groups: list[tuple[str, torch.Tensor | None]]) -> torch.Tensor | None: ...
