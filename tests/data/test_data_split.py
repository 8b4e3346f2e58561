"""Validation split: deterministic, disjoint, order-keeping."""

from __future__ import annotations

import pytest

from lorakit.data import split_validation


def test_split_is_deterministic_disjoint_and_keeps_order():
    records = list(range(100))
    train, val = split_validation(records, fraction=0.1, seed=3)
    assert len(val) == 10 and len(train) == 90
    assert sorted(train + val) == records
    assert train == sorted(train) and val == sorted(val)
    assert (train, val) == split_validation(records, fraction=0.1, seed=3)
    assert val != split_validation(records, fraction=0.1, seed=4)[1]


def test_small_fractions_hold_out_at_least_one_and_zero_holds_out_none():
    assert len(split_validation(list(range(5)), fraction=0.01)[1]) == 1
    assert split_validation([1, 2, 3], fraction=0.0) == ([1, 2, 3], [])


@pytest.mark.parametrize(
    ("records", "fraction", "message"),
    [
        ([1, 2, 3], 1.0, r"fraction must be in \[0, 1\), got 1.0"),
        ([1, 2, 3], -0.1, r"fraction must be in \[0, 1\), got -0.1"),
        ([1], 0.5, "holding out 1 of 1 records .* leaves nothing to train on"),
    ],
)
def test_bad_splits(records, fraction, message):
    with pytest.raises(ValueError, match=message):
        split_validation(records, fraction=fraction)
