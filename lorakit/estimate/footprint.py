"""How many parameters train and how much memory a fine-tuning run needs, without loading weights.

`estimate` builds the architecture on PyTorch's meta device (shapes, no storage: a 175B model
builds in under a second), adds the LoRA adapter with lorakit's own `add_adapter` so the
trainable count is exact, and prices full fine-tuning, LoRA and QLoRA side by side.
`estimate_for_model` prices a model that is already built, from its real parameters.
What the forward pass keeps for backward is estimate_activations.py's; the split across ranks,
estimate_distributed.py's. The formulas and conventions are written out in docs/estimate.md.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from lorakit.core.adapters import active_adapters, adapter_configs, format_trainable, trainable_parameters
from lorakit.core.bases import is_quantized
from lorakit.core.checks import is_positive_int
from lorakit.core.config import ALL_LINEAR, LoraConfig, parse_targets
from lorakit.core.inject import add_adapter
from lorakit.estimate.activations import (
    Shape,
    activation_bytes,
    adapter_bytes_per_token,
    model_shape,
    rebuilt_norm_outputs,
)
from lorakit.estimate.distributed import Units, check_distributed, describe, per_device, units
from lorakit.hf.model_config import DEFAULT_MODEL, meta_model, resolve_model_config, shipped_models
from lorakit.quant.quantize_model import quantizable_linears

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
QUANT_METHODS = ("nf4",)
FULL, LORA, QLORA = "full fine-tuning", "LoRA", "QLoRA"
ROWS = ("weights", "gradients", "optimizer", "activations", "total")
# Bits per NF4 weight with double quantization: the 4-bit code, an 8-bit absmax per block of 64
# and an fp32 scale per 256 blocks: about 4.127.
NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)


@dataclass(frozen=True)
class Memory:
    """Bytes one training method needs, by what holds them."""

    weights: int
    """All weights: the base (4-bit where quantized) plus any adapters."""
    gradients: int
    """One gradient per trainable parameter."""
    optimizer: int
    """AdamW's two moments per trainable parameter, plus an fp32 master copy where one is kept."""
    activations: int
    """Tensors the forward pass keeps for backward, logits included."""

    @property
    def total(self) -> int:
        """The sum of the four terms."""
        return self.weights + self.gradients + self.optimizer + self.activations

    def summary(self) -> str:
        """One line: `weights 538 MB + gradients 20 MB + optimizer 39 MB + activations 1.2 GB = 1.8 GB`."""
        terms = " + ".join(f"{row} {format_bytes(getattr(self, row))}" for row in ROWS[:-1])
        return f"{terms} = {format_bytes(self.total)}"


@dataclass(frozen=True)
class Estimate:
    """Parameter counts and memory of one model and setting, for one or more training methods."""

    model: str
    """What was estimated: a shipped name, a path, or the model's class name."""
    description: str
    """The architecture in a few words: class, layers, hidden size, vocabulary."""
    adapter: str
    """The LoRA adapter in a few words ("" for none)."""
    base_params: int
    """Parameters of the base model (a 4-bit weight counts as its in x out values)."""
    trainable_params: int
    """Parameters the LoRA adapter trains (estimate), or that require grad (estimate_for_model)."""
    all_params: int
    """All parameters, adapters included, as `print_trainable_parameters` counts them."""
    memory: Mapping[str, Memory]
    """Per method, in table order: full fine-tuning, LoRA and QLoRA from `estimate`; from
    `estimate_for_model`, the one method the model is set up for."""
    method: str
    """The method the settings select (a key of `memory`); `summary` reports it."""
    batch_size: int
    seq_len: int
    dtype: str
    """Compute dtype of the base weights and activations: bf16, fp16 or fp32."""
    gradient_checkpointing: bool
    notes: tuple[str, ...] = ()
    """The conventions behind the figures, printed under the table."""
    nproc: int = 1
    """Ranks training together; the memory figures are per device (estimate_distributed.py)."""
    distributed: str | None = None
    """ddp or fsdp when nproc > 1, else None."""

    def summary(self) -> str:
        """The selected method's memory on one line (what the training loop prints)."""
        return self.memory[self.method].summary()


