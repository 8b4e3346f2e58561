"""GGML block formats (the tensors of a GGUF file) dequantized with torch ops, bit for bit as gguf does.

A quantized GGUF tensor is a run of fixed-size blocks, each holding ``block_size`` consecutive
values of one row: fp16 scales followed by packed integer codes. :func:`dequantize` turns those bytes
into floats equal, bit for bit, to ``gguf.quants.dequantize(bytes, type)`` (gguf-py, the reference),
in a handful of whole-tensor ops (no loop over blocks), on whatever device the bytes live.

    Q4_0  w = d (q - 8)            Q4_1  w = d q + m           blocks of 32, q 4 bits
    Q5_0  w = d (q - 16)           Q5_1  w = d q + m           blocks of 32, q 5 bits
    Q8_0  w = d q                  q int8
    Q2_K  w = d sc q - dmin mn     16 sub-blocks of 16, 4-bit sc and mn, q 2 bits
    Q3_K  w = d (sc - 32) q        16 sub-blocks of 16, 6-bit sc, q 3 bits signed (-4..3)
    Q4_K  w = d sc q - dmin mn     8 sub-blocks of 32, 6-bit sc and mn, q 4 bits
    Q5_K  w = d sc q - dmin mn     8 sub-blocks of 32, 6-bit sc and mn, q 5 bits
    Q6_K  w = d sc (q - 32)        16 sub-blocks of 16, int8 sc, q 6 bits
    (the K-quants' blocks are 256-value super-blocks; d, dmin and m are fp16, as are F16 tensors)

Why bit for bit with a different order of operations: every product above is exact in fp32 (an fp16
scale has 11 significant bits, a sub-block scale at most 7, a code at most 6, so at most 24), so
gguf's ``(d * sc) * q`` and our ``q * (d * sc)`` or a fused multiply-add round only where gguf
rounds, once, at the final ``+ m`` / ``- dmin mn`` (``x + (-y)`` rounds as ``x - y``, signed zeros
included). Codes are unpacked as uint8 with bit ops on 8-byte words, and scaled in fp32 by one op
that converts them as it reads them (GPU) or by in-place ops on one converted copy (CPU): the fp32
result is the only full-size float tensor made.

Layouts are gguf-py's (``gguf/quants.py``); the shape is torch's (rows first, the blocks along the
last dimension), which is gguf-py's numpy shape, the reverse of a GGUF file's ``ne``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

Decoder = Callable[[torch.Tensor], torch.Tensor]
"""(n_blocks, type_size) uint8 -> (n_blocks, ...) fp32 holding block_size values per block."""


@dataclass(frozen=True)
class BlockFormat:
    """One GGML tensor type: its name, its GGML number, and how many values and bytes a block holds."""

    name: str
    """The GGML name, e.g. "Q4_K" (``gguf.GGMLQuantizationType[name]``)."""
    ggml_type: int
    """The number a GGUF file stores for this type (``GGMLQuantizationType`` value)."""
    block_size: int
    """Values per block (1 for the plain float types)."""
    type_size: int
    """Bytes per block."""
    decode: Decoder
    """The block decoder (fp32 out)."""

    def row_bytes(self, width: int) -> int:
        """Bytes of one row of `width` values (a multiple of ``block_size``)."""
        return width // self.block_size * self.type_size


_WORDS = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}
_PAIRS = (0, 2, 4, 6)  # the four 2-bit fields of a byte
_BITS = tuple(range(8))  # its eight bits


def _view(packed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bytes (..., k) viewed as a wider `dtype` (..., k / size), copied first where a view cannot be
    made (an offset or row stride that is not a multiple of the size; the copy is of the small packed
    part only)."""
    size = dtype.itemsize
    offsets = (packed.storage_offset(), *packed.stride()[:-1])
    aligned = packed.stride(-1) == 1 and all(n % size == 0 for n in offsets)
    return (packed if aligned else packed.new_empty(packed.shape).copy_(packed)).view(dtype)


