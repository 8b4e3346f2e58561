"""GGUFLinear: a frozen linear on a GGUF tensor's own blocks; LoRA on it, merging, moving, saving."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit
from lorakit import LoraConfig, LoraLinear, add_adapter, list_adapters, merge_and_unload
from lorakit.kernels import paths
from lorakit.quant import GGUFLinear
from lorakit.quant.gguf_blocks import FORMATS
from lorakit.quant.gguf_linear import quantizable_types, quantize
from tests.models import autograd_nodes
from tests.quant.test_gguf_blocks import FP16_FIELDS, assert_same_bits, random_blocks, reference


def small_scale_blocks(qtype: str, rows: int, width: int, seed: int = 0) -> torch.Tensor:
    """Random blocks with small fp16 scales (|d| < 0.01), so the weights are of a trained model's size."""
    data = random_blocks(qtype, rows, width, seed=seed)
    blocks = data.reshape(-1, FORMATS[qtype].type_size)  # a view: writing it writes data
    generator = torch.Generator().manual_seed(seed)
    for start in FP16_FIELDS[qtype]:
        scales = (torch.rand(blocks.shape[0], generator=generator) * 0.02 - 0.01).half()
        blocks[:, start:start + 2] = scales.view(torch.uint8).view(-1, 2).numpy()
    return torch.from_numpy(data)


def gguf_linear(qtype: str = "Q4_K", out_features: int = 24, in_features: int = 512, bias: bool = True,
                seed: int = 0, compute_dtype: torch.dtype = torch.float32) -> GGUFLinear:
    data = small_scale_blocks(qtype, out_features, in_features, seed)
    b = torch.randn(out_features, generator=torch.Generator().manual_seed(seed)) if bias else None
    return GGUFLinear.from_blocks(data.reshape(-1), qtype, (out_features, in_features), b, compute_dtype)


def test_from_blocks_holds_the_bytes_as_one_frozen_uint8_parameter():
    data = small_scale_blocks("Q4_K", 24, 512)
    layer = GGUFLinear.from_blocks(data.reshape(-1), 12, (24, 512), bias=torch.ones(24))
    assert (layer.in_features, layer.out_features, layer.qtype) == (512, 24, "Q4_K")
    assert layer.compute_dtype == torch.float32
    # a parameter (FSDP2 shards parameters on dim 0, here whole rows of blocks), frozen; no buffers
    params = dict(layer.named_parameters())
    assert set(params) == {"weight_blocks", "bias"} and not any(p.requires_grad for p in params.values())
    assert params["weight_blocks"].dtype == torch.uint8 and params["weight_blocks"].shape == (24, 2 * 144)
    assert not list(layer.buffers())
    assert_same_bits(layer.dequantize_weight(), reference(data.numpy(), "Q4_K"))
    assert layer.dequantize_weight(torch.bfloat16).dtype == torch.bfloat16
    assert repr(layer) == ("GGUFLinear(in_features=512, out_features=24, bias=True, qtype=Q4_K, "
                           "compute_dtype=torch.float32)")
    assert lorakit.trainable_parameters(layer) == (0, 24 * 512 + 24)


def test_from_blocks_errors_name_what_was_wrong():
    data = torch.zeros(24 * 288, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"^a Q4_K weight of shape \(24, 512\) takes 6912 bytes, got 6900 "):
        GGUFLinear.from_blocks(data[:6900], "Q4_K", (24, 512))
    with pytest.raises(ValueError, match="needs a 2-D weight shape"):
        GGUFLinear.from_blocks(data, "Q4_K", (24 * 512,))
    with pytest.raises(ValueError, match="GGUF tensor type 'IQ4_XS' is not supported; supported: F32"):
        GGUFLinear.from_blocks(data, "IQ4_XS", (24, 512))
    with pytest.raises(ValueError, match="compute_dtype must be one of"):
        GGUFLinear.from_blocks(data, "Q4_K", (24, 512), compute_dtype=torch.int8)
    with pytest.raises(ValueError, match=r"bias must have shape \(24,\), got \(23,\)"):
        GGUFLinear.from_blocks(data, "Q4_K", (24, 512), bias=torch.zeros(23))


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K", "Q8_0"])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_is_exactly_linear_with_the_dequantized_weight_and_so_is_the_input_grad(qtype, bias):
    layer = gguf_linear(qtype, bias=bias)
    weight = layer.dequantize_weight(torch.float32)
    x = torch.randn(2, 5, 512, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, y_ref = layer(x), F.linear(x_ref, weight, layer.bias)
    assert torch.equal(y, y_ref)
    grad_out = torch.randn(2, 5, 24)
    y.backward(grad_out)
    y_ref.backward(grad_out)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-6, atol=1e-6)


