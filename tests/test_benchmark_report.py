"""The benchmark report states only figures its own run measured: change the timings, every
time in the text changes with them."""

import copy
import json
import re
from pathlib import Path

from benchmarks.report import render

RESULTS = Path(__file__).parents[1] / "benchmarks" / "results.json"
TIMES = ("median_seconds", "roofline_seconds")


def slowed(value, factor):
    if isinstance(value, dict):
        return {k: v * factor if k in TIMES and isinstance(v, float) else slowed(v, factor) for k, v in value.items()}
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
