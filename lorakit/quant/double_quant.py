"""Double quantization: the NF4 block scales stored in 8 bits (QLoRA section 3).

Every 64-value NF4 block keeps one fp32 absmax, which alone costs 32/64 = 0.5 bits per
parameter. Double quantization subtracts the mean of those scales (the ``offset``) and stores
the remainder with bitsandbytes' signed *dynamic* 8-bit map, in blocks of 256 scales that each
keep one fp32 scale of their own: 8/64 + 32/(64*256) bits per parameter, about 0.127.

Everything here reproduces bitsandbytes' CPU path bit for bit (0.45+): the same 256-entry map
and the same rounding, including the 65,536-bin lookup table its CPU kernel uses to find the
nearest map entry (which is not always the exactly nearest one, so a plain nearest-value search
would disagree on a few codes).
"""

from __future__ import annotations

import functools

import torch

DOUBLE_QUANT_BLOCK_SIZE = 256
"""Number of NF4 scales that share one fp32 scale in double quantization."""

# Resolution of bitsandbytes' CPU lookup table: [-1, 1] is cut into this many bins.
_LUT_SIZE = 65536


def dynamic_map() -> torch.Tensor:
    """The signed dynamic 8-bit map of bitsandbytes' ``create_dynamic_map()``.

    256 sorted fp32 values in [-0.993, 1]: for each decimal exponent 1e-6 ... 1 the midpoints of
    a linear grid on [0.1, 1], with twice as many points per step up, both signs, plus 0 and 1.
    Dense near zero, where most de-meaned scales lie.

    Returns:
        A new fp32 tensor of shape (256,), on the CPU.
    """
    values = []
    for exponent in range(7):
        boundaries = torch.linspace(0.1, 1, 2**exponent + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        # Same Python scalar times fp32 tensor as bitsandbytes, so the roundings agree.
        scale = 10 ** (exponent - 6)
        values += [scale * means, -scale * means]
    values.append(torch.tensor([0.0, 1.0]))
    return torch.cat(values).sort().values


@functools.lru_cache(maxsize=8)
def _map_and_lut(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The dynamic map and its nearest-entry lookup table, built once per device."""
    code = dynamic_map()
    midpoints = 0.5 * (code[:-1] + code[1:])
    bins = torch.arange(_LUT_SIZE, dtype=torch.float32)
    bin_values = -1.0 + (2.0 * bins) / (_LUT_SIZE - 1)
    # lut[i] = index of the first map entry whose upper midpoint is not below bin i's value.
    lut = torch.searchsorted(midpoints, bin_values, side="left").to(torch.uint8)
    return code.to(device), lut.to(device)


def _blocks(values: torch.Tensor, block_size: int) -> torch.Tensor:
    """Flat ``values`` zero-padded to whole blocks, as (n_blocks, block_size)."""
    pad = -values.numel() % block_size
    return torch.nn.functional.pad(values, (0, pad)).view(-1, block_size)


def quantize_absmax(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Double-quantize NF4 block scales.

    Args:
        absmax: fp32 scales, shape (n_blocks,).

    Returns:
        ``(codes, scale, offset)``: uint8 codes (n_blocks,), fp32 per-256-block scales
        (ceil(n_blocks / 256),) and the fp32 mean that was subtracted, shape ().
    """
    assert absmax.dtype == torch.float32 and absmax.dim() == 1, "absmax must be a flat fp32 tensor"
    offset = absmax.mean()
    centred = _blocks(absmax - offset, DOUBLE_QUANT_BLOCK_SIZE)  # (n_blocks2, 256)
    scale = centred.abs().amax(dim=1)  # (n_blocks2,)
    _, lut = _map_and_lut(absmax.device)
    # bitsandbytes multiplies by the reciprocal (not a division) and rounds each step to fp32;
    # an all-zero block (every scale equal to the mean) gets code 0, as its kernel writes.
    normed = (centred * (1.0 / scale)[:, None]).clamp(-1.0, 1.0)
    bins = (((normed + 1.0) * 0.5) * (_LUT_SIZE - 1) + 0.5).nan_to_num(0.0).to(torch.int64)
    codes = torch.where(scale[:, None] == 0, 0, lut[bins])
    return codes.to(torch.uint8).reshape(-1)[: absmax.numel()], scale, offset


def dequantize_absmax(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Undo :func:`quantize_absmax`: ``map[codes] * scale + offset`` in fp32.

    Args:
        codes: uint8 codes, shape (n_blocks,).
        scale: fp32 per-256-block scales, shape (ceil(n_blocks / 256),).
        offset: fp32 mean that was subtracted, shape ().

    Returns:
        fp32 scales, shape (n_blocks,).
    """
    code, _ = _map_and_lut(codes.device)
    values = (_blocks(torch.index_select(code, 0, codes.to(torch.int32)), DOUBLE_QUANT_BLOCK_SIZE)
              * scale[:, None])
    return values.reshape(-1)[: codes.numel()] + offset
