"""What one server holds: the model and tokenizer, the served adapters, the scheduler, the metrics.

`Engine.start_request` turns a checked request into a queued `Sequence`: it builds the prompt
(the tokenizer's chat template for chat requests, as `lorakit generate` does), checks it against
the model's context, and resolves the adapter and queues the request under the registry's lock,
so an adapter cannot be unloaded between the two.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from lorakit.hf.context import PromptTooLong, model_context, tokens_to_generate
from lorakit.serve.adapters import AdapterRegistry
from lorakit.serve.metrics import Metrics
from lorakit.serve.scheduler import Scheduler
from lorakit.serve.schemas import ApiError, GenerationRequest
from lorakit.serve.sequence import Sequence


class Engine:
    """The model with its adapters and the scheduler stepping them.

    Args:
        model: a transformers causal LM (on any device), with no adapters merged.
        tokenizer: its tokenizer.
        base_name: the name that means "no adapter" in requests.
        adapters: adapter name -> folder, loaded now (from anywhere).
        adapter_dir: the only folder run-time loading may read from; None turns run-time loading off.
        max_batch: most sequences in one decode step.
        max_queue: most requests waiting to join; more get 429.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, base_name: str,
                 adapters: Mapping[str, str] | None = None,
                 adapter_dir: str | os.PathLike[str] | None = None, max_batch: int = 16,
                 max_queue: int = 256) -> None:
        model.eval()
        self.model, self.tokenizer = model, tokenizer
        self.metrics = Metrics()
        lock = threading.Lock()
        self.registry = AdapterRegistry(model, base_name, adapter_dir, lock)
        for name, path in (adapters or {}).items():
            self.registry.add(name, path)
        self.scheduler = Scheduler(model, max_batch, max_queue, self.metrics, lock)
        self.context = model_context(model)
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos = tokenizer.eos_token_id if eos is None else eos
        self.eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))

    def start_request(self, request: GenerationRequest, notify: Callable[[], None]) -> Sequence:
        """A queued Sequence for `request`; ApiError for an unknown model, a too-long prompt or a full
        queue."""
        ids = self.prompt_ids(request)
        try:
            budget = tokens_to_generate(len(ids), request.max_tokens, self.context, "max_tokens")
        except PromptTooLong as error:
            raise ApiError(400, str(error), "messages" if request.chat else "prompt") from None
        except ValueError as error:
            raise ApiError(400, str(error), "max_tokens") from None
        with self.registry.lock:
            adapter = self.registry.resolve(request.model)
            sequence = Sequence(request, adapter, ids, budget, self.eos_ids, self._decode, notify)
            self.scheduler.submit(sequence)
        return sequence

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        """The prompt's token ids: the chat template applied (chat), or the text with the tokenizer's
        specials."""
        if not request.chat:
            ids = self.tokenizer(request.prompt, add_special_tokens=True)["input_ids"]
        else:
            if not getattr(self.tokenizer, "chat_template", None):
                raise ApiError(400, "this model's tokenizer has no chat template; use /v1/completions with "
                                    "a prompt", "messages")
            text = self.tokenizer.apply_chat_template(request.messages, tokenize=False,
                                                      add_generation_prompt=True)
            # The template writes any BOS itself; adding special tokens again would double it.
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ApiError(400, "the prompt is empty after tokenization; give some text", "prompt")
        return list(ids)

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))
