"""Formatting and tokenizing: prompt/answer split, label masking, EOS, truncation and drop counts."""

from __future__ import annotations

import pytest

from lorakit.data import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_NO_INPUT,
    IGNORE_INDEX,
    AlpacaRecord,
    ChatRecord,
    CompletionRecord,
    Message,
    TextRecord,
    build_dataset,
    format_record,
)
from lorakit.data.tokenize import encode_formatted, special_prefix, truncate

CONVERSATION = ChatRecord(
    (
        Message("system", "You are a helpful assistant."),
        Message("user", "hello"),
        Message("assistant", "hello world"),
        Message("user", "What is the capital of France?"),
        Message("assistant", "Paris"),
    )
)


def trained_text(tokenizer, example) -> str:
    return tokenizer.decode([label for label in example.labels if label != IGNORE_INDEX])


def encode(record, tokenizer, **kwargs):
    return encode_formatted(format_record(record, tokenizer), tokenizer, **kwargs)


def test_alpaca_template_is_the_stanford_one():
    with_input = format_record(AlpacaRecord("Add the numbers.", "1 2", "3"))
    assert with_input.prompt == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd the numbers.\n\n### Input:\n1 2\n\n### Response:\n"
    )
    assert with_input.prompt == ALPACA_PROMPT.format(instruction="Add the numbers.", input="1 2")
    no_input = format_record(AlpacaRecord("Say hi.", "", "hi"))
    assert no_input.prompt == (
        "Below is an instruction that describes a task. Write a response that appropriately completes "
        "the request.\n\n### Instruction:\nSay hi.\n\n### Response:\n"
    )
    assert no_input.prompt == ALPACA_PROMPT_NO_INPUT.format(instruction="Say hi.")
    assert [s.trained for s in with_input.segments] == [False, True]
    assert with_input.segments[1].text == with_input.answer == "3"


def test_special_prefix_follows_the_tokenizer(tokenizer, chatml_tokenizer):
    assert special_prefix(tokenizer) == (tokenizer.bos_token_id,)
    assert special_prefix(chatml_tokenizer) == ()


@pytest.mark.parametrize(
    "record",
    [
        AlpacaRecord("Translate to German", "good morning", "Guten Morgen"),
        AlpacaRecord("Translate to German: good morning", "", "Guten Morgen"),
        CompletionRecord("Question: What is the capital of France? Answer:", " Paris"),
    ],
)
def test_labels_are_the_answer_and_eos(tokenizer, record):
    example = encode(record, tokenizer)
    answer = record.output if isinstance(record, AlpacaRecord) else record.completion
    assert trained_text(tokenizer, example) == answer + "</s>"
    assert example.input_ids[0] == tokenizer.bos_token_id and example.labels[0] == IGNORE_INDEX
    assert example.input_ids[-1] == tokenizer.eos_token_id
    # The masked part is exactly the prompt, and the rest is trained: labels equal the ids there.
    first = next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)
    assert tokenizer.decode(example.input_ids[1:first]) == format_record(record).prompt
    assert example.labels[first:] == example.input_ids[first:]


def test_text_is_all_trained(tokenizer):
    example = encode(TextRecord("The quick brown fox."), tokenizer)
    assert trained_text(tokenizer, example) == "The quick brown fox.</s>"
    assert example.input_ids[0] == tokenizer.bos_token_id


def test_train_on_prompt_trains_everything(tokenizer):
    example = encode(CompletionRecord("Question: 1+1? Answer:", " 2"), tokenizer, train_on_prompt=True)
    assert example.labels == example.input_ids


def test_chat_trains_every_assistant_turn(tokenizer):
    example = encode(CONVERSATION, tokenizer)
    full = tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in CONVERSATION.messages], tokenize=False
    )
    # The template writes the text; no BOS is added in front of it.
    assert tokenizer.decode(example.input_ids) == full + "</s>"
    assert trained_text(tokenizer, example) == "hello world<|im_end|>\nParis<|im_end|>\n</s>"


