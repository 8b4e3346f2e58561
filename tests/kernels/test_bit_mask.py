"""Keep masks packed a bit per entry: the same entries back, in any shape and dtype."""

import pytest
import torch

from lorakit.kernels.bit_mask import pack_bits, unpack_bits


@pytest.mark.parametrize("shape", [(1,), (8,), (13,), (3, 5, 7), (64, 24)])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.bfloat16, torch.float64])
def test_unpacking_gives_the_packed_entries_back(shape, dtype):
    torch.manual_seed(0)
    mask = (torch.rand(shape) < 0.5).to(torch.uint8)
    bits = pack_bits(mask)
    assert bits.dtype == torch.uint8 and bits.shape == (-(-mask.numel() // 8),)  # ceil(n / 8) bytes
    back = unpack_bits(bits, mask.shape, dtype)
    assert back.dtype == dtype and back.shape == mask.shape
    assert torch.equal(back, mask.to(dtype))


def test_bit_j_of_byte_i_is_entry_8i_plus_j():
    mask = torch.zeros(16, dtype=torch.uint8)
    mask[[0, 3, 7, 9, 15]] = 1
    assert pack_bits(mask).tolist() == [1 + 8 + 128, 2 + 128]
    assert pack_bits(torch.ones(8, dtype=torch.uint8)).tolist() == [255]  # no carry, no sign trouble


def test_bool_masks_views_and_unaligned_storage_pack_alike():
    torch.manual_seed(0)
    whole = torch.rand(9, 16) < 0.3
    part = whole.view(-1)[3:3 + 64]  # a view that starts 3 bytes into its storage
    assert torch.equal(unpack_bits(pack_bits(part), part.shape, torch.uint8), part.to(torch.uint8))
    columns = whole[:, ::2]  # not contiguous
    assert torch.equal(unpack_bits(pack_bits(columns), columns.shape, torch.bool), columns)
