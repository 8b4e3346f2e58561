"""`lorakit merge`: base + adapter -> a plain transformers folder, or a GGUF file, with the adapter
folded in."""

from __future__ import annotations

import argparse
from pathlib import Path

from lorakit.cli.common import add_model_arguments, load_with_adapters

EXAMPLES = """examples:
  lorakit merge --adapter runs/demo/adapter --output merged/
  lorakit merge --adapter runs/qlora/adapter --quantize nf4 --output merged/   # a QLoRA adapter, \
on its 4-bit base
  python -c "from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained('merged/')"
  lorakit merge --adapter runs/demo/adapter --output merged.gguf --outtype q8_0   # GGUF base in, GGUF out
"""

CHECK_TEXT = "The quick brown fox jumps over the lazy dog. LoRA merges cost no latency."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, adapters="one")
    parser.add_argument("--output", required=True,
                        help="folder for the merged model (must not exist), or a .gguf file when --model is "
                             "a GGUF file (the default model is one)")
    parser.add_argument("--outtype", default=None,
                        help="for a .gguf --output: f32, f16 or q8_0, the type every matrix is written in "
                             "(default: f16)")


def run(args: argparse.Namespace) -> int:
    import torch

    from lorakit.core.merge import merge_and_unload
    from lorakit.formats.atomic import check_parent
    from lorakit.hf.saving import save_merged

    output = Path(args.output)
    check_parent(output, "--output")  # before the model loads
    if output.suffix.lower() == ".gguf":
        return _merge_gguf(args, output)
    if args.outtype is not None:
        raise ValueError(f"--outtype applies to a .gguf --output only; {output} is written as a "
                         "transformers folder")
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


def _merge_gguf(args: argparse.Namespace, output: Path) -> int:
    from lorakit.gguf.merge_gguf import merge_to_gguf

    model = str(args.model)
    if model != "default" and not model.lower().endswith(".gguf"):
        raise ValueError(f"--output {output} is a GGUF file, which lorakit merges from a GGUF base only, "
                         f"and --model {model} is not one. Instead: export the adapter (lorakit export "
                         "ADAPTER --format gguf -o adapter.gguf --base MODEL) and run it with llama.cpp's "
                         "--lora on a GGUF of MODEL, or merge to a folder (--output merged/) and convert "
                         "that with llama.cpp's convert_hf_to_gguf.py")
    if args.quantize:
        raise ValueError("--quantize does not apply to a .gguf --output: the update is added to the GGUF "
                         "file's own weights (as on the unquantized base); leave --quantize out")
    report = merge_to_gguf(model, args.adapter, output, outtype=args.outtype or "f16")
    types = ", ".join(f"{count} {name}" for name, count in sorted(report.types.items()))
    print(f"merged model saved to {report.path} ({report.size / 1e6:.1f} MB): "
          f"{report.merged} weights updated; tensors: {types}")
    print(f"run it with: llama-cli -m {report.path}")
    return 0