def estimate(model: str | os.PathLike[str], r: int = 16, alpha: float | None = None,
             targets: str | Sequence[str] = ALL_LINEAR,
             quant: str | None = None, batch_size: int = 1, seq_len: int = 512, dtype: str = "bf16",
             gradient_checkpointing: bool = False, nproc: int = 1,
             distributed: str | None = None) -> Estimate:
    """Parameters and memory of fine-tuning `model` in full, with LoRA and with QLoRA.

    Args:
        model: anything `resolve_model_config` accepts, e.g. "llama-3.1-8b".
        r: LoRA rank.
        alpha: LoRA alpha; None means 2 * r. It scales the update and changes no figure here.
        targets: "all-linear", module-name suffixes, suffixes in one string ("q_proj,v_proj") or a regex.
        quant: None (LoRA is the selected method) or "nf4" (QLoRA).
        batch_size: rows per micro-batch.
        seq_len: tokens per row.
        dtype: compute dtype of the base weights and activations: "bf16", "fp16" or "fp32".
        gradient_checkpointing: keep only each layer's input and recompute the rest in backward.
        nproc: ranks training together (batch_size is per rank); the memory is per device.
        distributed: with nproc > 1, "ddp" (the default) or "fsdp" (FSDP2 shards everything).

    Returns:
        The estimate, all three methods in `memory`, `method` set by `quant`.

    Raises:
        ValueError: bad settings (all are listed), an unknown model, or targets matching no
            module (the model's linear modules are listed).
    """
    _check_settings(batch_size, seq_len, dtype, quant, check_distributed(nproc, distributed))
    distributed = distributed or ("ddp" if nproc > 1 else None)
    net = meta_model(resolve_model_config(model))
    base = sum(p.numel() for p in net.parameters())  # tied weights appear once
    quantized = _quantizable_weights(net)  # counted before adapters wrap the linears
    quantized_paths = set(quantizable_linears(net))
    lora = LoraConfig(r=r, alpha=2 * r if alpha is None else alpha, targets=parse_targets(targets))
    add_adapter(net, lora)
    trainable, total = trainable_parameters(net)

    compute = DTYPES[dtype]
    size, shape, tokens = compute.itemsize, model_shape(net), batch_size * seq_len
    full_act = activation_bytes(shape, tokens, size, 0, gradient_checkpointing, norms_train=True)
    # Planning for a GPU: adapters run under autocast, as lorakit's training loop runs them there.
    lora_act = activation_bytes(shape, tokens, size, adapter_bytes_per_token(net, compute, autocast=True),
                                gradient_checkpointing, norms_train=False)
    adapters = trainable * 4  # lorakit trains adapters in fp32, also beside 16-bit and 4-bit bases
    memory = {
        # Mixed precision keeps an fp32 master copy beside 16-bit weights; fp32 weights are their own.
        FULL: Memory(weights=base * size, gradients=base * size, optimizer=base * (8 if size == 4 else 12),
                     activations=full_act),
        LORA: Memory(weights=base * size + adapters, gradients=adapters, optimizer=2 * adapters,
                     activations=lora_act),
        QLORA: Memory(weights=(base - quantized) * size + round(quantized * NF4_BITS / 8) + adapters,
                      gradients=adapters, optimizer=2 * adapters, activations=lora_act),
    }
    notes = (f"full fine-tuning: {dtype} weights and gradients; AdamW's two moments"
             + (" and a master copy" if size < 4 else "") + " in fp32",
             "LoRA and QLoRA: adapters, their gradients and AdamW's moments in fp32",
             f"QLoRA: {quantized:,d} linear weights in NF4 ({NF4_BITS:.3f} bits each), the rest in {dtype}",
             "formulas and conventions: docs/estimate.md" + (", docs/distributed.md" if distributed else ""))
    if distributed:
        sizes = _units(net, quantized_paths, size)
        memory = {m: replace(one, **per_device(one.weights, one.gradients, one.optimizer, sizes[m], nproc,
                                               distributed))
                  for m, one in memory.items()}
    shown = os.fspath(model)
    shown = f"{shown} ({DEFAULT_MODEL})" if shown.strip().lower() == "default" else shown
    return Estimate(model=shown, description=_describe_model(net, shape), adapter=_describe_lora(lora),
                    base_params=base, trainable_params=trainable, all_params=total, memory=memory,
                    method=QLORA if quant else LORA, batch_size=batch_size, seq_len=seq_len, dtype=dtype,
                    gradient_checkpointing=gradient_checkpointing, notes=notes, nproc=nproc,
                    distributed=distributed)


