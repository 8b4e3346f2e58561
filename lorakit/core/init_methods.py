"""PiSSA and OLoRA: adapters initialised from the base weight, which keeps the residual.

For a weight W (out x in), an adapter of rank r and scale s:

- PiSSA (`init="pissa"`, Meng et al. 2024): with W = U S V^T, A = sqrt(S_r / s) V_r^T (r x in)
  and B = U_r sqrt(S_r / s) (out x r), so s B A is W's best rank-r part. `"pissa_niter_N"`
  takes the top r singular triplets from `torch.svd_lowrank` (N subspace iterations), which
  is much faster than a full SVD on large matrices.
- OLoRA (`init="olora"`, Büyükakyüz 2024): with W = Q R, B = Q[:, :r] and A = R[:r] (PEFT's
  choice: not divided by s).

The base keeps the residual W - s B A, so a fresh adapter changes nothing. A 4-bit base is
dequantized, and the residual quantized again: Q(W - s B A) + s B A is not exactly Q(W), and the
relative error is reported. The initial A0, B0 are kept on the layer (not in its state dict) for
`save_adapter(..., convert_to_lora=True)`, which writes a plain rank-2r LoRA for the original
base: A' = [A; A0], B' = [B, -B0], so W + s (B A - B0 A0) = (W - s B0 A0) + s B A.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from lorakit.core.config import LoraConfig


def factors_from_weight(weight: torch.Tensor, r: int, scale: float,
                        init: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r x in), B (out x r)) for `init` from W (out x in), in fp32 or wider: s B A is what the
    residual loses."""
    weight = weight.to(torch.promote_types(weight.dtype, torch.float32))
    if init == "olora":
        q, upper = torch.linalg.qr(weight)  # (out, k), (k, in)
        return upper[:r].contiguous(), q[:, :r].contiguous()
    if init == "pissa":
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        u, s, vh = u[:, :r], s[:r], vh[:r]
    else:
        niter = int(init.rsplit("_", 1)[1])
        u, s, v = torch.svd_lowrank(weight, q=r, niter=niter)
        vh = v.T
    root = (s / scale).sqrt()  # s B A = U_r S_r V_r^T
    return root[:, None] * vh, u * root


def convert_to_lora(config: LoraConfig) -> LoraConfig:
    """The config of the rank-2r plain LoRA that `convert_to_lora` writes: same scale everywhere.

    s = alpha / r needs alpha doubled; with rsLoRA (alpha / sqrt(r)), alpha times sqrt(2).
    """
    factor = math.sqrt(2) if config.use_rslora else 2.0
    return replace(config, r=2 * config.r, alpha=config.alpha * factor, init="kaiming",
                   rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
                   alpha_pattern={k: v * factor for k, v in config.alpha_pattern.items()})


def converted_factors(a: torch.Tensor, b: torch.Tensor, a0: torch.Tensor,
                      b0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A', B') = ([A; A0], [B, -B0]): s B' A' = s B A - s B0 A0."""
    return torch.cat([a, a0.to(a)], dim=0), torch.cat([b, -b0.to(b)], dim=1)


def relative_error(requantized: torch.Tensor, update: torch.Tensor, quantized: torch.Tensor) -> float:
    """||Q(W_res) + s B A - Q(W)||_F / ||Q(W)||_F: what re-quantizing the residual changed."""
    return float(torch.linalg.norm(requantized + update - quantized)
                 / torch.linalg.norm(quantized).clamp_min(1e-30))
