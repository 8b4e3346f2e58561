"""`lorakit generate`: one prompt, or a chat on standard input, streamed as it is produced."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator

from lorakit.cli.common import add_model_arguments, load_with_adapters, number_at_least

EXAMPLES = """examples:
  lorakit generate --prompt "Write a haiku about autumn"
  lorakit generate --adapter runs/demo/adapter --raw --prompt \
$'Write the date in ISO format (YYYY-MM-DD).\\nDate: 7 March 1994\\nISO:'
  lorakit generate --adapter runs/a/adapter --adapter runs/b/adapter      # chat, both adapters active
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--prompt", help="the prompt; without it, chat line by line on standard input")
    parser.add_argument("--raw", action="store_true",
                        help="continue the prompt text as is (no chat template)")
    parser.add_argument("--max-new-tokens", type=number_at_least(1), default=128,
                        help="tokens to generate at most")
    parser.add_argument("--temperature", type=number_at_least(0, float), default=0.0,
                        help="sampling temperature; 0 means greedy decoding")


def run(args: argparse.Namespace) -> int:
    from lorakit.hf import generate_text

    model, tokenizer, _ = load_with_adapters(args)
    sampling = {"do_sample": True, "temperature": args.temperature} if args.temperature > 0 else {}

    def answer(prompt: str) -> None:
        generate_text(model, tokenizer, [prompt], max_new_tokens=args.max_new_tokens, chat=not args.raw,
                      stream=lambda piece: print(piece, end="", flush=True), **sampling)
        print()

    if args.prompt is not None:
        answer(args.prompt)
        return 0
    print("chat: one message per line; an empty line or Ctrl-D ends", file=sys.stderr)
    for line in _utf8_lines():
        if not line.strip():
            break
        answer(line.rstrip("\n"))
    return 0


def _utf8_lines() -> Iterator[str]:
    """Standard input's lines; one clear error for bytes that are not UTF-8 (a tokenizer's own is cryptic)."""
    try:
        for line in sys.stdin:
            line.encode("utf-8")  # a C locale hands undecodable bytes over as lone surrogates
            yield line
    except UnicodeError:  # a strict UTF-8 stdin fails on reading already
        raise ValueError("standard input is not valid UTF-8 text; send UTF-8") from None
