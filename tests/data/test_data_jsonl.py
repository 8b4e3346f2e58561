"""Reading JSONL: format detection and forcing, bad-line messages, skipping."""

from __future__ import annotations

import re

import pytest

from lorakit.data import (
    AlpacaRecord,
    ChatRecord,
    CompletionRecord,
    DataFileError,
    Message,
    TextRecord,
    load_records,
)

CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
ALPACA = {"instruction": "Add", "input": "1 2", "output": "3"}
COMPLETION = {"prompt": "Q: 1+1? A:", "completion": " 2"}
TEXT = {"text": "The quick brown fox."}


@pytest.mark.parametrize(
    ("line", "fmt", "expected"),
    [
        (CHAT, "chat", ChatRecord((Message("user", "hi"), Message("assistant", "hello")))),
        (ALPACA, "alpaca", AlpacaRecord("Add", "1 2", "3")),
        (COMPLETION, "completion", CompletionRecord("Q: 1+1? A:", " 2")),
        (TEXT, "text", TextRecord("The quick brown fox.")),
    ],
)
def test_detects_each_format(write_jsonl, line, fmt, expected):
    path = write_jsonl([line, line])
    records, report = load_records(path)
    assert report.format == fmt
    assert report.num_records == 2 and report.num_skipped == 0
    assert records[0] == expected.__class__(**{**expected.__dict__, "origin": f"{path}:1"})
    assert records[1].origin == f"{path}:2"


def test_alpaca_input_is_optional(write_jsonl):
    path = write_jsonl(
        [{"instruction": "Say hi", "output": "hi"}, {"instruction": "x", "input": None, "output": "y"}]
    )
    records, _ = load_records(path)
    assert [r.input for r in records] == ["", ""]


def test_extra_keys_are_ignored(write_jsonl):
    records, _ = load_records(write_jsonl([{**COMPLETION, "id": 7, "source": "web"}]))
    assert records[0] == CompletionRecord("Q: 1+1? A:", " 2", origin=records[0].origin)


def test_blank_lines_are_ignored_and_line_numbers_count_them(write_jsonl):
    path = write_jsonl([TEXT, "", "   ", TEXT, "", '{"text": 3}'])
    with pytest.raises(DataFileError) as caught:
        load_records(path)
    assert caught.value.line == 6
    assert str(caught.value) == f"{path}:6: 'text' must be a string, found a number"


def test_forced_format_rejects_other_records(write_jsonl):
    path = write_jsonl([TEXT])
    with pytest.raises(
        DataFileError, match=re.escape(f"{path}:1: expected a record of the completion format")
    ):
        load_records(path, format="completion")
    records, report = load_records(write_jsonl([COMPLETION]), format="completion")
    assert report.format == "completion" and len(records) == 1


def test_forcing_picks_between_formats_of_an_ambiguous_record(write_jsonl):
    both = {**COMPLETION, **TEXT}
    assert load_records(write_jsonl([both]))[1].format == "completion"  # detection order
    assert load_records(write_jsonl([both]), format="text")[1].format == "text"


def test_every_record_must_have_the_detected_format(write_jsonl):
    path = write_jsonl([ALPACA, ALPACA, COMPLETION])
    with pytest.raises(DataFileError) as caught:
        load_records(path)
    message = str(caught.value)
    assert message.startswith(f"{path}:3: expected a record of the alpaca format")
    assert "missing 'instruction', 'output'" in message and "'prompt', 'completion'" in message


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ('{"prompt": "a", "completion": ', "invalid JSON"),
        ("[1, 2]", "expected a JSON object, found a list"),
        ('{"foo": 1}', "unknown record format: expected keys 'messages' (chat)"),
        ('{"prompt": "a"}', "unknown record format"),
        ('{"prompt": "a", "completion": ""}', "'completion' (the answer) is empty"),
        ('{"prompt": "a", "completion": "  \\n"}', "'completion' (the answer) is empty"),
        ('{"prompt": ["a"], "completion": "b"}', "'prompt' must be a string, found a list"),
        ('{"instruction": "a", "input": 5, "output": "b"}', "'input' must be a string, found a number"),
        ('{"instruction": "a", "output": null}', "'output' must be a string, found null"),
        ('{"text": ""}', "'text' is empty"),
        ('{"messages": "hi"}', "'messages' must be a list"),
        ('{"messages": []}', "'messages' is empty"),
        ('{"messages": [{"role": "user"}]}', "messages[0] has no 'content'"),
        (
            '{"messages": [{"role": "user", "content": 1}]}',
            "messages[0].content must be a string, found a number",
        ),
        (
            '{"messages": [{"role": "user", "content": "hi"}]}',
            "the last message must be the assistant's answer",
        ),
        (
            '{"messages": [{"role": "assistant", "content": ""}]}',
            "the last assistant message (messages[0]) is empty",
        ),
    ],
)
def test_bad_line_names_file_line_and_problem(write_jsonl, bad, reason):
    path = write_jsonl([bad])
    with pytest.raises(DataFileError) as caught:
        load_records(path)
    assert caught.value.path == str(path) and caught.value.line == 1
    assert str(caught.value).startswith(f"{path}:1: ")
    assert reason in str(caught.value)


def test_skip_bad_skips_and_reports(write_jsonl):
    path = write_jsonl(["not json", COMPLETION, "", {"prompt": "x", "completion": ""}, COMPLETION, TEXT])
    records, report = load_records(path, skip_bad=True)
    assert len(records) == 2 and report.num_records == 2
    assert [bad.line for bad in report.skipped] == [1, 4, 6]
    assert report.skipped[0].reason.startswith("invalid JSON")
    assert "empty" in report.skipped[1].reason
    assert "expected a record of the completion format" in report.skipped[2].reason


def test_detection_uses_first_valid_record_when_skipping(write_jsonl):
    # The first line looks like alpaca but is broken; it must not fix the format of the file.
    path = write_jsonl([{"instruction": "a", "output": ""}, TEXT, TEXT])
    records, report = load_records(path, skip_bad=True)
    assert report.format == "text" and len(records) == 2


def test_encoding(tmp_path):
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "caf\xc3\xa9"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataFileError, match=r"bytes.jsonl:2: not valid UTF-8 \(byte 14 of the line\)"):
        load_records(path)
    records, report = load_records(path, skip_bad=True)  # the byte-order mark of line 1 is allowed
    assert records[0].text == "café" and report.skipped[0].line == 2


def test_no_valid_records_is_an_error(write_jsonl, tmp_path):
    with pytest.raises(
        DataFileError, match=r"no valid records \(2 bad lines skipped; the first, line 1: invalid"
    ):
        load_records(write_jsonl(["{", "nope"]), skip_bad=True)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataFileError, match="empty.jsonl: no valid records"):
        load_records(empty)
    with pytest.raises(DataFileError, match="missing.jsonl: no such file"):
        load_records(tmp_path / "missing.jsonl")


def test_unknown_format_name(write_jsonl):
    with pytest.raises(ValueError, match="format='sharegpt' is not accepted; use one of auto, chat, alpaca"):
        load_records(write_jsonl([TEXT]), format="sharegpt")  # type: ignore[arg-type]
