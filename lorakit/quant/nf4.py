"""NormalFloat-4 (NF4) block-wise quantization, bit for bit as bitsandbytes (QLoRA, Dettmers et al. 2023).

A tensor is flattened and cut into blocks of ``block_size`` values (64 by default). Each block is
divided by its absolute maximum, so it lies in [-1, 1], and each value is replaced by the index of
the nearest of the 16 NF4 values: quantiles of N(0, 1) normalised to [-1, 1], with an exact 0.
Two 4-bit indices share a byte, the first value in the high nibble. The block scales are kept in
fp32, or, with double quantization, in 8 bits (see ``double_quant.py``).

Storage per parameter: 4 bits + 32/64 for fp32 scales = 4.5 bits, or with double quantization
4 + 8/64 + 32/(64*256) = 4.127 bits.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from lorakit.core.checks import is_int
from lorakit.quant.double_quant import DOUBLE_QUANT_BLOCK_SIZE, dequantize_absmax, quantize_absmax

NF4_VALUES: tuple[float, ...] = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
"""The 16 NF4 code values, in code order (the same constants as bitsandbytes' ``get_4bit_type("nf4")``)."""

SUPPORTED_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
"""Floating dtypes that can be quantized, and that dequantization can produce."""

# Block sizes are powers of two in this range: the range bitsandbytes accepts, so files interoperate.
MIN_BLOCK_SIZE = 32
MAX_BLOCK_SIZE = 4096

# bitsandbytes guards its reciprocal with this floor, so an all-zero block scales to 0, not NaN.
_TINY = 1e-38


@dataclass(frozen=True, eq=False)
class NF4Tensor:
    """A tensor quantized to NF4: packed codes, block scales and what is needed to undo it.

    Build one with :func:`quantize_nf4`; the fields are plain tensors, so a module can keep them
    as buffers and rebuild this view after ``.to(device)``.
    """

    codes: torch.Tensor
    """uint8, shape (ceil(numel / 2),): two 4-bit codes per byte, the first value in the high nibble."""
    absmax: torch.Tensor
    """Per-block scales, shape (n_blocks,): fp32, or uint8 codes with double quantization."""
    shape: torch.Size
    """Shape of the original tensor."""
    dtype: torch.dtype
    """Dtype of the original tensor, the default for dequantization."""
    block_size: int
    """Number of consecutive values (in row-major order) sharing one scale."""
    absmax_scale: torch.Tensor | None = None
    """Double quantization only: fp32 scale of each block of 256 scales, shape (ceil(n_blocks / 256),)."""
    absmax_offset: torch.Tensor | None = None
    """Double quantization only: the fp32 mean subtracted from the scales before quantizing them, shape ()."""

    def __post_init__(self) -> None:
        # Cheap consistency checks: these fields may come back from a state dict.
        object.__setattr__(self, "shape", torch.Size(self.shape))
        _check_block_size(self.block_size)
        _check_dtype(self.dtype, "original dtype")
        numel = self.shape.numel()
        problems = []
        if self.codes.dtype != torch.uint8 or self.codes.shape != ((numel + 1) // 2,):
            problems.append(
                f"codes must be uint8 of shape ({(numel + 1) // 2},), got {self.codes.dtype} "
                f"{tuple(self.codes.shape)}"
            )
        n_blocks = -(-numel // self.block_size)
        absmax_dtype = torch.uint8 if self.double_quant else torch.float32
        if self.absmax.dtype != absmax_dtype or self.absmax.shape != (n_blocks,):
            problems.append(
                f"absmax must be {absmax_dtype} of shape ({n_blocks},), "
                f"got {self.absmax.dtype} {tuple(self.absmax.shape)}"
            )
        if (self.absmax_scale is None) != (self.absmax_offset is None):
            problems.append("absmax_scale and absmax_offset must be given together (double quantization)")
        if self.absmax_scale is not None:
            n_blocks2 = -(-n_blocks // DOUBLE_QUANT_BLOCK_SIZE)
            if self.absmax_scale.dtype != torch.float32 or self.absmax_scale.shape != (n_blocks2,):
                problems.append(
                    f"absmax_scale must be float32 of shape ({n_blocks2},), "
                    f"got {self.absmax_scale.dtype} {tuple(self.absmax_scale.shape)}"
                )
        if self.absmax_offset is not None and (
            self.absmax_offset.dtype != torch.float32 or self.absmax_offset.shape != ()
        ):
            problems.append(
                f"absmax_offset must be a float32 scalar, "
                f"got {self.absmax_offset.dtype} {tuple(self.absmax_offset.shape)}"
            )
        if problems:
            raise ValueError(f"inconsistent NF4Tensor for shape {tuple(self.shape)}: " + "; ".join(problems))

    @property
    def double_quant(self) -> bool:
        """Whether the block scales are themselves quantized to 8 bits."""
        return self.absmax_scale is not None

    @property
    def numel(self) -> int:
        """Number of values in the original tensor."""
        return self.shape.numel()

    @property
    def device(self) -> torch.device:
        """Device holding the codes and scales."""
        return self.codes.device

    def stored_tensors(self) -> list[torch.Tensor]:
        """Every tensor that holds this quantized value: codes, scales, double-quant constants."""
        extra = (
            []
            if self.absmax_scale is None or self.absmax_offset is None
            else [self.absmax_scale, self.absmax_offset]
        )
        return [self.codes, self.absmax, *extra]

    def storage_bits(self) -> int:
        """Total size in bits of :meth:`stored_tensors`, as allocated."""
        return sum(t.numel() * t.element_size() * 8 for t in self.stored_tensors())

    def bits_per_parameter(self) -> float:
        """Storage bits per original value: 4.5 with fp32 scales, about 4.127 with double quantization
        (block size 64, large tensors)."""
        return self.storage_bits() / self.numel

    def absmax_fp32(self) -> torch.Tensor:
        """The per-block scales in fp32, shape (n_blocks,), undoing double quantization if used."""
        if self.absmax_scale is None or self.absmax_offset is None:
            return self.absmax
        return dequantize_absmax(self.absmax, self.absmax_scale, self.absmax_offset)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Same as :func:`dequantize_nf4`."""
        return dequantize_nf4(self, dtype)


def _check_block_size(block_size: int) -> None:
    if (
        not is_int(block_size)
        or not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE
        or block_size & (block_size - 1)
    ):
        raise ValueError(
            f"block_size must be a power of two from {MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE} "
            f"(64 is the QLoRA default), got {block_size!r}"
        )


def _check_dtype(dtype: torch.dtype, what: str, hint: str = "") -> None:
    if dtype not in SUPPORTED_DTYPES:
        accepted = ", ".join(str(d) for d in SUPPORTED_DTYPES)
        raise ValueError(f"NF4 {what} must be one of {accepted}; got {dtype}{hint}")


def _pad_to_blocks(values: torch.Tensor, block_size: int) -> torch.Tensor:
    """Flat ``values`` zero-padded to whole blocks, as (n_blocks, block_size)."""
    pad = -values.numel() % block_size
    if pad:
        values = torch.nn.functional.pad(values, (0, pad))
    return values.view(-1, block_size)


@functools.lru_cache(maxsize=8)
def _tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4 decision boundaries (15,) and the byte -> (high value, low value) table, per device.

    The table holds 256 int64 entries, each the bytes of two fp32 values: one gather per code byte
    fetches both of its values (1-D `index_select`, about 10x faster on a CPU than indexing a
    (256, 2) table), and the result read as fp32 is the values in order.
    """
    values = torch.tensor(NF4_VALUES, dtype=torch.float32)
    # Midpoints in fp32, as bitsandbytes computes them: a value exactly on one rounds down.
    boundaries = (values[:-1] + values[1:]) / 2
    byte = torch.arange(256)
    pairs = torch.stack((values[byte >> 4], values[byte & 0xF]), dim=1)  # (256, 2) fp32
    return boundaries.to(device), pairs.view(torch.int64).reshape(256).to(device)


def quantize_nf4(tensor: torch.Tensor, block_size: int = 64, double_quant: bool = True) -> NF4Tensor:
    """Quantize a floating tensor to NF4, block-wise.

    Produces the same codes and scales as ``bitsandbytes.functional.quantize_4bit(tensor,
    blocksize=block_size, quant_type="nf4", compress_statistics=double_quant)`` on the CPU.
    Sizes that are not a multiple of ``block_size`` are fine: the last block is shorter.

    Args:
        tensor: float32, float16 or bfloat16 values of any shape; read, never modified.
        block_size: values per scale, a power of two from 32 to 4096.
        double_quant: store the scales in 8 bits (4.127 instead of 4.5 bits per parameter).

    Returns:
        The quantized tensor, on ``tensor``'s device.

    Raises:
        TypeError: ``tensor`` is already an :class:`NF4Tensor`, or not a tensor.
        ValueError: unsupported dtype or block size, an empty tensor, or NaN/inf values.
    """
    if isinstance(tensor, NF4Tensor):
        raise TypeError("tensor is already NF4-quantized; dequantize_nf4() it first to quantize again")
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"quantize_nf4 expects a torch.Tensor, got {type(tensor).__name__}")
    hint = " (uint8 looks like already-packed NF4 codes)" if tensor.dtype == torch.uint8 else ""
    _check_dtype(tensor.dtype, "input dtype", hint)
    _check_block_size(block_size)
    if tensor.numel() == 0:
        raise ValueError(f"cannot quantize an empty tensor (shape {tuple(tensor.shape)})")
    values = tensor.detach().reshape(-1).float()  # codes are chosen in fp32 whatever the input dtype
    if not torch.isfinite(values).all():
        raise ValueError(f"cannot quantize a tensor with NaN or inf values (shape {tuple(tensor.shape)})")

    numel = values.numel()
    blocks = _pad_to_blocks(values, block_size)  # (n_blocks, block_size)
    absmax = blocks.abs().amax(dim=1)  # (n_blocks,)
    safe_absmax = absmax.clamp(min=_TINY)
    scaled = blocks * (1.0 / safe_absmax)[:, None]
    if numel % block_size:
        # bitsandbytes scales whole blocks by the reciprocal but divides the short last block;
        # the two may differ by one ulp, enough to flip a code on a boundary.
        scaled[-1] = blocks[-1] / safe_absmax[-1]
    boundaries, _ = _tables(values.device)
    codes = torch.bucketize(scaled.clamp_(-1.0, 1.0), boundaries, out_int32=True).to(torch.uint8)
    # An odd count leaves a half-filled last byte; its low nibble is the code of 0 (the padding).
    codes = codes.reshape(-1)[: numel + numel % 2]
    packed = (codes[0::2] << 4) | codes[1::2]  # (ceil(numel / 2),)

    if not double_quant:
        return NF4Tensor(packed, absmax, tensor.shape, tensor.dtype, block_size)
    absmax_codes, absmax_scale, absmax_offset = quantize_absmax(absmax)
    return NF4Tensor(
        packed, absmax_codes, tensor.shape, tensor.dtype, block_size, absmax_scale, absmax_offset
    )


def dequantize_nf4(q: NF4Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Rebuild the values of an NF4 tensor: ``NF4_VALUES[code] * block absmax``.

    Computed in fp32 and cast once at the end, as bitsandbytes does, so the result matches
    ``bitsandbytes.functional.dequantize_4bit`` up to that final rounding.

    Args:
        q: the quantized tensor.
        dtype: float32, float16 or bfloat16; defaults to the original dtype.

    Returns:
        A new tensor of the original shape, on ``q``'s device.

    Raises:
        TypeError: ``q`` is not an :class:`NF4Tensor`.
        ValueError: unsupported ``dtype``.
    """
    if not isinstance(q, NF4Tensor):
        raise TypeError(f"dequantize_nf4 expects an NF4Tensor (from quantize_nf4), got {type(q).__name__}")
    dtype = q.dtype if dtype is None else dtype
    _check_dtype(dtype, "dequantization dtype")
    _, pairs = _tables(q.device)
    # (2 * ceil(numel / 2),)
    values = torch.index_select(pairs, 0, q.codes.to(torch.int32)).view(torch.float32)
    blocks = _pad_to_blocks(values, q.block_size)  # (n_blocks, block_size) fp32, a new tensor: ours to reuse
    scales = q.absmax_fp32()[:, None]  # (n_blocks, 1)
    if dtype == torch.float32:
        out = blocks.mul_(scales)
    else:  # the product is computed in fp32 and rounded once to `dtype` as it is stored: no fp32 copy
        out = torch.mul(blocks, scales, out=torch.empty(blocks.shape, dtype=dtype, device=blocks.device))
    return out.reshape(-1)[: q.numel].reshape(q.shape)
