"""NF4 quantization against bitsandbytes (CPU) as the oracle: same input, same codes, same values."""

import pytest
import torch

from lorakit.quant import NF4_VALUES, NF4Tensor, dequantize_nf4, quantize_nf4
from lorakit.quant.double_quant import dequantize_absmax, dynamic_map, quantize_absmax

bnb = pytest.importorskip("bitsandbytes.functional")

# Sizes that are and are not multiples of 64, odd sizes (half-filled last byte), and more than
# 256 blocks (several double-quantization blocks, the last one short).
SHAPES = [(64,), (3, 64), (100, 70), (7, 9), (513,), (300, 100)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _random(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator) * 0.02).to(dtype)


def _bnb_quantize(t: torch.Tensor, double_quant: bool, block_size: int = 64):
    return bnb.quantize_4bit(t, blocksize=block_size, quant_type="nf4", compress_statistics=double_quant)


def _bnb_dequantize(packed: torch.Tensor, state) -> torch.Tensor:
    # bitsandbytes torch.compile's a fallback path (odd last dims); eager keeps the test fast.
    with torch.compiler.set_stance("force_eager"):
        return bnb.dequantize_4bit(packed, state, quant_type="nf4")


def test_constants_match_bitsandbytes():
    assert torch.equal(torch.tensor(NF4_VALUES), bnb.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(dynamic_map(), bnb.create_dynamic_map())


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_codes_and_scales_match_bitsandbytes(shape, dtype, double_quant):
    t = _random(shape, dtype)
    q = quantize_nf4(t, block_size=64, double_quant=double_quant)
    packed, state = _bnb_quantize(t, double_quant)

    assert torch.equal(q.codes, packed.reshape(-1))
    assert torch.equal(q.absmax, state.absmax)
    if double_quant:
        assert torch.equal(q.absmax_scale, state.state2.absmax)
        assert torch.equal(q.absmax_offset, state.offset)
    else:
        assert q.absmax_scale is None and q.absmax_offset is None


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_dequantized_values_match_bitsandbytes(shape, dtype, double_quant):
    t = _random(shape, dtype, seed=1)
    ours = dequantize_nf4(quantize_nf4(t, double_quant=double_quant))
    packed, state = _bnb_quantize(t, double_quant)
    reference = _bnb_dequantize(packed, state).reshape(shape)  # 1-D comes back as (1, n)

    assert ours.shape == t.shape and ours.dtype == dtype
    torch.testing.assert_close(ours, reference)


@pytest.mark.parametrize("block_size", [32, 128, 4096])
def test_other_block_sizes_match_bitsandbytes(block_size):
    t = _random((40, 333), torch.float32, seed=2)
    q = quantize_nf4(t, block_size=block_size)
    packed, state = _bnb_quantize(t, True, block_size)
    assert torch.equal(q.codes, packed.reshape(-1))
    assert torch.equal(q.absmax, state.absmax)
    torch.testing.assert_close(dequantize_nf4(q), _bnb_dequantize(packed, state))


def test_double_quant_matches_bitsandbytes_8bit_blockwise():
    # Heavy-tailed values with many near zero: exercises bitsandbytes' lookup-table rounding,
    # which differs from exact nearest-value rounding for small values.
    generator = torch.Generator().manual_seed(3)
    absmax = torch.randn(256 * 40 + 17, generator=generator).exp()
    absmax[::5] = absmax.mean() + torch.randn(absmax[::5].shape, generator=generator) * 1e-4
    codes, scale, offset = quantize_absmax(absmax)

    reference, state = bnb.quantize_blockwise(absmax - absmax.mean(), blocksize=256)
    assert torch.equal(offset, absmax.mean())
    assert torch.equal(codes, reference)
    assert torch.equal(scale, state.absmax)


def test_bits_per_parameter_from_stored_tensors():
    weight = _random((576, 1536), torch.float32)
    double = quantize_nf4(weight, double_quant=True)
    plain = quantize_nf4(weight, double_quant=False)

    # 884,736 values -> 442,368 code bytes, 13,824 block scales, 54 scales of scales + 1 offset.
    assert [tuple(t.shape) for t in double.stored_tensors()] == [(442368,), (13824,), (54,), ()]
    assert double.storage_bits() == 442368 * 8 + 13824 * 8 + 54 * 32 + 32
    assert round(double.bits_per_parameter(), 3) == 4.127
    assert plain.storage_bits() == 442368 * 8 + 13824 * 32
    assert plain.bits_per_parameter() == 4.5


def test_round_trip_error_is_small_and_shape_dtype_restored():
    t = _random((128, 96), torch.bfloat16)
    q = quantize_nf4(t)
    back = dequantize_nf4(q)
    assert back.shape == t.shape and back.dtype == torch.bfloat16
    assert dequantize_nf4(q, torch.float16).dtype == torch.float16
    relative_mse = (back.float() - t.float()).square().mean() / t.float().square().mean()
    assert relative_mse < 0.015  # NF4 on Gaussian weights: about 1%


def test_zero_and_constant_tensors_survive():
    zeros = torch.zeros(3, 50)
    assert torch.equal(dequantize_nf4(quantize_nf4(zeros)), zeros)
    # A single block: every scale equals the mean, so the de-meaned scales are all zero.
    constant = torch.full((10,), -0.5)
    assert torch.equal(dequantize_nf4(quantize_nf4(constant)), constant)


def test_input_is_not_modified():
    t = _random((64, 64), torch.float32)
    before = t.clone()
    quantize_nf4(t)
    assert torch.equal(t, before)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.uint8])
