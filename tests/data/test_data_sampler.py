"""Batching: padding collation, deterministic order, resume from a saved position, rank shares."""

from __future__ import annotations

import itertools
import json

import pytest

from lorakit.data import (
    IGNORE_INDEX,
    DataPosition,
    Example,
    TokenizedDataset,
    batches,
    collate_examples,
    epoch_order,
    steps_per_epoch,
)

PAD = 0


def make_dataset(num_rows: int) -> TokenizedDataset:
    """Rows of 1 to 3 tokens; the first token, 100 + i, names row i."""
    items = tuple(
        Example(input_ids=(100 + i,) * (1 + i % 3), labels=(IGNORE_INDEX,) + (100 + i,) * (i % 3))
        for i in range(num_rows)
    )
    return TokenizedDataset(items=items, pad_id=PAD, max_length=8)


def row_ids(batch) -> list[int]:
    return [int(first) - 100 for first in batch.inputs["input_ids"][:, 0]]


def test_collate_right_pads_and_masks():
    a = Example((5, 6, 7), (IGNORE_INDEX, 6, 7))
    b = Example((8,), (8,))
    batch = collate_examples([a, b], pad_id=PAD)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, PAD, PAD]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["use_cache"] is False


def test_position_round_trips_through_json():
    position = DataPosition(epoch=2, index=17)
    assert DataPosition.from_dict(json.loads(json.dumps(position.to_dict()))) == position
    with pytest.raises(ValueError, match="epoch and index must be integers >= 0, got epoch=-1"):
        DataPosition(epoch=-1)
    with pytest.raises(ValueError, match="needs 'epoch' and 'index', got keys \\['step'\\]"):
        DataPosition.from_dict({"step": 3})


def test_order_is_deterministic_and_seeded():
    assert epoch_order(50, epoch=0, seed=1) == epoch_order(50, epoch=0, seed=1)
    assert epoch_order(50, epoch=0, seed=1) != epoch_order(50, epoch=1, seed=1)
    assert epoch_order(50, epoch=0, seed=1) != epoch_order(50, epoch=0, seed=2)
    assert sorted(epoch_order(50, epoch=3, seed=1)) == list(range(50))
    assert epoch_order(5, epoch=0, shuffle=False) == [0, 1, 2, 3, 4]


def test_each_epoch_visits_every_row_once():
    dataset = make_dataset(10)
    seen = [row_ids(batch) for batch in batches(dataset, 3, seed=4, epochs=2)]
    assert [len(ids) for ids in seen] == [3, 3, 3, 1] * 2  # the last partial batch is kept
    assert sorted(sum(seen[:4], [])) == list(range(10)) == sorted(sum(seen[4:], []))
    assert sum(seen[:4], []) != sum(seen[4:], [])  # reshuffled


def test_positions_advance_and_wrap_to_the_next_epoch():
    positions = [batch.position for batch in batches(make_dataset(10), 4, epochs=2)]
    assert positions == [
        DataPosition(0, 4),
        DataPosition(0, 8),
        DataPosition(1, 0),
        DataPosition(1, 4),
        DataPosition(1, 8),
        DataPosition(2, 0),
    ]


def test_resume_from_a_saved_position_continues_exactly():
    dataset = make_dataset(23)
    uninterrupted = [row_ids(b) for b in itertools.islice(batches(dataset, 4, seed=7), 20)]
    first = list(itertools.islice(batches(dataset, 4, seed=7), 9))
    saved = json.dumps(first[-1].position.to_dict())  # what a checkpoint would store
    resumed = list(itertools.islice(batches(dataset, 4, seed=7, start=json.loads(saved)), 11))
    assert [row_ids(b) for b in first + resumed] == uninterrupted


def test_ranks_share_each_step_without_overlap():
    dataset = make_dataset(28)
    world = 3
    per_rank = [list(batches(dataset, 4, seed=5, epochs=1, rank=r, world_size=world)) for r in range(world)]
    steps = steps_per_epoch(28, 4, world)
    assert steps == 3  # 2 full steps of 12 rows, then 4 rows shared 2, 1, 1
    assert steps_per_epoch(26, 4, world) == 2  # 2 rows left cannot give each of 3 ranks one: dropped
    assert all(len(rank_batches) == steps for rank_batches in per_rank)
    assert [per_rank[r][-1].num_rows for r in range(world)] == [2, 1, 1]
    order = epoch_order(28, epoch=0, seed=5)
    for step in range(steps):
        shares = [row_ids(per_rank[r][step]) for r in range(world)]
        together = sorted(sum(shares, []))
        assert len(together) == len(set(together))
        assert together == sorted(order[12 * step : 12 * (step + 1)])
        # Every rank agrees on where the data stands.
        assert len({per_rank[r][step].position for r in range(world)}) == 1


def test_resume_with_another_world_size_continues_the_same_order():
    dataset = make_dataset(24)
    two_ranks = [
        list(itertools.islice(batches(dataset, 3, seed=1, rank=r, world_size=2), 2)) for r in range(2)
    ]
    position = two_ranks[0][-1].position
    assert position == DataPosition(0, 12)
    single = next(batches(dataset, 3, seed=1, start=position))
    assert row_ids(single) == epoch_order(24, epoch=0, seed=1)[12:15]


def test_drop_last():
    dataset = make_dataset(10)
    assert [len(row_ids(b)) for b in batches(dataset, 4, epochs=1, drop_last=True)] == [4, 4]
    assert steps_per_epoch(10, 4, drop_last=True) == 2 and steps_per_epoch(10, 4) == 3


def test_batch_counts_label_tokens():
    dataset = make_dataset(6)
    batch = next(batches(dataset, 6, shuffle=False))
    assert batch.num_rows == 6
    assert batch.num_label_tokens == sum(i % 3 for i in range(6))
    assert batch.num_label_tokens == int((batch.inputs["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert batch.to("cpu").inputs["use_cache"] is False


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "batch_size must be >= 1, got 0"),
        ({"rank": 2, "world_size": 2}, "rank must be in 0..1 for world_size=2, got 2"),
        ({"world_size": 0}, "world_size must be >= 1, got 0"),
        (
            {"start": DataPosition(0, 11)},
            "start position {'epoch': 0, 'index': 11} is past the end of the dataset",
        ),
        ({"world_size": 11}, "the dataset has 10 rows, too few for one step"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("{", "\\{").replace("}", "\\}")):
        batches(make_dataset(10), **{"batch_size": 2, **kwargs})
