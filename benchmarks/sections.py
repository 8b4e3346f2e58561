"""The benchmarks that print their own tables, run by `make bench` as child processes and quoted as is.

Each is a module of this folder with its own command line (`python -m benchmarks.<module> --help`).
`python -m benchmarks.run --only per_row,serve_load` re-runs some of them and keeps every other
figure of benchmarks/results.json; each section records its own command, date and machine load, so
a figure in docs/benchmarks.md always names the run that measured it.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

from benchmarks.common import run_text


@dataclass(frozen=True)
class Section:
    title: str
    module: str
    args: tuple[str, ...] = ()
    quick_args: tuple[str, ...] = ()
    timeout: float = 3600.0


SECTIONS = {
    "step_profile": Section("Where a training step's time goes (torch.profiler)", "benchmarks.step_profile",
                            quick_args=("--batch", "1", "--seq", "64")),
    "per_row": Section("Per-row adapters (decode shape)", "benchmarks.per_row",
                       quick_args=("--runs", "3", "--warmup", "1")),
    "serve_load": Section("Serving: a load run against lorakit serve", "benchmarks.serve_load",
                          quick_args=("--requests", "48", "--clients", "16")),
    "variants": Section("DoRA step and PiSSA init", "benchmarks.variants",
                        quick_args=("--steps", "2", "--seq", "128")),
    "distributed": Section("Several processes: DDP and FSDP2", "benchmarks.distributed",
                           quick_args=("--steps", "2", "--section", "cpu")),
}


def run_section(key: str, quick: bool) -> dict[str, Any]:
    """Run one section's module; its printed tables, or its error, with the command and the load."""
    section = SECTIONS[key]
    args = list(section.quick_args if quick else section.args)
    record: dict[str, Any] = {
        "command": " ".join(["python -m", section.module, *args]),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "load_average_start": os.getloadavg()[0], "logical_cpus": os.cpu_count(), "quick": quick,
    }
    started = time.time()
    print(f"[{time.strftime('%H:%M:%S')}] {section.title}: {record['command']}", file=sys.stderr, flush=True)
    try:
        record["text"] = run_text(section.module, args, timeout=section.timeout)
    except Exception as error:  # one failed section must not lose the others' figures
        record["error"] = str(error)[-2000:]
    record["seconds"] = time.time() - started
    return record


def render_sections(sections: dict[str, dict[str, Any]]) -> str:
    parts = []
    for key, section in SECTIONS.items():
        record = sections.get(key)
        if not record:
            continue
        busy = record["load_average_start"] > 0.5 * (record["logical_cpus"] or 1)
        lines = [f"## {section.title}", "",
                 f"From `{record['command']}` on {record['date']} ({record['seconds'] / 60:.1f} min; "
                 f"load average {record['load_average_start']:.1f} at its start"
                 f"{', a busy machine: timings less reliable' if busy else ''}"
                 f"{'; quick mode' if record['quick'] else ''}), quoted as it printed:", ""]
        lines.append(f"Failed: `{record['error'][-500:]}`" if "error" in record else record["text"].strip())
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)
