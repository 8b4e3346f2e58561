"""The LoRA layer contract: a frozen base module with named low-rank adapters beside it.

`LoraLayer` is the contract every layer kind implements, and the only thing model-level code
(set/delete/disable/merge/combine/per-row, save/load) talks to. A layer holds `base` (the original
module, untouched) and, per adapter name, its factors A (r x in) and B (out x r) with the scale s,
so that the adapter adds

    delta W = s * B A        (out x in; transposed for a base that stores its weight in x out)

Which adapters run is the list `active_adapters`; which are folded into the base weight is
`merged_adapters` (kept in merge order); `disabled` makes the layer compute its base alone.
Nothing here changes state behind the caller's back. A new kind is one new subclass: `add`,
`factors`, `_drop` and `forward`. A variant of an adapter (DoRA) is not a kind: it is a property of
the adapter on the same layer, with its extra tensors in `adapter_parameters` and `peft_state`.
The kinds are LoraLinear (layers.py) and LoraEmbedding (embedding_layer.py); bases.py holds what
lorakit knows of the modules they wrap, protocols.py what they answer. docs/layers.md is the tour.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lorakit.core.bases import builtin_kind, is_quantized
from lorakit.core.protocols import FastPaths
from lorakit.core.rows import RowAdapters, add_rows


def base_kind(module: nn.Module) -> str | None:
    """The kind of base module a LoRA layer can wrap ("linear", "conv1d", "embedding", "quantized", or
    the `kind_name` of a registered kind that wraps it), or None."""
    kind = builtin_kind(module)
    if kind is None:
        registered = layer_class(module)
        kind = None if registered is None else registered.kind_name
    return kind


def in_out(module: nn.Module) -> tuple[int, int]:
    """(in, out) of a linear, Conv1D, 4-bit linear or embedding (num_embeddings, dim), or what a
    registered kind's `sizes` says."""
    kind = builtin_kind(module)
    if kind is None and layer_class(module) is not None:
        return layer_class(module).sizes(module)  # type: ignore[union-attr]
    if kind == "conv1d":
        rows, cols = module.weight.shape  # type: ignore[union-attr,misc]
        return int(rows), int(cols)
    if kind == "embedding":
        return int(module.num_embeddings), int(module.embedding_dim)  # type: ignore[arg-type]
    return int(module.in_features), int(module.out_features)  # type: ignore[arg-type]


KINDS: list[type[LoraLayer]] = []
"""The LoRA layer kinds, in the order `layer_class` asks them (`register_kind` adds one)."""


def register_kind(kind: type[LoraLayer]) -> type[LoraLayer]:
    """Make `kind` (a LoraLayer subclass) wrap the modules its `wraps` accepts; usable as a decorator.

    From then on add_adapter targets those modules, and save_adapter / load_adapter write and read
    the kind's `peft_keys`: a new kind is this one class.
    """
    if kind not in KINDS:
        KINDS.append(kind)
    return kind


def layer_class(module: nn.Module) -> type[LoraLayer] | None:
    """The registered LoRA layer kind that wraps `module`, or None."""
    return next((kind for kind in KINDS if kind.wraps(module)), None)


