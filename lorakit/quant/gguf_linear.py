"""GGUFLinear: a frozen linear layer whose weight stays in a GGUF file's own blocks (Q4_K, Q8_0, ...).

    y = x W^T + b,   W (out x in) dequantized from its GGML blocks on the fly in ``compute_dtype``

Training LoRA on a GGUF model this way keeps the file's quantization exactly: the bytes are never
converted to another 4-bit format, and W is what llama.cpp's gguf-py reads from them, bit for bit
(gguf_blocks.py). The bytes are one frozen uint8 parameter, ``weight_blocks``, shaped (out_features,
bytes per row): a parameter rather than a buffer because FSDP2 (``fully_shard``) shards parameters
on dim 0 whatever their dtype and leaves buffers whole on every rank, and dim 0 holds whole rows, so
every shard is whole blocks (as NF4Linear's codes). ``.to(dtype)`` leaves uint8 alone, so casting a
model never touches the blocks; ``.to(device)`` moves them.

As NF4Linear's, the dequantized weight exists only for the matmul: backward dequantizes it again
rather than keeping it between the passes. The LoRA layer treats any module with ``in_features``,
``out_features`` and ``dequantize_weight()`` as a quantized linear (core/bases.py), so
``LoraLinear(GGUFLinear(...))`` needs nothing else, and the fused LoRA path dequantizes it inside its
own forward and backward (kernels/base_weight.py).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.quant.gguf_blocks import FORMATS, BlockFormat, block_format, byte_count, dequantize
from lorakit.quant.linear4bit import frozen_linear

COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class _GGUFLinear(torch.autograd.Function):
    """``x W^T + b`` with W dequantized from the GGML blocks in forward and again in backward.

    Only the bytes are kept for backward (on ctx: they are a frozen parameter, alive anyway), not the
    input (the weight gets no gradient) nor the dequantized weight.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, blocks: torch.Tensor, qtype: str, shape: tuple[int, int],
                bias: torch.Tensor | None) -> torch.Tensor:
        ctx.weight = (blocks, qtype, shape)
        return F.linear(x, dequantize(blocks, qtype, shape, x.dtype), bias)  # (..., in) -> (..., out)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None,
                                                            torch.Tensor | None]:
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            blocks, qtype, shape = ctx.weight
            grad_x = grad_out @ dequantize(blocks, qtype, shape, grad_out.dtype)  # (..., out) @ (out, in)
        if ctx.needs_input_grad[4]:  # only if someone unfroze the bias
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, None, None, None, grad_bias


