"""`lorakit estimate`: parameters and memory of full fine-tuning, LoRA and QLoRA, from the config only."""

from __future__ import annotations

import argparse

from lorakit.cli.common import train_help

EXAMPLES = """examples:
  lorakit estimate --model llama-3.1-8b --r 16 --targets q_proj,k_proj,v_proj,o_proj
  lorakit estimate --model gpt3-175b --r 8 --targets q_proj,v_proj
  lorakit estimate --model llama-3.1-70b --r 16 --quant nf4 --batch 1 --seq 4096 --gradient-checkpointing
  lorakit estimate --model path/to/config.json
  lorakit estimate --model llama-3.1-70b --quant nf4 --r 16 --targets q_proj,v_proj --nproc 2 \\
      --distributed fsdp --gradient-checkpointing

Shipped configs: llama-3.1-8b, llama-3.1-70b, mistral-7b, qwen2.5-7b, gpt2, smollm2-135m, gpt3-175b
(and 'default' = smollm2-135m). Formulas: docs/estimate.md.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default", help="a shipped name, a config.json or a model folder")
    parser.add_argument("--r", type=int, default=16, help=train_help("r"))
    parser.add_argument("--alpha", type=float, default=None,
                        help=f"{train_help('alpha')}; does not change memory")
    parser.add_argument("--targets", default="all-linear", help=train_help("targets"))
    parser.add_argument("--quant", default=None, choices=["nf4"], help="highlight QLoRA with an NF4 base")
    parser.add_argument("--batch", type=int, default=1, help="rows per step")
    parser.add_argument("--seq", type=int, default=512, help="tokens per row")
    parser.add_argument("--dtype", default="bf16", help="weight dtype: bf16 or fp32")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="count checkpointed activations")
    parser.add_argument("--nproc", type=int, default=1, help="ranks training together: memory per device "
                        "(--batch is per rank)")
    parser.add_argument("--distributed", default=None, choices=["ddp", "fsdp"],
                        help="with --nproc N: ddp (the default; every device holds everything) or fsdp "
                             "(FSDP2 shards)")


def run(args: argparse.Namespace) -> int:
    from lorakit.estimate.footprint import estimate, format_estimate

    result = estimate(args.model, r=args.r, alpha=args.alpha, targets=args.targets, quant=args.quant,
                      batch_size=args.batch, seq_len=args.seq, dtype=args.dtype,
                      gradient_checkpointing=args.gradient_checkpointing, nproc=args.nproc,
                      distributed=args.distributed)
    print(format_estimate(result))
    return 0
