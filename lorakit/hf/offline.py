"""Keep transformers away from the network while lorakit loads local files."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def hub_offline() -> Iterator[None]:
    """Set `HF_HUB_OFFLINE=1` for the duration of the block, then restore the old value.

    huggingface_hub reads this variable once, when it is first imported, so it only helps when
    transformers is imported inside the block. Callers must therefore also pass
    `local_files_only=True` to every `from_pretrained`; that is the guard that always holds.
    """
    previous = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = previous
