"""The machine's limit: FLOPs of one training step, and this machine's matmul rate on the model's shapes.

FLOP count of one step (N = batch * seq tokens, L layers, d = heads * head_dim, T = seq, B = batch;
a multiply-add counts as 2 FLOPs; elementwise work (norms, rotary, SiLU, softmax, the loss,
AdamW) is left out: it is memory-bound and small next to the matmuls):

    P_lin  = sum of in * out over every base linear, lm_head included
    P_lora = sum of r * (in + out) over the adapted linears (the trainable parameter count)

    forward, linears        2 N P_lin
    forward, attention      2 B T^2 d L   (QK^T and AV are 2 * 2 B T^2 d per layer; causal, so half)
    backward, frozen base   2 N P_lin + 4 B T^2 d L   (input gradients only: one matmul per linear;
                                                       attention has no weights, its backward is 2x)
    LoRA                    6 N P_lora    (forward, input gradient and weight gradient of A and B)
    checkpointing adds      the forward of the decoder layers again (all but lm_head)

The roofline time of a step is its FLOPs divided by the rate this machine reaches on the model's
own matmuls (torch.matmul, fp32, N x in @ in x out for every linear shape, forward and the
backward's transposed shape, each weighted by how often one step runs it).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from benchmarks.common import TARGETS, median


def linear_shapes(shape: dict[str, int]) -> list[tuple[str, int, int, int]]:
    """(name, in, out, count per model) of every base linear of a Llama-style model."""
    h, i, layers = shape["hidden"], shape["intermediate"], shape["layers"]
    q, kv = shape["heads"] * shape["head_dim"], shape["kv_heads"] * shape["head_dim"]
    return [
        ("q_proj", h, q, layers), ("k_proj", h, kv, layers), ("v_proj", h, kv, layers),
        ("o_proj", q, h, layers),
        ("gate_proj", h, i, layers), ("up_proj", h, i, layers), ("down_proj", i, h, layers),
        ("lm_head", h, shape["vocab"], 1),
    ]


def step_flops(shape: dict[str, int], batch: int, seq: int, r: int, kind: str,
               checkpointing: bool = False) -> dict[str, float]:
    """FLOPs of one step by part; kind is "lora" (train adapters), "base" (forward + backward, no
    adapter) or "forward" (forward only)."""
    tokens = batch * seq
    linears = linear_shapes(shape)
    p_lin = sum(n_in * n_out * count for _, n_in, n_out, count in linears)
    p_head = shape["hidden"] * shape["vocab"]
    p_lora = sum(r * (n_in + n_out) * count for name, n_in, n_out, count in linears if name in TARGETS)
    attention = 2 * batch * seq**2 * shape["heads"] * shape["head_dim"] * shape["layers"]  # causal half
    parts = {"forward_linear": 2.0 * tokens * p_lin, "forward_attention": float(attention)}
    if kind in ("lora", "base"):
        parts["backward_input_grad"] = 2.0 * tokens * p_lin + 2.0 * attention
    if kind == "lora":
        parts["lora"] = 6.0 * tokens * p_lora
    if checkpointing:
        parts["recompute"] = (2.0 * tokens * (p_lin - p_head) + attention
                              + (2.0 * tokens * p_lora if kind == "lora" else 0))
    parts["total"] = sum(parts.values())
    parts["model_total"] = parts["total"] - parts.get("recompute", 0.0)  # what MFU counts
    return parts


def measure_matmuls(shape: dict[str, int], tokens: int, dtype: torch.dtype = torch.float32,
                    device: str = "cpu", repeats: int = 5) -> dict[str, Any]:
    """Median GFLOP/s of torch.matmul on each (tokens x in) @ (in x out) shape of the model.

    Backward input gradients multiply (tokens x out) @ (out x in), so those shapes are timed too.
    The overall rate weighs every shape by the FLOPs one forward + backward spends on it.
    """
    needed: dict[tuple[int, int], int] = {}  # (k, n) -> how many per forward+backward
    for _, n_in, n_out, count in linear_shapes(shape):
        needed[(n_in, n_out)] = needed.get((n_in, n_out), 0) + count
        needed[(n_out, n_in)] = needed.get((n_out, n_in), 0) + count
    rows = []
    total_flops = total_seconds = 0.0
    for (k, n), count in needed.items():
        a = torch.randn(tokens, k, dtype=dtype, device=device)
        b = torch.randn(k, n, dtype=dtype, device=device)
        torch.matmul(a, b)  # warm-up
        times = []
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            torch.matmul(a, b)
            _sync(device)
            times.append(time.perf_counter() - start)
        seconds = median(times)
        flops = 2.0 * tokens * k * n
        rows.append({"m": tokens, "k": k, "n": n, "count": count, "seconds": seconds,
                     "gflops": flops / seconds / 1e9})
        total_flops += flops * count
        total_seconds += seconds * count
        del a, b
    return {"shapes": rows, "gflops": total_flops / total_seconds / 1e9, "tokens": tokens, "repeats": repeats}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
