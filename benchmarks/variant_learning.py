"""LoRA variants on the demo task at one budget: steps to 90% exact match, and the final score.

    .venv/bin/python -m benchmarks.variant_learning [--variants lora,dora,pissa,loraplus] [--steps 60]
        [--every 10] [--eval-limit N] [--json PATH]

Trains the demo's task (dates to ISO 8601, demo/data) on the default model with `make demo`'s
settings (r=16, alpha=32, no dropout, lr 2e-3, 5 warm-up steps, batch 16), once per variant:
plain LoRA, DoRA (`use_dora`), PiSSA (`init="pissa_niter_4"`) and LoRA+ (`loraplus_ratio=16`, A
at the same lr). A checkpoint every `--every` steps is scored on the 80 held-out dates (greedy,
exact match), so "steps to 90%" is the first scored step at or above 90% (a multiple of
`--every`; "not reached" when none is).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import ROOT, machine
from lorakit.data import eval_pairs, load_records
from lorakit.formats.io import load_adapter
from lorakit.hf import load_model
from lorakit.train import TrainConfig, train
from lorakit.train.checkpoint import list_checkpoints
from lorakit.train.evaluate import exact_match_score

DATA = ROOT / "demo" / "data"
VARIANTS: dict[str, dict[str, Any]] = {
    "lora": {},
    "dora": {"use_dora": True},
    "pissa": {"init": "pissa_niter_4"},
    "loraplus": {"loraplus_ratio": 16.0},
}
TARGET = 0.9


def one_run(variant: str, steps: int, every: int, work: Path, limit: int | None) -> dict[str, Any]:
    torch.manual_seed(0)
    model, tokenizer = load_model("default")
    config = TrainConfig(data=str(DATA / "train.jsonl"), output_dir=str(work / variant), r=16, alpha=32,
                         dropout=0.0, learning_rate=2e-3, warmup_steps=5, max_steps=steps, batch_size=16,
                         max_length=96, seed=0, save_every=every, keep_last=steps, progress=False,
                         **VARIANTS[variant])
    started = time.perf_counter()
    result = train(config, model, tokenizer)
    seconds = time.perf_counter() - started
    test_records, _ = load_records(DATA / "test.jsonl")
    pairs = eval_pairs(test_records[:limit], tokenizer)
    scores: dict[int, float] = {}
    for checkpoint in list_checkpoints(result.adapter_dir.parent):
        load_adapter(model, checkpoint / "adapter", name="default", replace=True)
        step = int(checkpoint.name.rsplit("-", 1)[1])
        scores[step] = exact_match_score(model, tokenizer, pairs, max_new_tokens=16).score
        print(json.dumps({"variant": variant, "step": step, "exact_match": scores[step]}), flush=True)
    events = [json.loads(line) for line in result.metrics_path.read_text().splitlines()]
    losses = [e["loss"] for e in events if e["kind"] == "train"]
    reached = next((step for step, score in sorted(scores.items()) if score >= TARGET), None)
    return {"variant": variant, "settings": VARIANTS[variant], "scores": scores, "steps_to_90": reached,
            "final": scores[max(scores)], "n": len(pairs), "train_seconds": seconds, "final_loss": losses[-1]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--eval-limit", type=int, default=None, help="score only the first N held-out dates")
    parser.add_argument("--json", type=Path, help="write the figures here as JSON")
    args = parser.parse_args(argv)
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    runs = []
    with tempfile.TemporaryDirectory() as work:
        for variant in args.variants.split(","):
            runs.append(one_run(variant, args.steps, args.every, Path(work), args.eval_limit))
    info = machine()
    print(f"\nMachine: {info.get('cpu', '?')}, torch {torch.__version__}; demo task, {args.steps} steps "
          f"of batch 16, scored every {args.every} steps on {runs[0]['n']} held-out dates\n")
    print(table(runs))
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "steps": args.steps, "every": args.every,
                                         "runs": runs},
                                        indent=1) + "\n")


def table(runs: list[dict[str, Any]]) -> str:
    steps = sorted({int(s) for run in runs for s in run["scores"]})
    lines = ["| variant | steps to 90% | final exact match | " + " | ".join(f"step {s}" for s in steps)
             + " | final loss | train time |",
             "|---|---:|---:|" + "---:|" * len(steps) + "---:|---:|"]
    for run in runs:
        scores = {int(k): v for k, v in run["scores"].items()}
        reached = run["steps_to_90"] if run["steps_to_90"] is not None else f"not in {max(steps)}"
        lines.append(f"| {run['variant']} | {reached} | {run['final']:.1%} | "
                     + " | ".join(f"{scores[s]:.0%}" if s in scores else "" for s in steps)
                     + f" | {run['final_loss']:.4f} | {run['train_seconds']:.0f} s |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
