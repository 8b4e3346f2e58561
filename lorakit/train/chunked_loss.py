"""Causal-LM loss without ever holding the full-vocabulary logits.

A transformers model computes logits for every position (batch x seq x vocab: 4 x 256 x 49,152
fp32 is 200 MB), keeps them for the cross-entropy, and its backward makes two more tensors that
size. With a frozen output head only the gradient with respect to the hidden states is needed,
so we compute it chunk by chunk during the forward pass itself: logits for a few rows, their
softmax, (softmax - onehot) @ W, and drop the logits. Peak extra memory: one chunk of logits
(on a CPU, log-softmax and softmax are computed in their buffer).

The maths is the plain formula: loss = sum over label tokens of -log softmax(h W^T + b)[label],
divided by the number of label tokens (or `num_items`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100
CHUNK_ROWS = 256
# On a CPU the logits of a chunk are written block by block of this many vocabulary columns, into
# one buffer that every chunk reuses: one (256 x 49,152) product ran at 92 GFLOP/s and blocks of
# 2,048 columns at 133 on this project's 2-core machine (a block of the weight stays in cache while
# it is used), and a fresh 50 MB tensor per chunk costs page faults. Each logit is the same dot
# product either way, over the whole hidden width.
VOCAB_BLOCK = 2048


class _ChunkedHeadLoss(torch.autograd.Function):
    """sum of cross-entropy(h W^T + b, labels) over rows; returns the sum, saves only dL/dh."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                labels: torch.Tensor, chunk_rows: int) -> torch.Tensor:
        # hidden: (N, h), weight: (V, h), labels: (N,)
        total = torch.zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
        grad_hidden = torch.zeros_like(hidden) if hidden.requires_grad else None
        blocked = (hidden.device.type == "cpu" and hidden.dtype == weight.dtype
                   and not torch.is_autocast_enabled("cpu"))
        buffer = hidden.new_empty(min(chunk_rows, hidden.shape[0]), weight.shape[0]) if blocked else None
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            chunk_labels = labels[rows]
            keep = chunk_labels != IGNORE_INDEX
            if not bool(keep.any()):
                continue
            h = hidden[rows][keep]
            logits = (F.linear(h, weight, bias) if buffer is None
                      else _blocked_logits(h, weight, bias, buffer))  # (n, V)
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # 16-bit up to fp32
            target = chunk_labels[keep]
            # On a CPU in place: the logits and their log-softmax never live side by side (50 MB a
            # chunk of 256 rows at a 49k vocabulary; the head runs at the forward's peak, every saved
            # tensor alive). The CPU kernel reads each row's max and sum before writing the row, so
            # the values are the out-of-place op's, bit for bit (tested); other devices' kernels are
            # not tested here, so they run out of place.
            in_place = logits.device.type == "cpu"
            log_probs = torch.log_softmax(logits, dim=-1, out=logits if in_place else None)
            total += -log_probs.gather(1, target[:, None]).sum()
            if grad_hidden is not None:
                probs = log_probs.exp_()  # reuse the buffer: softmax - onehot is dL/dlogits
                probs[torch.arange(len(target), device=probs.device), target] -= 1
                # grad_hidden[rows] is a view, so the masked assignment writes into grad_hidden
                grad_hidden[rows][keep] = (probs.to(weight.dtype) @ weight).to(hidden.dtype)
        ctx.save_for_backward(grad_hidden if grad_hidden is not None else torch.empty(0))
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None, None]:
        (grad_hidden,) = ctx.saved_tensors
        if grad_hidden.numel() == 0:
            return None, None, None, None, None
        return grad_hidden * grad_total.to(grad_hidden.dtype), None, None, None, None


def _blocked_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    buffer: torch.Tensor) -> torch.Tensor:
    """h W^T + b in the first len(h) rows of `buffer`, VOCAB_BLOCK columns per product."""
    logits = buffer[: h.shape[0]]
    for start in range(0, weight.shape[0], VOCAB_BLOCK):
        columns = slice(start, start + VOCAB_BLOCK)
        torch.mm(h, weight[columns].T, out=logits[:, columns])
    return logits if bias is None else logits.add_(bias)


def chunked_causal_lm_loss(hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor,
                           num_items: int | None = None, chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:
    """Mean next-token cross-entropy of `head(hidden)` against `labels`, shifted as transformers does.

    Args:
        hidden: (batch, seq, h) final hidden states.
        head: the frozen output projection (V x h).
        labels: (batch, seq) token ids, IGNORE_INDEX where no loss is taken.
        num_items: divide by this instead of the number of label tokens (gradient accumulation).
    """
    if head.weight.requires_grad:
        raise ValueError("chunked_causal_lm_loss needs a frozen output head; use the model's own loss")
    shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = shifted.reshape(-1).to(flat_hidden.device)
    total = _ChunkedHeadLoss.apply(flat_hidden, head.weight, head.bias, flat_labels, chunk_rows)
    count = num_items if num_items is not None else int((flat_labels != IGNORE_INDEX).sum())
    return total / max(count, 1)


def supports_chunked_loss(model: nn.Module) -> bool:
    """True for a transformers causal LM whose plain linear head is frozen and applied as is."""
    head = getattr(model, "get_output_embeddings", lambda: None)()
    decoder = getattr(model, "get_decoder", lambda: None)()
    config = getattr(model, "config", None)
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)  # Cohere-style scaled logits
    return (type(head) is nn.Linear and decoder is not None and not head.weight.requires_grad
            and softcap is None and scale is None)


def causal_lm_loss(model: nn.Module, inputs: dict[str, Any], num_items: int | None = None) -> torch.Tensor:
    """The model's training loss for a batch, through the chunked head when the model allows it."""
    if not supports_chunked_loss(model):
        return model(**inputs, num_items_in_batch=num_items).loss
    model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    hidden = model.get_decoder()(**model_inputs).last_hidden_state  # type: ignore[operator]
    return chunked_causal_lm_loss(hidden, model.get_output_embeddings(), inputs["labels"],  # type: ignore[operator]
                                  num_items=num_items)
