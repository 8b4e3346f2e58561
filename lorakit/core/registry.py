"""Which adapters a model holds: their configs and the active names, kept on the model object itself.

They are the model's own records (core/attached.py), so they travel with it through deepcopy and
need no global registry; `forget_adapters` removes both (merge_and_unload). This is also the one
home of the two refusals that every model-level function shares: an unknown adapter name, and merged adapters.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from lorakit.core.attached import drop_model_state, model_state, set_model_state
from lorakit.core.config import LoraConfig
from lorakit.core.walk import lora_layers

_CONFIGS = "configs"
_ACTIVE = "active"


def adapter_configs(model: nn.Module) -> dict[str, LoraConfig]:
    """The model's adapters by name, with the config each was created from (a live dict)."""
    configs: dict[str, LoraConfig] | None = model_state(model, _CONFIGS, dict)
    assert configs is not None
    return configs


def list_adapters(model: nn.Module) -> list[str]:
    """Names of all adapters on the model, in the order they were added."""
    return list(model_state(model, _CONFIGS) or {})


def active_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters that run in forward, in the order set_adapter was given."""
    return list(model_state(model, _ACTIVE) or [])


def record_active(model: nn.Module, names: Sequence[str]) -> None:
    """Remember `names` as the model's active adapters (the layers are told by set_adapter)."""
    set_model_state(model, _ACTIVE, list(names))


def forget_adapters(model: nn.Module) -> None:
    """Drop every record of adapters from the model (after merge_and_unload removed the layers)."""
    drop_model_state(model, _CONFIGS, _ACTIVE)


def merged_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters currently folded into the base weights."""
    found: list[str] = []
    for layer in lora_layers(model):
        found += [n for n in layer.merged_adapters if n not in found]
    return found


def unknown_adapter_error(model: nn.Module, unknown: Sequence[str], lead: str = "unknown adapter ",
                          empty: str = "(none given)") -> ValueError:
    """The one 'unknown adapter' error: `lead`, the names (or `empty`), and the adapters on the model."""
    return ValueError(f"{lead}{', '.join(map(repr, unknown)) or empty}; adapters on this model: "
                      f"{', '.join(list_adapters(model)) or 'none'}")


def check_known(model: nn.Module, names: Sequence[str]) -> None:
    """Raise the 'unknown adapter' error unless `names` is non-empty and every name is on the model."""
    known = list_adapters(model)
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise unknown_adapter_error(model, unknown)


def merged_error(merged: Sequence[str] | str, before: str) -> ValueError:
    """The one 'merged' error: which adapters are merged, and to call unmerge(model) `before` something."""
    what = f"adapter {merged!r} is" if isinstance(merged, str) else f"adapters {list(merged)} are"
    return ValueError(f"{what} merged into the base weights; call unmerge(model) {before}")


def refuse_merged(model: nn.Module, before: str) -> None:
    """Raise the 'merged' error when any adapter of the model is merged."""
    merged = merged_adapters(model)
    if merged:
        raise merged_error(merged, before)
