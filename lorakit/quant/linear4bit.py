"""NF4Linear: a frozen linear layer whose weight is stored in NF4 (the QLoRA base layer).

    y = x W^T + b,   W (out x in) dequantized from 4 bits on the fly in ``compute_dtype``

The quantized weight is held as frozen parameters (``requires_grad=False``, so optimizers never
see them): the uint8 codes, the block scales and the double-quantization scales, as the plain
tensors of :class:`NF4Tensor`. Parameters rather than buffers because FSDP2 (``fully_shard``)
shards every parameter of a unit on dim 0, whatever its dtype, and all-gathers mixed dtypes as
bytes, while it leaves buffers whole on every rank: so under FSDP2 each rank holds about 1/N of
the 4-bit base, and inside the forward pass the tensors are whole again, bit for bit. Only the
0-d double-quantization offset (4 bytes) stays a buffer, as a scalar cannot be sharded.

The dequantized weight exists only for the matmul: backward dequantizes it again rather than
keeping it alive between the passes, which is what makes a 4-bit base cheap in memory while
training adapters on top of it.

The LoRA layer treats any module with ``in_features``, ``out_features`` and
``dequantize_weight()`` as a quantized linear; keep those names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.core.bases import is_conv1d
from lorakit.quant.nf4 import SUPPORTED_DTYPES, NF4Tensor, dequantize_nf4, quantize_nf4

# The tensors holding the NF4 weight, in NF4Tensor field order; the last two exist with double quant
# only. The first three are frozen parameters (FSDP2 shards them), the 0-d offset a buffer.
_QUANT_TENSORS = ("weight_codes", "weight_absmax", "weight_absmax_scale", "weight_absmax_offset")
_OFFSET = "weight_absmax_offset"


class _NF4Linear(torch.autograd.Function):
    """``x W^T + b`` with W dequantized in the forward pass and again in the backward pass.

    Nothing is saved for backward: not the input (the weight gets no gradient) and not the
    dequantized weight, which backward rebuilds from the 4-bit tensors; the price is one extra
    dequantization per backward.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: NF4Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.weight = weight
        return F.linear(x, dequantize_nf4(weight, x.dtype), bias)  # (..., in) -> (..., out)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None, torch.Tensor | None]:
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ dequantize_nf4(ctx.weight, grad_out.dtype)  # (..., out) @ (out, in)
        if ctx.needs_input_grad[2]:  # only if someone unfroze the bias
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, None, grad_bias


class NF4Linear(nn.Module):
    """A frozen linear layer with an NF4 weight: ``y = x W^T + b``, W (out x in) dequantized per call.

    Build one with :meth:`from_linear`. Input of any floating dtype is cast to ``compute_dtype``
    for the matmul and the output is cast back, as bitsandbytes' ``Linear4bit`` does. Only the
    input gets a gradient: the weight and the bias are frozen.

    Attributes:
        in_features: size of each input sample.
        out_features: size of each output sample.
        bias: the original bias in its original dtype, frozen (``requires_grad=False``), or None.
        compute_dtype: dtype the weight is dequantized to for the matmul.
        weight_dtype: dtype of the original weight (the default of :meth:`dequantize_weight`).
        block_size: NF4 block size of the weight.
    """

    def __init__(
        self, weight: NF4Tensor, bias: torch.Tensor | None = None, compute_dtype: torch.dtype | None = None
    ):
        """Wrap an already quantized weight; most callers want :meth:`from_linear`.

        Args:
            weight: the NF4 weight, shape (out_features, in_features).
            bias: optional bias of shape (out_features,); copied and frozen.
            compute_dtype: float32, float16 or bfloat16; defaults to the weight's original dtype.
        """
        super().__init__()
        if not isinstance(weight, NF4Tensor) or len(weight.shape) != 2:
            got = tuple(weight.shape) if isinstance(weight, NF4Tensor) else type(weight).__name__
            raise ValueError(f"NF4Linear needs a 2-D NF4Tensor weight (out x in), got {got}")
        compute_dtype = weight.dtype if compute_dtype is None else compute_dtype
        if compute_dtype not in SUPPORTED_DTYPES:
            accepted = ", ".join(str(d) for d in SUPPORTED_DTYPES)
            raise ValueError(f"compute_dtype must be one of {accepted}; got {compute_dtype}")
        self.out_features, self.in_features = weight.shape
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"bias must have shape ({self.out_features},), got {tuple(bias.shape)}")
        self.compute_dtype = compute_dtype
        self.weight_dtype = weight.dtype
        self.block_size = weight.block_size
        tensors = (weight.codes, weight.absmax, weight.absmax_scale, weight.absmax_offset)
        for name, tensor in zip(_QUANT_TENSORS, tensors, strict=True):
            if name == _OFFSET:
                self.register_buffer(name, tensor)
            else:
                self.register_parameter(name, _frozen(tensor))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(
        cls,
        module: nn.Module,
        compute_dtype: torch.dtype | None = None,
        block_size: int = 64,
        double_quant: bool = True,
    ) -> NF4Linear:
        """Quantize an ``nn.Linear`` or a transformers ``Conv1D`` (weight stored in x out) to NF4.

        The weight is quantized where it lies (quantizing on the GPU is fast); ``module`` is left
        unchanged.

        Args:
            module: the layer to quantize.
            compute_dtype: dtype of the matmul; defaults to the weight's dtype.
            block_size: values per NF4 scale, a power of two from 32 to 4096.
            double_quant: quantize the scales too (4.127 instead of 4.5 bits per parameter).

        Returns:
            A new NF4Linear computing (up to quantization error) what ``module`` computed.

        Raises:
            TypeError: ``module`` is already an NF4Linear, or neither nn.Linear nor Conv1D.
        """
        if isinstance(module, NF4Linear):
            raise TypeError("module is already an NF4Linear (already quantized)")
        if isinstance(module, nn.Linear):
            weight = module.weight  # (out, in)
        elif is_conv1d(module):
            weight = cast(torch.Tensor, module.weight).T  # stored (in, out)
        else:
            raise TypeError(
                f"NF4Linear.from_linear accepts nn.Linear or transformers Conv1D, got {type(module).__name__}"
            )
        quantized = quantize_nf4(weight, block_size=block_size, double_quant=double_quant)
        bias = module.bias if isinstance(module.bias, torch.Tensor) else None
        return cls(quantized, bias, compute_dtype)

    @property
    def quantized_weight(self) -> NF4Tensor:
        """The weight as an :class:`NF4Tensor` view of this module's tensors (current device).

        Raises:
            RuntimeError: FSDP2 holds the weight sharded (outside the forward pass).
        """
        codes, absmax, absmax_scale, absmax_offset = (self._quant_tensor(name) for name in _QUANT_TENSORS)
        assert codes is not None and absmax is not None, "NF4Linear lost its weight tensors"
        if hasattr(codes, "to_local"):  # a DTensor: this rank's shard of the codes, not the weight
            raise RuntimeError(
                "this NF4Linear's weight is sharded by FSDP2 (each rank holds a part of its codes); it is "
                "whole only inside the model's forward pass: dequantize it there, or before fully_shard"
            )
        return NF4Tensor(
            codes=codes,
            absmax=absmax,
            shape=torch.Size((self.out_features, self.in_features)),
            dtype=self.weight_dtype,
            block_size=self.block_size,
            absmax_scale=absmax_scale,
            absmax_offset=absmax_offset,
        )

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dequantized weight, shape (out_features, in_features), a new tensor.

        Args:
            dtype: float32, float16 or bfloat16; defaults to the original weight's dtype.
        """
        return dequantize_nf4(self.quantized_weight, self.weight_dtype if dtype is None else dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x W^T + b`` for x of shape (..., in_features); returns (..., out_features) in x's dtype."""
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        out = _NF4Linear.apply(x.to(self.compute_dtype), self.quantized_weight, bias)
        return out.to(x.dtype)

    def requantized(self, weight: torch.Tensor) -> NF4Linear:
        """A new 4-bit linear like this one (block size, double quantization, bias, compute dtype) holding
        `weight` (out x in): what PiSSA's residual becomes on a 4-bit base."""
        old = self.quantized_weight
        new = quantize_nf4(weight.to(old.dtype), block_size=old.block_size, double_quant=old.double_quant)
        return NF4Linear(new, self.bias, self.compute_dtype).train(self.training)

    def to_linear(self, weight: torch.Tensor, requantize: bool = False) -> nn.Module:
        """A frozen plain nn.Linear in the compute dtype holding `weight` (out x in) and this bias, or with
        `requantize` that linear quantized again: what merging deltas into a 4-bit base gives."""
        plain = frozen_linear(weight, self.bias, self.compute_dtype)
        return NF4Linear.from_linear(plain, compute_dtype=self.compute_dtype) if requantize else plain

    def _quant_tensor(self, name: str) -> torch.Tensor | None:
        return self._buffers[name] if name == _OFFSET else self._parameters[name]

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> NF4Linear:
        # nn.Module.to(dtype) and .half() cast every floating tensor, which would silently round
        # the fp32 scales (and break the bit-exact format); so the quantized tensors only follow
        # the device: we learn it by applying fn to an empty probe tensor.
        saved = {name: (self._buffers if name == _OFFSET else self._parameters).pop(name)
                 for name in _QUANT_TENSORS}
        try:
            super()._apply(fn, recurse)
        finally:
            for name, tensor in saved.items():
                if tensor is not None:
                    device = fn(torch.empty(0, device=tensor.device)).device
                    if tensor.device != device:
                        moved = tensor.detach().to(device)
                        tensor = moved if name == _OFFSET else _frozen(moved)
                if name == _OFFSET:
                    self._buffers[name] = tensor
                else:
                    self._parameters[name] = tensor  # type: ignore[assignment]
        return self

    def extra_repr(self) -> str:
        double_quant = self._parameters["weight_absmax_scale"] is not None
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, "
            f"block_size={self.block_size}, double_quant={double_quant}, compute_dtype={self.compute_dtype}"
        )


def frozen_linear(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> nn.Linear:
    """A frozen plain nn.Linear in `dtype` holding `weight` (out x in) and `bias`, on the weight's device:
    what a quantized base becomes when deltas are merged into it without quantizing again."""
    out_features, in_features = weight.shape
    plain = nn.Linear(in_features, out_features, bias=bias is not None, device=weight.device, dtype=dtype)
    with torch.no_grad():
        plain.weight.copy_(weight)
        if isinstance(bias, torch.Tensor):
            plain.bias.copy_(bias)
    return plain.requires_grad_(False)


def _frozen(tensor: torch.Tensor | None) -> nn.Parameter | None:
    """A frozen parameter holding ``tensor`` (codes are uint8: a parameter that can never train)."""
    return None if tensor is None else nn.Parameter(tensor, requires_grad=False)
