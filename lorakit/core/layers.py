"""LoRA layers: a frozen base module with named low-rank adapters beside it.

A layer holds `base` (the original module, untouched) and, per adapter name, A (r x in) and
B (out x r) in `nn.ModuleDict`s, so state-dict keys read `<path>.lora_A.<name>.weight` as in PEFT.
Which adapters run is the list `active_adapters`; which are folded into the base weight is
`merged_adapters` (kept in merge order). Nothing here changes state behind the caller's back.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.core.lora_function import lora_linear, lora_update, per_input_cache

if TYPE_CHECKING:
    from lorakit.core.per_row import RowAdapters

SUPPORTED_MODULES = "nn.Linear, transformers' Conv1D, nn.Embedding and lorakit's NF4Linear"


def base_kind(module: nn.Module) -> str | None:
    """The kind of base module a LoRA layer can wrap, or None when unsupported."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    # transformers' Conv1D (GPT-2) is matched by name so core never imports transformers.
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:
        return "conv1d"
    if callable(getattr(module, "dequantize_weight", None)) and hasattr(module, "in_features"):
        return "quantized"
    return None


def in_out(module: nn.Module) -> tuple[int, int]:
    """(in, out) of a linear, Conv1D, 4-bit linear or embedding (num_embeddings, dim)."""
    kind = base_kind(module)
    if kind == "conv1d":
        rows, cols = module.weight.shape  # type: ignore[union-attr,misc]
        return int(rows), int(cols)
    if kind == "embedding":
        return int(module.num_embeddings), int(module.embedding_dim)  # type: ignore[arg-type]
    return int(module.in_features), int(module.out_features)  # type: ignore[arg-type]


