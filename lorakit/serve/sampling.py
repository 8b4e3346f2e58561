"""The next token of each row: greedy (argmax, as `model.generate` does), or sampled with
temperature and top-p from the row's own seeded generator."""

from __future__ import annotations

import torch


def greedy(logits: torch.Tensor) -> list[int]:
    """argmax per row of (B, vocab) logits, in one op for the whole batch."""
    return logits.argmax(dim=-1).tolist()


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """One token from (vocab,) logits: softmax(logits / temperature), cut to the top-p nucleus.

    The nucleus is the smallest set of most likely tokens whose probabilities reach top_p (the
    most likely token is always in it). Raises RuntimeError on non-finite logits, as
    torch.multinomial does: the scheduler turns it into that request's 500.
    """
    probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)  # the generator lives on the CPU
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(0) - sorted_probs  # mass of the more likely tokens
        sorted_probs[before >= top_p] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator).item())


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator: seeded for a reproducible request, else from fresh entropy."""
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator
