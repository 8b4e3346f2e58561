"""`lorakit merge`: base + adapter -> a plain transformers folder with the adapter folded in."""

from __future__ import annotations

import argparse
from pathlib import Path

from lorakit.cli.common import add_model_arguments, load_with_adapters

EXAMPLES = """examples:
  lorakit merge --adapter runs/demo/adapter --output merged/
  lorakit merge --adapter runs/qlora/adapter --quantize nf4 --output merged/   # a QLoRA adapter, on its 4-bit base
  python -c "from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained('merged/')"
"""

CHECK_TEXT = "The quick brown fox jumps over the lazy dog. LoRA merges cost no latency."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, adapters="one")
    parser.add_argument("--output", required=True, help="folder for the merged model (must not exist)")


def run(args: argparse.Namespace) -> int:
    import torch

    from lorakit.core.merge import merge_and_unload
    from lorakit.hf.saving import save_merged

    output = Path(args.output)
    if output.exists():
        raise ValueError(f"--output {output} already exists; choose a new folder")
    model, tokenizer, _ = load_with_adapters(args)
    ids = tokenizer(CHECK_TEXT, return_tensors="pt").input_ids.to(next(model.parameters()).device)
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits.float()
        # A 4-bit base cannot take the delta in place: merge into its dequantized weights.
        merge_and_unload(model, quantized="dequantize" if args.quantize else None)
        merged = model(input_ids=ids).logits.float()
    save_merged(model, tokenizer, output)
    print(f"merged model saved to {output} (loads with AutoModelForCausalLM.from_pretrained)")
    print(f"max |logits difference| merged vs unmerged: {(merged - unmerged).abs().max().item():.3e}")
    return 0
