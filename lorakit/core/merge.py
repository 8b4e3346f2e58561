"""Folding adapters into the base weights: W = W0 + s * B A, and back.

Merging is explicit and idempotent: a merged adapter is skipped by forward and by a second
merge. Deltas are computed in fp32 whatever the weight dtype, then cast once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lorakit.core.adapters import _ACTIVE, _CONFIGS, active_adapters, list_adapters
from lorakit.core.full_copies import ModulesToSave
from lorakit.core.layers import LoraEmbedding, LoraLinear
from lorakit.core.walk import lora_layers, model_modules, replace_module

QUANTIZED_MERGE_MODES = ("dequantize", "requantize")


def merge(model: nn.Module, names: Sequence[str] | None = None, safe: bool = True) -> None:
    """Add the adapters' deltas into the base weights (default: the active adapters).

    Args:
        model: a model with adapters.
        names: adapters to merge; already merged ones are skipped, so merging twice is merging once.
        safe: check each merged weight is finite before writing it; on failure every layer merged
            by this call is restored and a ValueError names the adapter and the module.
    """
    names = _checked_names(model, names)
    layers = lora_layers(model)
    quantized = [layer.path for layer in layers if layer.kind == "quantized" and _to_merge(layer, names)]
    if quantized:
        raise ValueError(
            f"cannot merge into the 4-bit base of {quantized[0]} (and {len(quantized) - 1} more) in place; "
            "use merge_and_unload(model, quantized='dequantize') for a 16/32-bit model, or "
            "quantized='requantize' to quantize the merged weights again"
        )
    _merge_layers(model, layers, names, safe)


def _merge_layers(model: nn.Module, layers: list[LoraLinear | LoraEmbedding], names: list[str],
                  safe: bool) -> None:
    work = [(layer, name) for layer in layers for name in _to_merge(layer, names)]
    _refuse_tied(model, [layer for layer, _ in work])
    if safe:
        # Check every layer before writing any, so a refused merge leaves all weights untouched
        # (undoing by subtraction would only restore them up to rounding).
        for layer, name in work:
            _merged_weight(layer, name, sign=1.0, check=True)
    for layer, name in work:
        _add_delta(layer, name, sign=1.0)
        layer.merged_adapters.append(name)


def _refuse_tied(model: nn.Module, layers: list[LoraLinear | LoraEmbedding]) -> None:
    owners: dict[int, list[str]] = {}
    for path, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(path)
    for layer in layers:
        sharing = [p for p in owners.get(id(layer.base.weight), []) if not p.startswith(layer.path + ".")]
        if sharing:
            raise ValueError(
                f"cannot merge into {layer.path!r}: its weight is tied to {', '.join(sharing)}, so merging would "
                "change those modules too; keep this adapter unmerged, or untie the weights first"
            )


def unmerge(model: nn.Module) -> None:
    """Subtract every merged adapter from the base weights again (no-op when none is merged)."""
    for layer in lora_layers(model):
        for name in reversed(layer.merged_adapters):
            _add_delta(layer, name, sign=-1.0)
        layer.merged_adapters.clear()


def merge_and_unload(model: nn.Module, names: Sequence[str] | None = None,
                     quantized: str | None = None) -> nn.Module:
    """Merge the adapters (default: the active ones) and remove every trace of lorakit.

    The LoRA layers give way to their original modules, `modules_to_save` to the active adapter's
    trained copy, and the model's state_dict has exactly the base model's keys again.

    Args:
        model: a model with adapters.
        names: adapters to merge.
        quantized: how to merge into 4-bit (NF4) base layers, which cannot be merged in place:
            "dequantize" returns plain linears in the compute dtype, "requantize" quantizes
            the merged weights to NF4 again (adding a second rounding error).
    """
    if quantized is not None and quantized not in QUANTIZED_MERGE_MODES:
        raise ValueError(f"quantized must be one of {', '.join(QUANTIZED_MERGE_MODES)}, got {quantized!r}")
    names = _checked_names(model, names)
    layers = lora_layers(model)
    pending_4bit = [layer.path for layer in layers if layer.kind == "quantized" and _to_merge(layer, names)]
    if pending_4bit and quantized is None:
        raise ValueError(
            f"{pending_4bit[0]!r} (and {len(pending_4bit) - 1} more) has a 4-bit (NF4) base: pass "
            "quantized='dequantize' for a 16/32-bit merged model, or quantized='requantize' to "
            "quantize the merged weights again"
        )
    probe = _probe_logits(model) if pending_4bit else None
    _merge_layers(model, [layer for layer in layers if layer.kind != "quantized"], names, safe=True)
    for path, module in list(model_modules(model)):
        if isinstance(module, ModulesToSave):
            replace_module(model, path, module.current())
        elif isinstance(module, LoraLinear) and module.kind == "quantized":
            replace_module(model, path, _merged_quantized(module, names, quantized))
        elif isinstance(module, (LoraLinear, LoraEmbedding)):
            replace_module(model, path, module.base)
    model.__dict__.pop(_CONFIGS, None)
    model.__dict__.pop(_ACTIVE, None)
    if probe is not None:
        ids, before = probe
        gap = (_logits(model, ids) - before).abs().max().item()
        print(f"merged a 4-bit base ({quantized}): max |logits difference| merged vs unmerged QLoRA model "
              f"= {gap:.3e} on a {ids.shape[1]}-token probe"
              + (" (float rounding only)" if quantized == "dequantize"
                 else " (the merged weights were rounded to NF4 again)"))
    return model


def _probe_logits(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A fixed token sequence and the model's logits for it, when the model takes token ids."""
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    vocab = getattr(embeddings, "num_embeddings", None) or getattr(getattr(embeddings, "base", None),
                                                                   "num_embeddings", None)
    if not vocab:
        return None
    device = next(model.parameters()).device
    ids = (torch.arange(16, device=device) * 7919 % vocab).unsqueeze(0)  # deterministic, spread out
    return ids, _logits(model, ids)


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids)
    return (out.logits if hasattr(out, "logits") else out).float()


