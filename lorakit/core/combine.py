"""combine_adapters: one new adapter from a weighted mix of existing ones.

Each layer's target is the weighted sum of the adapters' deltas, D = sum_i w_i s_i B_i A_i.
Three ways to build the new (B, A) from it:

- "cat": stack the As and the (weighted, scaled) Bs; rank = sum of ranks; exactly D.
- "linear": A = weighted mean of the As, B = weighted sum of s_i B_i; same ranks only. Exact
  when the adapters share A (e.g. trained from one initialisation with A frozen), otherwise an
  approximation whose error is reported.
- "svd": the best rank-k approximation of D (truncated SVD), k = `svd_rank`.

The new adapter has scale 1 (alpha = r per module), so it saves and loads like any other.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch
from torch import nn

from lorakit.core.checks import is_finite_real, is_positive_int
from lorakit.core.config import LoraConfig
from lorakit.core.contract import LoraLayer
from lorakit.core.inject import add_adapter
from lorakit.core.registry import adapter_configs, list_adapters, refuse_merged, unknown_adapter_error
from lorakit.core.walk import lora_layers

METHODS = ("cat", "linear", "svd")


def combine_adapters(model: nn.Module, weights: Mapping[str, float], name: str, method: str = "cat",
                     svd_rank: int | None = None) -> float:
    """Add adapter `name` whose delta is (about) sum_i weights[i] * delta_i, and make it active.

    Args:
        model: a model holding the adapters named in `weights`.
        weights: adapter name -> weight, e.g. {"a": 0.7, "b": 0.3}; weights may be negative.
        name: the new adapter's name.
        method: "cat", "linear" or "svd" (see the module docstring).
        svd_rank: rank of the "svd" result per module (capped by the module's size); default:
            the largest rank among the combined adapters at that module.

    Returns:
        The relative Frobenius error of the result, sqrt(sum ||D_new - D||^2 / sum ||D||^2) over
        all adapted modules: 0 (up to rounding) for "cat", the truncation error for "svd".

    Raises:
        ValueError: an unknown adapter or method, a taken name, empty weights, adapters with
            modules_to_save or DoRA, "linear" with unequal ranks or modules, or svd_rank < 1.
    """
    _check(model, weights, name, method, svd_rank)
    layers = [layer for layer in lora_layers(model) if any(n in layer.scaling for n in weights)]
    if method == "linear":
        _check_same_shapes(layers, weights)
    built: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    error_sq = total_sq = 0.0
    for layer in layers:
        pairs = [(weights[n] * layer.scaling[n], *_factors(layer, n)) for n in weights if n in layer.scaling]
        b_cat = torch.cat([w * b for w, b, _ in pairs], dim=1)  # (out, R): the scaled, weighted Bs
        a_cat = torch.cat([a for _, _, a in pairs], dim=0)  # (R, in)
        if method == "cat":
            b_new, a_new, err = b_cat, a_cat, 0.0
        elif method == "linear":
            total = sum(weights[n] for n in weights if n in layer.scaling)
            b_new = sum(w * b for w, b, _ in pairs)  # type: ignore[assignment]
            a_new = sum((weights[n] / total) * _factors(layer, n)[1] for n in weights)  # type: ignore[assignment]
            err = _frobenius_sq(torch.cat([b_new, -b_cat], dim=1), torch.cat([a_new, a_cat], dim=0))
        else:
            rank = svd_rank or max(a.shape[0] for _, _, a in pairs)
            b_new, a_new, err = _truncated_svd(b_cat, a_cat, rank)
        built[layer.path] = (b_new, a_new)
        error_sq += err
        total_sq += _frobenius_sq(b_cat, a_cat)

    _add_combined(model, name, built)
    return math.sqrt(error_sq / total_sq) if total_sq > 0 else 0.0


def _check(model: nn.Module, weights: Mapping[str, float], name: str, method: str,
           svd_rank: int | None) -> None:
    known = list_adapters(model)
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if not weights:
        raise ValueError("weights must name at least one adapter, e.g. {'a': 0.7, 'b': 0.3}")
    unknown = [n for n in weights if n not in known]
    if unknown:
        raise unknown_adapter_error(model, unknown)
    if name in known:
        raise ValueError(f"adapter {name!r} already exists on this model; "
                         "choose another name for the combination")
    refuse_merged(model, "before combining (the combination becomes the active adapter)")
    bad = {n: w for n, w in weights.items() if not is_finite_real(w)}
    if bad:
        raise ValueError(f"weights must be finite numbers, got {bad}")
    with_copies = [n for n in weights if adapter_configs(model)[n].modules_to_save]
    if with_copies:
        raise ValueError(f"adapters {with_copies} train modules in full (modules_to_save), which cannot be "
                         "combined; combine adapters without modules_to_save")
    with_dora = [n for n in weights if adapter_configs(model)[n].use_dora]
    if with_dora:
        raise ValueError(f"adapters {with_dora} use DoRA, whose magnitude rescales the base weight per row, "
                         "so their deltas do not add up as B A products; combine plain LoRA adapters only")
    if method == "svd" and svd_rank is not None and not is_positive_int(svd_rank):
        raise ValueError(f"svd_rank must be an integer >= 1, got {svd_rank!r}")
    if method == "linear" and math.isclose(sum(weights.values()), 0.0, abs_tol=1e-12):
        raise ValueError("method 'linear' averages the As with the weights, which sum to 0 here: "
                         f"{dict(weights)}")


def _check_same_shapes(layers: list[LoraLayer], weights: Mapping[str, float]) -> None:
    for layer in layers:
        ranks = {n: layer.rank(n) if n in layer.scaling else None for n in weights}
        if len(set(ranks.values())) > 1:
            shown = ", ".join(f"{n!r}: {'not adapted' if r is None else f'r={r}'}" for n, r in ranks.items())
            raise ValueError(f"method 'linear' needs adapters of the same rank on the same modules, but at "
                             f"{layer.path!r}: {shown}; use method='cat' (exact) or 'svd'")


def _factors(layer: LoraLayer, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) in fp32 with delta = s * B @ A: (out, r) and (r, in)."""
    a, b = layer.factors(name)
    return b.detach().float(), a.detach().float()


def _frobenius_sq(b: torch.Tensor, a: torch.Tensor) -> float:
    """||B A||_F^2 = trace((B^T B)(A A^T)) without forming the (out x in) product.

    In fp64: for "linear" B A is a difference of near-equal terms, and fp32 would cancel to noise.
    """
    b, a = b.double(), a.double()
    return float(((b.T @ b) * (a @ a.T)).sum().clamp_min(0))


def _truncated_svd(b: torch.Tensor, a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-`rank` (B', A') of D = B A, and the squared Frobenius norm it leaves out.

    D is never formed: with B = Qb Rb and A^T = Qa Ra, D = Qb (Rb Ra^T) Qa^T, so only the small
    (R x R) core needs an SVD.
    """
    q_b, r_b = torch.linalg.qr(b)  # (out, R), (R, R)
    q_a, r_a = torch.linalg.qr(a.T)  # (in, R), (R, R)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)
    rank = min(rank, s.shape[0])
    root = s[:rank].sqrt()  # split the singular values evenly between B and A
    b_new = (q_b @ u[:, :rank]) * root
    a_new = root[:, None] * (vh[:rank] @ q_a.T)
    return b_new, a_new, float((s[rank:] ** 2).sum())


def _add_combined(model: nn.Module, name: str, built: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Add `name` with exactly these factors; scale 1 everywhere (alpha = r per module)."""
    ranks = {path: int(a.shape[0]) for path, (_, a) in built.items()}
    common = max(set(ranks.values()), key=list(ranks.values()).count)
    # Full, escaped paths as pattern keys, so each override hits exactly its own module.
    pattern = {re.escape(path): r for path, r in ranks.items() if r != common}
    config = LoraConfig(r=common, alpha=common, targets=sorted(built), rank_pattern=pattern,
                        alpha_pattern=dict(pattern), init="zeros")
    add_adapter(model, config, name)
    for layer in lora_layers(model):
        if layer.path in built:
            b_new, a_new = built[layer.path]
            layer.set_factors(name, a_new, b_new)