class LoraLayer(nn.Module):
    """The contract of a LoRA layer: adapters held by name beside a frozen `base`.

    Attributes:
        base: the wrapped module, never changed except by merge/unmerge.
        path: the module's path in its model ("" for a layer used on its own).
        kind: the base's kind, as `base_kind` names it.
        in_features, out_features: the sizes A and B map between (for an embedding: the
            vocabulary and the embedding width).
        scaling: adapter name -> s; its keys are the adapters this layer holds.
        active_adapters: the adapters forward adds, in order.
        merged_adapters: the adapters folded into the base weight, in merge order.
        disabled: forward computes the base alone (inside `disable_adapters`).
        row_adapters: inside `adapters_per_row`, which adapter each batch row runs.
    """

    weight_in_by_out = False
    """True when the base stores its weight (in x out), so a delta is transposed before it is added."""
    fan_in_fan_out = False
    """PEFT's `fan_in_fan_out`: a linear base storing its weight (in x out), such as transformers' Conv1D."""
    peft_keys = ("lora_A.weight", "lora_B.weight")
    """Where A and B go in a PEFT adapter file: `base_model.model.<path>.<key>`."""
    # What a kind can do, asked by inject, the optimizer, the file formats and serve instead of its name.
    supports_dora = False
    """Whether an adapter on this kind may be a DoRA adapter (a magnitude per output row)."""
    supports_svd_init = False
    """Whether PiSSA / OLoRA can start an adapter here from the base weight's decomposition."""
    is_embedding = False
    """Whether the base is a lookup table (nn.Embedding): its A is read by index, not multiplied."""
    kind_name = ""
    """What `base_kind` calls the modules this kind wraps, for a kind outside lorakit's own."""
    kernels: FastPaths | None = None
    """The fast paths (lorakit.kernels.dispatch, handed over by `import lorakit`); None runs the reference."""

    def __init__(self, base: nn.Module, path: str) -> None:
        super().__init__()
        self.base = base
        self.path = path
        self.kind = base_kind(base)
        self.in_features, self.out_features = in_out(base)
        self.scaling: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        self.row_adapters: RowAdapters | None = None
        self._row_stacks: Any = None  # the kernels' per-row stacks of this layer's adapters (row_stacks.py)
        # PiSSA / OLoRA adapters (init_methods.py): name -> the (A0, B0) they started from, kept for
        # save_adapter(convert_to_lora=True), and on a 4-bit base the relative error of quantizing the
        # residual again. Not in the state dict.
        self.initial_factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.requantization_error: dict[str, float] = {}
        self.training = base.training  # follow the model's mode, not nn.Module's default

    # --- what each kind provides -----------------------------------------------------------------

    @classmethod
    def wraps(cls, module: nn.Module) -> bool:
        """Whether this kind wraps `module` (see `register_kind`)."""
        return False

    @classmethod
    def sizes(cls, module: nn.Module) -> tuple[int, int]:
        """(in, out) of a module this kind wraps: the sizes A and B map between."""
        return int(module.in_features), int(module.out_features)  # type: ignore[arg-type]

    def add(self, name: str, r: int, scale: float, dropout: float = 0.0, init: str = "kaiming",
            share_dropout_mask: bool = True, use_dora: bool = False) -> None:
        """Create adapter `name` of rank r and scale s (it does not become active by itself); `use_dora`
        gives it a DoRA magnitude (core/dora.py), on the kinds that support it."""
        raise NotImplementedError

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The live (A, B) parameters of adapter `name`: A (r x in), B (out x r), delta = s * B @ A."""
        raise NotImplementedError

    def _drop(self, name: str) -> None:
        """Free the kind's own storage of adapter `name` (its factors, its dropout)."""
        raise NotImplementedError

    def update(self, name: str, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(u, c) with c * u = adapter `name`'s addition to the output for input x (per-row batches)."""
        raise NotImplementedError

    # --- the same for every kind -----------------------------------------------------------------

    def adapter_names(self) -> list[str]:
        """The adapters this layer holds, in the order they were added."""
        return list(self.scaling)

    def live_adapters(self) -> list[str]:
        """The adapters forward adds now: active, held here, and not merged into the base."""
        return [n for n in self.active_adapters if n in self.scaling and n not in self.merged_adapters]

    def set_active(self, names: Sequence[str]) -> None:
        """Run the held adapters among `names` (in that order) and train exactly those."""
        self.active_adapters = [n for n in names if n in self.scaling]
        for held in self.scaling:
            for param in self.adapter_parameters(held):
                param.requires_grad_(held in names)

    def delete(self, name: str) -> None:
        """Remove adapter `name` and free its tensors (it must not be merged)."""
        assert name not in self.merged_adapters, "unmerge before deleting"
        self._drop(name)
        del self.scaling[name]
        self._row_stacks = None
        self.initial_factors.pop(name, None)
        self.requantization_error.pop(name, None)
        if name in self.active_adapters:
            self.active_adapters.remove(name)

    def start(self, name: str, r: int, alpha: float | None, dropout: float) -> None:
        """Standalone use: freeze the base, add adapter `name` (s = alpha / r; alpha defaults to r),
        run and train it."""
        self.base.requires_grad_(False)
        self.add(name, r, (r if alpha is None else alpha) / r, dropout)
        self.set_active([name])

    def forward_rows(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """Inside adapters_per_row: each row's update added at its row, one adapter at a time, or
        batched by the kernels where they apply (lorakit.kernels.row_stacks)."""
        plan = self.row_adapters
        assert plan is not None
        groups = plan.groups(x.shape[0], self.path)
        batched = None if self.kernels is None else self.kernels.forward_rows(self, x, result, groups)
        if batched is not None:
            return batched
        # Without autograd the base output is ours to update in place, saving a copy per adapter.
        in_place = not result.requires_grad
        for name, rows in groups:
            if name in self.scaling:
                update, scale = self.update(name, x if rows is None else x.index_select(0, rows))
                result = add_rows(result, rows, update.to(result.dtype), scale, in_place)
        return result

    def batches_rows(self, names: Sequence[str]) -> bool:
        """Whether the rows of adapters `names` (all held here) may run as one batched update: the
        same sum as `update` one adapter at a time. False (the default) keeps them one at a time."""
        return False

    def adapter_parameters(self, name: str) -> list[torch.Tensor]:
        """Every tensor adapter `name` trains: A and B, plus what a variant adds (DoRA's magnitude)."""
        return list(self.factors(name))

    def original(self) -> nn.Module:
        """The module this layer stands for: its base."""
        return self.base

    def rank(self, name: str) -> int:
        return int(self.factors(name)[0].shape[0])

    def set_factors(self, name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        """Copy A (r x in) and B (out x r) into adapter `name`'s parameters."""
        live_a, live_b = self.factors(name)
        with torch.no_grad():
            live_a.copy_(a)
            live_b.copy_(b)

    def peft_state(self, name: str) -> dict[str, torch.Tensor]:
        """Adapter `name`'s live A and B under their PEFT keys (`peft_keys`)."""
        return dict(zip(self.peft_keys, self.factors(name), strict=True))

    def delta_weight(self, name: str) -> torch.Tensor:
        """s * B @ A in fp32, laid out like the base weight (out x in, or in x out)."""
        a, b = self.factors(name)
        delta = (b.float() @ a.float()) * self.scaling[name]
        return delta.T if self.weight_in_by_out else delta

    # --- merging ---------------------------------------------------------------------------------

    @property
    def mergeable(self) -> bool:
        """Whether deltas can be added to the base weight in place (not into a 4-bit weight)."""
        return not is_quantized(self.base)

    def to_merge(self, names: Sequence[str]) -> list[str]:
        """The adapters among `names` that this layer holds and has not merged yet."""
        return [n for n in names if n in self.scaling and n not in self.merged_adapters]

    def merges_first(self, name: str) -> bool:
        """Whether adapter `name` can only be merged into the unmerged weight W0 (DoRA: g (W0 + s B A))."""
        return False

    def check_merge_order(self, names: Sequence[str]) -> None:
        """Refuse (ValueError) merging `names` in this order when one of them needs W0 but would follow
        another merged adapter."""
        for index, name in enumerate(names):
            if self.merges_first(name) and (self.merged_adapters or index > 0):
                before = [*self.merged_adapters, *names[:index]]
                raise ValueError(f"adapter {name!r} uses DoRA, whose merged weight needs the unmerged base "
                                 f"weight, but {', '.join(map(repr, before))} would be merged into "
                                 f"{self.path!r} before it; merge the DoRA adapter first (unmerge() undoes "
                                 "every merge)")

    def check_merge(self, names: Sequence[str]) -> None:
        """Refuse (ValueError) when W0 + delta of an adapter among `names` has an inf or NaN in the
        weight's dtype.

        Usually proven without building W0 + delta: when max|W0| + `delta_bound` stays below half the
        dtype's largest value, no entry can overflow or be NaN. Otherwise (non-finite factors or base,
        huge values, a delta that is not s B A) the merged weight is built and tested, entry by entry.
        """
        weight = self._base_weight()
        with torch.no_grad():
            low, high = torch.aminmax(weight)  # one read of W0, no copy; NaN if W0 holds one
            largest = max(-low.item(), high.item())
            for name in names:
                bound = self.delta_bound(name)
                if bound is not None and largest + bound < torch.finfo(weight.dtype).max / 2:
                    continue  # NaN in either term fails the comparison and falls through
                merged = (weight.float() + self.delta_weight(name).to(weight.device)).to(weight.dtype)
                if not torch.isfinite(merged).all():
                    raise ValueError(f"merging adapter {name!r} into {self.path!r} gives non-finite weights "
                                     f"(inf or NaN in {weight.dtype}); nothing was merged")

    def delta_bound(self, name: str) -> float | None:
        """A bound on every |entry| of adapter `name`'s delta s B A, or None when its delta is not s B A.

        Entry (i, j) is s * sum_k B_ik A_kj, so it is at most |s| * max_i sum_k |B_ik| * max |A|; in
        float64 from the small factors. inf or NaN when a factor holds one.
        """
        a, b = (t.detach().double() for t in self.factors(name))
        return abs(self.scaling[name]) * b.abs().sum(dim=1).max().item() * a.abs().max().item()

    def merged_weight(self, names: Sequence[str]) -> torch.Tensor:
        """W0 + the deltas of `names`, in fp32 (a 4-bit base dequantized)."""
        weight = self._base_weight()
        with torch.no_grad():
            merged = weight.float()
            for name in names:
                merged = merged + self.delta_weight(name).to(weight.device)
        return merged

    def unloaded(self, names: Sequence[str], quantized: str | None) -> nn.Module:
        """The plain module that takes this layer's place in merge_and_unload, with `names` merged.

        A mergeable base has them merged already (merge checks every layer first). A quantized base
        builds the merged module itself (`to_linear`, as NF4Linear does): a plain linear, or with
        quantized="requantize" a new 4-bit one; core knows no 4-bit format.
        """
        pending = self.to_merge(names)
        if self.mergeable or not pending:
            return self.base
        base: Any = self.base
        return base.to_linear(self.merged_weight(pending), requantize=quantized != "dequantize")  # type: ignore[no-any-return]

    def _base_weight(self) -> torch.Tensor:
        weight = self.base.dequantize_weight(torch.float32) if self.kind == "quantized" else self.base.weight  # type: ignore[operator]
        assert isinstance(weight, torch.Tensor)
        return weight

    def merge(self, names: Sequence[str], safe: bool = True) -> None:
        """Fold the adapters among `names` not merged yet into the base weight: W = W0 + s B A.

        Merging twice is merging once. With `safe`, every delta is checked to give finite weights
        before any is written.
        """
        pending = self.to_merge(names)
        if not pending:
            return
        if not self.mergeable:
            raise ValueError(f"cannot merge into the 4-bit base of {self.path!r} in place")
        self.check_merge_order(pending)
        if safe:
            self.check_merge(pending)
        for name in pending:  # one at a time, in order, as unmerge undoes them
            self._add_delta(name, sign=1.0)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Subtract every merged adapter from the base weight again, last merged first."""
        for name in reversed(self.merged_adapters):
            self._add_delta(name, sign=-1.0)
        self.merged_adapters.clear()

    def _add_delta(self, name: str, sign: float) -> None:
        """W0 += sign * s B A (transposed for a weight stored in x out), deltas in fp32."""
        weight = self._base_weight()
        a, b = self.factors(name)
        with torch.no_grad():
            if weight.dtype == a.dtype == b.dtype == torch.float32 and weight.device == a.device:
                # One BLAS call into W0 itself: no delta, no copy of W0. Each large temporary costs
                # page faults (glibc hands big blocks back to the kernel), which made merging slow.
                if self.weight_in_by_out:
                    weight.addmm_(a.T, b.T, alpha=sign * self.scaling[name])  # (in, r) @ (r, out)
                else:
                    weight.addmm_(b, a, alpha=sign * self.scaling[name])  # (out, r) @ (r, in)
                return
            updated = weight.float() + sign * self.delta_weight(name).to(weight.device)
            weight.copy_(updated.to(weight.dtype))

    def extra_repr(self) -> str:
        ranks = {name: self.rank(name) for name in self.scaling}
        return f"in={self.in_features}, out={self.out_features}, ranks={ranks}, active={self.active_adapters}"