def test_rejects_unsupported_dtype(dtype):
    with pytest.raises(ValueError, match=r"torch\.float32.*got torch\." + str(dtype).split(".")[1]):
        quantize_nf4(torch.ones(64, dtype=dtype))


@pytest.mark.parametrize("block_size", [48, 16, 8192, 0, True, 64.0])
def test_rejects_bad_block_size(block_size):
    with pytest.raises(ValueError, match=f"power of two from 32 to 4096.*got {block_size!r}"):
        quantize_nf4(torch.ones(64), block_size=block_size)


def test_rejects_already_quantized():
    q = quantize_nf4(torch.ones(64))
    with pytest.raises(TypeError, match="already NF4-quantized"):
        quantize_nf4(q)
    with pytest.raises(ValueError, match="already-packed NF4 codes"):
        quantize_nf4(q.codes)


def test_rejects_empty_and_non_finite():
    with pytest.raises(ValueError, match="empty"):
        quantize_nf4(torch.ones(0, 4))
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_nf4(torch.tensor([1.0, float("nan")]))


def test_dequantize_validation():
    q = quantize_nf4(torch.ones(64))
    with pytest.raises(ValueError, match="got torch.float64"):
        dequantize_nf4(q, torch.float64)
    with pytest.raises(TypeError, match="expects an NF4Tensor"):
        dequantize_nf4(torch.ones(4))  # type: ignore[arg-type]


def test_inconsistent_nf4_tensor_is_rejected():
    q = quantize_nf4(torch.ones(64), double_quant=False)
    with pytest.raises(ValueError, match=r"codes must be uint8 of shape \(50,\)"):
        NF4Tensor(q.codes, q.absmax, torch.Size((100,)), torch.float32, 64)
    with pytest.raises(ValueError, match="given together"):
        NF4Tensor(q.codes, q.absmax, q.shape, q.dtype, 64, absmax_scale=torch.ones(1))


def _reference_dequantize(q: NF4Tensor, dtype: torch.dtype) -> torch.Tensor:
    """NF4_VALUES[code] * block absmax, one code at a time from the unpacked nibbles, in float64.

    A product of two fp32 values is exact in float64, so rounding it to fp32 gives the correctly
    rounded fp32 product: the result must match dequantize_nf4 bit for bit.
    """
    codes = torch.stack((q.codes >> 4, q.codes & 0xF), dim=1).reshape(-1)[: q.numel].long()
    values = torch.tensor(NF4_VALUES, dtype=torch.float64)[codes]
    scales = q.absmax_fp32().double().repeat_interleave(q.block_size)[: q.numel]
    return (values * scales).float().to(dtype).reshape(q.shape)


@pytest.mark.parametrize("block_size", [32, 64, 256])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_dequantize_is_bit_equal_to_the_float64_formula(shape, dtype, double_quant, block_size):
    q = quantize_nf4(_random(shape, torch.float32, seed=4), block_size=block_size, double_quant=double_quant)
    ours = dequantize_nf4(q, dtype)
    assert ours.dtype == dtype and ours.shape == q.shape and ours.is_contiguous()
    assert torch.equal(ours, _reference_dequantize(q, dtype))


def test_dequantized_scales_follow_the_formula_bit_for_bit():
    # map[code] * scale, rounded to fp32, plus the offset: the steps bitsandbytes takes, in float64
    # (a product of two fp32 values is exact there) and rounded once per step.
    generator = torch.Generator().manual_seed(5)
    absmax = torch.randn(256 * 3 + 40, generator=generator).exp()
    codes, scale, offset = quantize_absmax(absmax)
    block = torch.arange(codes.numel()) // 256
    product = (dynamic_map().double()[codes.long()] * scale.double()[block]).float()
    assert torch.equal(dequantize_absmax(codes, scale, offset), product + offset)