def test_chat_eos_from_the_template_is_not_repeated(chatml_tokenizer):
    example = encode(CONVERSATION, chatml_tokenizer)
    assert trained_text(chatml_tokenizer, example) == "hello world<|im_end|>\nParis<|im_end|>\n"
    assert example.input_ids.count(chatml_tokenizer.eos_token_id) == len(CONVERSATION.messages)


def test_chat_prompt_ends_with_the_generation_prompt(tokenizer):
    formatted = format_record(CONVERSATION, tokenizer)
    assert formatted.prompt.endswith("What is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    assert formatted.answer == "Paris"


def test_template_that_rewrites_earlier_turns_trains_the_last_turn(tokenizer, make_tokenizer):
    # Earlier assistant turns are rendered differently from the last one (as templates that drop
    # reasoning do), so the conversation is not a chain of prefixes: only the last turn is trained.
    rewriting = tokenizer.chat_template.replace(
        "{{ m['content'] }}",
        "{% if m['role'] == 'assistant' and not loop.last %}...{% else %}{{ m['content'] }}{% endif %}",
    )
    tokenizer = make_tokenizer(chat_template=rewriting)
    example = encode(CONVERSATION, tokenizer)
    assert trained_text(tokenizer, example) == "Paris<|im_end|>\n</s>"
    assert "<|im_start|>assistant\n...<|im_end|>" in tokenizer.decode(example.input_ids)


def test_chat_needs_a_template(make_tokenizer):
    tokenizer = make_tokenizer(chat_template=None)
    record = ChatRecord(CONVERSATION.messages, origin="train.jsonl:3")
    with pytest.raises(
        ValueError, match="train.jsonl:3: chat records are rendered with the tokenizer's chat"
    ):
        build_dataset([record], tokenizer)


def test_prompt_tokens_are_those_of_the_prompt_alone(tokenizer):
    # A prompt ending in a space: the space and the answer's first word would merge into one token
    # if tokenized together; the prompt must keep the tokens that generation will see.
    record = CompletionRecord("Question: 1+1? Answer: ", "2")
    example = encode(record, tokenizer)
    prompt_ids = tokenizer.encode(record.prompt)
    assert example.input_ids[: len(prompt_ids)] == tuple(prompt_ids)
    assert trained_text(tokenizer, example) == "2</s>"


def test_truncation_keeps_the_start_and_reports_counts(tokenizer):
    short = CompletionRecord("Q:", " yes")
    long_answer = CompletionRecord("Q:", " The quick brown fox jumps over the lazy dog." * 3)
    long_prompt = CompletionRecord("The quick brown fox jumps over the lazy dog. " * 3, " yes")
    full = [encode(r, tokenizer) for r in (short, long_answer, long_prompt)]
    max_length = 16
    assert len(full[0]) <= max_length < len(full[1]) and len(full[2]) > max_length

    dataset, report = build_dataset([short, long_answer, long_prompt], tokenizer, max_length=max_length)
    assert (report.num_records, report.num_examples, report.num_truncated, report.num_dropped) == (3, 2, 1, 1)
    assert dataset.items == (full[0], truncate(full[1], max_length))
    kept = dataset.items[1]
    assert len(kept) == max_length and kept.input_ids == full[1].input_ids[:max_length]
    assert report.num_tokens == len(full[0]) + max_length
    assert report.num_label_tokens == sum(e.num_label_tokens for e in dataset.items)
    assert "1 truncated, 1 dropped" in report.summary()


def test_nothing_left_is_an_error(tokenizer):
    record = CompletionRecord("The quick brown fox jumps over the lazy dog.", " yes")
    with pytest.raises(ValueError, match="no example left out of 1 records.*max_length=4"):
        build_dataset([record], tokenizer, max_length=4)
    with pytest.raises(ValueError, match="max_length must be at least 2"):
        build_dataset([record], tokenizer, max_length=1)
