"""From a record to text: which parts are prompt (not trained) and which are answer (trained).

A formatted record is a list of text segments, each marked trained or not:

- chat: rendered with the tokenizer's chat template. Every assistant turn is trained; everything
  else (system and user turns, the template's role headers, the generation prompt that opens an
  assistant turn) is prompt. The template's own end-of-turn marker belongs to the trained turn,
  so the model learns to stop.
- alpaca: `ALPACA_PROMPT` (or `ALPACA_PROMPT_NO_INPUT` when the input is empty) is the prompt, the
  output is the answer.
- completion: the prompt, then the completion as the answer; nothing is inserted between them.
- text: one trained segment.

The final answer gets the tokenizer's EOS token when it does not already contain it (that is
done at tokenization, see `lorakit.data.tokenize`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lorakit.data.records import AlpacaRecord, ChatRecord, CompletionRecord, Message, Record, TextRecord

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
"""The Stanford Alpaca prompt for records with an input; the output follows it directly."""

ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
"""The Stanford Alpaca prompt for records whose input is absent or empty."""


@dataclass(frozen=True)
class Segment:
    """A piece of the training text."""

    text: str
    """The text, exactly as it is tokenized."""
    trained: bool
    """Whether its tokens are answer tokens (kept in the labels)."""


@dataclass(frozen=True)
class Formatted:
    """A record as text, split into prompt and answer segments."""

    segments: tuple[Segment, ...]
    """The full text in order; the last segment is the final answer and is trained."""
    templated: bool
    """True when a chat template wrote the text, special tokens (BOS) included; the tokenizer must
    then not add its own. False for the other formats, which get the tokenizer's usual BOS."""
    answer: str
    """The reference answer for evaluation: the last assistant message, the output or the
    completion; "" for text records."""

    @property
    def prompt(self) -> str:
        """Everything before the final answer: what a model is given to generate the answer."""
        return "".join(segment.text for segment in self.segments[:-1])


def format_record(record: Record, tokenizer: PreTrainedTokenizerBase | None = None) -> Formatted:
    """Split a record into prompt and answer text.

    Args:
        record: The record.
        tokenizer: Needed for chat records only (its ``chat_template`` renders them).

    Returns:
        The segments, the reference answer and whether a chat template wrote them.

    Raises:
        ValueError: If a chat record meets a tokenizer without a chat template, or a template that
            does not render the conversation as prompt followed by answer.
    """
    if isinstance(record, ChatRecord):
        return _format_chat(record, tokenizer)
    if isinstance(record, AlpacaRecord):
        template = ALPACA_PROMPT if record.input else ALPACA_PROMPT_NO_INPUT
        prompt = template.format(instruction=record.instruction, input=record.input)
        return _prompt_answer(prompt, record.output)
    if isinstance(record, CompletionRecord):
        return _prompt_answer(record.prompt, record.completion)
    if isinstance(record, TextRecord):
        return Formatted(segments=(Segment(record.text, trained=True),), templated=False, answer="")
    raise TypeError(
        f"expected a record (ChatRecord, AlpacaRecord, CompletionRecord, TextRecord), got {record!r}"
    )


def _prompt_answer(prompt: str, answer: str) -> Formatted:
    segments = (Segment(prompt, trained=False), Segment(answer, trained=True))
    return Formatted(segments=segments, templated=False, answer=answer)


def _format_chat(record: ChatRecord, tokenizer: PreTrainedTokenizerBase | None) -> Formatted:
    where = f"{record.origin}: " if record.origin else ""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"{where}chat records are rendered with the tokenizer's chat template, and "
            f"{'no tokenizer was given' if tokenizer is None else 'this tokenizer has none'}; "
            "set tokenizer.chat_template, or convert the data to the 'completion' format"
        )
    messages = record.messages
    answer = messages[-1].content
    segments = _all_assistant_turns(messages, tokenizer, where)
    if segments is None:
        # Some templates render earlier assistant turns differently from the last one (e.g. they
        # drop reasoning), so the conversation is not a chain of prefixes. Then only the last
        # turn is trained: everything before it is one prompt segment.
        prompt = _render(tokenizer, messages[:-1], True, where)
        full = _render(tokenizer, messages, False, where)
        if not full.startswith(prompt) or len(full) == len(prompt):
            raise ValueError(
                f"{where}the chat template does not render the conversation as the prompt (with the "
                "generation prompt) followed by the last assistant turn; prompt rendered as "
                f"{prompt[-80:]!r}, full conversation as {full[-120:]!r}"
            )
        segments = (Segment(prompt, trained=False), Segment(full[len(prompt) :], trained=True))
    return Formatted(segments=segments, templated=True, answer=answer)


def _all_assistant_turns(
    messages: tuple[Message, ...], tokenizer: Any, where: str
) -> tuple[Segment, ...] | None:
    """Segments with every assistant turn trained, or None if the template is not prefix-stable.

    For assistant turn i, the text up to and including its generation prompt is
    ``render(messages[:i], generation_prompt=True)`` and the text through its end is
    ``render(messages[:i + 1])``; each must extend the previous one for the split to be exact.
    """
    segments: list[Segment] = []
    done = ""
    for i, message in enumerate(messages):
        if message.role != "assistant":
            continue
        try:
            before = _render(tokenizer, messages[:i], True, where)
            through = _render(tokenizer, messages[: i + 1], False, where)
        except ValueError:
            # Some templates refuse partial conversations (e.g. one that starts with an assistant).
            return None
        if not (before.startswith(done) and through.startswith(before) and len(through) > len(before)):
            return None
        if len(before) > len(done):
            segments.append(Segment(before[len(done) :], trained=False))
        segments.append(Segment(through[len(before) :], trained=True))
        done = through
    return tuple(segments)


def _render(tokenizer: Any, messages: tuple[Message, ...], generation_prompt: bool, where: str) -> str:
    conversation = [{"role": m.role, "content": m.content} for m in messages]
    try:
        text = tokenizer.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as error:  # Jinja raises many types, including the template's own raise_exception
        roles = ", ".join(m.role for m in messages) or "no messages"
        raise ValueError(f"{where}the chat template failed on the turns ({roles}): {error}") from error
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, expected str")
    return text
