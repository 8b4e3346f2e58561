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


class BackgroundServer:
    """`engine` served by uvicorn on a thread of this process, for notebooks, tests and benchmarks.

    Args:
        engine: what to serve.
        host: the address to bind.
        port: the port; 0 picks a free one (read it from `url`).
        api_key: as `serve`'s.

    Raises:
        RuntimeError: if the server has not started within `timeout_s`.
    """

    def __init__(self, engine: Engine, host: str = "127.0.0.1", port: int = 0, api_key: str | None = None,
                 timeout_s: float = 60.0) -> None:
        import threading
        import time

        import uvicorn

        self.engine = engine
        config = uvicorn.Config(create_app(engine, api_key), host=host, port=port, log_level="warning",
                                access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="lorakit-serve", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"the server on {host}:{port} did not start within {timeout_s:g} s")
            time.sleep(0.02)
        bound = self.server.servers[0].sockets[0].getsockname()
        self.url = f"http://{host}:{bound[1]}"

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop as SIGTERM would: finish the requests in flight, then end the thread."""
        self.server.should_exit = True
        self.thread.join(timeout_s)
