"""The optimizer of a run, with LoRA+ parameter groups (Hayou et al. 2024) when asked.

LoRA+ trains B faster than A: B's learning rate is `loraplus_ratio` times A's (the paper and
PEFT's `create_loraplus_optimizer` suggest 16). The groups follow PEFT's:

| group | parameters | learning rate |
|---|---|---|
| A | A of linear adapters, and any other matrix (modules_to_save copies) | lr |
| embedding | A and B of embedding adapters | `loraplus_lr_embedding` (PEFT: 1e-6) |
| B | B of linear adapters, and every 1-D tensor (DoRA magnitudes, biases) | lr x ratio |

The learning-rate schedule multiplies every group's rate alike. Checkpoints keep the groups
(the optimizer's state dict holds them) and resume checks the settings that shape them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lorakit.core.walk import lora_layers
from lorakit.train.config import TrainConfig


def parameter_groups(model: nn.Module, params: list[nn.Parameter], lr: float, loraplus_ratio: float | None,
                     embedding_lr: float) -> list[dict[str, Any]]:
    """The optimizer's groups for the trainable `params` of `model`: one group, or LoRA+'s three.

    Groups left empty are dropped; the order (A, embedding, B) is fixed, so a resumed run builds
    the same groups.
    """
    if loraplus_ratio is None:
        return [{"params": params, "lr": lr}]
    embedding_ids, b_ids = set(), set()
    for layer in lora_layers(model):
        for name in layer.adapter_names():
            a, b = layer.factors(name)
            if layer.is_embedding:
                embedding_ids |= {id(a), id(b)}
            else:
                b_ids.add(id(b))
    groups: dict[str, list[nn.Parameter]] = {"A": [], "embedding": [], "B": []}
    for param in params:
        if id(param) in embedding_ids:
            groups["embedding"].append(param)
        elif id(param) in b_ids or param.dim() == 1:
            groups["B"].append(param)
        else:
            groups["A"].append(param)
    rates = {"A": lr, "embedding": embedding_lr, "B": lr * loraplus_ratio}
    return [{"params": found, "lr": rates[group], "name": group} for group, found in groups.items() if found]


def build_optimizer(config: TrainConfig, model: nn.Module,
                    params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW (or bitsandbytes' PagedAdamW) over `params`, in LoRA+ groups when `config.loraplus_ratio` is
    set."""
    groups = parameter_groups(model, params, config.learning_rate, config.loraplus_ratio,
                              config.loraplus_lr_embedding)
    if config.optimizer == "paged_adamw":
        if not torch.cuda.is_available():
            raise ValueError("optimizer 'paged_adamw' needs CUDA and bitsandbytes; use 'adamw' on CPU")
        import bitsandbytes as bnb  # type: ignore[import-not-found]

        return bnb.optim.PagedAdamW(groups, lr=config.learning_rate, weight_decay=config.weight_decay)
    return torch.optim.AdamW(groups, lr=config.learning_rate, weight_decay=config.weight_decay)