def estimate_for_model(model: nn.Module, batch_size: int, seq_len: int, gradient_checkpointing: bool = False,
                       autocast: bool | None = None) -> Estimate:
    """Memory of training `model` as it stands: its real parameters, dtypes and adapters.

    Weights are every parameter and buffer (an NF4 layer's codes and scales are frozen
    parameters); gradients and AdamW's two moments follow each trainable parameter's dtype, as
    `torch.optim.AdamW` keeps them (no master copy). Activations use `estimate`'s formula in the frozen base's
    dtype (an NF4 layer's compute dtype).

    Args:
        model: a transformers model (it needs `.config`), with or without adapters, 4-bit or not.
        batch_size: rows per micro-batch.
        seq_len: tokens per row.
        gradient_checkpointing: whether training recomputes each layer's activations.
        autocast: whether training runs under autocast in the base's dtype; None: when the model
            is on CUDA, as lorakit's training loop does.

    Returns:
        An estimate with one method in `memory`: QLoRA when the base is quantized, full
        fine-tuning when every parameter trains, LoRA otherwise.

    Raises:
        ValueError: bad sizes, or a model without a transformers config.
    """
    _check_settings(batch_size, seq_len, "fp32", None)
    if getattr(model, "config", None) is None:
        raise ValueError("estimate_for_model needs a transformers model (with .config), "
                         f"got a {type(model).__name__}")
    params = list(model.parameters())  # tied weights appear once
    gradients = _nbytes(p for p in params if p.requires_grad)
    compute, shape = _compute_dtype(model), model_shape(model)
    norms_train = any(p.requires_grad for m in model.modules() if type(m).__name__.endswith("RMSNorm")
                      for p in m.parameters(recurse=False))
    if autocast is None:
        autocast = any(p.is_cuda for p in model.parameters())
    if not autocast:  # under autocast the A sides read a cast copy, which they keep
        shape = replace(shape, rebuilt_norm_outputs=rebuilt_norm_outputs(model))
    activations = activation_bytes(shape, batch_size * seq_len, compute.itemsize,
                                   adapter_bytes_per_token(model, compute, autocast), gradient_checkpointing,
                                   norms_train)
    trainable, total = trainable_parameters(model)
    adapter_params = sum(p.numel() for name, p in model.named_parameters() if "lora_" in name)
    method = QLORA if any(map(_is_quantized, model.modules())) else FULL if trainable == total else LORA
    configs = adapter_configs(model)
    return Estimate(
        model=type(model).__name__, description=_describe_model(model, shape),
        adapter="; ".join(_describe_lora(configs[n], n) for n in active_adapters(model) if n in configs),
        base_params=total - adapter_params, trainable_params=trainable, all_params=total,
        memory={method: Memory(weights=_nbytes(params) + _nbytes(model.buffers()), gradients=gradients,
                               optimizer=2 * gradients, activations=activations)},
        method=method, batch_size=batch_size, seq_len=seq_len,
        dtype={value: name for name, value in DTYPES.items()}.get(compute, str(compute)),
        gradient_checkpointing=gradient_checkpointing,
        notes=("weights: parameters and buffers; gradients and AdamW moments in each trainable "
               "parameter's dtype",),
    )


def format_estimate(est: Estimate) -> str:
    """The report `lorakit estimate` prints: parameter counts and a memory table in GB (10^9 bytes)."""
    lines = [f"model: {est.model}, {est.description}"] + ([f"adapter: {est.adapter}"] if est.adapter else [])
    lines += [
        format_trainable(est.trainable_params, est.all_params),
        f"full fine-tuning trains all {est.base_params:,d} base params",
        f"batch {est.batch_size} x {est.seq_len} tokens, {est.dtype}, gradient checkpointing "
        f"{'on' if est.gradient_checkpointing else 'off'}",
    ]
    lines += [describe(est.nproc, est.distributed)] if est.distributed else []
    methods = list(est.memory)
    heads = [name + (" *" if name == est.method and len(methods) > 1 else "") for name in methods]
    title = "per device, GB (10^9 bytes)" if est.distributed else "memory in GB (10^9 bytes)"
    lines += ["", f"{title:<27}" + "".join(f"  {head:>16}" for head in heads)]
    for row in ROWS:
        lines.append(f"{row:<27}"
                     + "".join(f"  {getattr(est.memory[m], row) / 1e9:>16,.2f}" for m in methods))
    if len(methods) > 1:
        lines += ["", "* the method these settings select "
                      f"({'--quant nf4' if est.method == QLORA else 'no --quant'})"]
    return "\n".join(lines + list(est.notes))


