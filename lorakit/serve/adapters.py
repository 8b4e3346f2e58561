"""Which models the server answers to: the base, and each adapter loaded on it.

A request's `model` is an adapter name, or the base model's name for no adapter. Adapters given
at start (`--adapter name=path`) may live anywhere; at run time (`/v1/load_lora_adapter`) they
may only come from inside `--adapter-dir`, and without it run-time loading is off. Loading goes
through `lorakit.formats.io.load_adapter`, which checks everything (config, keys, shapes, finite
values) against the base before it changes the model; the name becomes visible only after
that, and the model lock keeps the change between two decode steps, so running requests are
unaffected. An adapter that requests are using cannot be unloaded.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

from torch import nn

from lorakit.serve.schemas import ApiError


class AdapterRegistry:
    """The served names (base first, then adapters in load order) and their folders."""

    def __init__(self, model: nn.Module, base_name: str, adapter_dir: str | os.PathLike[str] | None,
                 model_lock: threading.Lock) -> None:
        self.model, self.base_name, self.model_lock = model, base_name, model_lock
        self.adapter_dir = Path(adapter_dir).resolve() if adapter_dir is not None else None
        self.paths: dict[str, str] = {}  # adapter name -> its folder
        self.lock = threading.Lock()  # held while a name is resolved and its request queued, and by unload

    def names(self) -> list[str]:
        return [self.base_name, *self.paths]

    def resolve(self, model: str) -> str | None:
        """The adapter a request's `model` names (None for the base); 404 listing the served names."""
        if model == self.base_name:
            return None
        if model in self.paths:
            return model
        raise ApiError(404, f"model {model!r} is not served here; served models: {', '.join(self.names())}",
                       "model", kind="not_found_error")

    def add(self, name: str, path: str | os.PathLike[str]) -> None:
        """Load adapter folder `path` as `name` (checked fully first); ValueError/FileNotFoundError
        otherwise."""
        from lorakit.core.per_row import runs_per_row
        from lorakit.formats.adapter_folder import find_adapter_folder
        from lorakit.formats.io import load_adapter, read_adapter

        if name == self.base_name or name in self.paths:
            raise ValueError(f"the name {name!r} is taken already (served: {', '.join(self.names())}); "
                             "choose another or unload it first")
        config, _, _ = read_adapter(find_adapter_folder(path))  # the files checked before the model changes
        if not runs_per_row(config):  # core's rule: each row would need its own weight norm
            raise ValueError(f"{path} is a DoRA adapter, which lorakit serve cannot run per row; merge it "
                             "into the base (lorakit merge) and serve that, or serve it with vLLM")
        with self.model_lock:
            load_adapter(self.model, path, name=name)
        with self.lock:
            self.paths[name] = str(path)

    def load(self, name: str, path: str) -> None:
        """/v1/load_lora_adapter: `path` must lie inside --adapter-dir (symlinks followed); 400 otherwise."""
        if self.adapter_dir is None:
            raise ApiError(400, "loading adapters at run time is off; start the server with --adapter-dir "
                                "DIR and put adapters inside it", "lora_path")
        folder = (self.adapter_dir / path).resolve()  # an absolute path replaces adapter_dir here
        if not folder.is_relative_to(self.adapter_dir):
            raise ApiError(400, f"lora_path {path!r} is outside --adapter-dir {self.adapter_dir}; "
                                "only adapters inside it can be loaded at run time", "lora_path")
        try:
            self.add(name, folder)
        except (ValueError, FileNotFoundError, OSError) as err:
            raise ApiError(400, f"adapter {name!r} from {path!r} was not loaded: {err}",
                           "lora_path") from None

    def unload(self, name: str, in_use: Callable[[str], int]) -> None:
        """/v1/unload_lora_adapter: 404 for an unknown name, 400 while requests use it."""
        from lorakit.core.adapters import delete_adapter

        with self.lock:
            if name not in self.paths:
                raise ApiError(404, f"adapter {name!r} is not loaded; loaded adapters: "
                                    f"{', '.join(self.paths) or 'none'}", "lora_name", kind="not_found_error")
            busy = in_use(name)
            if busy:
                raise ApiError(400, f"adapter {name!r} is used by {busy} running or waiting requests; "
                                    "unload it when they are done", "lora_name")
            del self.paths[name]  # invisible to new requests from here on
        with self.model_lock:
            delete_adapter(self.model, name)
