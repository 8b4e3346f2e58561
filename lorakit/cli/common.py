"""Options and steps several commands share: the base model, the adapters on it, checked numbers, and
flag help read from the config fields' docstrings."""

from __future__ import annotations

import argparse
import ast
import functools
import inspect
import itertools
import os
import re
import textwrap
from collections.abc import Callable, Mapping
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


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Each field of dataclass `cls` with its docstring (the text under the field), folded onto one line.

    A config's fields are documented there, once; the flags' help is read from it rather than written again.
    """
    class_node = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0]
    assert isinstance(class_node, ast.ClassDef)
    docs = {}
    for field, doc in itertools.pairwise(class_node.body):  # a field, then the string under it
        if (isinstance(field, ast.AnnAssign) and isinstance(field.target, ast.Name)
                and isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)
                and isinstance(doc.value.value, str)):
            docs[field.target.id] = " ".join(doc.value.value.split())
    return docs


def field_help(cls: type, name: str, flags: Mapping[str, str] | None = None) -> str:
    """The help of a flag that sets field `name` of `cls`: the field's docstring as a help line.

    Help lines start in lower case ("Training JSONL" -> "training JSONL"; "LoRA" stays) and end
    without a full stop. A field named in backquotes reads as its flag when `flags` (field -> flag)
    has one: `output_dir` becomes --output-dir; other names lose the backquotes.
    """
    text = re.sub(r"`([^`]+)`", lambda m: (flags or {}).get(m.group(1), m.group(1)),
                  field_docs(cls)[name].removesuffix("."))
    first = text.split(" ", 1)[0]
    return text[0].lower() + text[1:] if first[1:].islower() else text


def train_help(name: str) -> str:
    """The help of a flag with the meaning of TrainConfig's field `name` (the same words in every command)."""
    from lorakit.train.config import TrainConfig

    return field_help(TrainConfig, name)


def add_model_arguments(parser: argparse.ArgumentParser, adapters: str = "many") -> None:
    parser.add_argument("--model", default="default", help=train_help("model"))
    if adapters == "many":
        parser.add_argument("--adapter", action="append", default=[], metavar="PATH",
                            help="adapter folder (PEFT layout) or a training run's folder; repeat to stack "
                                 "several (their deltas add)")
    else:
        parser.add_argument("--adapter", required=True, metavar="PATH",
                            help="adapter folder (PEFT layout) or a training run's folder")
    parser.add_argument("--quantize", default=None, choices=["nf4"],
                        help="read the base straight into 4-bit NF4 before adding the adapters: use it for "
                             "adapters trained with `lorakit train --quantize nf4` (QLoRA), which learned "
                             "that base")
    parser.add_argument("--dtype", default=None, help=train_help("dtype"))
    parser.add_argument("--device", default="auto", help=train_help("device"))


def load_with_adapters(args: argparse.Namespace) -> tuple[Any, Any, list[str]]:
    """The base model (4-bit with --quantize) and tokenizer, with every --adapter loaded and active
    together."""
    from lorakit.core.adapters import set_adapter
    from lorakit.formats.io import load_adapter
    from lorakit.hf import load_model

    paths = args.adapter if isinstance(args.adapter, list) else [args.adapter]
    _refuse_repeats(paths)
    # With --quantize the linears are read straight into 4-bit where the files allow (hf/load_quantized.py).
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device, quantize=args.quantize)
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
            raise ValueError(f"--adapter {path} is given twice (as {seen[key]!r} and {path!r}); "
                             "stacked adapters add their deltas, so it would count double. Give each "
                             "adapter once")
        seen[key] = path
