"""lorakit vs PEFT in one run: training step, the machine's limit, merge, generation, per-row, QLoRA, CUDA.

    .venv/bin/python -m benchmarks.run [--quick]      (make bench / make bench-quick)

Writes docs/benchmarks.md (the tables) and benchmarks/results.json (every figure). Each training
configuration runs in its own child process (`benchmarks.training`), so its peak RSS is its own;
the children run in alternating order (lorakit, PEFT, PEFT, lorakit, ...) over several rounds, so a
change in machine load hits both libraries alike, and each reports the median of its timed steps
after warm-up. The matmul rate that sets the roofline is measured at the start of every round.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import ROOT, Setting, machine, median, run_child, versions
from benchmarks.report import render, summary_rows
from benchmarks.roofline import measure_matmuls, step_flops
from benchmarks.sections import SECTIONS, run_section

PAIRS = (("lorakit", 0), ("peft", 0), ("lorakit", 1), ("peft", 1))
# glibc's malloc keeps freed blocks and fragments, so a process's peak RSS is its live tensors plus
# whatever the allocator held on to. With every block above 64 KiB mmapped (and unmapped when
# freed), RSS follows the live tensors: that run measures what training needs, not how glibc kept it.
# (It makes each step slower, from the page faults, so its timings are not used.)
LIVE_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
GPU_BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 FLOP/s, by name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="small batch, few steps, one round (a few minutes)")
    parser.add_argument("--rounds", type=int, help="rounds of the lorakit/PEFT pairs (default 2, quick 1)")
    parser.add_argument("--steps", type=int, help="timed steps per child (default 3, quick 2)")
    parser.add_argument("--warmup", type=int, help="warm-up steps per child (default 1)")
    parser.add_argument("--batch", type=int, help="default 4, quick 2")
    parser.add_argument("--seq", type=int, help="default 256, quick 128")
    parser.add_argument("--skip", default="", help="comma-separated sections to leave out (a section the "
                        "--json file holds keeps its earlier figures): "
                        f"extras,live,loss,generation,cuda,{','.join(SECTIONS)}")
    parser.add_argument("--only", default="", help=f"comma-separated sections of cuda,{','.join(SECTIONS)} "
                        "to run again, keeping every other figure of the --json file (`--only cuda` on a "
                        "lent GPU machine)")
    parser.add_argument("--cuda-model", default="llama-1b", help="random Llama model for the CUDA section")
    parser.add_argument("--cuda-device", default="cuda",
                        help="'cpu' runs the CUDA section's code on the CPU (a check)")
    parser.add_argument("--cuda-dtype", default="bfloat16")
    parser.add_argument("--cuda-batch", type=int, default=8)
    parser.add_argument("--cuda-seq", type=int, default=1024)
    parser.add_argument("--markdown", default=str(ROOT / "docs" / "benchmarks.md"))
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results.json"))
    parser.add_argument("--render", metavar="RESULTS_JSON",
                        help="only rewrite the markdown from a results file")
    args = parser.parse_args()
    if args.render:
        _write(Path(args.markdown), render(json.loads(Path(args.render).read_text())))
        return
    if args.only:
        _only(args)
        return
    quick = args.quick
    plan = {
        "quick": quick,
        "rounds": args.rounds or (1 if quick else 2),
        "extra_rounds": 1,
        "warmup": args.warmup if args.warmup is not None else 1,
        "steps": args.steps or (2 if quick else 3),
        "loss_check_steps": 2 if quick else 3,
        "generation": {"runs": 2 if quick else 3, "warmup": 1, "merge_runs": 2 if quick else 3,
                       "new_tokens": 32},
        "matmul_repeats": 3 if quick else 5,
    }
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    setting = Setting(batch=args.batch or (2 if quick else 4), seq=args.seq or (128 if quick else 256))
    started = time.time()
    results: dict[str, Any] = {
        "command": _command(), "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "plan": plan, "setting": setting.to_dict(), "machine": machine(), "versions": versions(),
        "skipped": sorted(skip),
    }
    with tempfile.TemporaryDirectory() as tmp:
        init = str(Path(tmp) / "init.safetensors")
        _log("preparing the shared initial adapter")
        prepared = run_child("benchmarks.training", ["--mode", "prepare", "--init", init, *setting.to_args()])
        results["model"] = prepared
        results["training"], results["roofline"] = _training(setting, prepared["shape"], init, plan, skip)
        if "live" not in skip:
            results["live_peak"] = _live_peaks(setting, init)

    if "loss" not in skip:
        _log("loss check (dropout 0, both libraries in one process)")
        results["loss_check"] = _safe(lambda: run_child(
            "benchmarks.training", ["--mode", "loss-check", "--steps", str(plan["loss_check_steps"]),
                                    *Setting(batch=setting.batch, seq=setting.seq).to_args()]))
    if "generation" not in skip:
        _log("merge and generation")
        gen = plan["generation"]
        results["generation"] = _safe(lambda: run_child("benchmarks.generation", [
            "--runs", str(gen["runs"]), "--warmup", str(gen["warmup"]),
            "--merge-runs", str(gen["merge_runs"]), "--new-tokens", str(gen["new_tokens"])]))
    # A skipped section keeps the figures of the run that measured it (each names its own command and date).
    earlier = _earlier_sections(Path(args.json))
    results["sections"] = {key: run_section(key, quick) if key not in skip else earlier[key]
                           for key in SECTIONS if key not in skip or key in earlier}
    earlier_cuda = _earlier(Path(args.json)).get("cuda", {})
    if "cuda" not in skip:
        results["cuda"] = kept_cuda_section(_cuda(args, plan), earlier_cuda)
    elif earlier_cuda:
        results["cuda"] = earlier_cuda

    results["machine"]["load_average_end"] = os.getloadavg()[0]
    results["total_seconds"] = time.time() - started
    results["summary"] = summary_rows(results)
    _write(Path(args.json), json.dumps(results, indent=1) + "\n")
    _write(Path(args.markdown), render(results))
    _log(f"done in {results['total_seconds'] / 60:.1f} min: wrote {args.markdown} and {args.json}")
    print(render(results).split("## Training step")[0])


def _training(setting: Setting, shape: dict[str, int], init: str, plan: dict[str, Any],
              skip: set[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The lorakit/PEFT pairs in alternating order over the rounds, then QLoRA, base and forward."""
    common = ["--warmup", str(plan["warmup"]), "--steps", str(plan["steps"]), *setting.to_args()]
    configs: dict[str, dict[str, Any]] = {}
    matmuls = []
    for round_index in range(plan["rounds"]):
        _log(f"round {round_index + 1}/{plan['rounds']}: matmul rate on the model's shapes")
        matmuls.append(measure_matmuls(shape, setting.tokens, repeats=plan["matmul_repeats"]))
        _log(f"  {matmuls[-1]['gflops']:.1f} GFLOP/s")
        # ABBA order: the library that goes first alternates from round to round.
        order = PAIRS if round_index % 2 == 0 else (PAIRS[1], PAIRS[0], PAIRS[3], PAIRS[2])
        for lib, gc in order:
            _run_config(configs, f"{lib}_gc{gc}", ["--lib", lib, "--gc", str(gc), "--init", init, *common])
    if "extras" not in skip:
        for _ in range(plan["extra_rounds"]):
            _run_config(configs, "qlora_gc0", ["--lib", "lorakit", "--quant", "nf4", "--init", init, *common])
            _run_config(configs, "base_gc0", ["--lib", "base", *common])
            _run_config(configs, "forward", ["--lib", "forward", *common])
    for key, config in configs.items():
        _summarize(config)
        kind = "lora" if key.split("_")[0] in ("lorakit", "peft", "qlora") else key.split("_")[0]
        config["flops"] = step_flops(shape, setting.batch, setting.seq, setting.r, kind,
                                     checkpointing=key.endswith("gc1"))
    rate = median([m["gflops"] for m in matmuls]) * 1e9
    for config in configs.values():
        if "median_seconds" in config:
            config["roofline_seconds"] = config["flops"]["total"] / rate
            config["roofline_multiple"] = config["median_seconds"] / config["roofline_seconds"]
            config["achieved_gflops"] = config["flops"]["total"] / config["median_seconds"] / 1e9
    roofline = {"gflops": rate / 1e9, "measurements": matmuls,
                "shapes": _median_shapes(matmuls)}
    return configs, roofline


