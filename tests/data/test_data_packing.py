"""Packing: row planning, boundary labels, and the proof that packed = unpacked on a real Llama."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lorakit.data import (
    IGNORE_INDEX,
    ChatRecord,
    CompletionRecord,
    Example,
    Message,
    TextRecord,
    build_dataset,
    collate_examples,
    collate_packed,
)
from lorakit.data.packing import pack_row, plan_packing

RECORDS = [
    CompletionRecord("Question: What is the capital of France? Answer:", " Paris"),
    CompletionRecord("1 2 3", " 4 5 6 7 8 9 10"),
    TextRecord("The quick brown fox jumps over the lazy dog."),
    TextRecord("hello world"),
    ChatRecord((Message("user", "hello"), Message("assistant", "hello world"))),
    ChatRecord(
        (
            Message("system", "You are a helpful assistant."),
            Message("user", "Translate to German: good morning."),
            Message("assistant", "Guten Morgen."),
            Message("user", "What is the capital of France?"),
            Message("assistant", "Paris."),
        )
    ),
    CompletionRecord("Translate to German: good morning.", " Guten Morgen."),
    TextRecord("1 2 3 4 5 6 7 8 9 10"),
    CompletionRecord("Q:", " yes"),
]
MAX_LENGTH = 64


def test_plan_packing_fits_every_example_once():
    lengths = [30, 5, 64, 12, 40, 33, 1, 20, 20, 7]
    plan = plan_packing(lengths, 64)
    assert sorted(i for row in plan for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 64 for row in plan)
    # 252 tokens need at least 4 rows of 64; best-fit decreasing finds 4.
    assert len(plan) == 4
    assert plan == plan_packing(lengths, 64)  # deterministic


def test_plan_packing_rejects_examples_that_do_not_fit():
    with pytest.raises(
        ValueError, match=r"1 examples cannot be packed into rows of 8 tokens \(the first, example 1"
    ):
        plan_packing([3, 9, 2], 8)


def test_pack_row_restarts_positions_and_masks_boundaries():
    a = Example((1, 10, 11), (IGNORE_INDEX, 10, 11))
    b = Example((1, 20), (1, 20))  # trained from its first token, as with train_on_prompt
    row = pack_row([a, b])
    assert row.input_ids == (1, 10, 11, 1, 20)
    assert row.position_ids == (0, 1, 2, 0, 1)
    assert row.labels == (IGNORE_INDEX, 10, 11, IGNORE_INDEX, 20)
    assert row.num_examples == 2 and row.num_label_tokens == 3


def test_packed_batch_has_position_ids_and_no_attention_mask():
    rows = [
        pack_row([Example((5, 6), (5, 6)), Example((7,), (7,))]),
        pack_row([Example((8, 9, 9, 9), (8, 9, 9, 9))]),
    ]
    batch = collate_packed(rows, pad_id=0)
    assert set(batch) == {"input_ids", "labels", "position_ids", "use_cache"}
    assert batch["use_cache"] is False
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [8, 9, 9, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 0, 0], [0, 1, 2, 3]]  # padding is its own sequence
    assert batch["labels"].tolist() == [[-100, 6, -100, -100], [-100, 9, 9, 9]]


def test_transformers_sees_the_packed_sequences():
    # The mechanism the packed path relies on (transformers.masking_utils): new sequence wherever the
    # position does not go up by one.
    from transformers.masking_utils import find_packed_sequence_indices

    rows = [
        pack_row([Example((5, 6), (5, 6)), Example((7,), (7,))]),
        pack_row([Example((8, 9, 9, 9), (8, 9, 9, 9))]),
    ]
    batch = collate_packed(rows, pad_id=0)
    sequences = find_packed_sequence_indices(batch["position_ids"])
    assert sequences is not None
    assert sequences.tolist() == [[0, 0, 1, 2], [0, 0, 0, 0]]


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-position cross entropy with the model's label shift: (B, T-1), 0 where ignored."""
    return F.cross_entropy(
        logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=IGNORE_INDEX, reduction="none"
    )


def tiny_llama(vocab_size: int, attn: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=MAX_LENGTH,
        attn_implementation=attn,
    )
    # Train mode, as in fine-tuning (Llama has no dropout by default, so it is deterministic).
    return LlamaForCausalLM(config).to(dtype).train()