def _fp16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The fp16 at bytes [start, start + 2) of each block, as fp32 of shape (n_blocks, 1)."""
    return _view(blocks[:, start:start + 2], torch.float16).float()


def _fields(packed: torch.Tensor, shifts: Sequence[int], width: int, to: int = 0) -> torch.Tensor:
    """Bit fields of bytes: (..., k) -> (..., len(shifts), k) uint8, field j of byte i being its `width`
    bits from bit shifts[j] of byte i, moved to bit `to` (the other bits 0).

    The bytes are read as words of up to 8 (a mask keeps each byte's field in that byte, so the words'
    byte order is the bytes' order), one shift and one mask per field: a loop over a byte's fields,
    not over blocks. On the CPU this is several times faster than shifting bytes (AVX2 has no byte
    shifts).
    """
    size = next(size for size in _WORDS if packed.shape[-1] % size == 0)
    words = _view(packed, _WORDS[size])
    # the field's mask in every byte; no field reaches bit 7, so it fits the signed word
    mask = int.from_bytes(bytes([((1 << width) - 1) << to]) * size, "little")
    out = words.new_empty((*words.shape[:-1], len(shifts), words.shape[-1]))
    for j, shift in enumerate(shifts):
        field = out.select(-2, j)
        if shift >= to:  # (an arithmetic shift's sign bits land above the field: masked away)
            torch.bitwise_right_shift(words, shift - to, out=field)
        else:
            torch.bitwise_left_shift(words, to - shift, out=field)
        field.bitwise_and_(mask)
    return out.view(torch.uint8)


def _converts_while_reading(device: torch.device) -> bool:
    """Whether a mixed-dtype op on `device` converts its uint8 operand as it reads it (CUDA does); the
    CPU first copies it to fp32 in a temporary."""
    return device.type != "cpu"


def _scaled(q: torch.Tensor, scale: torch.Tensor, zero: int = 0,
            shift: torch.Tensor | None = None) -> torch.Tensor:
    """(q - zero) * scale + shift in fp32: integer codes q, scales and shifts broadcast over them.

    Where an op converts q as it reads it, one op writes the result. On the CPU, whose mixed-dtype
    ops go through an fp32 temporary (fresh memory to fault in: the largest cost there), q is
    converted once into the result, which the other steps update in place. Both round as gguf does.
    """
    if _converts_while_reading(q.device):
        if zero:
            q = q.view(torch.int8) - zero  # codes have at most 6 bits: q - zero fits int8
        return q * scale if shift is None else torch.addcmul(shift, q, scale)
    out = q.to(torch.float32)
    if zero:
        out.sub_(zero)
    out.mul_(scale)
    return out if shift is None else out.add_(shift)


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Q4/Q5 blocks: 16 bytes -> 32 codes, the low nibbles then the high nibbles."""
    return _fields(packed, (0, 4), 4).flatten(-2)  # (n, 2, 16) -> (n, 32)


def _q4_0(blocks: torch.Tensor) -> torch.Tensor:
    return _scaled(_nibbles(blocks[:, 2:18]), _fp16(blocks, 0), zero=8)


def _q4_1(blocks: torch.Tensor) -> torch.Tensor:
    return _scaled(_nibbles(blocks[:, 4:20]), _fp16(blocks, 0), shift=_fp16(blocks, 2))


def _q5_codes(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    """Q5_0/Q5_1: the 32 bits of qh (a little-endian uint32) are the codes' fifth bits, in order."""
    n = qh.shape[0]
    fifth = _fields(qh, _BITS, 1, to=4).transpose(-1, -2).reshape(n, 32)  # bit k of byte j: code 8 j + k
    return _nibbles(qs).bitwise_or_(fifth)


def _q5_0(blocks: torch.Tensor) -> torch.Tensor:
    return _scaled(_q5_codes(blocks[:, 2:6], blocks[:, 6:22]), _fp16(blocks, 0), zero=16)


def _q5_1(blocks: torch.Tensor) -> torch.Tensor:
    return _scaled(_q5_codes(blocks[:, 4:8], blocks[:, 8:24]), _fp16(blocks, 0), shift=_fp16(blocks, 2))


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    return _scaled(blocks[:, 2:34].view(torch.int8), _fp16(blocks, 0))


def _q2_k(blocks: torch.Tensor) -> torch.Tensor:
    # scales[16] | qs[64] | d | dmin; sub-block s of 16 values: d * (sc_s & 15) * q - dmin * (sc_s >> 4)
    n = blocks.shape[0]
    scales = blocks[:, :16]
    scale = (_fp16(blocks, 80) * (scales & 0x0F)).view(n, 16, 1)
    offset = (_fp16(blocks, 82) * (scales >> 4)).view(n, 16, 1)
    q = _fields(blocks[:, 16:80].reshape(n, 2, 32), _PAIRS, 2).view(n, 16, 16)  # (n, 2, 4, 32)
    return _scaled(q, scale, shift=-offset)  # x + (-y) rounds as x - y, signed zeros included


def _q3_k(blocks: torch.Tensor) -> torch.Tensor:
    # hmask[32] | qs[64] | scales[12] | d; the 16 6-bit scales: low nibbles in bytes 0-7, top 2 bits in 8-11
    n = blocks.shape[0]
    packed = blocks[:, 96:108]
    low = _fields(packed[:, :8], (0, 4), 4).view(n, 16)
    high = _fields(packed[:, 8:12], _PAIRS, 2, to=4).view(n, 16)
    scale = (_fp16(blocks, 108) * ((low | high).view(torch.int8) - 32)).view(n, 16, 1)
    # gguf: q = low - 4 (1 - high) = (low | high << 2) - 4, in -4..3
    q = _fields(blocks[:, 32:96].reshape(n, 2, 32), _PAIRS, 2).view(n, 16, 16)  # (n, 2, 4, 32)
    q.bitwise_or_(_fields(blocks[:, :32], _BITS, 1, to=2).view(n, 16, 16))  # (n, 8, 32)
    return _scaled(q, scale, zero=4)


def _k_scales(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: d * sc and dmin * mn for the 8 sub-blocks, each (n, 8, 1), from the 12 packed bytes.

    Bytes 0-3 hold sc 0-3 (low 6 bits) and sc 4-7's top 2 bits; bytes 4-7 the same for mn; bytes
    8-11 the low nibbles of sc 4-7 (low) and mn 4-7 (high).
    """
    n = blocks.shape[0]
    packed = blocks[:, 4:16].reshape(n, 3, 4)
    a, b, c = packed[:, 0], packed[:, 1], packed[:, 2]
    sc = torch.cat([a & 0x3F, (c & 0x0F) | ((a >> 2) & 0x30)], dim=-1)
    mn = torch.cat([b & 0x3F, (c >> 4) | ((b >> 2) & 0x30)], dim=-1)
    return (_fp16(blocks, 0) * sc).view(n, 8, 1), (_fp16(blocks, 2) * mn).view(n, 8, 1)


def _q4_k(blocks: torch.Tensor) -> torch.Tensor:
    # d | dmin | scales[12] | qs[128]: 4 groups of 32 bytes, low nibbles then high nibbles
    n = blocks.shape[0]
    scale, offset = _k_scales(blocks)
    q = _fields(blocks[:, 16:144].reshape(n, 4, 32), (0, 4), 4).view(n, 8, 32)
    return _scaled(q, scale, shift=-offset)


def _q5_k(blocks: torch.Tensor) -> torch.Tensor:
    # d | dmin | scales[12] | qh[32] | qs[128]; bit k of qh[j] is the fifth bit of value 32 k + j
    n = blocks.shape[0]
    scale, offset = _k_scales(blocks)
    q = _fields(blocks[:, 48:176].reshape(n, 4, 32), (0, 4), 4).view(n, 8, 32)
    q.bitwise_or_(_fields(blocks[:, 16:48], _BITS, 1, to=4).view(n, 8, 32))
    return _scaled(q, scale, shift=-offset)


def _q6_k(blocks: torch.Tensor) -> torch.Tensor:
    # ql[128] | qh[64] | scales[16] (int8) | d; 16 sub-blocks of 16
    n = blocks.shape[0]
    scale = (_fp16(blocks, 208) * blocks[:, 192:208].view(torch.int8)).view(n, 16, 1)
    q = _fields(blocks[:, :128].reshape(n, 2, 64), (0, 4), 4).view(n, 8, 32)  # (n, 2, 2, 64)
    q.bitwise_or_(_fields(blocks[:, 128:192].reshape(n, 2, 32), _PAIRS, 2, to=4).view(n, 8, 32))
    return _scaled(q.view(n, 16, 16), scale, zero=32)


def _floats(dtype: torch.dtype) -> Decoder:
    """F32/F16/BF16: the bytes viewed as `dtype`, then fp32 (exact; gguf's BF16 is ``bits << 16``)."""
    return lambda blocks: _view(blocks, dtype).float()


FORMATS: dict[str, BlockFormat] = {
    fmt.name: fmt
    for fmt in (
        BlockFormat("F32", 0, 1, 4, _floats(torch.float32)),
        BlockFormat("F16", 1, 1, 2, _floats(torch.float16)),
        BlockFormat("BF16", 30, 1, 2, _floats(torch.bfloat16)),
        BlockFormat("Q4_0", 2, 32, 18, _q4_0),
        BlockFormat("Q4_1", 3, 32, 20, _q4_1),
        BlockFormat("Q5_0", 6, 32, 22, _q5_0),
        BlockFormat("Q5_1", 7, 32, 24, _q5_1),
        BlockFormat("Q8_0", 8, 32, 34, _q8_0),
        BlockFormat("Q2_K", 10, 256, 84, _q2_k),
        BlockFormat("Q3_K", 11, 256, 110, _q3_k),
        BlockFormat("Q4_K", 12, 256, 144, _q4_k),
        BlockFormat("Q5_K", 13, 256, 176, _q5_k),
        BlockFormat("Q6_K", 14, 256, 210, _q6_k),
    )
}
"""The supported types by GGML name."""

_BY_NUMBER = {fmt.ggml_type: fmt for fmt in FORMATS.values()}


def block_format(qtype: str | int) -> BlockFormat:
    """The format of a GGML type given by name ("Q4_K") or number (12, or a ``GGMLQuantizationType``).

    Raises:
        ValueError: a type this module does not dequantize (named, with the supported ones).
    """
    if isinstance(qtype, str):
        fmt = FORMATS.get(qtype.upper())
    elif isinstance(qtype, int) and not isinstance(qtype, bool):
        fmt = _BY_NUMBER.get(int(qtype))
    else:
        fmt = None
    if fmt is None:
        # an IntEnum (gguf's GGMLQuantizationType) knows its name; a bare number is shown as given
        shown = getattr(qtype, "name", None) or repr(qtype)
        raise ValueError(f"GGUF tensor type {shown} is not supported; supported: {', '.join(FORMATS)}")
    return fmt


def byte_count(shape: Sequence[int], qtype: str | int) -> int:
    """Bytes a tensor of `shape` (blocks along the last dimension) takes in `qtype`.

    Raises:
        ValueError: an unsupported type, or a last dimension that is not a whole number of blocks.
    """
    fmt = block_format(qtype)
    dims = tuple(int(n) for n in shape)
    if not dims or min(dims) < 0 or dims[-1] % fmt.block_size:
        raise ValueError(f"a {fmt.name} tensor needs a shape whose last dimension is a multiple of "
                         f"{fmt.block_size} (its block size), got {dims}")
    return math.prod(dims[:-1]) * fmt.row_bytes(dims[-1])


def dequantize(data: torch.Tensor, qtype: str | int, shape: Sequence[int],
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The values of a GGML tensor from its raw bytes, equal bit for bit to ``gguf.quants.dequantize``.

    Args:
        data: the tensor's bytes, uint8, flat or (rows, bytes per row); any device. Blocks are read
            in memory order, so the bytes must be in the file's order (a contiguous copy is made
            otherwise).
        qtype: the GGML type, by name ("Q4_K") or number.
        shape: the tensor's shape in torch order (rows first, e.g. (out, in) for a linear weight).
        dtype: the result's floating dtype; values are computed in fp32 (as gguf does) and cast.

    Returns:
        A new tensor of `shape` and `dtype` on `data`'s device.

    Raises:
        ValueError: an unsupported type, a shape that is not whole blocks, or a byte count that
            does not match the shape.
    """
    fmt = block_format(qtype)
    expected = byte_count(shape, fmt.name)
    if data.dtype != torch.uint8:
        raise ValueError(f"GGUF tensor data must be uint8 bytes, got {data.dtype}")
    if data.numel() != expected:
        raise ValueError(f"a {fmt.name} tensor of shape {tuple(shape)} takes {expected} bytes, "
                         f"got {data.numel()} (data shape {tuple(data.shape)})")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")
    blocks = data.reshape(-1, fmt.type_size)  # (n_blocks, type_size); a view when data is contiguous
    values = fmt.decode(blocks).view(*shape)
    if values.dtype == dtype and values.data_ptr() == data.data_ptr():
        return values.clone()  # F32 bytes read as fp32 are a view of the bytes: return a tensor of its own
    return values.to(dtype)
