"""The LoRA layer kinds: LoraLinear (Linear, Conv1D, 4-bit linear) here, LoraEmbedding re-exported.

Both implement the contract in contract.py (adapters by name, active/merged/disabled state,
factors, delta weight, merge/unmerge); each kind's file holds only what differs: how the factors
are stored and how forward computes h = W0 x + s * B A dropout(x). State-dict keys read
`<path>.lora_A.<name>.weight` (embeddings, in embedding_layer.py: `<path>.lora_embedding_A.<name>`)
as in PEFT. `layer_class` and `wrap` pick the kind for a module; model-level code imports the
kinds from here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import nn

from lorakit.core.base_weight import BaseWeight
from lorakit.core.config import is_svd_init
from lorakit.core.contract import (
    SUPPORTED_MODULES,
    LoraLayer,
    adapter_dtype,
    base_device,
    base_kind,
    in_out,
    init_factors,
)
from lorakit.core.dora import Magnitude, dora_delta, dora_output, row_norm, unmerged_weight
from lorakit.core.embedding_layer import LoraEmbedding
from lorakit.core.init_methods import factors_from_weight, relative_error
from lorakit.core.lora_function import (
    adapter_input,
    lora_forward,
    lora_linear,
    lora_update,
    quantized_dropout,
)
from lorakit.core.shared_input import InputGroup

__all__ = ["SUPPORTED_MODULES", "LoraEmbedding", "LoraLayer", "LoraLinear", "base_kind", "in_out", "wrap"]

LINEAR_KINDS = ("linear", "conv1d", "quantized")
DORA_KEY = "lora_magnitude_vector"
"""Where a DoRA adapter's magnitude m (out,) goes in a PEFT adapter file: `base_model.model.<path>.<key>`."""

# The three computations LoraLinear.forward can run; `LoraLinear.path_for` picks one.
FUSED, UPDATE, AUTOGRAD = "fused", "update", "autograd"


