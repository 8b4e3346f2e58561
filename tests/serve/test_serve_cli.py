"""`lorakit serve` as a process: it starts, answers, and drains on SIGTERM, exiting 0."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from lorakit.cli.serve_cmd import parse_adapters
from tests.serve.http import next_event, open_stream, request


def test_adapter_options_are_name_equals_path():
    assert parse_adapters(["sql=runs/sql/adapter", "chat=x=y"]) == {"sql": "runs/sql/adapter", "chat": "x=y"}
    with pytest.raises(ValueError, match="--adapter 'runs/sql' must be NAME=PATH"):
        parse_adapters(["runs/sql"])
    with pytest.raises(ValueError, match="name 'a' is given twice"):
        parse_adapters(["a=x", "a=y"])


@pytest.mark.parametrize("port", ["70000", "-1", "http"])
def test_a_bad_port_is_one_line_before_the_model_loads(port, capsys):
    from lorakit.cli.main import main

    with pytest.raises(SystemExit) as stopped:
        main(["serve", "--port", port])
    assert stopped.value.code == 2
    assert "--port: " in capsys.readouterr().err


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_sigterm_finishes_the_running_request_then_exits_0(files):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "lorakit", "serve", "--model", str(files.model), "--port", str(port),
               "--adapter", f"a0={files.adapters / 'a0'}", "--adapter", f"a1={files.adapters / 'a1'}"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if request(url, "GET", "/health")[0] == 200:
                    break
            except OSError:
                pass
            assert process.poll() is None, process.communicate()[1]
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        # a1 continues "one" for 240 tokens without an end-of-sequence token (greedy): in flight at SIGTERM
        _, response = open_stream(url, dict(model="a1", prompt="one", max_tokens=240, temperature=0))
        events = [next_event(response)]
        process.send_signal(signal.SIGTERM)
        reader = threading.Thread(target=lambda: events.extend(_rest(response)))
        reader.start()
        reader.join(60)
        assert process.wait(60) == 0, process.communicate()[1]
    finally:
        if process.poll() is None:
            process.kill()
    assert events[-1] == "[DONE]", events[-3:]
    finish = json.loads(events[-2])["choices"][0]["finish_reason"]
    assert finish == "length" and len(events) > 20, "the request did not run on after SIGTERM"
    with pytest.raises(OSError):
        request(url, "GET", "/health")


def _rest(response):
    while True:
        try:
            event = next_event(response)
        except EOFError:
            return
        yield event
        if event == "[DONE]":
            return
