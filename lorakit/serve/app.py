"""The HTTP API (FastAPI): OpenAI's routes, vLLM's adapter routes, health and metrics.

    GET  /v1/models                   the base model and every adapter
    POST /v1/chat/completions         chat template applied; streaming as server-sent events
    POST /v1/completions              raw text continued
    POST /v1/load_lora_adapter        {"lora_name", "lora_path"} (vLLM's names), inside --adapter-dir only
    POST /v1/unload_lora_adapter      {"lora_name"}
    GET  /health, GET /metrics        open without the API key, as in vLLM

Handlers run on the event loop and only queue work and wait: the model runs on the scheduler's
thread. With an API key, every /v1 route wants `Authorization: Bearer KEY`, compared in constant
time (hmac.compare_digest), so the time to refuse says nothing about the key.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from lorakit.serve import responses
from lorakit.serve.engine import Engine
from lorakit.serve.schemas import ApiError, parse_generation, parse_load, parse_unload
from lorakit.serve.sequence import Sequence

DISCONNECT_POLL_S = 0.5  # how often a waiting non-streaming request checks that its client is still there


def create_app(engine: Engine, api_key: str | None = None) -> FastAPI:
    """The FastAPI app serving `engine`; the scheduler thread starts and stops with the app's lifespan."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.scheduler.start()
        try:
            yield
        finally:  # uvicorn has finished the in-flight requests (or run out of its graceful time)
            await asyncio.to_thread(engine.scheduler.stop, 10.0)

    app = FastAPI(title="lorakit serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def refuse(request: Request, err: ApiError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.middleware("http")
    async def check_key(request: Request, call_next: Any) -> Response:
        if api_key is not None and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            expected = f"Bearer {api_key}"
            if not hmac.compare_digest(given.encode(), expected.encode()):
                what = "missing" if not given else "wrong"
                err = ApiError(401, f"the API key is {what}; send the header 'Authorization: Bearer <key>' "
                                    "with the key given to --api-key", kind="authentication_error")
                return JSONResponse(err.body(), status_code=401)
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(engine.metrics.text(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return responses.model_list(engine.registry.base_name, dict(engine.registry.paths))

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await _generate(engine, request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _generate(engine, request, chat=False)

    @app.post("/v1/load_lora_adapter")
    async def load(request: Request) -> PlainTextResponse:
        name, path = parse_load(await request.body())
        await asyncio.to_thread(engine.registry.load, name, path)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload(request: Request) -> PlainTextResponse:
        name = parse_unload(await request.body())
        await asyncio.to_thread(engine.registry.unload, name, engine.scheduler.in_use)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    return app


async def _generate(engine: Engine, http: Request, chat: bool) -> Response:
    """Queue the request, then answer whole or stream; every outcome is counted in the metrics."""
    started = time.monotonic()
    model, status = "-", 500
    try:
        request = parse_generation(await http.body(), chat)
        model = request.model
        loop, changed = asyncio.get_running_loop(), asyncio.Event()

        def notify() -> None:  # called from the scheduler thread
            loop.call_soon_threadsafe(changed.set)

        sequence = engine.start_request(request, notify)
        response = await _respond(http, sequence, changed, responses.new_id(chat), int(time.time()))
        status = response.status_code
        return response
    except ApiError as err:
        status = err.status
        raise
    finally:
        engine.metrics.requests.labels(model, str(status)).inc()
        if status == 200:
            engine.metrics.latency.observe(time.monotonic() - started)


async def _respond(http: Request, sequence: Sequence, changed: asyncio.Event, request_id: str,
                   created: int) -> Response:
    # Wait for the prefill (or the whole answer) first, so a failure there is still a plain 500.
    try:
        while not (sequence.done or (sequence.request.stream and sequence.generated)):
            try:
                await asyncio.wait_for(changed.wait(), DISCONNECT_POLL_S)
            except TimeoutError:
                if await http.is_disconnected():
                    sequence.cancelled.set()
                    return Response(status_code=499)
            changed.clear()
    except asyncio.CancelledError:
        sequence.cancelled.set()
        raise
    if sequence.error is not None:
        return JSONResponse(_failure(sequence).body(), status_code=500)
    if not sequence.request.stream:
        return JSONResponse(responses.answer(sequence, request_id, created))
    return StreamingResponse(_stream(sequence, changed, request_id, created), media_type="text/event-stream")


async def _stream(sequence: Sequence, changed: asyncio.Event, request_id: str,
                  created: int) -> AsyncIterator[str]:
    """Server-sent events: the role (chat), text as it becomes final, the finish reason, usage, [DONE].

    When the client goes away, Starlette cancels this generator; the row leaves the batch at the
    next step.
    """
    try:
        if sequence.request.chat:
            yield responses.chunk(sequence, request_id, created, None, role=True)
        sent = 0
        while True:
            changed.clear()
            text, done, error = sequence.visible_text(), sequence.done, sequence.error
            if len(text) > sent:
                yield responses.chunk(sequence, request_id, created, text[sent:])
                sent = len(text)
            if error is not None:  # the status line went out already: the error travels as an event
                yield responses.event(_failure(sequence).body())
                return
            if done:
                yield responses.chunk(sequence, request_id, created, None,
                                      finish_reason=sequence.finish_reason)
                if sequence.request.include_usage:
                    yield responses.usage_chunk(sequence, request_id, created)
                yield responses.DONE
                return
            await changed.wait()
    finally:
        if not sequence.done:
            sequence.cancelled.set()


def _failure(sequence: Sequence) -> ApiError:
    err = sequence.error
    return ApiError(500, f"generation failed for this request: {type(err).__name__}: {err}",
                    kind="server_error")
