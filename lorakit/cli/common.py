"""Options and steps several commands share: the base model and the adapters on it."""

from __future__ import annotations

import argparse
from typing import Any


def add_model_arguments(parser: argparse.ArgumentParser, adapters: str = "many") -> None:
    parser.add_argument("--model", default="default", help="base model: default, a .gguf file or a transformers "
                                                          "folder (default: %(default)s)")
    if adapters == "many":
        parser.add_argument("--adapter", action="append", default=[], metavar="PATH",
                            help="adapter folder (PEFT layout); repeat to stack several (their deltas add)")
    else:
        parser.add_argument("--adapter", required=True, metavar="PATH", help="adapter folder (PEFT layout)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: fp32 on CPU, "
                                                      "bf16 on CUDA)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


def load_with_adapters(args: argparse.Namespace) -> tuple[Any, Any, list[str]]:
    """The base model and tokenizer, with every --adapter loaded and active together."""
    from lorakit.core.adapters import set_adapter
    from lorakit.core.io import load_adapter
    from lorakit.hf import load_model

    paths = args.adapter if isinstance(args.adapter, list) else [args.adapter]
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    names = [load_adapter(model, path, name=f"adapter{i}") for i, path in enumerate(paths)]
    if names:
        set_adapter(model, names)
    return model, tokenizer, names
