"""NF4Linear on CUDA: the same maths as on the CPU (skipped without a GPU)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorakit.quant import NF4Linear, dequantize_nf4, quantize_nf4

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_cuda_forward_and_input_grad_equal_dequantize_then_linear(compute_dtype):
    torch.manual_seed(0)
    layer = NF4Linear.from_linear(nn.Linear(256, 192), compute_dtype=compute_dtype).to("cuda")
    assert all(t.device.type == "cuda" for t in [*layer.parameters(), *layer.buffers()])
    assert isinstance(layer.weight_codes, nn.Parameter)
    assert layer.weight_absmax_scale.dtype == torch.float32
    weight = layer.dequantize_weight(compute_dtype)
    assert weight.device.type == "cuda"

    x = torch.randn(4, 8, 256, device="cuda", dtype=compute_dtype, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    grad_out = torch.randn(4, 8, 192, device="cuda", dtype=compute_dtype)
    y = layer(x)
    y_ref = F.linear(x_ref, weight, layer.bias.to(compute_dtype))
    torch.testing.assert_close(y, y_ref)
    y.backward(grad_out)
    y_ref.backward(grad_out)
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_cuda_quantization_matches_cpu():
    torch.manual_seed(0)
    t = torch.randn(300, 100) * 0.02
    on_cpu = quantize_nf4(t)
    on_gpu = quantize_nf4(t.cuda())
    assert on_gpu.codes.device.type == "cuda"
    assert torch.equal(on_gpu.codes.cpu(), on_cpu.codes)
    torch.testing.assert_close(dequantize_nf4(on_gpu).cpu(), dequantize_nf4(on_cpu))
