"""`lorakit inspect PATH`: what an adapter folder holds, readable at a glance."""

from __future__ import annotations

import argparse

EXAMPLES = """examples:
  lorakit inspect runs/demo/adapter
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="adapter folder (adapter_config.json + adapter_model.safetensors)")


def run(args: argparse.Namespace) -> int:
    from lorakit.core.inspect_adapter import describe_adapter

    print(describe_adapter(args.path))
    return 0
