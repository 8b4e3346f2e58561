"""How many parameters train and how much memory a fine-tuning run needs, without loading weights.

`estimate` builds the architecture on PyTorch's meta device (shapes, no storage: a 175B model
builds in under a second), adds the LoRA adapter with lorakit's own `add_adapter` so the
trainable count is exact, and prices full fine-tuning, LoRA and QLoRA side by side.
`estimate_for_model` prices a model that is already built, from its real parameters.
The formulas and conventions are written out in docs/estimate.md.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lorakit.core.adapters import active_adapters, adapter_configs, format_trainable, trainable_parameters
from lorakit.core.config import ALL_LINEAR, LoraConfig, parse_targets
from lorakit.core.inject import add_adapter
from lorakit.core.layers import AUTOGRAD, LoraEmbedding, LoraLinear, base_kind
from lorakit.core.rebuild import rebuilds_outputs
from lorakit.hf.estimate_distributed import Units, check_distributed, describe, per_device, units
from lorakit.hf.fused_mlp import FusedGatedMLP
from lorakit.hf.model_config import DEFAULT_MODEL, meta_model, resolve_model_config, shipped_models
from lorakit.quant.quantize_model import quantizable_linears

if TYPE_CHECKING:
    pass

"""The shipped config "default" names: the offline default model's architecture."""
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
QUANT_METHODS = ("nf4",)
FULL, LORA, QLORA = "full fine-tuning", "LoRA", "QLoRA"
ROWS = ("weights", "gradients", "optimizer", "activations", "total")
# Bits per NF4 weight with double quantization: the 4-bit code, an 8-bit absmax per block of 64
# and an fp32 scale per 256 blocks: about 4.127.
NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)
# transformers writes these out of several ops, which keep 4 tensors in all (GPT-2 uses gelu_new).
_UNFUSED_GELUS = ("gelu_new", "gelu_fast")


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


