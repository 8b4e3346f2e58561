"""Raw HTTP against the test server, for what the openai client will not send (bad JSON, wrong types)."""

from __future__ import annotations

import http.client
import json
from typing import Any
from urllib.parse import urlparse


def request(url: str, method: str, path: str, body: bytes | dict | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
    """(status, headers, body as JSON or text) of one request."""
    parsed = urlparse(url)
    connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=60)
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    connection.request(method, path, body=data,
                       headers={"Content-Type": "application/json", **(headers or {})})
    response = connection.getresponse()
    raw = response.read().decode()
    connection.close()
    try:
        content: Any = json.loads(raw)
    except json.JSONDecodeError:
        content = raw
    return response.status, {k.lower(): v for k, v in response.getheaders()}, content


def post(url: str, path: str, body: bytes | dict,
         headers: dict[str, str] | None = None) -> tuple[int, dict, Any]:
    return request(url, "POST", path, body, headers)


def open_stream(url: str, body: dict) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """Start a streaming request; read events from the response with `next_event`."""
    parsed = urlparse(url)
    connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=60)
    connection.request("POST", "/v1/completions", body=json.dumps({**body, "stream": True}).encode(),
                       headers={"Content-Type": "application/json"})
    return connection, connection.getresponse()


def next_event(response: http.client.HTTPResponse) -> str:
    """The data of the next server-sent event."""
    while True:
        line = response.readline().decode()
        if not line:
            raise EOFError("the stream ended")
        if line.startswith("data: "):
            return line[len("data: "):].strip()
