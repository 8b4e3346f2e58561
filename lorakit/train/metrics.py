"""metrics.jsonl (one JSON object per event) and the loss curve plot.

Starting, trimming (on resume) and plotting replace the file whole (formats/atomic.py); events are
appended, and a torn last line (the only damage an append can do) is dropped when read.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lorakit.formats.atomic import write_file_atomically


class MetricsLog:
    """Appends events to metrics.jsonl; on resume, drops events after the checkpoint's step."""

    def __init__(self, path: Path, resume_step: int | None = None,
                 say: Callable[[str], None] = print) -> None:
        self.path = path
        self._say = say
        if resume_step is None:
            write_file_atomically(path, lambda tmp: tmp.write_text(""))
        elif path.exists():
            kept = [event for event in self.events() if event.get("step", 0) <= resume_step]
            text = "".join(json.dumps(event) + "\n" for event in kept)
            write_file_atomically(path, lambda tmp: tmp.write_text(text))

    def write(self, **event: Any) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(event) + "\n")

    def events(self) -> list[dict[str, Any]]:
        """Every event in the file. A torn last line (disk full, power cut) is dropped with a notice."""
        lines = [(number, line) for number, line in enumerate(self.path.read_text().splitlines(), start=1)
                 if line.strip()]
        events = []
        for index, (number, line) in enumerate(lines):
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                event = None
            if isinstance(event, dict):
                events.append(event)
            elif index == len(lines) - 1:
                self._say(f"{self.path}:{number}: dropped a torn last line ({len(line)} characters), "
                          "left by a write that did not finish")
            else:
                raise ValueError(f"{self.path}:{number}: not a JSON object; this metrics file is damaged "
                                 "(move it aside to resume without it)")
        return events


def plot_losses(events: list[dict[str, Any]], path: Path) -> Path:
    """Draw train and validation loss against the step into a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no screen needed
    import matplotlib.pyplot as plt

    train = [(e["step"], e["loss"]) for e in events if e.get("kind") == "train"]
    val = [(e["step"], e["val_loss"]) for e in events if e.get("kind") == "eval"]
    figure, axes = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        axes.plot(*zip(*train, strict=True), label="train loss", linewidth=1.2)
    if val:
        axes.plot(*zip(*val, strict=True), "o-", label="validation loss", linewidth=1.5)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss (cross-entropy per answer token)")
    axes.set_title("lorakit training")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    # The temporary file's name ends in `.tmp-PID-HEX`, so the format comes from `path`'s suffix.
    file_format = path.suffix[1:] or matplotlib.rcParams["savefig.format"]
    try:
        write_file_atomically(path, lambda tmp: figure.savefig(tmp, format=file_format))
    finally:
        plt.close(figure)
    return path