def test_backward_dequantizes_again_instead_of_keeping_the_weight():
    layer = gguf_linear()
    saved_shapes = []

    def pack(t):
        saved_shapes.append(tuple(t.shape))
        return t

    x = torch.randn(3, 512, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    assert (24, 512) not in saved_shapes and (512, 24) not in saved_shapes
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


def test_compute_dtype_is_used_and_output_keeps_input_dtype():
    layer = gguf_linear(compute_dtype=torch.bfloat16)
    assert layer.bias.dtype == torch.bfloat16  # stored in the compute dtype, as the fused path wants
    x = torch.randn(4, 512)
    y = layer(x)
    assert y.dtype == torch.float32
    expected = F.linear(x.bfloat16(), layer.dequantize_weight(torch.bfloat16), layer.bias)
    torch.testing.assert_close(y, expected.float())


@pytest.mark.parametrize("bias", [True, False])
def test_lora_on_a_gguf_base_takes_the_fused_path_and_matches_the_float64_dense_formula(bias):
    layer = LoraLinear(gguf_linear("Q4_K", bias=bias), r=4, alpha=8)
    assert layer.kind == "quantized"
    assert paths.path_for(layer, torch.float32, False) == "fused"
    a, b = layer.factors("default")
    with torch.no_grad():
        b.copy_(torch.randn(b.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
    x = torch.randn(3, 7, 512, requires_grad=True)
    grad_out = torch.randn(3, 7, 24)
    y = layer(x)
    assert "LoraLinearFunctionBackward" in {type(node).__name__ for node in autograd_nodes(y)}
    y.backward(grad_out)

    # The reference: a plain float64 nn.Linear holding the same dequantized weight, the same A and B.
    dense = nn.Linear(512, 24, bias=bias, dtype=torch.float64)
    with torch.no_grad():
        dense.weight.copy_(layer.base.dequantize_weight(torch.float64))
        if bias:
            dense.bias.copy_(layer.base.bias)
    a64, b64 = (t.detach().double().requires_grad_(True) for t in (a, b))
    x64 = x.detach().double().requires_grad_(True)
    y64 = dense(x64) + layer.scaling["default"] * (x64 @ a64.T) @ b64.T
    y64.backward(grad_out.double())
    update = y64 - dense(x64)
    assert update.abs().max() > 0.1  # the adapter's share is there to be checked
    for actual, expected in [(y, y64), (x.grad, x64.grad), (a.grad, a64.grad), (b.grad, b64.grad)]:
        # fp32 sums of 512 products against float64 (about 3e-7 of the largest entry here)
        scale = expected.abs().max().item()
        torch.testing.assert_close(actual.double(), expected.detach(), rtol=0, atol=1e-6 * scale)


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = gguf_linear("Q4_K", 24, 512, seed=1)
        self.down = gguf_linear("Q8_0", 512, 32, seed=2)
        self.other = nn.Linear(24, 32)

    def forward(self, x):
        return self.down(self.other(self.up(x)))


def test_add_adapter_and_merge_and_unload_dequantize():
    model = add_adapter(TwoLayers(), LoraConfig(r=4, alpha=8, targets=["up", "down"]))
    assert isinstance(model.up, LoraLinear) and isinstance(model.up.base, GGUFLinear)
    assert isinstance(model.down, LoraLinear) and isinstance(model.down.base, GGUFLinear)
    assert isinstance(model.other, nn.Linear)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    for layer in (model.up, model.down):
        _, b = layer.factors("default")
        with torch.no_grad():
            b.normal_(std=0.1)
    x = torch.randn(5, 512)
    with torch.no_grad():
        before = model(x)
    expected = {}  # W0 + s B A, W0 the dequantized blocks
    for name in ("up", "down"):
        layer = getattr(model, name)
        a, b = (t.detach() for t in layer.factors("default"))
        expected[name] = layer.base.dequantize_weight() + layer.scaling["default"] * (b @ a)
    merge_and_unload(model, quantized="dequantize")
    for name, weight in expected.items():
        plain = getattr(model, name)
        assert type(plain) is nn.Linear and not any(p.requires_grad for p in plain.parameters())
        torch.testing.assert_close(plain.weight, weight, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-4)


def test_to_dtype_and_state_dict_round_trip_keep_the_bytes():
    layer = gguf_linear("Q6_K")
    blocks = layer.weight_blocks.detach().clone()
    layer.to(torch.float64)
    assert layer.weight_blocks.dtype == torch.uint8 and torch.equal(layer.weight_blocks, blocks)
    assert layer.bias.dtype == torch.float64 and layer.compute_dtype == torch.float32
    assert layer(torch.randn(2, 512)).dtype == torch.float32

    state = layer.state_dict()
    assert set(state) == {"weight_blocks", "bias"}
    fresh = GGUFLinear.from_blocks(torch.zeros_like(blocks), "Q6_K", (24, 512), bias=torch.zeros(24))
    fresh.load_state_dict(state)
    assert torch.equal(fresh.weight_blocks, blocks)
    assert_same_bits(fresh.dequantize_weight(), layer.dequantize_weight())


def test_requantize_keeps_the_block_type_where_gguf_can_quantize_it():
    assert {"Q4_0", "Q8_0", "F16"} <= set(quantizable_types())
    layer = gguf_linear("Q8_0", bias=True)
    weight = layer.dequantize_weight() + 0.001
    again = layer.requantized(weight)
    assert isinstance(again, GGUFLinear) and again.qtype == "Q8_0" and torch.equal(again.bias, layer.bias)
    assert torch.equal(again.weight_blocks, quantize(weight, "Q8_0"))
    # |w| < 1.28 (|d| < 0.01, |q| <= 128): half a step of 1.28 / 127, plus d's rounding to fp16
    assert (again.dequantize_weight() - weight).abs().max() < 0.006
    merged = layer.to_linear(weight, requantize=True)
    assert isinstance(merged, GGUFLinear) and torch.equal(merged.weight_blocks, again.weight_blocks)
    with pytest.raises(ValueError, match=r"quantizing to Q8_0 needs shape \(24, 512\), got \(512, 24\)"):
        layer.requantized(weight.T)


def test_requantize_to_a_type_gguf_cannot_quantize_is_a_one_line_error():
    layer = gguf_linear("Q4_K")
    if "Q4_K" in quantizable_types():
        pytest.skip("this gguf quantizes Q4_K")
    with pytest.raises(ValueError) as error:
        layer.to_linear(layer.dequantize_weight(), requantize=True)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("cannot quantize to Q4_K: the installed gguf ")
    assert f"quantizes only {', '.join(quantizable_types())}; merge with quantized='dequantize'" in message
    with pytest.raises(ValueError, match="cannot quantize to Q4_K"):
        layer.requantized(layer.dequantize_weight())


class TwoBases(nn.Module):
    """A Q8_0 base (gguf-py writes it) beside a Q4_K one (gguf-py 0.19 cannot), reading one x."""

    def __init__(self) -> None:
        super().__init__()
        self.q8 = gguf_linear("Q8_0")
        self.q4k = gguf_linear("Q4_K")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q8(x) + self.q4k(x)


def test_merge_requantize_onto_a_type_gguf_cannot_write_changes_nothing():
    if "Q4_K" in quantizable_types():
        pytest.skip("this gguf quantizes Q4_K")
    model = TwoBases()
    add_adapter(model, LoraConfig(r=2, targets=["q8", "q4k"], init="random"))
    x = torch.randn(3, model.q8.in_features)
    before = model(x)
    with pytest.raises(ValueError, match=r"cannot requantize 'q4k' \(and 0 more\): the installed gguf "
                                         r".* cannot quantize to Q4_K.*; nothing was merged"):
        merge_and_unload(model, quantized="requantize")
    assert list_adapters(model) == ["default"] and isinstance(model.q4k, LoraLinear)
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"cannot be requantized: the installed gguf"):
        add_adapter(model, LoraConfig(r=2, targets=["q4k"], init="pissa", allow_requantize=True), name="p")
    assert list_adapters(model) == ["default"]