def _checked_names(model: nn.Module, names: Sequence[str] | None) -> list[str]:
    if names is None:
        return active_adapters(model)
    names = [names] if isinstance(names, str) else list(names)
    unknown = [n for n in names if n not in list_adapters(model)]
    if unknown:
        raise ValueError(f"unknown adapter {', '.join(map(repr, unknown))}; adapters on this model: "
                         f"{', '.join(list_adapters(model)) or 'none'}")
    return names


def _to_merge(layer: LoraLinear | LoraEmbedding, names: list[str]) -> list[str]:
    return [n for n in names if n in layer.lora_A and n not in layer.merged_adapters]


def _merged_weight(layer: LoraLinear | LoraEmbedding, name: str, sign: float, check: bool) -> torch.Tensor:
    """W0 +/- delta, computed in fp32 and returned in the weight's dtype."""
    weight = layer.base.weight
    assert isinstance(weight, torch.Tensor)
    with torch.no_grad():
        updated = weight.float() + sign * layer.delta_weight(name).to(weight.device)
        if check and not torch.isfinite(updated).all():
            raise ValueError(f"merging adapter {name!r} into {layer.path!r} gives non-finite weights "
                             "(inf or NaN); nothing was merged")
        return updated.to(weight.dtype)


def _add_delta(layer: LoraLinear | LoraEmbedding, name: str, sign: float) -> None:
    with torch.no_grad():
        weight = layer.base.weight
        assert isinstance(weight, torch.Tensor)
        weight.copy_(_merged_weight(layer, name, sign, check=False))


def _merged_quantized(layer: LoraLinear, names: list[str], quantized: str | None) -> nn.Module:
    pending = _to_merge(layer, names)
    if not pending:
        return layer.base
    base = layer.base
    compute_dtype = getattr(base, "compute_dtype", None) or torch.float32
    with torch.no_grad():
        weight = base.dequantize_weight(torch.float32)  # type: ignore[operator]
        for name in pending:
            weight = weight + layer.delta_weight(name).to(weight.device)
        plain = nn.Linear(layer.in_features, layer.out_features, bias=base.bias is not None,
                          device=weight.device, dtype=compute_dtype)
        plain.weight.copy_(weight)
        if isinstance(base.bias, torch.Tensor):
            plain.bias.copy_(base.bias)
    plain.requires_grad_(False)
    if quantized == "dequantize":
        return plain
    from lorakit.quant import NF4Linear  # torch-only, like core

    return NF4Linear.from_linear(plain, compute_dtype=compute_dtype)