def make_datasets(tokenizer, train_on_prompt: bool):
    unpacked, _ = build_dataset(RECORDS, tokenizer, max_length=MAX_LENGTH, train_on_prompt=train_on_prompt)
    packed, report = build_dataset(
        RECORDS, tokenizer, max_length=MAX_LENGTH, train_on_prompt=train_on_prompt, pack=True
    )
    plan = plan_packing([len(example) for example in unpacked.items], MAX_LENGTH)
    # The packed dataset is exactly the plan applied to the unpacked examples.
    assert packed.items == tuple(pack_row([unpacked.items[i] for i in row]) for row in plan)
    assert 1 < report.num_rows < report.num_examples, "the test needs rows holding several examples"
    return unpacked, packed, plan


# In float64 the only difference between the two paths is the attention mask, so the per-example
# losses (sums of ~5-20 token losses of ~6 each) agree far inside 1e-5. In float32 the sums alone
# carry rounding of a few 1e-6, so the check there is looser. train_on_prompt=True trains the first
# token of every example, so there the boundary labels of the packed rows are what keeps the
# losses equal; flatten=True is the batch-size-1 layout for flash attention.
@pytest.mark.parametrize(
    ("attn", "dtype", "tolerance", "train_on_prompt", "flatten"),
    [
        ("eager", torch.float64, 1e-5, False, False),
        ("sdpa", torch.float64, 1e-5, False, False),
        ("sdpa", torch.float64, 1e-5, True, False),
        ("eager", torch.float64, 1e-5, True, True),
        ("eager", torch.float32, 1e-4, False, False),
        ("sdpa", torch.float32, 1e-4, False, False),
    ],
    ids=["eager-f64", "sdpa-f64", "sdpa-f64-train_on_prompt", "eager-f64-flattened", "eager-f32", "sdpa-f32"],
)
def test_packed_loss_equals_unpacked_loss(tokenizer, attn, dtype, tolerance, train_on_prompt, flatten):
    unpacked, packed, plan = make_datasets(tokenizer, train_on_prompt)
    model = tiny_llama(len(tokenizer), attn, dtype)
    with torch.no_grad():
        # Unpacked: one example at a time, the per-example loss is the sum of its token losses.
        expected = []
        for example in unpacked.items:
            batch = collate_examples([example], unpacked.pad_id)
            expected.append(token_losses(model(**batch).logits, batch["labels"]).sum().item())

        # Packed: every row in one padded batch, or all rows in one flattened row.
        batch = collate_packed(packed.items, packed.pad_id, flatten=flatten)
        assert "attention_mask" not in batch
        output = model(**batch)
        losses = token_losses(output.logits, batch["labels"])
        # The example each predicted token (position t + 1) belongs to, counted within its row.
        example_of = (batch["position_ids"] == 0).cumsum(dim=1)[:, 1:] - 1
        layout = [[i for row in plan for i in row]] if flatten else plan
        assert batch["input_ids"].shape[0] == len(layout)
        for row_index, row in enumerate(layout):
            for slot, example_index in enumerate(row):
                got = losses[row_index][example_of[row_index] == slot].sum().item()
                assert got == pytest.approx(expected[example_index], abs=tolerance), (row_index, slot)

        # The model's own loss (mean over trained tokens) matches too.
        num_tokens = sum(example.num_label_tokens for example in unpacked.items)
        assert output.loss.item() == pytest.approx(sum(expected) / num_tokens, abs=tolerance)

        # Controls: the equality is not an accident of the test. An attention mask, or a KV cache
        # (the model's default), switches off transformers' packed-sequence detection, so examples
        # see each other and the losses change.
        for leak in ({"attention_mask": torch.ones_like(batch["input_ids"])}, {"use_cache": True}):
            leaky = model(**{**batch, **leak})
            leaky_loss = token_losses(leaky.logits, batch["labels"])
            assert (leaky_loss - losses).abs().max().item() > 1e-3, leak


def test_boundary_labels_are_masked_when_the_first_token_is_trained(tokenizer):
    unpacked, packed, _ = make_datasets(tokenizer, train_on_prompt=True)
    assert all(example.labels[0] != IGNORE_INDEX for example in unpacked.items)
    batch = packed.collate(packed.items)
    starts = batch["position_ids"] == 0
    assert (batch["labels"][starts] == IGNORE_INDEX).all()
    # So the packed batch trains exactly the tokens the examples train on their own.
    trained = int((batch["labels"] != IGNORE_INDEX).sum())
    assert trained == sum(example.num_label_tokens for example in unpacked.items)


def test_flattened_batch_is_one_row_without_padding():
    rows = [
        pack_row([Example((5, 6), (5, 6)), Example((7,), (7,))]),
        pack_row([Example((8, 9, 9), (8, 9, 9))]),
    ]
    batch = collate_packed(rows, pad_id=0, flatten=True)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 0, 0, 1, 2]]
    assert batch["labels"].tolist() == [[-100, 6, -100, -100, 9, 9]]
