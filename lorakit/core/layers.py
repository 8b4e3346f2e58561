"""The LoRA layer kinds: LoraLinear (Linear, Conv1D, 4-bit linear) here, LoraEmbedding re-exported.

Both implement the contract in contract.py (adapters by name, active/merged/disabled state,
factors, delta weight, merge/unmerge); each kind's file holds only what differs: how the factors
are stored and how forward computes h = W0 x + s * B A dropout(x). State-dict keys read
`<path>.lora_A.<name>.weight` (embeddings, in embedding_layer.py: `<path>.lora_embedding_A.<name>`)
as in PEFT. `layer_class` and `wrap` pick the kind for a module; model-level code imports the
kinds from here. The forward here is the reference; lorakit.kernels computes the same faster where
it can (protocols.FastPaths).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch import nn

from lorakit.core.attached import shared
from lorakit.core.bases import SUPPORTED_MODULES, adapter_dtype, base_device, builtin_kind, init_factors
from lorakit.core.config import is_svd_init
from lorakit.core.contract import KINDS, LoraLayer, base_kind, in_out, layer_class, register_kind
from lorakit.core.dora import DORA, Dora, Magnitude
from lorakit.core.embedding_layer import LoraEmbedding
from lorakit.core.init_methods import factors_from_weight, relative_error

__all__ = ["SUPPORTED_MODULES", "LoraEmbedding", "LoraLayer", "LoraLinear", "base_kind", "in_out",
           "layer_class", "register_kind", "wrap"]

LINEAR_KINDS = ("linear", "conv1d", "quantized")
DORA_KEY = "lora_magnitude_vector"
"""Where a DoRA adapter's magnitude m (out,) goes in a PEFT adapter file: `base_model.model.<path>.<key>`."""

AdapterUpdate = Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor]
"""(adapter name, start, x) -> start + s B A dropout(x): one adapter's addition, however computed."""


