"""Streaming generated text to a callback as it is produced.

This module imports transformers at the top, so `generate.py` imports it only when streaming
is asked for.
"""

from __future__ import annotations

from collections.abc import Callable

from transformers import PreTrainedTokenizerBase, TextStreamer


class CallbackStreamer(TextStreamer):
    """A `TextStreamer` that hands each finished piece of text to a callback instead of printing.

    Pieces arrive at word boundaries (TextStreamer holds back partial words and multi-byte
    characters), the prompt is skipped, and special tokens such as `<|im_end|>` are not shown.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, callback: Callable[[str], object]) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.callback = callback

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        """Pass a finished piece of text to the callback (empty pieces are dropped)."""
        if text:
            self.callback(text)
