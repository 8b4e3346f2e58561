"""0/1 masks kept at one bit per entry: dropout's keep masks between forward and backward.

Forward multiplies by a keep mask of bytes; backward needs the same mask again. Kept as bytes, the
masks cost one byte per input value of every adapted linear: 96 MiB per step for SmolLM2-135M at
4 x 256 tokens, r=16 on all 7 linear kinds, fp32. Packed 8 to a byte they cost 12 MiB; backward
unpacks each straight into the dtype it multiplies in (one table lookup per byte, about the cost
of converting a byte mask to floats, which backward did anyway).

    pack:   8 entries b_0..b_7 (bytes, each 0 or 1) read as one little-endian int64 w = sum_j b_j 2^(8j).
            w * 0x0102040810204080 = sum_j sum_k b_j 2^(8j + 7k + 7): for j + k = 7 the term lands on
            bit 56 + j; no two terms share a bit, so nothing carries, and bits 56..63 are b_0..b_7.
            The top byte is the packed byte (bit j = entry j). The product passes 2^63: it relies on
            torch's int64 multiply wrapping (two's complement, as its CPU and CUDA kernels do; the
            tests check the all-ones byte), which only drops terms above bit 63.
    unpack: a 256-row table, row v = the 8 entries of byte v (bit j of v), indexed by the packed bytes.
"""

from __future__ import annotations

import sys

import torch

if sys.byteorder != "little":  # pack reads 8 bytes as one int64, least significant byte first
    raise ImportError("lorakit.kernels.bit_mask packs masks on little-endian machines only")

_SPREAD = 0x0102040810204080  # 2^7 + 2^14 + ... + 2^56: one shifted copy of each byte's low bit per byte


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A 0/1 mask (bytes or bool, any shape) as uint8 (ceil(numel / 8),): bit j of byte i is entry 8 i + j."""
    flat = mask.reshape(-1).contiguous().view(torch.uint8)
    if flat.numel() % 8 or flat.storage_offset() % 8:  # int64 words need a multiple of 8 bytes, aligned
        flat = torch.cat([flat, flat.new_zeros(-flat.numel() % 8)])  # a new, aligned tensor
    words = flat.view(torch.int64)
    return torch.bitwise_right_shift(words * _SPREAD, 56).to(torch.uint8)


def unpack_bits(bits: torch.Tensor, shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The mask `pack_bits` packed, in `shape`, as 0/1 values of `dtype` (a new tensor)."""
    codes = torch.arange(256, dtype=torch.int32, device=bits.device)
    table = torch.bitwise_right_shift(codes[:, None], torch.arange(8, dtype=torch.int32, device=bits.device))
    table = table.bitwise_and_(1).to(dtype)  # (256, 8): row v holds the 8 entries of byte v
    count = 1
    for size in shape:
        count *= size
    entries = table.index_select(0, bits.to(torch.int32)).view(-1)  # (8 * len(bits),)
    return entries[:count].view(shape)