def _live_peaks(setting: Setting, init: str) -> dict[str, Any]:
    """Peak RSS of one warm-up + one step per configuration with glibc returning freed blocks (LIVE_ENV)."""
    _log(f"live peaks ({' '.join(f'{k}={v}' for k, v in LIVE_ENV.items())}; timings not used)")
    configs: dict[str, dict[str, Any]] = {}
    for lib, gc in PAIRS:
        args = ["--lib", lib, "--gc", str(gc), "--init", init, "--warmup", "1", "--steps", "1",
                *setting.to_args()]
        _run_config(configs, f"{lib}_gc{gc}", args, extra_env=LIVE_ENV)
    peaks = {key: config["runs"][0]["peak_rss"] for key, config in configs.items() if config["runs"]}
    return {"env": LIVE_ENV, "peak_rss": peaks,
            "rss_after_load": {key: c["runs"][0]["rss_after_load"] for key, c in configs.items()
                               if c["runs"]}}


def _run_config(configs: dict[str, dict[str, Any]], key: str, args: list[str],
                extra_env: dict[str, str] | None = None) -> None:
    _log(f"  {key}: python -m benchmarks.training "
         f"{' '.join(a for a in args if not a.endswith('.safetensors'))}")
    config = configs.setdefault(key, {"runs": [], "errors": []})
    try:
        run = run_child("benchmarks.training", args, extra_env=extra_env)
    except Exception as error:  # one failed child (e.g. out of memory) must not lose the others' figures
        config["errors"].append(str(error)[-2000:])
        _log(f"    FAILED: {str(error)[-500:]}")
        return
    config["runs"].append(run)
    timed = [s["seconds"] for s in run["steps"] if not s["warmup"]]
    _log(f"    median {median(timed):.2f} s/step, peak RSS {run['peak_rss'] / 2**30:.2f} GiB")


