"""The HTTP application: routes, replies and errors (Starlette; serve.py runs it with uvicorn).

    GET  /               the web page (tfx/serve/page.html)
    GET  /health         {"status": "ok", "backend": ..., "source": ..., "target": ...}
    GET  /metrics        Prometheus text format (tfx/serve/metrics.py)
    GET  /languages      LibreTranslate's language list
    POST /translate      LibreTranslate's API
    POST /v1/translate   tfx's API (tfx/serve/api.py)

Every error is a JSON object {"error": message}, LibreTranslate's shape: 400 for a bad request
(the message names the field), 413 for a body over `max_body` bytes, 503 with Retry-After when
the queue is full, 504 past `timeout` seconds, 500 when decoding fails. A bad request never
touches another's reply.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.resources
import logging
import time
from typing import Protocol

from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from tfx.serve import api
from tfx.serve.batcher import Batcher, Item, QueueFull
from tfx.serve.metrics import Metrics

log = logging.getLogger("tfx.serve")


class Backend(Protocol):
    name: str
    source_lang: str
    target_lang: str
    rows: int  # sentences per decoded batch.

    def check(self, request: api.Request): ...  # raises api.BadRequest

    def decode(self, items: list[Item]) -> list[list[tuple[str, float]]]: ...


@dataclasses.dataclass(frozen=True)
class Settings:
    max_wait: float = 0.005  # seconds the oldest sentence waits for a fuller batch.
    max_queue: int = 1024  # sentences waiting, at most.
    timeout: float = 60.0  # seconds a request may take.
    max_body: int = 1 << 20  # bytes.
    max_sentences: int = 64  # per request.
    retry_after: int = 1  # seconds, with a 503.


class _Refused(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers


def create_app(backend: Backend, settings: Settings = Settings()) -> Starlette:
    metrics = Metrics()
    metrics.compilations.set_function(lambda: getattr(backend, "compilations", 0))
    page = importlib.resources.files("tfx.serve").joinpath("page.html").read_text(encoding="utf-8")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        app.state.batcher = Batcher(backend.decode, backend.rows, settings.max_wait, settings.max_queue, metrics)
        worker = asyncio.create_task(app.state.batcher.run())
        yield
        worker.cancel()
        app.state.batcher.close()

    async def translate(request: api.Request, http: HttpRequest) -> list[list[tuple[str, float]]]:
        backend.check(request)
        try:
            return await asyncio.wait_for(http.app.state.batcher.translate(request), settings.timeout)
        except QueueFull as error:
            raise _Refused(503, f"the server is busy: {error} Retry later.",
                           {"Retry-After": str(settings.retry_after)}) from None
        except TimeoutError:
            raise _Refused(504, f"the translation took longer than {settings.timeout:g} s.") from None

    async def libretranslate(http: HttpRequest, payload: dict) -> dict:
        request, many = api.libretranslate_request(payload, backend.source_lang, [backend.target_lang],
                                                   settings.max_sentences)
        results = await translate(request, http)
        texts = [hypotheses[0][0] for hypotheses in results]
        reply = {"translatedText": texts if many else texts[0]}
        if request.nbest > 1:
            alternatives = [[text for text, _ in hypotheses[1:]] for hypotheses in results]
            reply["alternatives"] = alternatives if many else alternatives[0]
        return reply

    async def v1(http: HttpRequest, payload: dict) -> dict:
        request, _ = api.v1_request(payload, settings.max_sentences)
        if request.target_lang not in (None, backend.target_lang):
            raise api.BadRequest(f"target_lang: this model translates into {backend.target_lang!r} only.")
        results = await translate(request, http)
        return {"translations": [{"text": hypotheses[0][0], "score": hypotheses[0][1],
                                  "hypotheses": [{"text": text, "score": score} for text, score in hypotheses]}
                                 for hypotheses in results]}

    def endpoint(name: str, handle):
        async def route(http: HttpRequest) -> Response:
            start = time.perf_counter()
            try:
                reply = JSONResponse(await handle(http, api.parse_json(await _body(http, settings.max_body))))
            except api.BadRequest as error:
                reply = JSONResponse({"error": str(error)}, status_code=error.status)
            except _Refused as error:
                reply = JSONResponse({"error": str(error)}, status_code=error.status, headers=error.headers)
            except Exception as error:  # a failed decode: this request's reply, not the server's end.
                log.exception("%s failed", name)
                reply = JSONResponse({"error": f"translation failed: {error}"}, status_code=500)
            metrics.answered(name, reply.status_code, time.perf_counter() - start)
            return reply
        return route

    async def health(_):
        return JSONResponse({"status": "ok", "backend": backend.name, "source": backend.source_lang,
                             "target": backend.target_lang})

    async def languages(_):
        return JSONResponse([{"code": backend.source_lang, "name": backend.source_lang, "targets": [backend.target_lang]},
                             {"code": backend.target_lang, "name": backend.target_lang, "targets": []}])

    async def metrics_text(_):
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def index(_):
        return HTMLResponse(page)

    return Starlette(routes=[
        Route("/", index), Route("/health", health), Route("/metrics", metrics_text),
        Route("/languages", languages),
        Route("/translate", endpoint("/translate", libretranslate), methods=["POST"]),
        Route("/v1/translate", endpoint("/v1/translate", v1), methods=["POST"]),
    ], lifespan=lifespan)


async def _body(http: HttpRequest, most: int) -> bytes:
    """The request body, refused (413) past `most` bytes whatever Content-Length says."""
    too_large = api.BadRequest(f"body: larger than {most} bytes.", status=413)
    if int(http.headers.get("content-length") or 0) > most:
        raise too_large
    body = bytearray()
    async for chunk in http.stream():
        body += chunk
        if len(body) > most:
            raise too_large
    return bytes(body)
