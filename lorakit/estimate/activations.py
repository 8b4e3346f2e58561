"""The activation model: how many bytes a decoder's forward pass keeps for backward.

Per token, each decoder layer keeps a fixed count of values (`Shape.layer_values`), read from the
model's config and modules; the active LoRA adapters keep what their computation saves
(`kernels.paths.path_for` says which); the final norm, the head and the fp32 logits come last.
estimate.py adds these bytes to the weights, gradients and optimizer state; docs/estimate.md
writes the formula out, and tests/hf/test_estimate.py compares it with what autograd keeps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorakit.core.layers import LoraEmbedding, LoraLinear
from lorakit.fusion.fused_mlp import FusedGatedMLP
from lorakit.kernels.paths import AUTOGRAD, path_for
from lorakit.kernels.rebuild import rebuilds_outputs

__all__ = ["Shape", "activation_bytes", "adapter_bytes_per_token", "model_shape", "rebuilt_norm_outputs"]

# transformers writes these out of several ops, which keep 4 tensors in all (GPT-2 uses gelu_new).
_UNFUSED_GELUS = ("gelu_new", "gelu_fast")


@dataclass(frozen=True)
class Shape:
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
    # of q/k/v's and gate/up's inputs (norm outputs), how many backward rebuilds
    rebuilt_norm_outputs: int = 0

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
        # (lorakit.fusion.rebuilt_norms): one hidden-wide value less per rebuilt norm output.
        rebuilt = self.rebuilt_norm_outputs * self.hidden
        # An RMSNorm whose weight trains (full fine-tuning) also keeps its output before the weight.
        return attention + mlp - rebuilt + (2 * self.hidden if norms_train and self.rms_norm else 0)


def activation_bytes(shape: Shape, tokens: int, size: int, adapters: int, checkpointing: bool,
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
# (lorakit.kernels.lora_function.shared). Which modules read one tensor shows only in a forward, which
# the estimate does not run, so it goes by transformers' names.
_SIBLING_READERS = {"q_proj", "k_proj", "v_proj", "query", "key", "value", "gate_proj", "up_proj", "w1", "w3"}


def adapter_bytes_per_token(model: nn.Module, compute: torch.dtype, autocast: bool) -> int:
    """Bytes per token the active adapters keep, over the whole model.

    Under autocast an adapter computes in the compute dtype (no cast copy of its input), without
    it in its own (fp32) dtype. Which computation each layer runs is kernels.paths.path_for's answer.
    """
    total = 0
    prepared: set[str] = set()
    for path, module in model.named_modules():
        if isinstance(module, LoraEmbedding):
            total += sum(module.rank(n)
                         * (compute.itemsize if autocast else module.factors(n)[0].element_size())
                         for n in module.live_adapters())
        if not isinstance(module, LoraLinear):
            continue
        parent, _, leaf = path.rpartition(".")
        # the fused and update paths keep x (which the base keeps anyway) and, with dropout, a
        # mask packed a bit per value; the autograd path keeps A's input as a new tensor when it
        # is cast (fp32 adapters on a 16-bit base) or dropped out (plus torch's one-byte mask)
        plain = path_for(module, compute, autocast) == AUTOGRAD
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


def model_shape(model: nn.Module) -> Shape:
    """The sizes `activation_bytes` needs, from the model's config and modules (ValueError if one is
    missing)."""
    config: Any = model.config
    hidden = _config_int(config, "hidden_size", "n_embd", "d_model")
    heads = _config_int(config, "num_attention_heads", "n_head")
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    get_head = getattr(model, "get_output_embeddings", None)
    activation = getattr(config, "hidden_act", None) or getattr(config, "activation_function", None)
    return Shape(
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


def rebuilt_norm_outputs(model: nn.Module) -> int:
    """Of a layer's norm outputs that q/k/v and gate/up read, how many backward rebuilds instead of
    keeping: with the norms marked (lorakit.fusion.rebuilt_norms), one for grouped q/k/v
    (group_attention_inputs), one for a fused MLP whose gate and up carry adapters."""
    if not any(rebuilds_outputs(m) for m in model.modules()):
        return 0
    attention = any(isinstance(m, LoraLinear) and m.input_group is not None for m in model.modules())
    mlp = any(isinstance(m, FusedGatedMLP) and isinstance(m.gate_proj, LoraLinear)
              and isinstance(m.up_proj, LoraLinear)
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
