"""NF4Linear: forward and input gradient equal dequantize-then-linear; frozen, shardable, Conv1D-aware."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorakit.quant import NF4Linear, dequantize_nf4, quantize_nf4


def _linear(
    in_features: int = 96, out_features: int = 48, bias: bool = True, dtype=torch.float32
) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(in_features, out_features, bias=bias).to(dtype)


def test_from_linear_keeps_the_contract_attributes():
    linear = _linear()
    layer = NF4Linear.from_linear(linear)
    assert (layer.in_features, layer.out_features) == (96, 48)
    assert layer.compute_dtype == torch.float32
    assert torch.equal(layer.bias, linear.bias) and not layer.bias.requires_grad
    weight = layer.dequantize_weight(torch.float32)
    assert weight.shape == (48, 96) and weight.dtype == torch.float32
    assert torch.equal(weight, dequantize_nf4(quantize_nf4(linear.weight)))


def test_quantized_data_are_frozen_parameters_fsdp2_can_shard_and_nothing_trains():
    layer = NF4Linear.from_linear(_linear())
    # Parameters, not buffers: FSDP2 shards parameters (any dtype) and leaves buffers whole on every rank.
    params = dict(layer.named_parameters())
    assert set(params) == {"weight_codes", "weight_absmax", "weight_absmax_scale", "bias"}
    assert not any(p.requires_grad for p in layer.parameters())
    assert params["weight_codes"].dtype == torch.uint8 and params["weight_codes"].numel() == 48 * 96 // 2
    assert [name for name, _ in layer.named_buffers()] == ["weight_absmax_offset"]  # 0-d: cannot be sharded
    assert set(NF4Linear.from_linear(_linear(), double_quant=False).state_dict()) == {
        "weight_codes",
        "weight_absmax",
        "bias",
    }


def test_a_sharded_weight_outside_forward_is_a_clear_error():
    class Shard(torch.Tensor):  # stands for FSDP2's DTensor, which has to_local()
        def to_local(self) -> torch.Tensor:
            return self

    layer = NF4Linear.from_linear(_linear())
    codes = layer.weight_codes
    layer._parameters["weight_codes"] = nn.Parameter(codes[: codes.numel() // 2].as_subclass(Shard),
                                                     requires_grad=False)
    with pytest.raises(RuntimeError, match="sharded by FSDP2 .* whole only inside the model's forward pass"):
        layer.dequantize_weight()


@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_input_grad_equal_dequantize_then_linear(bias):
    layer = NF4Linear.from_linear(_linear(bias=bias))
    weight = layer.dequantize_weight(torch.float32)
    x = torch.randn(2, 5, 96, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    grad_out = torch.randn(2, 5, 48)

    y = layer(x)
    y_ref = F.linear(x_ref, weight, layer.bias)
    torch.testing.assert_close(y, y_ref)
    y.backward(grad_out)
    y_ref.backward(grad_out)
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_backward_does_not_keep_the_dequantized_weight():
    layer = NF4Linear.from_linear(_linear())
    saved_shapes = []

    def pack(t):
        saved_shapes.append(tuple(t.shape))
        return t

    x = torch.randn(3, 96, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    assert (48, 96) not in saved_shapes and (96, 48) not in saved_shapes
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


def test_compute_dtype_is_used_and_output_keeps_input_dtype():
    layer = NF4Linear.from_linear(_linear(), compute_dtype=torch.bfloat16)
    x = torch.randn(4, 96)
    y = layer(x)
    assert y.dtype == torch.float32
    reference = F.linear(x.bfloat16(), layer.dequantize_weight(torch.bfloat16), layer.bias.bfloat16())
    torch.testing.assert_close(y, reference.float())


def test_dequantize_weight_defaults_to_the_original_dtype():
    layer = NF4Linear.from_linear(_linear(dtype=torch.bfloat16))
    assert layer.compute_dtype == torch.bfloat16
    assert layer.dequantize_weight().dtype == torch.bfloat16
    assert layer.bias.dtype == torch.bfloat16


def test_conv1d_weight_is_transposed():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(nf=48, nx=96)  # weight stored (in, out) = (96, 48)
    nn.init.normal_(conv.bias, std=0.1)
    layer = NF4Linear.from_linear(conv)
    assert (layer.in_features, layer.out_features) == (96, 48)
    assert torch.equal(layer.dequantize_weight(), dequantize_nf4(quantize_nf4(conv.weight.T)))

    x = torch.randn(2, 7, 96, requires_grad=True)
    y = layer(x)
    torch.testing.assert_close(y, F.linear(x, layer.dequantize_weight(), conv.bias))
    # And it still computes what the Conv1D computed, up to 4-bit rounding of the weight.
    expected = conv(x)
    assert (y - expected).norm() / expected.norm() < 0.2
    y.sum().backward()
    torch.testing.assert_close(x.grad, layer.dequantize_weight().sum(0).expand(2, 7, 96))


def test_dtype_casts_move_only_the_bias():
    layer = NF4Linear.from_linear(_linear())
    codes, absmax = layer.weight_codes.clone(), layer.weight_absmax.clone()
    scale = layer.weight_absmax_scale.clone()
    layer.half()
    layer.to(torch.bfloat16)
    layer.double()
    assert torch.equal(layer.weight_codes, codes) and torch.equal(layer.weight_absmax, absmax)
    assert layer.weight_absmax_scale.dtype == torch.float32 and torch.equal(layer.weight_absmax_scale, scale)
    assert layer.bias.dtype == torch.float64
    assert isinstance(layer.weight_codes, nn.Parameter) and not layer.weight_codes.requires_grad
    assert layer(torch.randn(2, 96)).shape == (2, 48)


def test_state_dict_round_trip():
    source = NF4Linear.from_linear(_linear())
    torch.manual_seed(1)
    target = NF4Linear.from_linear(nn.Linear(96, 48))
    target.load_state_dict(source.state_dict())
    x = torch.randn(3, 96)
    assert torch.equal(target(x), source(x))


def test_from_linear_errors():
    layer = NF4Linear.from_linear(_linear())
    with pytest.raises(TypeError, match="already quantized"):
        NF4Linear.from_linear(layer)
    with pytest.raises(TypeError, match="nn.Linear or transformers Conv1D, got Conv2d"):
        NF4Linear.from_linear(nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match="compute_dtype must be one of .* got torch.float64"):
        NF4Linear.from_linear(_linear(), compute_dtype=torch.float64)
    with pytest.raises(ValueError, match="power of two"):
        NF4Linear.from_linear(_linear(), block_size=100)


def test_unfrozen_bias_gets_its_gradient():
    layer = NF4Linear.from_linear(_linear())
    layer.bias.requires_grad_(True)
    layer(torch.randn(2, 3, 96)).sum().backward()
    torch.testing.assert_close(layer.bias.grad, torch.full((48,), 6.0))
