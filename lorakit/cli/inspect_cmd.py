"""`lorakit inspect PATH`: what an adapter folder holds, readable at a glance."""

from __future__ import annotations

import argparse

EXAMPLES = """examples:
  lorakit inspect runs/demo/adapter
  lorakit inspect runs/demo            # a training run's folder: its adapter/

Exits with status 1 when the adapter has problems that would stop it from loading (listed last).
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="adapter folder (adapter_config.json + adapter_model.safetensors), "
                                     "or a training run's output folder")


def run(args: argparse.Namespace) -> int:
    from lorakit.formats.inspect_adapter import inspect_adapter

    report = inspect_adapter(args.path)
    print(report.text)
    return 1 if report.problems else 0
