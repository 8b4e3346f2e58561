"""Validation: loss over a dataset, and exact match of greedy generations against references."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorakit.data import EvalPair, TokenizedDataset, batches, exact_match
from lorakit.hf.generate import left_pad
from lorakit.train.chunked_loss import causal_lm_loss
from lorakit.train.parallel import TrainingModule


@dataclass(frozen=True)
class ExactMatch:
    score: float
    """Share of answers equal to the reference (ignoring surrounding whitespace)."""
    generations: list[str]
    """What the model answered, in the order of the pairs."""


def evaluation_loss(model: nn.Module, dataset: TokenizedDataset, batch_size: int,
                    device: torch.device) -> float:
    """Mean cross-entropy per label token over the whole dataset (eval mode, no gradients)."""
    total = tokens = 0.0
    with _evaluating(model):
        for batch in batches(dataset, batch_size, shuffle=False, epochs=1):
            inputs = batch.to(device).inputs
            count = batch.num_label_tokens
            # A TrainingModule (FSDP2's root) computes the loss in its own forward.
            loss = model(inputs, num_items=count) if isinstance(model, TrainingModule) else \
                causal_lm_loss(model, inputs, num_items=count)
            total += float(loss) * count
            tokens += count
    return total / max(tokens, 1)


def exact_match_score(model: Any, tokenizer: Any, pairs: Sequence[EvalPair], max_new_tokens: int,
                      batch_size: int = 16) -> ExactMatch:
    """Greedy-generate an answer for each pair's prompt and compare it with the reference."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    outputs: list[str] = []
    with _evaluating(model):
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            ids, mask = left_pad([list(p.prompt_ids) for p in chunk], pad)
            generated = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                       max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
            new_tokens = generated[:, ids.shape[1]:]
            outputs += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    hits = sum(exact_match(out, pair.answer) for out, pair in zip(outputs, pairs, strict=True))
    return ExactMatch(score=hits / max(len(pairs), 1), generations=outputs)


@contextlib.contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode and no gradients inside; afterwards the mode the model had, even after an error.

    `model.train(mode)` sets every submodule, LoRA layers and their dropouts included.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)
