"""Continuous batching: one loop runs decode steps over every running sequence.

Each step, on the scheduler's own thread (torch releases the GIL inside its ops, so the HTTP
event loop keeps answering):

1. rows whose request finished, failed or was abandoned (client gone) leave the batch;
2. waiting requests join, up to `max_batch` running: their prompts are prefilled together in
   one left-padded forward (each row with its adapter) into a KV cache that joins the batch
   cache (`batch_cache.BatchCache`), and each picks its first token;
3. one forward over all running rows, one new token each, inside `adapters_per_row`, so each row
   runs its own adapter (or none) in the same forward; then each row picks its next token.

A request therefore joins at the next step and leaves when it finishes, never waiting for the
batch to drain. The model lock is held for a whole step, so loading or unloading an adapter
(`adapters.AdapterRegistry`) happens between steps. An exception in one request's prefill or
sampling fails that request only; when a batched forward (prefill or decode) raises, each row
is retried alone to find the failing ones, and the others go on.
"""

from __future__ import annotations

import copy
import inspect
import threading
import time
from collections import deque
from typing import Any

import torch
from torch import nn

from lorakit.core.per_row import adapters_per_row
from lorakit.serve.batch_cache import BatchCache
from lorakit.serve.metrics import Metrics
from lorakit.serve.sampling import greedy, sample
from lorakit.serve.schemas import ApiError
from lorakit.serve.sequence import Sequence


