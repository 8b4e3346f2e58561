"""Options and steps several commands share: the base model, the adapters on it, checked numbers."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any


def number_at_least(low: float, kind: type = int) -> Callable[[str], Any]:
    """An argparse type: a number of `kind` that is at least `low`, with a one-line error otherwise."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if not value >= low:  # also refuses nan
            raise argparse.ArgumentTypeError(f"must be >= {low:g}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its own messages
    return parse


def add_model_arguments(parser: argparse.ArgumentParser, adapters: str = "many") -> None:
    parser.add_argument("--model", default="default", help="base model: default, a .gguf file or a transformers "
                                                          "folder")
    if adapters == "many":
        parser.add_argument("--adapter", action="append", default=[], metavar="PATH",
                            help="adapter folder (PEFT layout) or a training run's folder; repeat to stack "
                                 "several (their deltas add)")
    else:
        parser.add_argument("--adapter", required=True, metavar="PATH",
                            help="adapter folder (PEFT layout) or a training run's folder")
    parser.add_argument("--quantize", default=None, choices=["nf4"],
                        help="store the base in 4-bit NF4 before adding the adapters: use it for adapters "
                             "trained with `lorakit train --quantize nf4` (QLoRA), which learned that base")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: fp32 on CPU, "
                                                      "bf16 on CUDA)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


def load_with_adapters(args: argparse.Namespace) -> tuple[Any, Any, list[str]]:
    """The base model (4-bit with --quantize) and tokenizer, with every --adapter loaded and active together."""
    from lorakit.core.adapters import set_adapter
    from lorakit.formats.io import load_adapter
    from lorakit.hf import load_model

    paths = args.adapter if isinstance(args.adapter, list) else [args.adapter]
    _refuse_repeats(paths)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    if args.quantize:
        from lorakit.quant import quantize_model

        quantize_model(model, args.quantize)
    names = [load_adapter(model, path, name=f"adapter{i}") for i, path in enumerate(paths)]
    if names:
        set_adapter(model, names)
    return model, tokenizer, names


def _refuse_repeats(paths: list[str]) -> None:
    from lorakit.formats.adapter_folder import find_adapter_folder

    seen: dict[str, str] = {}
    for path in paths:
        key = os.path.realpath(find_adapter_folder(path))  # a run folder and its adapter/ are one adapter
        if key in seen:
            raise ValueError(f"--adapter {path} is given twice (as {seen[key]!r} and {path!r}); stacked adapters "
                             "add their deltas, so it would count double. Give each adapter once")
        seen[key] = path
