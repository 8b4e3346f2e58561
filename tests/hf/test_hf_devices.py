"""dtype and device rules."""

from __future__ import annotations

import pytest
import torch

from lorakit.hf import devices
from lorakit.hf.devices import resolve_device, resolve_dtype

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("float32", torch.float32),
        ("fp32", torch.float32),
        ("bfloat16", torch.bfloat16),
        ("BF16", torch.bfloat16),
        ("float16", torch.float16),
        ("fp16", torch.float16),
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float16),
        (torch.float32, torch.float32),
    ],
)
def test_named_dtypes(given, expected):
    assert resolve_dtype(given, CPU) == expected


def test_default_dtype_is_float32_on_cpu():
    assert resolve_dtype(None, CPU) == torch.float32
    assert resolve_dtype("auto", CPU) == torch.float32


def test_default_dtype_on_cuda(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert resolve_dtype(None, torch.device("cuda")) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    assert resolve_dtype(None, torch.device("cuda")) == torch.float32


@pytest.mark.parametrize("bad", ["int8", "float64", "half precision", torch.int8, torch.float64, 16])
def test_bad_dtype_lists_accepted_values(bad):
    with pytest.raises(ValueError, match="unsupported dtype") as error:
        resolve_dtype(bad, CPU)
    message = str(error.value)
    assert repr(bad) in message
    for name in ("float32", "bf16", "fp16", "torch.bfloat16"):
        assert name in message


def test_auto_device_without_cuda(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == CPU
    assert resolve_device("cpu") == CPU
    assert resolve_device(torch.device("cpu")) == CPU


def test_cuda_without_a_gpu_is_a_clear_error(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA GPU is available"):
        resolve_device("cuda")


def test_cuda_index_must_exist(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    assert resolve_device("auto") == torch.device("cuda")
    with pytest.raises(ValueError, match=r"'cuda:3' does not exist: this machine has 1 CUDA device"):
        resolve_device("cuda:3")


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", "tpu", ""])
def test_unknown_device(bad):
    with pytest.raises(ValueError, match="unknown device") as error:
        resolve_device(bad)
    assert devices.ACCEPTED_DEVICES in str(error.value)
