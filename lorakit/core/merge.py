"""Folding adapters into the base weights: W = W0 + s * B A, and back.

Merging is explicit and idempotent: a merged adapter is skipped by forward and by a second
merge. Deltas are computed in fp32 whatever the weight dtype, then cast once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lorakit.core.bases import requantize_problem
from lorakit.core.contract import LoraLayer
from lorakit.core.registry import active_adapters, forget_adapters, list_adapters, unknown_adapter_error
from lorakit.core.walk import ADAPTER_MODULES, lora_layers, model_modules, replace_module

QUANTIZED_MERGE_MODES = ("dequantize", "requantize")


def merge(model: nn.Module, names: Sequence[str] | None = None, safe: bool = True) -> None:
    """Add the adapters' deltas into the base weights (default: the active adapters).

    Args:
        model: a model with adapters.
        names: adapters to merge; already merged ones are skipped, so merging twice is merging once.
        safe: check each merged weight is finite before writing it; on failure nothing is merged
            and a ValueError names the adapter and the module.
    """
    names = _checked_names(model, names)
    layers = lora_layers(model)
    quantized = [layer.path for layer in layers if not layer.mergeable and layer.to_merge(names)]
    if quantized:
        raise ValueError(
            f"cannot merge into the 4-bit base of {quantized[0]} (and {len(quantized) - 1} more) in place; "
            "use merge_and_unload(model, quantized='dequantize') for a 16/32-bit model, or "
            "quantized='requantize' to quantize the merged weights again"
        )
    _merge_layers(model, layers, names, safe)


def _merge_layers(model: nn.Module, layers: list[LoraLayer], names: list[str], safe: bool) -> None:
    work = [layer for layer in layers if layer.to_merge(names)]
    _refuse_tied(model, work)
    for layer in work:  # before any layer changes
        layer.check_merge_order(layer.to_merge(names))
    if safe:
        # Check every layer before writing any, so a refused merge leaves all weights untouched
        # (undoing by subtraction would only restore them up to rounding).
        for layer in work:
            layer.check_merge(layer.to_merge(names))
    for layer in work:
        layer.merge(names, safe=False)


def _refuse_tied(model: nn.Module, layers: list[LoraLayer]) -> None:
    owners: dict[int, list[str]] = {}
    for path, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(path)
    for layer in layers:
        prefix = layer.path + "." if layer.path else ""
        sharing = [p for p in owners.get(id(layer.base.weight), []) if not p.startswith(prefix)]
        if sharing:
            raise ValueError(
                f"cannot merge into {layer.path!r}: its weight is tied to {', '.join(sharing)}, "
                "so merging would change those modules too; keep this adapter unmerged, or untie the "
                "weights first"
            )


def unmerge(model: nn.Module) -> None:
    """Subtract every merged adapter from the base weights again (no-op when none is merged)."""
    for layer in lora_layers(model):
        layer.unmerge()


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

    Returns:
        The model; a model that was itself one LoRA layer gives way to its merged base.
    """
    if quantized is not None and quantized not in QUANTIZED_MERGE_MODES:
        raise ValueError(f"quantized must be one of {', '.join(QUANTIZED_MERGE_MODES)}, got {quantized!r}")
    names = _checked_names(model, names)
    layers = lora_layers(model)
    pending_4bit = [layer.path for layer in layers if not layer.mergeable and layer.to_merge(names)]
    if pending_4bit and quantized is None:
        raise ValueError(
            f"{pending_4bit[0]!r} (and {len(pending_4bit) - 1} more) has a 4-bit (NF4) base: pass "
            "quantized='dequantize' for a 16/32-bit merged model, or quantized='requantize' to "
            "quantize the merged weights again"
        )
    if quantized == "requantize":
        problems = {layer.path: requantize_problem(layer.base) for layer in layers
                    if layer.path in pending_4bit}
        problems = {path: problem for path, problem in problems.items() if problem}
        if problems:
            path, problem = next(iter(problems.items()))
            raise ValueError(f"cannot requantize {path!r} (and {len(problems) - 1} more): {problem}; "
                             "nothing was merged")
    probe = _probe_logits(model) if pending_4bit else None
    _merge_layers(model, [layer for layer in layers if layer.mergeable], names, safe=True)
    forget_adapters(model)
    for path, module in list(model_modules(model)):
        if not isinstance(module, ADAPTER_MODULES):
            continue
        plain = module.unloaded(names, quantized)
        if not path:
            return plain  # the model was itself one wrapper
        replace_module(model, path, plain)
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
        raise unknown_adapter_error(model, unknown)
    return names
