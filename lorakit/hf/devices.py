"""Turning the user's `device` and `dtype` strings into torch objects.

Rules:
- device "auto" is the first CUDA GPU when there is one, else the CPU.
- dtype None (or "auto") is float32 on CPU and bfloat16 on a CUDA GPU that supports it.
  CPU kernels for half precision are slow and bf16 on CPU loses accuracy for no speed, while on a
  GPU bf16 halves memory and trains without the loss scaling that float16 needs.
"""

from __future__ import annotations

import re

import torch

DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
ACCEPTED_DEVICES = '"auto", "cpu", "cuda" or "cuda:N"'

_CUDA_DEVICE = re.compile(r"cuda(:\d+)?")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Return the torch device that `device` names.

    Args:
        device: "auto" (CUDA if available, else CPU), "cpu", "cuda" or "cuda:N", or a
            `torch.device`.

    Returns:
        The resolved device.

    Raises:
        ValueError: If `device` is not one of the accepted spellings, or names a CUDA device
            that this machine does not have.
    """
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str):
        raise ValueError(f"device must be a string, got {device!r}; accepted: {ACCEPTED_DEVICES}")
    name = device.strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if _CUDA_DEVICE.fullmatch(name):
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {device!r} asked for CUDA, but no CUDA GPU is available; use 'cpu' or 'auto'"
            )
        resolved = torch.device(name)
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise ValueError(f"device {device!r} does not exist: this machine has {count} CUDA device(s)")
        return resolved
    raise ValueError(f"unknown device {device!r}; accepted: {ACCEPTED_DEVICES}")


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """Return the floating-point dtype to load weights in.

    Args:
        dtype: None or "auto" for the device's default (float32 on CPU, bfloat16 on CUDA),
            one of "float32"/"fp32", "bfloat16"/"bf16", "float16"/"fp16", or one of
            `torch.float32`, `torch.bfloat16`, `torch.float16`.
        device: The device the model will live on; only used when `dtype` is None or "auto".

    Returns:
        The resolved dtype.

    Raises:
        ValueError: If `dtype` is anything else; the message lists the accepted values.
    """
    if dtype is None or (isinstance(dtype, str) and dtype.strip().lower() == "auto"):
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        # Pre-Ampere GPUs have no bf16; fall back to float32 rather than float16, which would
        # need a gradient scaler to train.
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPE_NAMES.values():
            return dtype
    elif isinstance(dtype, str) and dtype.strip().lower() in DTYPE_NAMES:
        return DTYPE_NAMES[dtype.strip().lower()]
    accepted = ", ".join(f'"{name}"' for name in DTYPE_NAMES)
    raise ValueError(
        f'unsupported dtype {dtype!r}; accepted: None or "auto" (float32 on CPU, bfloat16 on CUDA), '
        f"{accepted}, or torch.float32 / torch.bfloat16 / torch.float16"
    )