def format_bytes(count: float) -> str:
    """A byte count for people: 538 MB, 1.2 GB, 2.8 TB (decimal units)."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.1f} {unit}" if count < 10 * size else f"{count / size:.0f} {unit}"
    return f"{count:.0f} B"


def _quantizable_weights(model: nn.Module) -> int:
    """Weights QLoRA stores in NF4: those of the layers quantize_model quantizes."""
    weights = [model.get_submodule(path).weight for path in quantizable_linears(model)]
    return sum(int(w.numel()) for w in weights if isinstance(w, torch.Tensor))


def _units(net: nn.Module, quantized_paths: set[str], size: int) -> dict[str, Units]:
    """FSDP2's unit sizes for each method, with `net` adapted and `quantized_paths` taken before."""
    def is_adapter(name: str) -> bool:
        return ".lora_" in name

    def quantized(name: str) -> bool:
        owner = name.removesuffix(".weight").removesuffix(".base")
        return name.endswith(".weight") and owner in quantized_paths

    return {
        FULL: units(net, lambda n, v: 0 if is_adapter(n) else v * size, lambda n: not is_adapter(n), size),
        LORA: units(net, lambda n, v: v * (4 if is_adapter(n) else size), is_adapter, 4),
        QLORA: units(net, lambda n, v: (v * 4 if is_adapter(n) else round(v * NF4_BITS / 8) if quantized(n)
                                        else v * size), is_adapter, 4),
    }


def _is_quantized(module: nn.Module) -> bool:
    return is_quantized(module)


def _compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype activations run in: an NF4 layer's compute dtype, else the frozen base's dtype."""
    for module in model.modules():
        if _is_quantized(module) and isinstance(getattr(module, "compute_dtype", None), torch.dtype):
            return module.compute_dtype  # type: ignore[return-value]
    frozen: Counter[torch.dtype] = Counter()
    every: Counter[torch.dtype] = Counter()
    for param in model.parameters():
        if param.is_floating_point():
            every[param.dtype] += param.numel()
            frozen[param.dtype] += 0 if param.requires_grad else param.numel()
    counts = +frozen or every  # unary + drops the zero counts
    return counts.most_common(1)[0][0] if counts else torch.float32


def _nbytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _check_settings(batch_size: object, seq_len: object, dtype: object, quant: object,
                    more: list[str] | None = None) -> None:
    problems = [f"{name} must be an integer >= 1, got {value!r}"
                for name, value in (("batch_size", batch_size), ("seq_len", seq_len))
                if not is_positive_int(value)]
    if dtype not in DTYPES:
        problems.append(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if quant is not None and quant not in QUANT_METHODS:
        problems.append(f"quant must be one of {', '.join(QUANT_METHODS)} or None, got {quant!r}")
    problems += more or []
    if problems:
        raise ValueError("invalid estimate settings:\n  " + "\n  ".join(problems))


def _describe_model(model: nn.Module, shape: Shape) -> str:
    config: Any = model.config
    return (f"{type(model).__name__}, {shape.layers} layers, hidden {shape.hidden}, "
            f"vocab {config.vocab_size:,d}")


def _describe_lora(config: LoraConfig, name: str | None = None) -> str:
    targets = config.targets if isinstance(config.targets, str) else ", ".join(config.targets)
    return f"LoRA{f' {name!r}' if name else ''} r={config.r}, alpha={config.alpha:g} on {targets}"


__all__ = ["estimate", "estimate_for_model", "format_estimate", "resolve_model_config", "shipped_models",
           "meta_model"]
