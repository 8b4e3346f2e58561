"""Generating text from a model and tokenizer: chat formatting, batching and streaming.

Batched prompts are left-padded here, so every row's last prompt token sits in the last column
and new tokens line up after it; the tokenizer's own padding side (right, for training) is left
untouched, and it needs no pad token (the pad or else the eos id fills the gaps, masked out).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from lorakit.hf.context import model_context, tokens_to_generate

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase
    from transformers.generation.streamers import BaseStreamer


def generate_text(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int = 64,
    chat: bool = True,
    stream: Callable[[str], object] | BaseStreamer | None = None,
    **generate_kwargs: Any,
) -> list[str]:
    """Generate a completion for each prompt, greedily unless told otherwise.

    Args:
        model: A transformers causal language model (LoRA-adapted or not).
        tokenizer: Its tokenizer.
        prompts: The prompts, one completion each. A single prompt still goes in a list.
        max_new_tokens: Upper bound on generated tokens per prompt; generation stops earlier at
            the model's end-of-sequence token. The longest prompt plus this must fit the model's
            context.
        chat: If True, wrap each prompt as one user message with the tokenizer's chat template
            (and the assistant header after it); if False, continue the raw text.
        stream: For a single prompt only: a callable that receives each piece of new text as it
            is produced, or a transformers streamer (e.g. `TextStreamer(tokenizer,
            skip_prompt=True)`). None streams nothing.
        **generate_kwargs: Passed to `model.generate`, e.g. `do_sample=True, temperature=0.7`.
            The default is greedy decoding (`do_sample=False`).

    Returns:
        The generated text for each prompt, without the prompt and without special tokens.

    Raises:
        TypeError: If `prompts` is a bare string or holds non-strings, or `stream` is neither a
            callable nor a streamer.
        ValueError: If `prompts` is empty or a prompt tokenizes to nothing, `max_new_tokens` < 1,
            `stream` is given for more than one prompt, `chat` is True but the tokenizer has no
            chat template, a batch needs padding and the tokenizer has neither pad nor eos
            token, or the (longest) prompt plus `max_new_tokens` does not fit the model's context
            (`max_position_embeddings`, the rule `lorakit serve` applies).
    """
    prompts = _check_prompts(prompts)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    streamer = _make_streamer(tokenizer, stream, len(prompts))
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_token_id is None and len(prompts) > 1:
        raise ValueError(
            "the tokenizer has neither a pad token nor an eos token, so a batch cannot be padded"
        )

    texts = [format_chat(tokenizer, prompt) for prompt in prompts] if chat else prompts
    # A chat template writes any BOS itself; adding special tokens again would double it.
    rows = tokenizer(texts, add_special_tokens=not chat)["input_ids"]
    empty = [index for index, row in enumerate(rows) if not row]
    if empty:
        raise ValueError(
            f"prompts at indices {empty} are empty after tokenization; give some text to continue"
        )
    input_ids, attention_mask = left_pad(rows, pad_token_id if pad_token_id is not None else 0)
    # Checked before generating: a rotary model decodes on past its context without complaint.
    tokens_to_generate(input_ids.shape[1], max_new_tokens, model_context(model), "max_new_tokens")
    options: dict[str, Any] = {"do_sample": False, **generate_kwargs}

    with _eval_mode(model):
        output = model.generate(  # type: ignore[operator]  # mypy sees nn.Module.__getattr__
            input_ids=input_ids.to(model.device),
            attention_mask=attention_mask.to(model.device),
            max_new_tokens=max_new_tokens,
            pad_token_id=pad_token_id,
            streamer=streamer,
            **options,
        )
    new_tokens = output[:, input_ids.shape[1] :]
    return tokenizer.batch_decode(new_tokens, skip_special_tokens=True)


def format_chat(tokenizer: PreTrainedTokenizerBase, prompt: str) -> str:
    """Return `prompt` as a single user turn, followed by the assistant header.

    Raises:
        ValueError: If the tokenizer has no chat template.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"the tokenizer ({type(tokenizer).__name__}, {tokenizer.name_or_path!r}) has no chat template; "
            "pass chat=False to continue raw text instead"
        )
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    assert isinstance(text, str), "apply_chat_template(tokenize=False) returns a string"
    return text


def left_pad(rows: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack token rows into one batch, padding on the left.

    Args:
        rows: Token ids per prompt, of varying lengths.
        pad_token_id: The id to fill with; masked out, so any id works.

    Returns:
        `(input_ids, attention_mask)`, both (batch, longest row), the mask 1 on real tokens.
    """
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        input_ids[index, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        attention_mask[index, width - len(row) :] = 1
    return input_ids, attention_mask


def _check_prompts(prompts: list[str]) -> list[str]:
    """Return `prompts` as a list after checking it is a non-empty list of strings."""
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings; wrap a single prompt as [prompt]")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is empty; give at least one prompt")
    bad = [
        (index, type(prompt).__name__) for index, prompt in enumerate(prompts) if not isinstance(prompt, str)
    ]
    if bad:
        raise TypeError(f"prompts must all be strings; these are not (index, type): {bad}")
    return prompts


def _make_streamer(
    tokenizer: PreTrainedTokenizerBase, stream: Callable[[str], object] | BaseStreamer | None, batch: int
) -> BaseStreamer | None:
    """Turn the `stream` argument into something `model.generate` accepts."""
    if stream is None:
        return None
    if batch != 1:
        raise ValueError(f"streaming works for a single prompt only, got {batch} prompts; pass stream=None")
    # transformers' streamers are duck-typed: generate only calls put(token_ids) and end().
    if hasattr(stream, "put") and hasattr(stream, "end"):
        return stream  # type: ignore[return-value]
    if callable(stream):
        from lorakit.hf.streaming import CallbackStreamer

        return CallbackStreamer(tokenizer, stream)
    raise TypeError(
        f"stream must be None, a callable taking each new piece of text, or a transformers streamer; "
        f"got {type(stream).__name__}"
    )


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Run the block with dropout off, then give every submodule back its own train/eval flag.

    Generating in train mode would apply dropout to each step. Restoring per module (rather than
    `model.train(previous)`) keeps any mix of modes the caller had set up.
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
