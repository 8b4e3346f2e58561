"""The next-token rules, checked against the plain formulas: greedy is argmax; sampling draws from
softmax(logits / T) cut to the top-p nucleus, renormalised; a seed repeats the draws."""

from __future__ import annotations

import math

import pytest
import torch

from lorakit.serve.sampling import greedy, make_generator, sample

# Probabilities chosen so no nucleus boundary lies near a top_p below: sorted they are
# 0.4 (token 1), 0.25 (3), 0.2 (4), 0.1 (2), 0.05 (0).
PROBS = [0.05, 0.4, 0.1, 0.25, 0.2]
LOGITS = [math.log(p) + 3.0 for p in PROBS]  # a shift changes nothing after softmax


def expected(logits: list[float], temperature: float, top_p: float) -> list[float]:
    """The distribution `sample` should draw from, written out in float64 Python."""
    weights = [math.exp(x / temperature) for x in logits]
    probs = [w / sum(weights) for w in weights]
    kept, mass = set(), 0.0
    for token in sorted(range(len(probs)), key=lambda t: -probs[t]):
        if mass >= top_p:  # the tokens before already reach top_p: the nucleus is complete
            break
        kept.add(token)
        mass += probs[token]
    total = sum(probs[t] for t in kept)
    return [probs[t] / total if t in kept else 0.0 for t in range(len(probs))]


def test_expected_nucleus_of_the_fixture_is_what_the_comment_says():
    assert expected(LOGITS, 1.0, 0.7) == pytest.approx([0, 0.4 / 0.85, 0, 0.25 / 0.85, 0.2 / 0.85])
    assert expected(LOGITS, 1.0, 0.6) == pytest.approx([0, 0.4 / 0.65, 0, 0.25 / 0.65, 0])
    assert expected(LOGITS, 1.0, 0.3) == pytest.approx([0, 1, 0, 0, 0])


def test_greedy_is_the_argmax_of_each_row():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    rows = logits.tolist()
    assert greedy(logits) == [max(range(50), key=row.__getitem__) for row in rows]
    assert all(type(token) is int for token in greedy(logits))


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.5, 1.0), (2.0, 1.0), (1.0, 0.7), (1.0, 0.6),
                                                (0.7, 0.6), (1.3, 0.3), (1.0, 1e-6)])
def test_sample_draws_from_softmax_over_temperature_cut_to_top_p(monkeypatch, temperature, top_p):
    seen = []
    real = torch.multinomial

    def spy(probs, *args, **kwargs):
        seen.append(probs.clone())
        return real(probs, *args, **kwargs)

    monkeypatch.setattr(torch, "multinomial", spy)
    token = sample(torch.tensor(LOGITS), temperature, top_p, make_generator(0))
    (probs,) = seen
    want = expected(LOGITS, temperature, top_p)
    assert (probs / probs.sum()).tolist() == pytest.approx(want, abs=1e-6)
    assert want[token] > 0, f"token {token} lies outside the nucleus {want}"


def test_sample_frequencies_follow_the_formula():
    generator = make_generator(1)
    logits = torch.tensor(LOGITS)
    draws = [sample(logits, 0.7, 0.6, generator) for _ in range(4000)]
    want = expected(LOGITS, 0.7, 0.6)
    for token, p in enumerate(want):
        share = draws.count(token) / len(draws)
        if p == 0:
            assert share == 0, f"token {token} is outside the nucleus but was drawn"
        else:
            assert share == pytest.approx(p, abs=0.03), (token, share, p)


def test_tiny_temperature_or_top_p_is_greedy():
    logits = torch.randn(40, generator=torch.Generator().manual_seed(3))
    best = int(logits.argmax())
    generator = make_generator(5)
    assert {sample(logits, 1e-3, 1.0, generator) for _ in range(50)} == {best}
    assert {sample(logits, 1.5, 1e-6, generator) for _ in range(50)} == {best}  # the top token is always kept


def test_a_seed_repeats_the_draws_and_other_seeds_differ():
    logits = torch.zeros(1000)  # uniform: two independent runs of 20 draws differ (but for ~1e-60)

    def draws(generator: torch.Generator) -> list[int]:
        return [sample(logits, 1.0, 1.0, generator) for _ in range(20)]

    assert draws(make_generator(7)) == draws(make_generator(7))
    assert draws(make_generator(7)) != draws(make_generator(8))
    assert draws(make_generator(None)) != draws(make_generator(None))  # fresh entropy each time


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_logits_raise_runtime_error(bad):
    logits = torch.tensor([0.0, bad, 1.0])
    with pytest.raises(RuntimeError):
        sample(logits, 1.0, 1.0, make_generator(0))