class GGUFLinear(nn.Module):
    """A frozen linear layer with a GGML block weight: ``y = x W^T + b``, W (out x in) dequantized per call.

    Build one with :meth:`from_blocks` from a GGUF tensor's bytes. Input of any floating dtype is cast
    to ``compute_dtype`` for the matmul and the output cast back, as NF4Linear does. Only the input
    gets a gradient: the blocks and the bias are frozen.

    Attributes:
        in_features: size of each input sample.
        out_features: size of each output sample.
        bias: frozen (``requires_grad=False``), in ``compute_dtype``, or None.
        compute_dtype: dtype the weight is dequantized to for the matmul.
        qtype: the GGML type name of the weight, e.g. "Q4_K".
        weight_blocks: the GGML blocks, a frozen uint8 parameter (out_features, bytes per row).
    """

    def __init__(self, blocks: torch.Tensor, qtype: str | int, bias: torch.Tensor | None = None,
                 compute_dtype: torch.dtype = torch.float32):
        """Wrap the blocks of a weight as stored, one row of blocks per output; most callers want
        :meth:`from_blocks`.

        Args:
            blocks: uint8 (out_features, bytes per row), bytes per row a whole number of blocks; held
                as given, not copied (a memory-mapped file's bytes stay mapped).
            qtype: the GGML type, by name ("Q4_K") or number (a ``GGMLQuantizationType``).
            bias: optional (out_features,); copied, frozen, in ``compute_dtype``.
            compute_dtype: float32, float16, bfloat16 or float64.

        Raises:
            ValueError: an unsupported type, blocks that are not uint8 rows of whole blocks, a bias of
                the wrong shape, or another compute dtype.
        """
        super().__init__()
        fmt = block_format(qtype)
        if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[1] % fmt.type_size:
            raise ValueError(f"GGUFLinear needs uint8 blocks of shape (out, bytes per row), a multiple of "
                             f"{fmt.type_size} bytes per row for {fmt.name}; got {blocks.dtype} "
                             f"{tuple(blocks.shape)}")
        if compute_dtype not in COMPUTE_DTYPES:
            accepted = ", ".join(str(d) for d in COMPUTE_DTYPES)
            raise ValueError(f"compute_dtype must be one of {accepted}; got {compute_dtype}")
        self.out_features = int(blocks.shape[0])
        self.in_features = int(blocks.shape[1]) // fmt.type_size * fmt.block_size
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"bias must have shape ({self.out_features},), got {tuple(bias.shape)}")
        self.qtype = fmt.name
        self.compute_dtype = compute_dtype
        self.weight_blocks = nn.Parameter(blocks.detach(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(
            bias.detach().to(compute_dtype, copy=True), requires_grad=False)

    @classmethod
    def from_blocks(cls, data: torch.Tensor, qtype: str | int, shape: Sequence[int],
                    bias: torch.Tensor | None = None,
                    compute_dtype: torch.dtype = torch.float32) -> GGUFLinear:
        """A GGUFLinear from a GGUF tensor's bytes, e.g. ``torch.from_numpy(reader_tensor.data)``.

        Args:
            data: the weight's bytes, uint8, flat or (out, bytes per row), in the file's order.
            qtype: the GGML type, by name ("Q4_K") or number (``reader_tensor.tensor_type``).
            shape: the weight's (out_features, in_features), torch's order (the reverse of the file's
                ``ne``, i.e. gguf-py's numpy shape).
            bias: optional (out_features,); copied, frozen, in ``compute_dtype``.
            compute_dtype: float32, float16, bfloat16 or float64.

        Raises:
            ValueError: an unsupported type, a shape that is not 2-D whole blocks per row, or a byte
                count that does not match it (naming both).
        """
        if len(shape) != 2:
            raise ValueError(f"GGUFLinear needs a 2-D weight shape (out, in), got {tuple(shape)}")
        expected = byte_count(shape, qtype)
        if data.numel() != expected:
            fmt = block_format(qtype)
            raise ValueError(f"a {fmt.name} weight of shape {tuple(shape)} takes {expected} bytes, "
                             f"got {data.numel()} (data shape {tuple(data.shape)})")
        return cls(data.reshape(int(shape[0]), -1), qtype, bias, compute_dtype)

    @property
    def block_format(self) -> BlockFormat:
        """The GGML block format of the weight."""
        return FORMATS[self.qtype]

    def blocks(self) -> torch.Tensor:
        """The weight's GGML blocks (out_features, bytes per row) on the current device.

        Raises:
            RuntimeError: FSDP2 holds the blocks sharded (outside the forward pass).
        """
        blocks = self.weight_blocks
        if hasattr(blocks, "to_local"):  # a DTensor: this rank's rows of blocks, not the weight
            raise RuntimeError(
                "this GGUFLinear's weight is sharded by FSDP2 (each rank holds some rows of its blocks); "
                "it is whole only inside the model's forward pass: dequantize it there, or before fully_shard"
            )
        return blocks

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dequantized weight, shape (out_features, in_features), a new tensor.

        Args:
            dtype: the result's floating dtype (computed in fp32, as gguf does, then cast); defaults
                to ``compute_dtype``.
        """
        dtype = self.compute_dtype if dtype is None else dtype
        return dequantize(self.blocks(), self.qtype, (self.out_features, self.in_features), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x W^T + b`` for x of shape (..., in_features); returns (..., out_features) in x's dtype."""
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        shape = (self.out_features, self.in_features)
        out = _GGUFLinear.apply(x.to(self.compute_dtype), self.blocks(), self.qtype, shape, bias)
        return out.to(x.dtype)

    def requantize_problem(self) -> str | None:
        """Why a new weight cannot be quantized to this block type (the installed gguf cannot write
        it), or None; merge and PiSSA ask before they change anything."""
        if self.qtype in quantizable_types():
            return None
        from importlib.metadata import version

        return (f"the installed gguf {version('gguf')} cannot quantize to {self.qtype} (it quantizes "
                f"{', '.join(quantizable_types())}); merge with quantized='dequantize' for a plain linear")

    def requantized(self, weight: torch.Tensor) -> GGUFLinear:
        """A new GGUFLinear like this one (block type, bias, compute dtype) holding `weight` (out x in)
        quantized by gguf-py: what PiSSA's residual becomes on a GGUF base.

        Raises:
            ValueError: the installed gguf cannot quantize this block type (naming those it can), or
                `weight` has another shape.
        """
        blocks = quantize(weight, self.qtype, (self.out_features, self.in_features))
        return GGUFLinear(blocks.to(self.weight_blocks.device), self.qtype, self.bias,
                          self.compute_dtype).train(self.training)

    def to_linear(self, weight: torch.Tensor, requantize: bool = False) -> nn.Module:
        """A frozen plain nn.Linear in the compute dtype holding `weight` (out x in) and this bias, or with
        `requantize` a GGUFLinear of this block type holding it: what merging deltas into a GGUF base gives.

        Raises:
            ValueError: with `requantize`, a block type the installed gguf cannot quantize.
        """
        if requantize:
            return self.requantized(weight)
        return frozen_linear(weight, self.bias, self.compute_dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, qtype={self.qtype}, compute_dtype={self.compute_dtype}")


@functools.cache
def quantizable_types() -> tuple[str, ...]:
    """The block types the installed gguf-py quantizes to (it dequantizes more than it quantizes: in
    0.19, none of the K-quants), found by asking it to quantize one block of zeros."""
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize as gguf_quantize

    found = []
    for fmt in FORMATS.values():
        try:
            gguf_quantize(np.zeros((1, fmt.block_size), dtype=np.float32), GGMLQuantizationType[fmt.name])
        except NotImplementedError:
            continue
        found.append(fmt.name)
    return tuple(found)


def quantize(weight: torch.Tensor, qtype: str | int, shape: Sequence[int] | None = None) -> torch.Tensor:
    """`weight` quantized to GGML blocks by gguf-py: uint8 (rows, bytes per row), on the CPU.

    Args:
        weight: the values, (rows, width) with width a whole number of blocks; any float dtype, any
            device (quantized in fp32 on the CPU, as gguf-py does).
        qtype: the GGML type, by name or number.
        shape: the shape `weight` must have, if given.

    Raises:
        ValueError: a type the installed gguf cannot quantize (naming those it can), or a weight of
            another shape or not whole blocks per row.
    """
    fmt = block_format(qtype)
    if fmt.name not in quantizable_types():
        from importlib.metadata import version

        raise ValueError(f"cannot quantize to {fmt.name}: the installed gguf {version('gguf')} quantizes "
                         f"only {', '.join(quantizable_types())}; merge with quantized='dequantize' for "
                         "a plain linear instead")
    if weight.dim() != 2 or (shape is not None and tuple(weight.shape) != tuple(shape)):
        wanted = "a 2-D (rows, width) weight" if shape is None else f"shape {tuple(shape)}"
        raise ValueError(f"quantizing to {fmt.name} needs {wanted}, got {tuple(weight.shape)}")
    byte_count(weight.shape, fmt.name)  # whole blocks per row, or the one-line error
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize as gguf_quantize

    values = weight.detach().to("cpu", torch.float32).numpy()
    data = np.ascontiguousarray(gguf_quantize(values, GGMLQuantizationType[fmt.name]))
    return torch.from_numpy(data.view(np.uint8).reshape(weight.shape[0], -1).copy())
