"""`lorakit eval`: validation loss and exact match of a model (with adapters) on a JSONL file."""

from __future__ import annotations

import argparse

from lorakit.cli.common import add_model_arguments, load_with_adapters, number_at_least, train_help

EXAMPLES = """examples:
  lorakit eval --data demo/data/test.jsonl
  lorakit eval --adapter runs/demo/adapter --data demo/data/test.jsonl --max-new-tokens 8
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--data", required=True, help="JSONL file (chat, alpaca, completion or text records)")
    parser.add_argument("--format", default="auto", help=train_help("format"))
    parser.add_argument("--max-length", type=number_at_least(1), default=512, help=train_help("max_length"))
    parser.add_argument("--batch-size", type=number_at_least(1), default=8, help="rows per forward")
    parser.add_argument("--limit", type=number_at_least(1), default=None,
                        help="evaluate only the first N records (default: all)")
    parser.add_argument("--max-new-tokens", type=number_at_least(1), default=64,
                        help=train_help("max_new_tokens"))
    parser.add_argument("--no-exact-match", action="store_true", help="only the loss (no generation)")


def run(args: argparse.Namespace) -> int:
    from lorakit.data import TextRecord, build_dataset, eval_pairs, load_records
    from lorakit.train.evaluate import evaluation_loss, exact_match_score

    records, _ = load_records(args.data, format=args.format)
    records = records if args.limit is None else records[: args.limit]
    model, tokenizer, _ = load_with_adapters(args)
    dataset, _ = build_dataset(records, tokenizer, max_length=args.max_length)
    loss = evaluation_loss(model, dataset, args.batch_size, next(model.parameters()).device)
    print(f"loss: {loss:.4f} over {len(dataset)} examples")
    if not args.no_exact_match and not any(isinstance(r, TextRecord) for r in records):
        match = exact_match_score(model, tokenizer, eval_pairs(records, tokenizer), args.max_new_tokens,
                                  batch_size=args.batch_size)
        print(f"exact match: {match.score:.1%} ({round(match.score * len(records))}/{len(records)})")
    return 0
