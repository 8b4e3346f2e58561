"""`lorakit export ADAPTER --format gguf -o OUT.gguf`: an adapter as a llama.cpp / Ollama LoRA file."""

from __future__ import annotations

import argparse
from pathlib import Path

EXAMPLES = """examples:
  lorakit export runs/demo/adapter --format gguf -o demo.gguf
  lorakit export runs/demo --format gguf -o demo-f32.gguf --outtype f32 --base default
  llama-cli -m SmolLM2-135M-Instruct.Q4_1.gguf --lora demo.gguf -p "Hello"   # llama.cpp
  # Ollama Modelfile:  FROM ./SmolLM2-135M-Instruct.Q4_1.gguf   ADAPTER ./demo.gguf

Written: blk.N.<attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down>.weight.lora_a/.lora_b,
with Llama's q/k rows permuted as in the base GGUF, and rsLoRA / rank_pattern / alpha_pattern
scales folded in so llama.cpp's alpha / rank gives each weight the same update.
Refused before writing: DoRA, trained biases, modules_to_save, embedding or output-head adapters,
architectures other than llama, mistral, qwen2, gemma, phi3, gpt2, and a base whose shapes differ.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter", help="adapter folder (PEFT layout) or a training run's folder")
    parser.add_argument("--format", default="gguf",
                        help="output format; gguf (llama.cpp's LoRA adapter file) is the one there is")
    parser.add_argument("-o", "--output", required=True, metavar="OUT.gguf",
                        help="file to write (replaced atomically when it exists)")
    parser.add_argument("--base", default="default",
                        help="the base model the adapter was trained on: default, a .gguf file or a "
                             "transformers folder")
    parser.add_argument("--outtype", default="f16",
                        help="tensor type: f32, f16, bf16 or q8_0 (a B whose rank is not a multiple of 32 "
                             "stays f16 under q8_0)")


def run(args: argparse.Namespace) -> int:
    from lorakit.formats.atomic import check_parent
    from lorakit.gguf.export_adapter import export_adapter

    if args.format != "gguf":
        raise ValueError(f"unknown --format {args.format!r}; accepted: gguf")
    check_parent(Path(args.output), "--output")  # before the base model is read
    report = export_adapter(args.adapter, args.output, base=args.base, outtype=args.outtype)
    types = ", ".join(f"{count} {name}" for name, count in sorted(report.types.items()))
    folded = f"; {report.folded} scale(s) folded into lora_b" if report.folded else ""
    print(f"wrote {report.path} ({report.size / 1e6:.2f} MB): {report.pairs} LoRA pairs for a "
          f"{report.architecture} base, alpha {report.alpha:g}{folded}; tensors: {types}")
    print(f"use it with: llama-cli -m BASE.gguf --lora {report.path}")
    return 0
