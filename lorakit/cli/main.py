"""`lorakit COMMAND ...`: dispatch to one module per command; errors print one line unless --debug."""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading
import warnings
from collections.abc import Sequence

COMMANDS = {
    "train": "fine-tune a LoRA (or QLoRA) adapter on a JSONL file",
    "generate": "generate text with a base model and adapters, streamed to the terminal",
    "merge": "merge an adapter into its base model and save a transformers folder (or a GGUF file)",
    "eval": "loss and exact match of a model (+ adapter) on a JSONL file",
    "estimate": ("trainable parameters and memory of full fine-tuning, LoRA and QLoRA, "
                 "without loading weights"),
    "inspect": "describe an adapter folder at a glance",
    "serve": "serve a base model and many adapters over an OpenAI-compatible HTTP API",
    "export": "write an adapter as a llama.cpp / Ollama LoRA GGUF file",
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Examples kept as written, and every option's default shown after its help."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        silent = action.default in (None, False, [], argparse.SUPPRESS) or not action.option_strings
        return text if silent or "default:" in text else f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorakit", description="LoRA and QLoRA fine-tuning for PyTorch language models.",
        epilog="Run 'lorakit COMMAND --help' for a command's options and examples.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, summary in COMMANDS.items():
        module = importlib.import_module(f"lorakit.cli.{name}_cmd")
        sub = commands.add_parser(name, help=summary, description=f"{summary}.", epilog=module.EXAMPLES,
                                  formatter_class=HelpFormatter)
        # SUPPRESS: an unset sub-command flag must not overwrite `lorakit --debug COMMAND`.
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                         help="show full tracebacks on errors")
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # `kill` and job schedulers stop a run with SIGTERM: end it as Ctrl-C does, which releases the
    # output folder and says how to continue.
    previous = signal.signal(signal.SIGTERM, _interrupt) if _main_thread() else None
    previous_format, warnings.formatwarning = warnings.formatwarning, _one_line_warning  # type: ignore[assignment]
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("lorakit: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # one clear line for people; the traceback for --debug
        if args.debug:
            raise
        print(f"lorakit {args.command}: error: {err}", file=sys.stderr)
        return 1
    finally:
        warnings.formatwarning = previous_format
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                      line: str | None = None) -> str:
    # People read warnings, not source lines: "lorakit: warning: ..." on one line.
    return f"lorakit: warning: {message}\n"


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    sys.exit(main())
