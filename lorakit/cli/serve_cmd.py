"""`lorakit serve`: one base model, many adapters, an OpenAI-compatible API (docs/serve.md)."""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path

from lorakit.cli.common import number_at_least, train_help

EXAMPLES = """examples:
  lorakit serve --model default --adapter sql=runs/sql/adapter --adapter chat=runs/chat/adapter
  lorakit serve --adapter-dir adapters --api-key "$KEY" --max-batch 32      # load adapters at run time
  curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"model": "sql", "messages": [{"role": "user", "content": "List all tables"}]}'
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default",
                        help=f"{train_help('model')}; requests name it to run no adapter")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                        help="serve the adapter folder PATH under NAME (the request's model field); repeat")
    parser.add_argument("--adapter-dir", default=None, metavar="DIR",
                        help="allow /v1/load_lora_adapter to load adapters from inside DIR "
                             "(and nowhere else)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 exposes the server")
    parser.add_argument("--port", type=_port, default=8000, help="port to listen on (0: any free port)")
    parser.add_argument("--max-batch", type=number_at_least(1), default=16,
                        help="most requests in one decode step")
    parser.add_argument("--max-queue", type=number_at_least(0), default=256,
                        help="most requests waiting to join the batch; more are refused with 429")
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
    parser.add_argument("--drain-timeout", type=number_at_least(0, float), default=30.0,
                        help="seconds SIGTERM waits for running requests before exiting")
    parser.add_argument("--dtype", default=None, help=train_help("dtype"))
    parser.add_argument("--device", default="auto", help=train_help("device"))


def run(args: argparse.Namespace) -> int:
    from lorakit.hf import load_model
    from lorakit.serve.engine import Engine
    from lorakit.serve.server import serve

    adapters = parse_adapters(args.adapter)
    if args.adapter_dir is not None and not Path(args.adapter_dir).is_dir():
        state = "is a file" if Path(args.adapter_dir).exists() else "does not exist"
        raise ValueError(f"--adapter-dir {args.adapter_dir} {state}; give the folder that holds the adapter "
                         "folders requests may load")
    check_address(args.host, args.port)  # before the model loads, not after
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    engine = Engine(model, tokenizer, args.model, adapters, args.adapter_dir, args.max_batch, args.max_queue)
    names = ", ".join(engine.registry.names())
    print(f"lorakit serve: http://{args.host}:{args.port}/v1 serving {names}", file=sys.stderr, flush=True)
    serve(engine, args.host, args.port, args.api_key, args.drain_timeout)
    return 0


def parse_adapters(values: list[str]) -> dict[str, str]:
    """NAME=PATH pairs as a dict; one-line errors for a missing '=' or a repeated name."""
    adapters: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapter {value!r} must be NAME=PATH (e.g. sql=runs/sql/adapter); "
                             "the name is what requests put in their model field")
        if name in adapters:
            raise ValueError(f"--adapter name {name!r} is given twice ({adapters[name]} and {path}); "
                             "give each adapter its own name")
        adapters[name] = path
    return adapters


def check_address(host: str, port: int) -> None:
    """Refuse an address this server could not listen on (a port in use, an unknown host), in one line.

    A probe: the port is free again at once, and uvicorn binds it the same way (SO_REUSEADDR).
    """
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as err:  # socket.gaierror too
        raise ValueError(f"cannot listen on --host {host} --port {port}: {err.strerror or err}; "
                         "choose another --port (0: any free port) or --host") from None


def _port(text: str) -> int:
    """An argparse type: a TCP port, 0-65535, refused before the model is loaded."""
    port = number_at_least(0)(text)
    if port > 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port, 0-65535, got {text}")
    return port