class Scheduler:
    """The waiting queue, the running batch, and the thread that steps them."""

    def __init__(self, model: nn.Module, max_batch: int, max_queue: int, metrics: Metrics,
                 model_lock: threading.Lock) -> None:
        self.model, self.max_batch, self.max_queue = model, max_batch, max_queue
        self.metrics, self.model_lock = metrics, model_lock
        self.device = next(model.parameters()).device
        self.cache_arg = ("cache" if "cache" in inspect.signature(model.forward).parameters
                          else "past_key_values")
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.batch = BatchCache()
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="lorakit-scheduler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Let the loop finish the sequences it has, then end it (waits up to `timeout` seconds)."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout)

    def submit(self, sequence: Sequence) -> None:
        """Queue a request for the next step, or refuse it (429) when `max_queue` are waiting already."""
        with self._wake:
            if len(self.waiting) >= self.max_queue:
                raise ApiError(429, f"the queue is full ({self.max_queue} requests waiting, --max-queue); "
                                    "retry shortly", kind="rate_limit_error", headers={"Retry-After": "1"})
            self.waiting.append(sequence)
            self.metrics.queue.set(len(self.waiting))
            self._wake.notify()

    def in_use(self, adapter: str) -> int:
        """How many waiting or running requests use `adapter`."""
        with self._wake:
            return sum(s.adapter == adapter for s in [*self.waiting, *self.running] if not s.done)

    # --- the loop --------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not (self.waiting or self.running or self._stopping):
                    self._wake.wait()
                if self._stopping and not (self.waiting or self.running):
                    return
            self.step()

    def step(self) -> None:
        """Drop finished rows, admit waiting requests, run one decode step; then wake their handlers."""
        touched: list[Sequence] = []
        with self.model_lock, torch.inference_mode():
            self._drop_finished()
            touched += self._admit()
            self._drop_finished()  # a request can finish on its first token
            if self.running:
                touched += self._decode_isolating()
        self.metrics.batch.set(len(self.running))
        for sequence in touched:
            sequence.notify()

    def _drop_finished(self) -> None:
        keep = [i for i, s in enumerate(self.running) if not (s.done or s.cancelled.is_set())]
        self.running = [self.running[i] for i in keep]
        self.batch.keep(keep)

    def _admit(self) -> list[Sequence]:
        joining: list[Sequence] = []
        with self._wake:
            while self.waiting and len(self.running) + len(joining) < self.max_batch:
                sequence = self.waiting.popleft()
                if not sequence.cancelled.is_set():
                    sequence.admitted_at = time.monotonic()
                    joining.append(sequence)
            self.metrics.queue.set(len(self.waiting))
        if not joining:
            return []
        try:  # all joining prompts in one left-padded forward, each row with its adapter
            cache, mask, logits = self._prefill(joining)
        except Exception:  # find the failing prompts: each alone, the rest join one by one
            for sequence in joining:
                try:
                    cache, mask, logits = self._prefill([sequence])
                except Exception as err:  # this request's failure only
                    sequence.fail(err)
                else:
                    self._join([sequence], cache, mask, logits)
            return joining
        self._join(joining, cache, mask, logits)
        return joining

    def _prefill(self, rows: list[Sequence]) -> tuple[Any, torch.Tensor, torch.Tensor]:
        """(KV cache, padding mask, last-position logits (rows, vocab)) of the rows' prompts, left-padded."""
        from lorakit.hf.generate import left_pad

        ids, mask = left_pad([s.prompt_ids for s in rows], pad_token_id=0)
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(1) - 1).clamp(min=0)  # each row counts its own tokens, as generate does
        with adapters_per_row(self.model, [s.adapter for s in rows]):
            # The last position as a tensor: `logits_to_keep=1` would slice the hidden states into a
            # strided view, which the head's CPU matmul runs several times slower than a gathered copy.
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                             logits_to_keep=torch.tensor([ids.shape[1] - 1], device=self.device))
        return getattr(out, self.cache_arg), mask, out.logits[:, -1]

    def _join(self, rows: list[Sequence], cache: Any, mask: torch.Tensor, logits: torch.Tensor) -> None:
        """Pick each prefilled row's first token; the rows that did not fail join the batch."""
        for i, sequence in enumerate(rows):
            try:
                self._pick(sequence, logits[i])
            except Exception as err:
                sequence.fail(err)
        self.batch.add(cache, mask, [len(s.prompt_ids) for s in rows])
        self.running.extend(rows)  # a failed row leaves at the next _drop_finished

    def _decode(self, rows: list[Sequence], batch: BatchCache) -> torch.Tensor:
        """One forward of one token per row; the batch cache grows by one column. Logits: (rows, vocab)."""
        inputs = batch.step_inputs(self.cache_arg)
        ids = torch.tensor([[s.generated[-1]] for s in rows], device=self.device)
        with adapters_per_row(self.model, [s.adapter for s in rows]):
            out = self.model(input_ids=ids, logits_to_keep=1, **inputs)
        batch.advance(inputs["attention_mask"])
        return out.logits[:, -1]

    def _decode_isolating(self) -> list[Sequence]:
        try:
            logits = self._decode(self.running, self.batch)
        except Exception:
            # Find the rows whose forward fails alone, from the cache as it was before the step (layers
            # that ran before the failure had appended their column); the others redo the step.
            self.batch.undo_partial_step()
            failing = set()
            for i, sequence in enumerate(self.running):
                alone = copy.deepcopy(self.batch)
                alone.keep([i])
                try:
                    self._decode([sequence], alone)
                except Exception as err:
                    sequence.fail(err)
                    failing.add(i)
            keep = [i for i in range(len(self.running)) if i not in failing]
            touched = [self.running[i] for i in failing]
            self.running = [self.running[i] for i in keep]
            self.batch.keep(keep)
            return touched + (self._decode_isolating() if self.running else [])
        tokens = greedy(logits)  # cheap for every row; sampled rows draw their own below
        for i, sequence in enumerate(self.running):
            try:
                self._pick(sequence, logits[i], tokens[i])
            except Exception as err:
                sequence.fail(err)
        return list(self.running)

    def _pick(self, sequence: Sequence, logits: torch.Tensor, greedy_token: int | None = None) -> None:
        request = sequence.request
        if request.temperature == 0:
            token = greedy_token if greedy_token is not None else int(logits.argmax())
        else:
            token = sample(logits, request.temperature, request.top_p, sequence.generator)
        sequence.add_token(token)
        self.metrics.tokens.labels(sequence.request.model).inc()