def adapter_dtype(base: nn.Module) -> torch.dtype:
    """Adapters train in fp32 beside half-precision or quantized bases, otherwise in the base dtype."""
    weight = getattr(base, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dtype in (torch.float32, torch.float64):
        return weight.dtype
    return torch.float32


def base_device(base: nn.Module) -> torch.device:
    for tensor in [*base.parameters(), *base.buffers()]:
        return tensor.device
    return torch.device("cpu")


class LoraLinear(nn.Module):
    """h = base(x) + sum over active adapters of s * B(A(dropout(x))).

    x: (..., in) -> h: (..., out). Wraps nn.Linear, Conv1D (weight stored in x out) and NF4Linear.
    """

    def __init__(self, base: nn.Module, path: str) -> None:
        super().__init__()
        kind = base_kind(base)
        if kind not in ("linear", "conv1d", "quantized"):
            raise TypeError(f"LoraLinear cannot wrap {type(base).__name__} at {path!r}")
        self.base = base
        self.path = path
        self.kind = kind
        # Conv1D stores its weight in x out, so deltas are transposed when merged into it.
        self.fan_in_fan_out = kind == "conv1d"
        if kind == "conv1d":
            rows, cols = cast(torch.Tensor, base.weight).shape
            self.in_features, self.out_features = int(rows), int(cols)
        else:
            self.in_features, self.out_features = int(base.in_features), int(base.out_features)  # type: ignore[arg-type]
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        # Set only inside `adapters_per_row`: each batch row then runs its own adapter.
        self.row_adapters: RowAdapters | None = None

    def add(self, name: str, r: int, scale: float, dropout: float, init: str) -> None:
        """Create adapter `name` of rank r; with init "kaiming" or "gaussian" it changes nothing yet."""
        device, dtype = base_device(self.base), adapter_dtype(self.base)
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_dropout[name].train(self.training)  # a new module starts in training mode
        self.scaling[name] = scale
        init_linear_adapter(self.a(name).weight, self.b(name).weight, init)

    def a(self, name: str) -> nn.Linear:
        """Adapter `name`'s A projection (in -> r)."""
        return cast(nn.Linear, self.lora_A[name])

    def b(self, name: str) -> nn.Linear:
        """Adapter `name`'s B projection (r -> out)."""
        return cast(nn.Linear, self.lora_B[name])

    def delete(self, name: str) -> None:
        for store in (self.lora_A, self.lora_B, self.lora_dropout):
            del store[name]
        del self.scaling[name]
        if name in self.active_adapters:
            self.active_adapters.remove(name)

    def delta_weight(self, name: str) -> torch.Tensor:
        """s * B @ A in fp32, laid out like the base weight (out x in, or in x out for Conv1D)."""
        a = self.a(name).weight.float()
        b = self.b(name).weight.float()
        delta = (b @ a) * self.scaling[name]
        return delta.T if self.fan_in_fan_out else delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """h = base(x) + sum over active adapters of B(s * A(dropout(x))); x (..., in) -> h (..., out)."""
        if self.disabled:
            return self.base(x)
        if self.row_adapters is not None:
            return self._forward_per_row(x, self.base(x))
        fused = self.fused_adapter(x)
        if fused is not None:
            weight, bias, a, b, scale, p = self.fused_arguments(fused)
            return lora_linear(x, weight, bias, a, b, scale, p)
        result = self.base(x)
        autocast = torch.is_autocast_enabled(x.device.type)
        for name in self.active_adapters:
            if name in self.merged_adapters or name not in self.lora_A:
                continue
            lora_a = self.a(name)
            if not autocast and x.dtype == lora_a.weight.dtype == result.dtype:
                # a 4-bit or Conv1D base, or one of several adapters: LoraUpdateFunction, no copies
                dropout = self.lora_dropout[name]
                p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
                result = lora_update(result, x, lora_a.weight, self.b(name).weight, self.scaling[name], p)
                continue
            x_in = adapter_input(x, lora_a.weight.dtype, self.lora_dropout[name])
            # s applied on the rank-r side: a (..., r) multiply instead of an (..., out) one
            update = self.b(name)(lora_a(x_in) * self.scaling[name])
            result = result + update.to(result.dtype)
        return result

    def fused_adapter(self, x: torch.Tensor) -> str | None:
        """The one adapter LoraLinearFunction would run on x, or None when the general path must.

        The fused path takes a frozen nn.Linear, exactly one live adapter, and x, W, A and B in
        one dtype with autocast off.
        """
        if self.disabled or self.row_adapters is not None or self.kind != "linear":
            return None
        live = [n for n in self.active_adapters if n not in self.merged_adapters and n in self.lora_A]
        if len(live) != 1 or torch.is_autocast_enabled(x.device.type):
            return None
        base = cast(nn.Linear, self.base)
        a, b = self.a(live[0]).weight, self.b(live[0]).weight
        frozen = not base.weight.requires_grad and (base.bias is None or not base.bias.requires_grad)
        return live[0] if frozen and x.dtype == base.weight.dtype == a.dtype == b.dtype else None

    def fused_arguments(self, name: str) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor,
                                                  float, float]:
        """(W, bias, A, B, scale, dropout p) of adapter `name` for LoraLinearFunction; p = 0 in eval mode."""
        dropout = self.lora_dropout[name]
        p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
        base = cast(nn.Linear, self.base)
        return base.weight, base.bias, self.a(name).weight, self.b(name).weight, self.scaling[name], p

    def _forward_per_row(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """Rows grouped by adapter: gather a group's rows, run its B A, add back at the same rows."""
        assert self.row_adapters is not None
        # Without autograd the base output is ours to update in place, saving a copy per adapter.
        in_place = not result.requires_grad
        for name, rows in self.row_adapters.groups(x.shape[0], self.path):
            if name not in self.lora_A:
                continue
            lora_a = self.a(name)
            x_rows = (x if rows is None else x.index_select(0, rows)).to(lora_a.weight.dtype)
            update = self.b(name)(lora_a(self.lora_dropout[name](x_rows))).to(result.dtype)
            result = _add_rows(result, rows, update, self.scaling[name], in_place)
        return result

    def extra_repr(self) -> str:
        ranks = {name: a.out_features for name, a in self.lora_A.items()}  # type: ignore[union-attr]
        return f"in={self.in_features}, out={self.out_features}, ranks={ranks}, active={self.active_adapters}"


class LoraEmbedding(nn.Module):
    """h = base(ids) + sum over active adapters of s * (A^T[ids]) B^T.

    ids: (...) -> h: (..., dim). As in PEFT, A (r x num_embeddings) starts at zero and B
    (dim x r) random, and no dropout applies to token ids.
    """

    def __init__(self, base: nn.Embedding, path: str) -> None:
        super().__init__()
        if not isinstance(base, nn.Embedding):
            raise TypeError(f"LoraEmbedding cannot wrap {type(base).__name__} at {path!r}")
        self.base = base
        self.path = path
        self.kind = "embedding"
        self.fan_in_fan_out = False
        self.in_features, self.out_features = base.num_embeddings, base.embedding_dim
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.scaling: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        # Set only inside `adapters_per_row`: each batch row then runs its own adapter.
        self.row_adapters: RowAdapters | None = None

    def add(self, name: str, r: int, scale: float, dropout: float, init: str) -> None:
        device, dtype = base_device(self.base), adapter_dtype(self.base)
        a = torch.zeros(r, self.in_features, device=device, dtype=dtype)
        b = torch.zeros(self.out_features, r, device=device, dtype=dtype)
        if init != "zeros":
            nn.init.normal_(b)
        if init == "random":
            nn.init.normal_(a)
        self.lora_embedding_A[name] = nn.Parameter(a)
        self.lora_embedding_B[name] = nn.Parameter(b)
        self.scaling[name] = scale

    def delete(self, name: str) -> None:
        del self.lora_embedding_A[name]
        del self.lora_embedding_B[name]
        del self.scaling[name]
        if name in self.active_adapters:
            self.active_adapters.remove(name)

    @property
    def lora_A(self) -> nn.ParameterDict:
        """Same name as on LoraLinear, so code listing adapters treats both kinds alike."""
        return self.lora_embedding_A

    def delta_weight(self, name: str) -> torch.Tensor:
        """s * (B @ A)^T in fp32: (num_embeddings x dim), like the embedding weight."""
        a = self.lora_embedding_A[name].float()
        b = self.lora_embedding_B[name].float()
        return (b @ a).T * self.scaling[name]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        result = self.base(ids)
        if self.disabled:
            return result
        if self.row_adapters is not None:
            for name, rows in self.row_adapters.groups(ids.shape[0], self.path):
                if name in self.lora_embedding_A:
                    update = self._update(name, ids if rows is None else ids.index_select(0, rows))
                    result = _add_rows(result, rows, update, 1.0, in_place=not result.requires_grad)
            return result
        for name in self.active_adapters:
            if name in self.merged_adapters or name not in self.lora_embedding_A:
                continue
            result = result + self._update(name, ids).to(result.dtype)
        return result

    def _update(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        """s * (A^T[ids]) B^T for adapter `name`: (...) -> (..., dim), in the base's dtype."""
        a, b = self.lora_embedding_A[name], self.lora_embedding_B[name]
        rows = F.embedding(ids, a.T, padding_idx=self.base.padding_idx, max_norm=self.base.max_norm,
                           norm_type=self.base.norm_type, scale_grad_by_freq=self.base.scale_grad_by_freq,
                           sparse=self.base.sparse)
        return ((rows @ b.T) * self.scaling[name]).to(self.base.weight.dtype)


def _add_rows(result: torch.Tensor, rows: torch.Tensor | None, update: torch.Tensor, scale: float,
              in_place: bool) -> torch.Tensor:
    """result[rows] += scale * update (all rows when `rows` is None); the scale rides along as alpha."""
    if rows is None:
        return result.add_(update, alpha=scale) if in_place else result.add(update, alpha=scale)
    if in_place:
        return result.index_add_(0, rows, update, alpha=scale)
    return result.index_add(0, rows, update, alpha=scale)


def adapter_input(x: torch.Tensor, dtype: torch.dtype, dropout: nn.Module) -> torch.Tensor:
    """x cast to the adapter dtype and dropped out, shared by all adapters reading this x.

    No copy at all when the dtypes agree (or autocast will cast) and dropout is off.
    """
    p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
    cast_needed = x.dtype != dtype and not torch.is_autocast_enabled(x.device.type)
    if not cast_needed and p == 0:
        return x
    if torch.compiler.is_compiling():  # no Python-side cache inside a compiled graph
        return dropout(x.to(dtype) if cast_needed else x)
    # q, k and v (and gate and up) read the same tensor: one cast copy and one dropout mask for all
    cache = per_input_cache(x)
    prepared = cache.get(("prepared", dtype, p))
    if prepared is None:
        prepared = cache[("prepared", dtype, p)] = dropout(x.to(dtype) if cast_needed else x)
    return prepared


LORA_LAYERS = (LoraLinear, LoraEmbedding)
LoraLayer = LoraLinear | LoraEmbedding


def init_linear_adapter(a: torch.Tensor, b: torch.Tensor, init: str) -> None:
    """Initialise A (r x in) and B (out x r) in place; B = 0 unless init is "random"."""
    with torch.no_grad():
        if init == "kaiming":
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # the reference implementation's choice
        elif init == "gaussian":
            nn.init.normal_(a, std=1 / a.shape[0])
        elif init == "random":
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            nn.init.kaiming_uniform_(b, a=math.sqrt(5))
            return
        elif init == "zeros":
            a.zero_()
        else:
            raise ValueError(f"unknown init {init!r}")
        b.zero_()


def wrap(module: nn.Module, path: str) -> LoraLinear | LoraEmbedding:
    """A new LoRA layer around `module`, which must be a supported kind, in the module's train/eval mode."""
    layer = LoraEmbedding(module, path) if isinstance(module, nn.Embedding) else LoraLinear(module, path)
    layer.training = module.training  # a new nn.Module starts in training mode
    return layer
