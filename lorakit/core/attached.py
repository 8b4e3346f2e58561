"""State lorakit keeps on objects it does not own: the one home of such state, and its lifetimes.

Three kinds, each in the owner's `__dict__` under one `_lorakit_` name, so there is no
process-wide registry to leak or to go stale:

- On an input tensor x (`shared`): what the layers reading x made once for all of them (a cast
  copy, a dropped-out copy, a dropout mask, q/k/v's grouped outputs). It lives exactly as long
  as x: in a model, one forward, since each forward makes new activations (a checkpointed
  block's recompute makes new ones too, drawing the same masks from the restored RNG state).
- On a module's output y (`tag` / `tag_of`): how to rebuild y from the module's input
  (lorakit.kernels.rebuild). It lives as long as y, and is ignored once y or that input changed
  in place (the caller checks their version counters).
- On a model (`model_state`): the adapters' configs and the active names (core/registry.py). It
  lives as long as the model and travels with it through deepcopy.

Inside a compiled graph nothing is kept on tensors (there is no Python-side state there).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, TypeVar

import torch
from torch import nn

T = TypeVar("T")
_SHARED = "_lorakit_shared"
_PREFIX = "_lorakit_"


def shared(x: torch.Tensor, key: Hashable, make: Callable[[], T], reader: Hashable | None = None) -> T:
    """make(), computed once per input tensor x and key: what one reader of x made, the others reuse.

    `reader` names who asks (a layer object, with its adapter's name). A reader that asks again
    for the same x is in a new forward over the very same tensor object (a loop feeding one batch
    again, or a layer that is the model's first module): it gets a fresh value, which the other
    readers then share, so dropout stays random from one forward to the next. None joins whatever
    is there. Threads running forwards on different inputs share nothing.
    """
    if torch.compiler.is_compiling():
        return make()
    values = x.__dict__.setdefault(_SHARED, {})
    entry = values.get(key)  # (value, readers so far)
    if entry is None or (reader is not None and reader in entry[1]):
        entry = values[key] = (make(), set())
    if reader is not None:
        entry[1].add(reader)
    return entry[0]  # type: ignore[no-any-return]


def tag(y: torch.Tensor, name: str, value: Any) -> None:
    """Attach `value` to tensor y under `name` (it lives as long as y)."""
    y.__dict__[_PREFIX + name] = value


def tag_of(y: torch.Tensor, name: str) -> Any:
    """What `tag` attached to y under `name`, or None (always None inside a compiled graph)."""
    return None if torch.compiler.is_compiling() else y.__dict__.get(_PREFIX + name)


def model_state(model: nn.Module, name: str, default: Callable[[], T] | None = None) -> T | None:
    """The model's own record `name`; made by `default()` and kept when missing, or None without one."""
    key = _PREFIX + name
    if key not in model.__dict__ and default is not None:
        model.__dict__[key] = default()
    return model.__dict__.get(key)


def set_model_state(model: nn.Module, name: str, value: Any) -> None:
    model.__dict__[_PREFIX + name] = value


def drop_model_state(model: nn.Module, *names: str) -> None:
    for name in names:
        model.__dict__.pop(_PREFIX + name, None)
