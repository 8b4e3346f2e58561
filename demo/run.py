"""`make demo`: fine-tune the default model on date normalisation and show before and after.

SmolLM2-135M-Instruct (the offline default model) is asked to rewrite dates such as
"7 March 1994" as ISO 8601 ("1994-03-07"). Out of the box it rarely answers in that form; after
a few minutes of LoRA training on 480 examples it does. Exact match is measured on 80 held-out
dates the model never saw.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from lorakit.data import eval_pairs, load_records
from lorakit.hf import load_model
from lorakit.train import TrainConfig, train
from lorakit.train.evaluate import exact_match_score

HERE = Path(__file__).parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="runs/demo")
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    started = time.perf_counter()
    torch.manual_seed(0)

    model, tokenizer = load_model("default")
    test_records, _ = load_records(HERE / "data" / "test.jsonl")
    pairs = eval_pairs(test_records, tokenizer)
    print(f"\nHeld-out test set: {len(pairs)} dates. Scoring the base model...")
    before = exact_match_score(model, tokenizer, pairs, max_new_tokens=16)
    print(f"exact match before training: {before.score:.0%}\n")

    config = TrainConfig(data=str(HERE / "data" / "train.jsonl"), output_dir=args.output_dir, r=16, alpha=32,
                         dropout=0.0, learning_rate=2e-3, warmup_steps=5, max_steps=args.steps, batch_size=16,
                         max_length=96, seed=0, overwrite=True)  # the demo's own folder: each run starts over
    result = train(config, model, tokenizer)
    after = exact_match_score(model, tokenizer, pairs, max_new_tokens=16)

    print(f"\n{'date':<52} {'reference':<12} {'before':<24} after")
    for pair, old, new in list(zip(pairs, before.generations, after.generations, strict=True))[:8]:
        text = pair.prompt.split("Date: ")[1].split("\n")[0]
        print(f"{text:<52} {pair.answer.strip():<12} {first_line(old):<24} {first_line(new)}")
    print(f"\nexact match on {len(pairs)} held-out dates: before {before.score:.0%}, after {after.score:.0%}")
    print(f"adapter (PEFT layout): {result.adapter_dir}")
    print(f"loss curve:            {result.plot_path}")
    print(f"metrics:               {result.metrics_path}")
    print(f"demo time: {time.perf_counter() - started:.0f} s")


def first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return (lines[0] if lines else "")[:22] + (" ..." if len(lines) > 1 else "")


if __name__ == "__main__":
    main()
