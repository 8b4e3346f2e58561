"""generate_text on a tiny random Llama: greedy, batched with left padding, chat, streaming."""

from __future__ import annotations

import pytest
from transformers import TextStreamer

from lorakit.hf import generate_text, load_model
from lorakit.hf.generate import format_chat, left_pad

PROMPTS = ["hello", "what is the capital of france? the capital of"]


@pytest.fixture(scope="module")
def loaded(tiny):
    return load_model(str(tiny.folder))


def test_greedy_is_deterministic_and_bounded(loaded):
    model, tokenizer = loaded
    first = generate_text(model, tokenizer, PROMPTS[:1], max_new_tokens=6)
    assert first == generate_text(model, tokenizer, PROMPTS[:1], max_new_tokens=6)
    assert isinstance(first[0], str)
    assert len(tokenizer.encode(first[0])) <= 6 + 2  # decoding then re-encoding may split differently


def test_batch_equals_one_by_one(loaded):
    # Left padding plus the attention mask must leave each row's continuation unchanged.
    model, tokenizer = loaded
    for chat in (True, False):
        batched = generate_text(model, tokenizer, PROMPTS, max_new_tokens=8, chat=chat)
        alone = [
            generate_text(model, tokenizer, [prompt], max_new_tokens=8, chat=chat)[0] for prompt in PROMPTS
        ]
        assert batched == alone


def test_chat_applies_the_template(loaded):
    model, tokenizer = loaded
    formatted = format_chat(tokenizer, "hello")
    assert formatted == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    chat = generate_text(model, tokenizer, ["hello"], max_new_tokens=5)
    raw = generate_text(model, tokenizer, [formatted], max_new_tokens=5, chat=False)
    assert chat == raw


def test_tokenizer_padding_side_is_left_alone(loaded):
    model, tokenizer = loaded
    generate_text(model, tokenizer, PROMPTS, max_new_tokens=2)
    assert tokenizer.padding_side == "right"


def test_stream_to_a_callback(loaded):
    model, tokenizer = loaded
    pieces: list[str] = []
    result = generate_text(model, tokenizer, ["hello"], max_new_tokens=10, stream=pieces.append)
    assert pieces
    assert "".join(pieces) == result[0]


def test_stream_to_a_text_streamer(loaded, capsys: pytest.CaptureFixture[str]):
    model, tokenizer = loaded
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    result = generate_text(model, tokenizer, ["hello"], max_new_tokens=10, stream=streamer)
    assert capsys.readouterr().out.strip() == result[0].strip()


def test_streaming_needs_a_single_prompt(loaded):
    model, tokenizer = loaded
    with pytest.raises(ValueError, match="single prompt only, got 2 prompts"):
        generate_text(model, tokenizer, PROMPTS, stream=print)


def test_sampling_options_pass_through(loaded):
    model, tokenizer = loaded
    out = generate_text(
        model, tokenizer, ["hello"], max_new_tokens=4, do_sample=True, temperature=1.5, top_k=50
    )
    assert isinstance(out[0], str)


def test_train_mode_is_restored(loaded):
    model, tokenizer = loaded
    model.train()
    model.model.layers[0].eval()  # a mixed state must survive too
    try:
        generate_text(model, tokenizer, ["hello"], max_new_tokens=2)
        assert model.training
        assert not model.model.layers[0].training
        assert model.model.layers[1].training
    finally:
        model.eval()


def test_bad_prompts(loaded):
    model, tokenizer = loaded
    with pytest.raises(TypeError, match=r"wrap a single prompt as \[prompt\]"):
        generate_text(model, tokenizer, "hello")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="prompts is empty"):
        generate_text(model, tokenizer, [])
    with pytest.raises(TypeError, match=r"\(1, 'int'\)"):
        generate_text(model, tokenizer, ["hello", 3])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="max_new_tokens must be at least 1, got 0"):
        generate_text(model, tokenizer, ["hello"], max_new_tokens=0)
    with pytest.raises(ValueError, match=r"indices \[0\] are empty"):
        generate_text(model, tokenizer, [""], chat=False)
    with pytest.raises(TypeError, match="stream must be None, a callable"):
        generate_text(model, tokenizer, ["hello"], stream=42)  # type: ignore[arg-type]


def test_chat_without_template(tiny):
    model, tokenizer = load_model(str(tiny.folder))  # a private copy: the fixture's stays intact
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="has no chat template; pass chat=False"):
        generate_text(model, tokenizer, ["hello"])
    assert generate_text(model, tokenizer, ["hello"], max_new_tokens=2, chat=False)


def test_left_pad():
    input_ids, mask = left_pad([[1, 2, 3], [4]], pad_token_id=0)
    assert input_ids.tolist() == [[1, 2, 3], [0, 0, 4]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
