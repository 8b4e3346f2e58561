"""LoraEmbedding: the LoRA layer kind around nn.Embedding, h = W0[ids] + s * (A^T[ids]) B^T.

It implements the contract in contract.py; what differs from a linear layer is that A is indexed
by token id rather than multiplied, and that no dropout applies to ids. The factors are stored as
PEFT stores them, so state-dict keys read `<path>.lora_embedding_A.<name>` and
`<path>.lora_embedding_B.<name>`. layers.py holds the linear kind and picks the kind for a module.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.core.bases import adapter_dtype, base_device
from lorakit.core.contract import LoraLayer

__all__ = ["LoraEmbedding"]


class LoraEmbedding(LoraLayer):
    """h = W0[ids] + sum over live adapters of s * (A^T[ids]) B^T.   ids: (...) -> h: (..., dim)

    As in PEFT, A (r x num_embeddings) starts at zero and B (dim x r) random, and no dropout
    applies to token ids. On its own: `LoraEmbedding(nn.Embedding(100, 16), r=4)`.
    """

    weight_in_by_out = True  # the weight is (num_embeddings x dim): in x out
    peft_keys = ("lora_embedding_A", "lora_embedding_B")

    is_embedding = True

    @classmethod
    def wraps(cls, module: nn.Module) -> bool:
        return isinstance(module, nn.Embedding)

    @classmethod
    def sizes(cls, module: nn.Module) -> tuple[int, int]:
        return int(module.num_embeddings), int(module.embedding_dim)  # type: ignore[arg-type]

    def __init__(self, base: nn.Embedding, path: str = "", r: int | None = None, alpha: float | None = None,
                 name: str = "default") -> None:
        if not isinstance(base, nn.Embedding):
            raise TypeError(f"LoraEmbedding cannot wrap {type(base).__name__} at {path!r}; "
                            "it wraps nn.Embedding")
        super().__init__(base, path)
        self.fan_in_fan_out = False  # PEFT's flag is for linear layers only
        self.lora_embedding_A = nn.ParameterDict()  # name -> A: (r, num_embeddings)
        self.lora_embedding_B = nn.ParameterDict()  # name -> B: (dim, r)
        if r is not None:
            self.start(name, r, alpha, 0.0)

    def add(self, name: str, r: int, scale: float, dropout: float = 0.0, init: str = "kaiming",
            share_dropout_mask: bool = True, use_dora: bool = False) -> None:
        assert not use_dora, "add_adapter refuses DoRA on embeddings before any layer changes"
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

    @property
    def lora_A(self) -> nn.ParameterDict:
        """Same name as on LoraLinear, for code that tests `name in layer.lora_A`."""
        return self.lora_embedding_A

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_embedding_A[name], self.lora_embedding_B[name]

    def _drop(self, name: str) -> None:
        del self.lora_embedding_A[name]
        del self.lora_embedding_B[name]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """h = W0[ids] + sum over live adapters of s * (A^T[ids]) B^T.   ids: (...) -> h: (..., dim)"""
        h = self.base(ids)
        if self.disabled:
            return h
        if self.row_adapters is not None:
            return self.forward_rows(ids, h)
        for name in self.live_adapters():
            h = h + self.update(name, ids)[0].to(h.dtype)
        return h

    def update(self, name: str, ids: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(s * (A^T[ids]) B^T, 1): (...) -> (..., dim) in the base's dtype, already scaled."""
        a, b = self.factors(name)
        base = cast(nn.Embedding, self.base)
        rows = F.embedding(ids, a.T, padding_idx=base.padding_idx, max_norm=base.max_norm,
                           norm_type=base.norm_type, scale_grad_by_freq=base.scale_grad_by_freq,
                           sparse=base.sparse)
        return ((rows @ b.T) * self.scaling[name]).to(base.weight.dtype), 1.0