class LoraLinear(LoraLayer):
    """h = W0 x + sum over live adapters of s * B A dropout(x).   x: (..., in) -> h: (..., out)

    Wraps nn.Linear, transformers' Conv1D (weight stored in x out) and a 4-bit linear (NF4Linear).
    An adapter added with `use_dora` also holds a magnitude m (out,) in `lora_magnitude_vector`
    and scales the base output and its update per row (core/dora.py has the maths).
    Built by add_adapter, or on its own: `LoraLinear(nn.Linear(64, 32), r=8, alpha=16)` freezes the
    linear and holds one active, trainable adapter "default" (s = alpha / r).
    """

    supports_dora = True
    supports_svd_init = True

    @classmethod
    def wraps(cls, module: nn.Module) -> bool:
        return builtin_kind(module) in LINEAR_KINDS

    def __init__(self, base: nn.Module, path: str = "", r: int | None = None, alpha: float | None = None,
                 dropout: float = 0.0, name: str = "default") -> None:
        if not self.wraps(base):
            raise TypeError(f"LoraLinear cannot wrap {type(base).__name__} at {path!r}; it wraps nn.Linear, "
                            "transformers' Conv1D and lorakit's NF4Linear (nn.Embedding: LoraEmbedding)")
        super().__init__(base, path)
        # Conv1D stores its weight in x out, so deltas are transposed when merged into it.
        self.weight_in_by_out = self.fan_in_fan_out = self.kind == "conv1d"
        self.lora_A = nn.ModuleDict()  # name -> nn.Linear(in, r): A
        self.lora_B = nn.ModuleDict()  # name -> nn.Linear(r, out): B
        self.lora_dropout = nn.ModuleDict()  # name -> nn.Dropout(p), or nn.Identity without dropout
        self.shares_dropout_mask: dict[str, bool] = {}
        self.lora_magnitude_vector = nn.ModuleDict()  # name -> Magnitude (m: (out,)), DoRA adapters only
        # layers reading the same input (q, k, v), whose A sides run as one GEMM
        # (lorakit.kernels.shared_input); set by lorakit.fusion.fused_attention
        self.input_group: Any = None
        if r is not None:
            self.start(name, r, alpha, dropout)

    def add(self, name: str, r: int, scale: float, dropout: float = 0.0, init: str = "kaiming",
            share_dropout_mask: bool = True, use_dora: bool = False) -> None:
        """Create adapter `name` of rank r; with init "kaiming" or "gaussian" it changes nothing yet.

        With `use_dora`, m starts as the row norms of W + s B A (of W while B = 0).
        """
        device, dtype = base_device(self.base), adapter_dtype(self.base)
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_dropout[name].train(self.base.training)  # a new module starts in training mode
        self.shares_dropout_mask[name] = share_dropout_mask
        self.scaling[name] = scale
        if is_svd_init(init):
            self.init_from_weight(name, init)
        else:
            init_factors(self.a(name).weight, self.b(name).weight, init)
        if use_dora:
            DORA.start(self, name)

    def init_from_weight(self, name: str, init: str) -> None:
        """PiSSA / OLoRA: A and B from the base weight W, which becomes the residual W - s B A.

        A 4-bit base gets a new NF4 weight holding the quantized residual (init_methods.py).
        """
        scale = self.scaling[name]
        weight = self.weight_rows()  # (out, in); a 4-bit base dequantized
        a0, b0 = factors_from_weight(weight, self.rank(name), scale, init)
        self.set_factors(name, a0, b0)
        a0, b0 = (t.detach().clone() for t in self.factors(name))  # in the adapter's dtype
        self.initial_factors[name] = (a0, b0)
        dtype = torch.promote_types(weight.dtype, torch.float32)
        with torch.no_grad():
            update = (b0.to(dtype) @ a0.to(dtype)) * scale
            residual = weight.to(dtype) - update
            if self.kind == "quantized":  # a quantized base makes its own successor (NF4Linear.requantized)
                self.base = cast(Any, self.base).requantized(residual)
                self.requantization_error[name] = relative_error(self.weight_rows(), update, weight.to(dtype))
            else:
                base_weight = self._base_weight()
                base_weight.copy_((residual.T if self.weight_in_by_out else residual).to(base_weight.dtype))

    def variant(self, name: str) -> Dora | None:
        """Adapter `name`'s variant (DoRA), whose hooks forward and merging call; None for plain LoRA."""
        return DORA if name in self.lora_magnitude_vector else None

    def uses_dora(self, name: str) -> bool:
        """Whether adapter `name` is a DoRA adapter (holds a magnitude vector)."""
        return name in self.lora_magnitude_vector

    def magnitude(self, name: str) -> Magnitude:
        """DoRA adapter `name`'s magnitude module (m is its `weight`)."""
        return cast(Magnitude, self.lora_magnitude_vector[name])

    def weight_rows(self) -> torch.Tensor:
        """The base weight W as (out x in) (transposed for Conv1D, dequantized for a 4-bit base)."""
        weight = self._base_weight()
        return weight.T if self.weight_in_by_out else weight

    def a(self, name: str) -> nn.Linear:
        """Adapter `name`'s A projection (in -> r)."""
        return cast(nn.Linear, self.lora_A[name])

    def b(self, name: str) -> nn.Linear:
        """Adapter `name`'s B projection (r -> out)."""
        return cast(nn.Linear, self.lora_B[name])

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.a(name).weight, self.b(name).weight

    def adapter_parameters(self, name: str) -> list[torch.Tensor]:
        return [*self.factors(name), *([self.magnitude(name).weight] if self.uses_dora(name) else [])]

    def peft_state(self, name: str) -> dict[str, torch.Tensor]:
        state = super().peft_state(name)
        if self.uses_dora(name):
            state[DORA_KEY] = self.magnitude(name).weight
        return state

    def _drop(self, name: str) -> None:
        for store in (self.lora_A, self.lora_B, self.lora_dropout):
            del store[name]
        del self.shares_dropout_mask[name]
        if self.uses_dora(name):
            del self.lora_magnitude_vector[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """h = W0 x + sum over live adapters of s * B A dropout(x).   x: (..., in) -> h: (..., out)"""
        if self.disabled:
            return self.base(x)
        if self.row_adapters is not None:
            return self.forward_rows(x, self.base(x))
        # lorakit.kernels, where it applies
        fast = None if self.kernels is None else self.kernels.forward(self, x)
        return self.forward_adapters(x, self.reference_update) if fast is None else fast

    def forward_adapters(self, x: torch.Tensor, add_update: AdapterUpdate) -> torch.Tensor:
        """W0 x + bias, then each live adapter's update in turn through `add_update`; a variant (DoRA)
        rescales its own update on the base output alone."""
        h = base_out = self.base(x)  # W0 x + bias: (..., out)
        for name in self.live_adapters():
            variant = self.variant(name)
            z = add_update(name, h if variant is None else base_out, x)
            h = z if variant is None else variant.output(self, name, z, h, base_out)
        return h

    def reference_update(self, name: str, start: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """start + s B A dropout(x) in autograd ops, s on the rank side: an (..., r) multiply.

        Layers reading the same x (q, k and v) share its cast copy and, with shared masks, its
        dropped-out copy (`shared`, core/attached.py).
        """
        a, dropout, p = self.a(name), self.lora_dropout[name], self.dropout_p(name)
        cast_needed = x.dtype != a.weight.dtype and not torch.is_autocast_enabled(x.device.type)
        x_in = x
        if p > 0 and not self.shares_dropout_mask[name]:
            x_in = dropout(x.to(a.weight.dtype) if cast_needed else x)
        elif cast_needed or p > 0:
            x_in = shared(x, ("prepared", a.weight.dtype, p),
                          lambda: dropout(x.to(a.weight.dtype) if cast_needed else x), reader=(self, name))
        return start + self.b(name)(a(x_in) * self.scaling[name]).to(start.dtype)

    def dropout_p(self, name: str) -> float:
        """Adapter `name`'s dropout probability now: 0 in eval mode or without dropout."""
        dropout = self.lora_dropout[name]
        return dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0

    def batches_rows(self, names: Sequence[str]) -> bool:
        """Per-row rows batch unless an adapter among `names` has live dropout, whose mask `update`
        draws per adapter."""
        if not self.training or not any(isinstance(d, nn.Dropout) and d.training and d.p > 0
                                        for d in self.lora_dropout.values()):
            return True  # eval mode (serving), or no dropout: decided without a lookup per name
        return all(self.dropout_p(n) == 0 for n in names)

    def delta_weight(self, name: str) -> torch.Tensor:
        """What adapter `name` adds to the unmerged weight, fp32, laid out like it: s B A, or its
        variant's delta (DoRA: (g - 1) W0 + g s B A, so that W0 + delta = g (W0 + s B A))."""
        variant = self.variant(name)
        return super().delta_weight(name) if variant is None else variant.delta_weight(self, name)

    def delta_bound(self, name: str) -> float | None:
        # A variant's delta (DoRA: (g - 1) W0 + g s B A) is not bounded by the factors alone.
        return None if self.variant(name) is not None else super().delta_bound(name)

    def merges_first(self, name: str) -> bool:
        variant = self.variant(name)
        return variant is not None and variant.merges_first

    def _add_delta(self, name: str, sign: float) -> None:
        variant = self.variant(name)
        if variant is None:
            super()._add_delta(name, sign)
        else:
            variant.add_delta(self, name, sign)

    def update(self, name: str, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(B A dropout(x), s) for rows that run adapter `name` (adapters_per_row)."""
        x_in = self.lora_dropout[name](x.to(self.a(name).weight.dtype))
        return self.b(name)(self.a(name)(x_in)), self.scaling[name]


register_kind(LoraLinear)
register_kind(LoraEmbedding)
LAYER_KINDS = KINDS
"""Every LoRA layer kind: lorakit's two, then any a user registered (contract.register_kind)."""


def wrap(module: nn.Module, path: str) -> LoraLayer:
    """A new LoRA layer around `module`, which must be a supported kind, in the module's train/eval mode."""
    kind = layer_class(module)
    assert kind is not None, f"{type(module).__name__} is not a supported kind"
    return kind(module, path)
