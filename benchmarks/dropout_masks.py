"""Shared or per-module dropout masks: the demo task's loss curve and exact match under both.

    .venv/bin/python -m benchmarks.dropout_masks [--steps 60] [--seeds 0]

Trains the demo's task (dates to ISO 8601, demo/data) on the default model as `make demo` does,
but with dropout 0.05 (the `lorakit train` default; the demo itself uses no dropout), once with
`share_dropout_mask=True` (q, k, v and gate, up draw one mask per input) and once with False
(every module draws its own, as PEFT does). Prints a markdown table and writes
docs/dropout_masks.png with both loss curves.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import ROOT, machine
from lorakit.data import eval_pairs, load_records
from lorakit.hf import load_model
from lorakit.train import TrainConfig, train
from lorakit.train.evaluate import exact_match_score

DATA = ROOT / "demo" / "data"


def one_run(shared: bool, seed: int, steps: int, work: Path) -> dict:
    torch.manual_seed(seed)
    model, tokenizer = load_model("default")
    config = TrainConfig(data=str(DATA / "train.jsonl"), output_dir=str(work / f"{shared}-{seed}"), r=16,
                         alpha=32, dropout=0.05, share_dropout_mask=shared, learning_rate=2e-3,
                         warmup_steps=5, max_steps=steps, batch_size=16, max_length=96, seed=seed,
                         progress=False)
    started = time.perf_counter()
    result = train(config, model, tokenizer)
    seconds = time.perf_counter() - started
    test_records, _ = load_records(DATA / "test.jsonl")
    match = exact_match_score(model, tokenizer, eval_pairs(test_records, tokenizer), max_new_tokens=16)
    events = [json.loads(line) for line in result.metrics_path.read_text().splitlines()]
    losses = [e["loss"] for e in events if e["kind"] == "train"]
    return {"shared": shared, "seed": seed, "losses": losses, "exact_match": match.score, "seconds": seconds,
            "n": len(test_records)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seeds", default="0", help="comma-separated seeds; each runs both settings")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = []
    with tempfile.TemporaryDirectory() as work:
        for seed in seeds:
            for shared in (True, False):
                runs.append(one_run(shared, seed, args.steps, Path(work)))
                print(json.dumps({k: v for k, v in runs[-1].items() if k != "losses"}), flush=True)
    info = machine()
    print(f"\nMachine: {info.get('cpu', '?')}, torch {torch.__version__}; {args.steps} steps, batch 16, "
          f"dropout 0.05, seeds {args.seeds}\n")
    print("| masks | seed | first loss | mean loss, last 10 steps | exact match | train time |")
    print("|---|---:|---:|---:|---:|---:|")
    for run in runs:
        name = "shared (q/k/v, gate/up)" if run["shared"] else "per module (PEFT)"
        print(f"| {name} | {run['seed']} | {run['losses'][0]:.4f} | "
              f"{statistics.mean(run['losses'][-10:]):.4f} | "
              f"{run['exact_match']:.1%} ({round(run['exact_match'] * run['n'])}/{run['n']}) | "
              f"{run['seconds']:.0f} s |")
    _plot(runs, ROOT / "docs" / "dropout_masks.png")


def _plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4), dpi=110)
    for run in runs:
        label = f"{'shared' if run['shared'] else 'per-module'} masks, seed {run['seed']}"
        axes.plot(range(1, len(run["losses"]) + 1), run["losses"], label=label, linewidth=1.2)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("train loss")
    axes.set_yscale("log")
    axes.set_title("demo task, dropout 0.05: shared vs per-module dropout masks")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    print(f"\nloss curves: {path}")


if __name__ == "__main__":
    main()
