"""Running the app under uvicorn, with SIGTERM draining the server and exiting 0."""

from __future__ import annotations

import signal

from lorakit.serve.app import create_app
from lorakit.serve.engine import Engine


def serve(engine: Engine, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          drain_s: float = 30.0) -> None:
    """Serve `engine` until SIGTERM or Ctrl-C.

    On SIGTERM uvicorn stops accepting connections, lets in-flight requests finish (at most
    `drain_s` seconds), then the scheduler stops and this returns normally.
    """
    import uvicorn

    config = uvicorn.Config(create_app(engine, api_key), host=host, port=port, log_level="warning",
                            timeout_graceful_shutdown=max(1, round(drain_s)), access_log=False)
    # uvicorn raises the signal it caught again once it has shut down; the drained server exits 0 then.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        uvicorn.Server(config).run()
    finally:
        signal.signal(signal.SIGTERM, previous)
