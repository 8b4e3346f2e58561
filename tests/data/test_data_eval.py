"""Evaluation pairs: the prompt a model is given and the reference answer."""

from __future__ import annotations

import pytest

from lorakit.data import (
    AlpacaRecord,
    ChatRecord,
    CompletionRecord,
    Message,
    TextRecord,
    build_dataset,
    eval_pairs,
    exact_match,
)

RECORDS = [
    ChatRecord(
        (
            Message("user", "hello"),
            Message("assistant", "hello world"),
            Message("user", "What is the capital of France?"),
            Message("assistant", "Paris"),
        )
    ),
    AlpacaRecord("Translate to German", "good morning", "Guten Morgen"),
    CompletionRecord("Question: 1+1? Answer: ", "2"),
]


@pytest.mark.parametrize("fixture", ["tokenizer", "chatml_tokenizer"])
def test_prompt_ids_start_the_training_example(request, fixture):
    tokenizer = request.getfixturevalue(fixture)
    pairs = eval_pairs(RECORDS, tokenizer)
    dataset, _ = build_dataset(RECORDS, tokenizer, max_length=512)
    assert [pair.answer for pair in pairs] == ["Paris", "Guten Morgen", "2"]
    for pair, example in zip(pairs, dataset.items, strict=True):
        n = len(pair.prompt_ids)
        assert example.input_ids[:n] == pair.prompt_ids
        # What follows the prompt in training is exactly the trained answer.
        assert all(label != -100 for label in example.labels[n:])
        assert all(label == -100 for label in example.labels[:n][-3:])


def test_prompts_are_the_training_prompts(tokenizer):
    chat, alpaca, completion = eval_pairs(RECORDS, tokenizer)
    assert chat.prompt.endswith("What is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    assert chat.prompt.startswith("<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\nhello world")
    assert alpaca.prompt.endswith("### Input:\ngood morning\n\n### Response:\n")
    assert completion.prompt == "Question: 1+1? Answer: "
    assert completion.prompt_ids == tuple(tokenizer.encode(completion.prompt))  # BOS included
    assert chat.prompt_ids == tuple(tokenizer.encode(chat.prompt, add_special_tokens=False))


def test_text_records_have_no_pairs(tokenizer):
    with pytest.raises(ValueError, match="data.jsonl:4: text records have no prompt/answer split"):
        eval_pairs([TextRecord("hello", origin="data.jsonl:4")], tokenizer)


def test_exact_match_ignores_surrounding_whitespace():
    assert exact_match(" Paris\n", "Paris")
    assert not exact_match("paris", "Paris")