def estimate(model: str | os.PathLike[str], r: int = 16, alpha: float | None = None, targets: str | Sequence[str] = ALL_LINEAR,
             quant: str | None = None, batch_size: int = 1, seq_len: int = 512, dtype: str = "bf16",
             gradient_checkpointing: bool = False, nproc: int = 1, distributed: str | None = None) -> Estimate:
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
    size, shape, tokens = compute.itemsize, _shape(net), batch_size * seq_len
    full_act = _activation_bytes(shape, tokens, size, 0, gradient_checkpointing, norms_train=True)
    # Planning for a GPU: adapters run under autocast, as lorakit's training loop runs them there.
    lora_act = _activation_bytes(shape, tokens, size, _adapter_bytes_per_token(net, compute, autocast=True),
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
        memory = {m: replace(one, **per_device(one.weights, one.gradients, one.optimizer, sizes[m], nproc, distributed))
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
    parameters); gradients and AdamW's two moments follow each trainable parameter's dtype, as `torch.optim.AdamW`
    keeps them (no master copy). Activations use `estimate`'s formula in the frozen base's
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
        raise ValueError(f"estimate_for_model needs a transformers model (with .config), got a {type(model).__name__}")
    params = list(model.parameters())  # tied weights appear once
    gradients = _nbytes(p for p in params if p.requires_grad)
    compute, shape = _compute_dtype(model), _shape(model)
    norms_train = any(p.requires_grad for m in model.modules() if type(m).__name__.endswith("RMSNorm")
                      for p in m.parameters(recurse=False))
    if autocast is None:
        autocast = any(p.is_cuda for p in model.parameters())
    if not autocast:  # under autocast the A sides read a cast copy, which they keep
        shape = replace(shape, rebuilt_norm_outputs=_rebuilt_norm_outputs(model))
    activations = _activation_bytes(shape, batch_size * seq_len, compute.itemsize,
                                    _adapter_bytes_per_token(model, compute, autocast), gradient_checkpointing,
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
        notes=("weights: parameters and buffers; gradients and AdamW moments in each trainable parameter's dtype",),
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
        lines.append(f"{row:<27}" + "".join(f"  {getattr(est.memory[m], row) / 1e9:>16,.2f}" for m in methods))
    if len(methods) > 1:
        lines += ["", f"* the method these settings select ({'--quant nf4' if est.method == QLORA else 'no --quant'})"]
    return "\n".join(lines + list(est.notes))


def format_bytes(count: float) -> str:
    """A byte count for people: 538 MB, 1.2 GB, 2.8 TB (decimal units)."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.1f} {unit}" if count < 10 * size else f"{count / size:.0f} {unit}"
    return f"{count:.0f} B"


@dataclass(frozen=True)
class _Shape:
    """The sizes the activation formula needs."""

    layers: int
    hidden: int
    q_width: int  # heads x head_dim
    kv_width: int  # key/value heads x head_dim (narrower than q under grouped-query attention)
    intermediate: int
    gated: bool  # SwiGLU-style MLP (gate and up projections) rather than fc1 -> act -> fc2
    act_values: int  # values the MLP activation keeps per channel: 1 when fused (silu, gelu, relu)
    fused_gate: bool  # silu(gate) * up runs as lorakit's SwiGLUFunction (keeps gate and up only)
    rms_norm: bool  # transformers' RMSNorm, which applies its weight as a separate multiply
    vocab: int  # logits per token; 0 without a language-model head
    rebuilt_norm_outputs: int = 0  # of q/k/v's and gate/up's inputs (norm outputs), how many backward rebuilds

    def layer_values(self, norms_train: bool) -> int:
        """Values one decoder layer keeps per token for backward."""
        # Attention: the norm's input, the q/k/v input (the norm's output), q, k and v (SDPA's
        # inputs, after RoPE) and o_proj's input (SDPA's output). SDPA keeps no seq x seq matrix.
        attention = 2 * self.hidden + 2 * self.q_width + 2 * self.kv_width
        # MLP: the norm's input, the first projections' input, then per intermediate channel the
        # activation's input(s) and gate's activated output, up's output, down's input (gated)
        # or just fc2's input (plain).
        # Fused (lorakit.fuse_gated_mlps): gate's and up's outputs only; down's input is recomputed
        # by down's fused LoRA function (or kept by nobody when down carries no adapter).
        per_channel = 2 if self.fused_gate else self.act_values + (3 if self.gated else 1)
        mlp = 2 * self.hidden + per_channel * self.intermediate
        # Grouped q/k/v and gate/up A sides keep their norm's input instead of its output
        # (lorakit.hf.rebuilt_norms): one hidden-wide value less per rebuilt norm output.
        rebuilt = self.rebuilt_norm_outputs * self.hidden
        # An RMSNorm whose weight trains (full fine-tuning) also keeps its output before the weight.
        return attention + mlp - rebuilt + (2 * self.hidden if norms_train and self.rms_norm else 0)


def _activation_bytes(shape: _Shape, tokens: int, size: int, adapters: int, checkpointing: bool,
                      norms_train: bool) -> int:
    """Bytes kept for backward: layers, adapters (`adapters` bytes per token), final norm, head, logits.

    `size` is the compute dtype's bytes per value. With checkpointing only each layer's input
    stays, plus one layer (with its share of the adapters) recomputed at a time.
    """
    layer = shape.layer_values(norms_train) * size
    if checkpointing:
        kept = shape.layers * shape.hidden * size + layer + adapters // max(shape.layers, 1)
    else:
        kept = shape.layers * layer + adapters
    # The final norm's and the head's inputs (and the norm's output when it trains), and the
    # logits in fp32, which the loss keeps.
    head = (3 if norms_train and shape.rms_norm else 2) * shape.hidden * size + 4 * shape.vocab
    return tokens * (kept + head)


# Projections that read their block's input: an adapter input prepared for one of them (a cast
# copy, a dropout output or mask) is shared by its siblings when their adapter shares dropout masks
# (lorakit.core.lora_function.shared). Which modules read one tensor shows only in a forward, which
# the estimate does not run, so it goes by transformers' names.
_SIBLING_READERS = {"q_proj", "k_proj", "v_proj", "query", "key", "value", "gate_proj", "up_proj", "w1", "w3"}


def _adapter_bytes_per_token(model: nn.Module, compute: torch.dtype, autocast: bool) -> int:
    """Bytes per token the active adapters keep, over the whole model.

    Under autocast an adapter computes in the compute dtype (no cast copy of its input), without
    it in its own (fp32) dtype. Which computation each layer runs is LoraLinear.path_for's answer.
    """
    total = 0
    prepared: set[str] = set()
    for path, module in model.named_modules():
        if isinstance(module, LoraEmbedding):
            total += sum(module.rank(n) * (compute.itemsize if autocast else module.factors(n)[0].element_size())
                         for n in module.live_adapters())
        if not isinstance(module, LoraLinear):
            continue
        parent, _, leaf = path.rpartition(".")
        # the fused and update paths keep x (which the base keeps anyway) and, with dropout, a
        # mask packed a bit per value; the autograd path keeps A's input as a new tensor when it
        # is cast (fp32 adapters on a 16-bit base) or dropped out (plus torch's one-byte mask)
        plain = module.path_for(compute, autocast) == AUTOGRAD
        for name in module.live_adapters():
            weight = module.factors(name)[0]
            size = compute.itemsize if autocast else weight.element_size()
            total += weight.shape[0] * size  # A's output (r values), which B keeps
            dropout = isinstance(module.lora_dropout[name], nn.Dropout)
            cast = weight.dtype != compute and not autocast
            copy = module.in_features * size if plain and (dropout or cast) else 0
            mask = (module.in_features if plain else (module.in_features + 7) // 8) if dropout else 0
            # shared by every adapter reading the same x, unless each draws its own mask
            shared = module.shares_dropout_mask[name] or not dropout
            reader = f"{parent}.<input>" if leaf in _SIBLING_READERS else path
            reader = reader if shared else f"{path}.{name}"
            if reader not in prepared and copy + mask:
                prepared.add(reader)
                total += copy + mask
    return total


def _shape(model: nn.Module) -> _Shape:
    config: Any = model.config
    hidden = _config_int(config, "hidden_size", "n_embd", "d_model")
    heads = _config_int(config, "num_attention_heads", "n_head")
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    get_head = getattr(model, "get_output_embeddings", None)
    activation = getattr(config, "hidden_act", None) or getattr(config, "activation_function", None)
    return _Shape(
        layers=_config_int(config, "num_hidden_layers", "n_layer", "num_layers"),
        hidden=hidden,
        q_width=heads * head_dim,
        kv_width=(getattr(config, "num_key_value_heads", None) or heads) * head_dim,
        intermediate=_config_int(config, "intermediate_size", "ffn_dim", "n_inner", default=4 * hidden),
        gated=any(path.endswith(("gate_proj", "gate_up_proj")) for path, _ in model.named_modules()),
        act_values=4 if activation in _UNFUSED_GELUS else 1,
        fused_gate=any(isinstance(m, FusedGatedMLP) for m in model.modules()),
        rms_norm=any(type(m).__name__.endswith("RMSNorm") for m in model.modules()),
        vocab=int(config.vocab_size) if callable(get_head) and get_head() is not None else 0,
    )


def _rebuilt_norm_outputs(model: nn.Module) -> int:
    """Of a layer's norm outputs that q/k/v and gate/up read, how many backward rebuilds instead of
    keeping: with the norms marked (lorakit.hf.rebuilt_norms), one for grouped q/k/v
    (group_attention_inputs), one for a fused MLP whose gate and up carry adapters."""
    if not any(rebuilds_outputs(m) for m in model.modules()):
        return 0
    attention = any(isinstance(m, LoraLinear) and m.input_group is not None for m in model.modules())
    mlp = any(isinstance(m, FusedGatedMLP) and isinstance(m.gate_proj, LoraLinear) and isinstance(m.up_proj, LoraLinear)
              for m in model.modules())
    return int(attention) + int(mlp)


def _config_int(config: Any, *names: str, default: int | None = None) -> int:
    for name in names:
        if getattr(config, name, None) is not None:
            return int(getattr(config, name))
    if default is None:
        raise ValueError(f"{type(config).__name__} has none of {', '.join(names)}, which the estimate needs "
                         "(decoder transformers such as llama, mistral, qwen2, gpt2 and opt have them)")
    return default


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
    return base_kind(module) == "quantized"


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
                if not isinstance(value, int) or isinstance(value, bool) or value < 1]
    if dtype not in DTYPES:
        problems.append(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if quant is not None and quant not in QUANT_METHODS:
        problems.append(f"quant must be one of {', '.join(QUANT_METHODS)} or None, got {quant!r}")
    problems += more or []
    if problems:
        raise ValueError("invalid estimate settings:\n  " + "\n  ".join(problems))


def _describe_model(model: nn.Module, shape: _Shape) -> str:
    config: Any = model.config
    return f"{type(model).__name__}, {shape.layers} layers, hidden {shape.hidden}, vocab {config.vocab_size:,d}"


def _describe_lora(config: LoraConfig, name: str | None = None) -> str:
    targets = config.targets if isinstance(config.targets, str) else ", ".join(config.targets)
    return f"LoRA{f' {name!r}' if name else ''} r={config.r}, alpha={config.alpha:g} on {targets}"


__all__ = ["estimate", "estimate_for_model", "format_estimate", "resolve_model_config", "shipped_models",
           "meta_model"]
