"""GGML block dequantizers: bit for bit gguf-py's `gguf.quants.dequantize` for every type, and clear errors.

Random bytes are valid blocks of every type (the reference needs no quantizer), except that a random
fp16 scale can be inf or NaN: each type is checked on raw random bytes (NaN in the same places, every
other value bit for bit) and on bytes whose fp16 scales were made finite (every value bit for bit).
"""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from lorakit.quant import gguf_blocks
from lorakit.quant.gguf_blocks import FORMATS, block_format, byte_count, dequantize

# Where each type keeps its fp16 scales, as byte offsets in a block (the float types: every value).
FP16_FIELDS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,), "Q2_K": (80, 82),
               "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
# The bit that, cleared in an all-ones exponent, makes a value finite: fp16 and bf16 bit 14, fp32 bit 30.
EXPONENT_TOP = {"F32": (np.uint32, 0x7F800000, 0x40000000), "BF16": (np.uint16, 0x7F80, 0x4000)}
FP16 = (np.uint16, 0x7C00, 0x4000)

SHAPES = [(1, 1), (3, 2), (8, 5)]  # (rows, blocks per row)


def random_blocks(qtype: str, rows: int, width: int, seed: int = 0, finite: bool = False) -> np.ndarray:
    """Random bytes of a `qtype` tensor of shape (rows, width): uint8 (rows, bytes per row). With
    `finite`, each fp16 scale (each value, for the float types) that is inf or NaN is made finite."""
    fmt = FORMATS[qtype]
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(rows * width // fmt.block_size, fmt.type_size), dtype=np.uint8)
    if finite:
        kind, exponent, top = EXPONENT_TOP.get(qtype, FP16)
        size = fmt.type_size if fmt.block_size == 1 else 2  # a float type's block is one value
        for start in FP16_FIELDS.get(qtype, (0,)):
            field = data[:, start:start + size]
            bits = np.ascontiguousarray(field).view(kind)
            cleared = bits & (np.iinfo(kind).max ^ top)
            bits = np.where((bits & exponent) == exponent, cleared, bits).astype(kind)
            field[:] = bits.view(np.uint8).reshape(field.shape)
    return data.reshape(rows, -1)


def reference(data: np.ndarray, qtype: str) -> torch.Tensor:
    with np.errstate(invalid="ignore", over="ignore"):
        return torch.from_numpy(np.ascontiguousarray(gguf_dequantize(data, GGMLQuantizationType[qtype])))


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal bit for bit (fp32), except that a NaN matches any NaN (payloads are not compared)."""
    assert actual.dtype == expected.dtype == torch.float32 and actual.shape == expected.shape
    nan = expected.isnan()
    assert torch.equal(actual.isnan(), nan), "NaN in other places"
    actual_bits, expected_bits = (t.masked_fill(nan, 0).view(torch.int32) for t in (actual, expected))
    assert torch.equal(actual_bits, expected_bits)


def width_of(qtype: str, blocks: int) -> int:
    return blocks * max(FORMATS[qtype].block_size, 32)  # the float types: rows of 32 values a "block"


@pytest.mark.parametrize("rows, blocks", SHAPES)
@pytest.mark.parametrize("qtype", sorted(FORMATS))
def test_finite_scales_are_bit_for_bit_gguf(qtype, rows, blocks):
    width = width_of(qtype, blocks)
    data = random_blocks(qtype, rows, width, seed=rows * 10 + blocks, finite=True)
    expected = reference(data, qtype)
    assert expected.isfinite().all()  # the test's own premise: finite scales give finite values
    actual = dequantize(torch.from_numpy(data), qtype, (rows, width))
    assert_same_bits(actual, expected)


@pytest.mark.parametrize("rows, blocks", SHAPES)
@pytest.mark.parametrize("qtype", sorted(FORMATS))
def test_raw_random_bytes_match_gguf_nans_included(qtype, rows, blocks):
    width = width_of(qtype, blocks)
    data = random_blocks(qtype, rows, width, seed=rows * 10 + blocks + 1)
    assert_same_bits(dequantize(torch.from_numpy(data), qtype, (rows, width)), reference(data, qtype))


def test_the_raw_bytes_do_hold_nan_and_inf():
    """The NaN-aware test above is only worth having if random bytes give NaN and inf: they do."""
    data = random_blocks("Q4_K", 64, 256, seed=3)
    assert dequantize(torch.from_numpy(data), "Q4_K", (64, 256)).isnan().any()
    data = random_blocks("F16", 64, 4096, seed=3)
    assert dequantize(torch.from_numpy(data), "F16", (64, 4096)).isinf().any()


@pytest.mark.parametrize("qtype", ["Q4_0", "Q5_1", "Q8_0", "Q3_K", "Q5_K", "Q6_K", "F16"])
def test_flat_bytes_other_shapes_and_unaligned_storage(qtype):
    """Flat data, a 3-D shape, and bytes starting at an odd address (a slice of a larger buffer, as a
    memory-mapped file gives) all read the same values."""
    width = width_of(qtype, 2)
    data = random_blocks(qtype, 6, width, seed=7, finite=True)
    expected = reference(data, qtype)
    flat = torch.from_numpy(data).reshape(-1)
    assert_same_bits(dequantize(flat, qtype, (6, width)), expected)
    assert_same_bits(dequantize(flat, qtype, (2, 3, width)), expected.view(2, 3, width))
    unaligned = torch.cat([torch.zeros(1, dtype=torch.uint8), flat])[1:]
    assert unaligned.storage_offset() == 1
    assert_same_bits(dequantize(unaligned, qtype, (6, width)), expected)
    assert_same_bits(dequantize(unaligned[: flat.numel() // 6], qtype, (1, width)), expected[:1])


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q5_0", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_the_single_op_path_other_devices_take_gives_the_same_bits(qtype, monkeypatch):
    """On a GPU the codes are scaled by one mixed-dtype op (`addcmul` / `mul`); run that path here."""
    monkeypatch.setattr(gguf_blocks, "_converts_while_reading", lambda device: True)
    width = width_of(qtype, 3)
    for finite in (True, False):
        data = random_blocks(qtype, 5, width, seed=11, finite=finite)
        assert_same_bits(dequantize(torch.from_numpy(data), qtype, (5, width)), reference(data, qtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("qtype", ["Q4_K", "Q8_0", "F16", "BF16", "F32"])
def test_other_dtypes_are_the_fp32_values_cast(qtype, dtype):
    width = width_of(qtype, 2)
    data = random_blocks(qtype, 4, width, seed=5, finite=True)
    values = dequantize(torch.from_numpy(data), qtype, (4, width), dtype)
    assert values.dtype == dtype
    torch.testing.assert_close(values, reference(data, qtype).to(dtype), rtol=0, atol=0, equal_nan=True)


def test_f32_values_do_not_share_memory_with_the_bytes():
    data = torch.from_numpy(random_blocks("F32", 2, 32, finite=True))
    values = dequantize(data, "F32", (2, 32))
    values.zero_()
    assert data.any()


def test_types_by_name_or_number():
    assert block_format("q4_k") is block_format(12) is block_format(GGMLQuantizationType.Q4_K)
    for name, fmt in FORMATS.items():  # our table agrees with gguf's
        from gguf.constants import GGML_QUANT_SIZES

        assert fmt.ggml_type == GGMLQuantizationType[name]
        assert (fmt.block_size, fmt.type_size) == GGML_QUANT_SIZES[GGMLQuantizationType[name]]
    assert byte_count((3, 512), "Q4_K") == 3 * 2 * 144


@pytest.mark.parametrize("qtype, shown", [("IQ2_XXS", "'IQ2_XXS'"), (GGMLQuantizationType.TQ1_0, "TQ1_0"),
                                          (16, "16"), ("nf4", "'nf4'")])
def test_an_unsupported_type_is_a_one_line_error_naming_it_and_the_supported_ones(qtype, shown):
    data = torch.zeros(144, dtype=torch.uint8)
    with pytest.raises(ValueError) as error:
        dequantize(data, qtype, (1, 256))
    message = str(error.value)
    assert "\n" not in message
    assert f"GGUF tensor type {shown} is not supported" in message
    assert "supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K" in message


def test_a_byte_count_that_does_not_match_the_shape_names_both():
    data = torch.zeros(2, 140, dtype=torch.uint8)
    with pytest.raises(ValueError) as error:
        dequantize(data, "Q4_K", (2, 256))
    message = str(error.value)
    assert "\n" not in message
    assert "Q4_K tensor of shape (2, 256) takes 288 bytes, got 280 (data shape (2, 140))" in message


@pytest.mark.parametrize("shape", [(2, 100), ()])
def test_a_shape_that_is_not_whole_blocks_is_refused(shape):
    with pytest.raises(ValueError, match="last dimension is a multiple of 32 \\(its block size\\)"):
        dequantize(torch.zeros(72, dtype=torch.uint8), "Q4_0", shape)


def test_data_must_be_bytes_and_dtype_floating():
    with pytest.raises(ValueError, match="must be uint8 bytes, got torch.int8"):
        dequantize(torch.zeros(18, dtype=torch.int8), "Q4_0", (1, 32))
    with pytest.raises(ValueError, match="dtype must be a floating dtype, got torch.int32"):
        dequantize(torch.zeros(18, dtype=torch.uint8), "Q4_0", (1, 32), torch.int32)