def _summarize(config: dict[str, Any]) -> None:
    """Medians over every timed step of every run (round) of one configuration."""
    runs = config["runs"]
    if not runs:
        return
    steps = [s for run in runs for s in run["steps"] if not s["warmup"]]
    setting = runs[0]["setting"]
    seconds = median([s["seconds"] for s in steps])
    config.update(
        median_seconds=seconds, tokens_per_s=setting["batch"] * setting["seq"] / seconds,
        per_round_seconds=[median([s["seconds"] for s in run["steps"] if not s["warmup"]]) for run in runs],
        parts={part: median([s[part] for s in steps]) for part in ("forward", "backward", "optimizer")
               if part in steps[0]},
        peak_rss=median([run["peak_rss"] for run in runs]),
        rss_after_load=median([run["rss_after_load"] for run in runs]),
        peak_rss_after_load=median([run["peak_rss_after_load"] for run in runs]),
        trainable=runs[0]["trainable"],
    )
    if "cuda_peak_allocated" in runs[0]:
        config["cuda_peak_allocated"] = median([run["cuda_peak_allocated"] for run in runs])
        config["cuda_allocated_before_steps"] = median([run["cuda_allocated_before_steps"] for run in runs])
        config["device_name"] = runs[0]["device_name"]


def _median_shapes(matmuls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for i, first in enumerate(matmuls[0]["shapes"]):
        seconds = median([m["shapes"][i]["seconds"] for m in matmuls])
        flops = 2.0 * first["m"] * first["k"] * first["n"]
        rows.append({**first, "seconds": seconds, "gflops": flops / seconds / 1e9})
    return rows


def _earlier_sections(path: Path) -> dict[str, Any]:
    """The sections an earlier results file holds ({} when there is none)."""
    return dict(_earlier(path).get("sections", {}))


def _earlier(path: Path) -> dict[str, Any]:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return {}


def kept_cuda_section(new: dict[str, Any], earlier: dict[str, Any]) -> dict[str, Any]:
    """The CUDA section to report: a machine without a GPU keeps the figures an earlier GPU run measured
    (they name their device and date) instead of writing "skipped" over them."""
    return earlier if "skipped" in new and "configs" in earlier else new


def _only(args: argparse.Namespace) -> None:
    """Run some sections again; every other figure stays as the run that measured it wrote it."""
    keys = [key.strip() for key in args.only.split(",") if key.strip()]
    unknown = [key for key in keys if key != "cuda" and key not in SECTIONS]
    if unknown:
        raise SystemExit(f"--only: unknown section(s) {', '.join(unknown)}; "
                         f"choose from cuda, {', '.join(SECTIONS)}")
    results = json.loads(Path(args.json).read_text())
    results.pop("per_row", None)  # the layout before sections existed
    sections = results.setdefault("sections", {})
    for key in keys:
        if key == "cuda":
            plan = {"quick": args.quick, "rounds": args.rounds or (1 if args.quick else 2)}
            results["cuda"] = kept_cuda_section(_cuda(args, plan), results.get("cuda", {}))
        else:
            sections[key] = run_section(key, args.quick)
    results["summary"] = summary_rows(results)
    _write(Path(args.json), json.dumps(results, indent=1) + "\n")
    _write(Path(args.markdown), render(results))
    _log(f"wrote {args.markdown} and {args.json}")


def _cuda(args: argparse.Namespace, plan: dict[str, Any]) -> dict[str, Any]:
    """The same lorakit/PEFT comparison on a random ~1B Llama in bf16, when there is a GPU."""
    if args.cuda_device.startswith("cuda") and not torch.cuda.is_available():
        return {"skipped": "torch.cuda.is_available() is False on this machine (torch "
                           f"{torch.__version__}); on a machine with a GPU, "
                           "`python -m benchmarks.run --only cuda` runs this section alone"}
    _log(f"CUDA section: {args.cuda_model} on {args.cuda_device}")
    setting = Setting(model=args.cuda_model, device=args.cuda_device, dtype=args.cuda_dtype,
                      batch=args.cuda_batch, seq=args.cuda_seq)
    warmup, steps = (1, 3) if plan["quick"] else (2, 5)
    configs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        init = str(Path(tmp) / "init.safetensors")
        prepared = _safe(lambda: run_child("benchmarks.training",
                                           ["--mode", "prepare", "--init", init, *setting.to_args()]))
        if "error" in prepared:
            return {"setting": setting.to_dict(), **prepared}
        common = ["--warmup", str(warmup), "--steps", str(steps), "--init", init, *setting.to_args()]
        for round_index in range(plan["rounds"]):
            order = PAIRS if round_index % 2 == 0 else (PAIRS[1], PAIRS[0], PAIRS[3], PAIRS[2])
            for lib, gc in order:
                _run_config(configs, f"{lib}_gc{gc}", ["--lib", lib, "--gc", str(gc), *common])
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else args.cuda_device
    peak = next((value for key, value in GPU_BF16_PEAK.items() if key in device_name), None)
    for key, config in configs.items():
        _summarize(config)
        config["flops"] = step_flops(prepared["shape"], setting.batch, setting.seq, setting.r, "lora",
                                     checkpointing=key.endswith("gc1"))
        if "median_seconds" in config and peak and setting.dtype == "bfloat16":
            config["mfu"] = config["flops"]["model_total"] / config["median_seconds"] / peak
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "setting": setting.to_dict(), "model": prepared, "device_name": device_name,
            "bf16_peak_flops": peak,
            "warmup": warmup, "steps": steps, "configs": configs}


def _safe(fn: Any) -> dict[str, Any]:
    try:
        return fn()
    except Exception as error:
        _log(f"    FAILED: {str(error)[-500:]}")
        return {"error": str(error)[-2000:]}


def _command() -> str:
    python = os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(str(ROOT)) else sys.executable
    return " ".join([python, "-m", "benchmarks.run", *sys.argv[1:]])


def _write(path: Path, text: str) -> None:
    """Atomic: a temporary file in the same folder, then a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as file:
        file.write(text)
    os.chmod(file.name, 0o644)
    os.replace(file.name, path)


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