class LoraLinear(LoraLayer):
    """h = W0 x + sum over live adapters of s * B A dropout(x).   x: (..., in) -> h: (..., out)

    Wraps nn.Linear, transformers' Conv1D (weight stored in x out) and a 4-bit linear (NF4Linear).
    An adapter added with `use_dora` also holds a magnitude m (out,) in `lora_magnitude_vector`
    and scales the base output and its update per row (core/dora.py has the maths).
    Built by add_adapter, or on its own: `LoraLinear(nn.Linear(64, 32), r=8, alpha=16)` freezes the
    linear and holds one active, trainable adapter "default" (s = alpha / r).
    """

    def __init__(self, base: nn.Module, path: str = "", r: int | None = None, alpha: float | None = None,
                 dropout: float = 0.0, name: str = "default") -> None:
        if base_kind(base) not in LINEAR_KINDS:
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
        # layers reading the same input (q, k, v), whose A sides run as one GEMM; set by hf.fused_attention
        self.input_group: InputGroup | None = None
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
            self.start_magnitude(name)

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
            if self.kind == "quantized":
                self.base = requantized(self.base, residual)
                self.requantization_error[name] = relative_error(self.weight_rows(), update, weight.to(dtype))
            else:
                base_weight = self._base_weight()
                base_weight.copy_((residual.T if self.weight_in_by_out else residual).to(base_weight.dtype))

    def start_magnitude(self, name: str) -> None:
        """Make adapter `name` a DoRA adapter (again): m = ||W + s B A||_row of the current W, A and B."""
        a, b = self.factors(name)
        magnitude = row_norm(self.weight_rows(), a, b, self.scaling[name]).to(a.dtype)
        self.lora_magnitude_vector[name] = Magnitude(magnitude)

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

    def dora_norm(self, name: str) -> torch.Tensor:
        """||W + s B A||_row of DoRA adapter `name`, detached: computed once per change of W, A or B."""
        sources = [*self.base.parameters(recurse=False), *self.base.buffers(recurse=False)]
        return self.magnitude(name).norm(self.weight_rows, *self.factors(name), self.scaling[name], sources)

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
            self.refuse_dora([n for n in self.row_adapters.names if n is not None], "per-row adapters")
            return self.forward_rows(x, self.base(x))
        if not torch.is_grad_enabled():
            out = self._inference(x)
            if out is not None:
                return out
        path = self.path_for(x.dtype, torch.is_autocast_enabled(x.device.type))
        live = self.live_adapters()
        if path == FUSED:  # the base and the one adapter in one autograd function (lora_function.py)
            # with q, k and v: all three A sides as one GEMM when the first of them runs (shared_input.py)
            grouped = self.input_group.output(self, x) if self.input_group is not None else None
            if grouped is not None:
                return grouped
            return lora_linear(x, *self.fused_arguments(live[0]), self.shares_dropout_mask[live[0]],
                               reader=(id(self), live[0]))
        h = base_out = self.base(x)  # W0 x + bias: (..., out)
        for name in live:
            a, b, s = *self.factors(name), self.scaling[name]  # A: (r, in), B: (out, r)
            # DoRA rescales W0 x + s B A x, its own update on the base output alone.
            start = base_out if self.uses_dora(name) else h
            if path == UPDATE:  # start + s B A dropout(x) in one autograd function (lora_function.py)
                z = lora_update(start, x, a, b, s, self.dropout_p(name), self.shares_dropout_mask[name],
                                reader=(id(self), name))
            else:  # the reference, in autograd ops; s on the rank side: an (..., r) multiply
                x_in = adapter_input(x, a.dtype, self.lora_dropout[name], self.shares_dropout_mask[name],
                                     reader=(id(self), name))
                z = start + self.b(name)(self.a(name)(x_in) * s).to(h.dtype)
            if not self.uses_dora(name):
                h = z
            elif h is base_out:  # the first adapter: h is exactly its output
                h = self._dora(name, z)
            else:  # add what DoRA changes: (g - 1) W0 x + g s B A dropout(x)
                h = h + (self._dora(name, z) - base_out)
        return h

    def _inference(self, x: torch.Tensor) -> torch.Tensor | None:
        """W0 x + bias + s B A x without autograd, for one plain adapter on a linear base with no
        dropout, all in x's dtype and autocast off; None otherwise (forward then decides as usual).

        The same maths as the fused path without its autograd function. Generation runs this once per
        layer per token, where the matmuls take tens of microseconds and Python's checks are no longer
        small beside them: each is made once here, straight from the dicts, rather than through
        path_for's general questions, and a grouped q/k/v (InputGroup) does not pay at one token.
        """
        live = self.live_adapters()
        if len(live) != 1 or self.kind != "linear":
            return None
        name = live[0]
        dropout = self.lora_dropout[name]
        if name in self.lora_magnitude_vector or (dropout.training and isinstance(dropout, nn.Dropout)
                                                  and quantized_dropout(dropout.p) > 0):
            return None
        base = cast(nn.Linear, self.base)
        weight, bias = base.weight, base.bias
        a, b = cast(nn.Linear, self.lora_A[name]).weight, cast(nn.Linear, self.lora_B[name]).weight
        if not (x.dtype == weight.dtype == a.dtype == b.dtype) or torch.is_autocast_enabled(x.device.type):
            return None
        flat = x.reshape(-1, x.shape[-1])
        y, _ = lora_forward(flat, weight, bias, a, b, self.scaling[name], None)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def _dora(self, name: str, z: torch.Tensor) -> torch.Tensor:
        """g * z + (1 - g) * bias for z = W0 x + bias + s B A dropout(x), g = m / ||W0 + s B A||_row."""
        bias = getattr(self.base, "bias", None)
        return dora_output(z, self.magnitude(name).weight, self.dora_norm(name),
                           bias if isinstance(bias, torch.Tensor) else None)

    def refuse_dora(self, names: list[str], what: str) -> None:
        """ValueError when an adapter among `names` uses DoRA, which `what` does not support."""
        if not self.lora_magnitude_vector:  # no DoRA adapter here: the check per forward stays cheap
            return
        dora = sorted({n for n in names if self.uses_dora(n)})
        if dora:
            raise ValueError(f"adapter(s) {', '.join(map(repr, dora))} use DoRA, which {what} do not support yet "
                             f"(at {self.path!r}); use them one at a time with set_adapter, or merge them")

    def path_for(self, dtype: torch.dtype, autocast: bool) -> str:
        """Which computation forward runs for an input of `dtype`: the one place that decides.

        The estimator (hf/estimate_activations.py) asks this too, to know what each layer keeps for backward.

        - "fused": `LoraLinearFunction`, the base matmul and the one live adapter as one autograd
          function that keeps x (which the model keeps anyway), x A^T and a 1-byte dropout mask.
          Needs exactly one live, plain (not DoRA) adapter and either a frozen nn.Linear base with
          x, W, A and B in one dtype or any dtypes under autocast (all then run in autocast's dtype,
          so fp32 adapters beside a bf16 base take this path under autocast),
          or a 4-bit base with x, its compute dtype, A and B in one dtype and autocast off (W is
          dequantized in forward and again in backward; base_weight.py) (`fused_adapter`).
        - "update": `LoraUpdateFunction` per adapter, added to the base's output with the same
          savings: a Conv1D base, a 4-bit base in another dtype, or several adapters. Needs x and
          every live adapter in one dtype, autocast off.
        - "autograd": the plain formula in autograd ops, the reference every fast path is tested
          against: it keeps A's input, a cast copy of x where the dtypes differ and a dropped-out
          copy with dropout. Adapters in fp32 beside a 16-bit base with autocast off, and a Conv1D,
          4-bit or multi-adapter layer under autocast.
        """
        if self.fused_adapter(dtype, autocast) is not None:
            return FUSED
        if not autocast and all(self.factors(n)[0].dtype == dtype for n in self.live_adapters()):
            return UPDATE
        return AUTOGRAD

    def fused_adapter(self, dtype: torch.dtype, autocast: bool) -> str | None:
        """The one adapter LoraLinearFunction would run for input of `dtype`, or None (see path_for)."""
        if self.disabled or self.row_adapters is not None or self.kind not in ("linear", "quantized"):
            return None
        live = self.live_adapters()
        # DoRA rescales the output after the update: not a plain fused LoRA (hf/fused_mlp.py asks too)
        if len(live) != 1 or self.uses_dora(live[0]):
            return None
        a, b = self.factors(live[0])
        if self.kind == "quantized":  # NF4Linear: x, its compute dtype, its bias, A and B in one dtype, no autocast
            bias = getattr(self.base, "bias", None)
            plain_bias = bias is None or (not bias.requires_grad and bias.dtype == dtype)
            same = dtype == getattr(self.base, "compute_dtype", None) == a.dtype == b.dtype
            return live[0] if plain_bias and same and not autocast else None
        base = cast(nn.Linear, self.base)
        frozen = not base.weight.requires_grad and (base.bias is None or not base.bias.requires_grad)
        # Under autocast the function casts x, W, the bias, A and B to autocast's dtype, as autocast's own
        # linears do, so their dtypes need not agree: fp32 adapters beside a bf16 base (lorakit train on a GPU).
        same_dtype = autocast or base.weight.dtype == a.dtype == b.dtype == dtype
        return live[0] if frozen and same_dtype else None

    def fused_arguments(self, name: str) -> tuple[BaseWeight, torch.Tensor | None, torch.Tensor, torch.Tensor,
                                                  float, float]:
        """(W, bias, A, B, s, dropout p) of adapter `name` for the fused functions; p = 0 in eval mode.

        W is the weight itself, or for a 4-bit base its dequantizer (core/base_weight.py)."""
        base: Any = self.base
        weight = base.dequantize_weight if self.kind == "quantized" else base.weight
        return (weight, base.bias, *self.factors(name), self.scaling[name], self.dropout_p(name))

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
        """What adapter `name` adds to the unmerged weight, fp32, laid out like it: s B A, or for
        DoRA (g - 1) W0 + g s B A (so that W0 + delta = g (W0 + s B A))."""
        if not self.uses_dora(name):
            return super().delta_weight(name)
        delta, _ = dora_delta(self.weight_rows(), *self.factors(name), self.scaling[name],
                              self.magnitude(name).weight)
        return delta.T if self.weight_in_by_out else delta

    def delta_bound(self, name: str) -> float | None:
        # A DoRA delta, (g - 1) W0 + g s B A, is not bounded by the factors alone.
        return None if self.uses_dora(name) else super().delta_bound(name)

    def merges_first(self, name: str) -> bool:
        # DoRA's merged weight g (W0 + s B A) needs W0 itself: nothing may be merged before it.
        return self.uses_dora(name)

    def _add_delta(self, name: str, sign: float) -> None:
        if not self.uses_dora(name):
            return super()._add_delta(name, sign)
        weight = self._base_weight()
        a, b = self.factors(name)
        magnitude, scale = self.magnitude(name), self.scaling[name]
        with torch.no_grad():
            if sign > 0:  # W0 -> g (W0 + s B A), keeping the norm to undo it exactly
                delta, magnitude.merged_norm = dora_delta(self.weight_rows(), a, b, scale, magnitude.weight)
                rows = self.weight_rows().to(delta.dtype) + delta
            else:
                assert magnitude.merged_norm is not None, "a merged DoRA adapter keeps its norm"
                rows = unmerged_weight(self.weight_rows(), a, b, scale, magnitude.weight, magnitude.merged_norm)
                magnitude.merged_norm = None
            weight.copy_((rows.T if self.weight_in_by_out else rows).to(weight.dtype))
        return None

    def update(self, name: str, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(B A dropout(x), s) for rows that run adapter `name` (adapters_per_row)."""
        x_in = self.lora_dropout[name](x.to(self.a(name).weight.dtype))
        return self.b(name)(self.a(name)(x_in)), self.scaling[name]


def requantized(base: nn.Module, weight: torch.Tensor) -> nn.Module:
    """A new 4-bit linear like `base` (block size, double quantization, bias, compute dtype) holding `weight`."""
    from lorakit.quant import NF4Linear, quantize_nf4  # torch-only, like core

    assert isinstance(base, NF4Linear)
    old = base.quantized_weight
    new = quantize_nf4(weight.to(old.dtype), block_size=old.block_size, double_quant=old.double_quant)
    return NF4Linear(new, base.bias, base.compute_dtype).train(base.training)


LAYER_KINDS = (LoraLinear, LoraEmbedding)


def layer_class(module: nn.Module) -> type[LoraLinear] | type[LoraEmbedding]:
    """The LoRA layer kind that wraps `module` (which must be a supported kind)."""
    return LoraEmbedding if base_kind(module) == "embedding" else LoraLinear


def wrap(module: nn.Module, path: str) -> LoraLayer:
    """A new LoRA layer around `module`, which must be a supported kind, in the module's train/eval mode."""
    return layer_class(module)(module, path)  # type: ignore[arg-type]
