"""The running batch's KV cache: one transformers DynamicCache whose rows come and go.

The requests joining at one step are prefilled together into a DynamicCache of their own (keys
and values per layer: (rows, kv_heads, length, head_dim), prompts padded on the left); joining
the batch pastes those rows under the batch's, padded on the left to a common length, and
leaving drops a row (`batch_select_indices`). The mask
marks the padding, which attention then skips exactly (a masked score contributes exp(-inf) = 0),
and each row's positions count its real tokens only, so a row's logits are the ones it would get
alone. Columns that are padding in every row are cut off, so a long-gone long prompt does not keep
costing attention.

Only full-attention caches (DynamicLayer) can be padded this way; a model whose cache holds
sliding-window or other layers is refused with a clear error (`check_layers`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


class BatchCache:
    """KV cache, padding mask and next position of every running row, in batch order."""

    def __init__(self) -> None:
        self.cache: Any = None  # a transformers DynamicCache once a row has joined
        self.mask = torch.zeros(0, 0, dtype=torch.long)  # (rows, columns): 1 where a real token sits
        self.positions: list[int] = []  # per row: its real tokens so far, the next token's position

    @property
    def rows(self) -> int:
        return len(self.positions)

    @property
    def width(self) -> int:
        return int(self.mask.shape[1])

    def add(self, cache: Any, mask: torch.Tensor, lengths: list[int]) -> None:
        """Append the rows of a prefilled cache (left-padded as `mask` (rows, columns) says) as the last
        rows."""
        check_layers(cache)
        if self.cache is None or self.rows == 0:
            self.cache, self.mask, self.positions = cache, mask, list(lengths)
            return
        width = max(self.width, int(mask.shape[1]))
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([_pad_left(mine.keys, width), _pad_left(theirs.keys, width)])
            mine.values = torch.cat([_pad_left(mine.values, width), _pad_left(theirs.values, width)])
        self.mask = torch.cat([F.pad(self.mask, (width - self.width, 0)),
                               F.pad(mask, (width - mask.shape[1], 0))])
        self.positions += lengths

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows (in this order), then cut the columns that are padding in all of them."""
        if rows == list(range(self.rows)):
            return
        if not rows:
            self.__init__()  # type: ignore[misc]
            return
        index = torch.tensor(rows, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask = self.mask.index_select(0, index)
        self.positions = [self.positions[i] for i in rows]
        padding = int((self.mask.sum(0) == 0).long().cumprod(0).sum())  # leading all-padding columns
        if padding:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, padding:], layer.values[:, :, padding:]
            self.mask = self.mask[:, padding:]

    def undo_partial_step(self) -> None:
        """Drop what a failed decode step appended: each layer's columns past the mask's width.

        A forward that raises after some layers have run leaves those layers one column longer than
        the others (and than the mask); the rows then redo the step from the cache as it was.
        """
        for layer in getattr(self.cache, "layers", []):
            keys = getattr(layer, "keys", None)
            if isinstance(keys, torch.Tensor) and keys.dim() == 4 and keys.shape[2] > self.width:
                layer.keys, layer.values = keys[:, :, : self.width], layer.values[:, :, : self.width]

    def step_inputs(self, cache_arg: str) -> dict[str, Any]:
        """The forward arguments of one decode step (one new token per row), besides input_ids; the
        cache goes in as `cache_arg` (transformers renamed past_key_values to cache in 5.2x)."""
        mask = torch.cat([self.mask, self.mask.new_ones(self.rows, 1)], dim=1)
        return dict(attention_mask=mask, **{cache_arg: self.cache}, use_cache=True,
                    position_ids=torch.tensor(self.positions, device=mask.device).unsqueeze(1),
                    cache_position=torch.tensor([self.width], device=mask.device))

    def advance(self, attention_mask: torch.Tensor) -> None:
        """After a decode step: the step's mask (one more column) and one more position per row."""
        self.mask = attention_mask
        self.positions = [p + 1 for p in self.positions]


def check_layers(cache: Any) -> None:
    """Refuse caches this batching cannot pad: anything but plain full-attention DynamicLayers."""
    kinds = sorted({type(layer).__name__ for layer in getattr(cache, "layers", [None])})
    if kinds != ["DynamicLayer"]:
        raise ValueError(f"lorakit serve batches full-attention KV caches only (transformers' "
                         f"DynamicLayer); this model's cache holds {', '.join(kinds)}. Serve it with vLLM "
                         "instead (docs/serve.md)")


def _pad_left(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """(rows, heads, length, dim) padded with zeros on the left of the length axis to `width`."""
    missing = width - tensor.shape[2]
    return tensor if missing == 0 else F.pad(tensor, (0, 0, missing, 0))

