"""The benchmark report states only figures its own run measured: change the timings, every
time in the text changes with them."""

import copy
import json
import re
from pathlib import Path

from benchmarks.report import render, summary_rows

RESULTS = Path(__file__).parents[1] / "benchmarks" / "results.json"
TIMES = ("median_seconds", "roofline_seconds")


def slowed(value, factor):
    if isinstance(value, dict):
        return {k: v * factor if k in TIMES and isinstance(v, float) else slowed(v, factor)
                for k, v in value.items()}
    if isinstance(value, list):
        return [slowed(v, factor) for v in value]
    return value


def limits(results):
    text = render(results)
    return text.split("## What limits the targets not met")[1].split("\n## ")[0]


def test_every_time_in_the_limits_section_comes_from_the_run():
    results = json.loads(RESULTS.read_text())
    before = re.findall(r"\b\d+\.\d+ s\b", limits(results))
    after = re.findall(r"\b\d+\.\d+ s\b", limits(slowed(copy.deepcopy(results), 1.37)))
    assert before and len(before) == len(after)
    assert [b for b, a in zip(before, after, strict=True) if a == b] == []


def test_the_cuda_targets_are_judged_from_the_cuda_run():
    results = json.loads(RESULTS.read_text())
    config = {"tokens_per_s": 1000.0, "cuda_peak_allocated": 8 * 2**30, "median_seconds": 8.0}
    results["cuda"] = {"device_name": "NVIDIA H200", "configs": {
        "lorakit_gc0": {**config, "tokens_per_s": 2100.0, "cuda_peak_allocated": 5 * 2**30},
        "peft_gc0": config}}
    rows = {row["measure"]: row for row in summary_rows(results)}
    speed = rows["CUDA training throughput, NVIDIA H200 (tokens/s)"]
    memory = rows["CUDA peak memory, NVIDIA H200 (max_memory_allocated)"]
    assert (speed["ratio"], speed["met"]) == (2.1, "yes")
    assert (memory["ratio"], memory["met"]) == (0.625, "no")
    results.pop("cuda")
    assert not any(row["measure"].startswith("CUDA") for row in summary_rows(results))


def test_a_machine_without_a_gpu_keeps_the_figures_a_gpu_measured():
    from benchmarks.run import kept_cuda_section

    measured = {"date": "2026-12-01T10:00:00+00:00", "device_name": "NVIDIA H200",
                "configs": {"lorakit_gc0": {}}}
    skipped = {"skipped": "torch.cuda.is_available() is False on this machine"}
    assert kept_cuda_section(skipped, measured) is measured
    assert kept_cuda_section(skipped, {}) is skipped
    fresh = {"device_name": "NVIDIA H100", "configs": {}}
    assert kept_cuda_section(fresh, measured) is fresh
