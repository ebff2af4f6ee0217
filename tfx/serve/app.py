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
from tfx.serve.languages import Languages
from tfx.serve.metrics import Metrics

log = logging.getLogger("tfx.serve")


class Backend(Protocol):
    name: str
    languages: Languages
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
    service = _Service(backend, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.batcher = Batcher(backend.decode, backend.rows, settings.max_wait, settings.max_queue,
                                  service.metrics)
        worker = asyncio.create_task(service.batcher.run())
        yield
        worker.cancel()
        service.batcher.close()

    return Starlette(routes=[
        Route("/", service.index), Route("/health", service.health), Route("/metrics", service.metrics_text),
        Route("/languages", service.languages),
        Route("/translate", service.endpoint("/translate", service.libretranslate, forms=True), methods=["POST"]),
        Route("/v1/translate", service.endpoint("/v1/translate", service.v1), methods=["POST"]),
    ], lifespan=lifespan)


class _Service:
    """The routes' handlers over one backend and its batcher (set at start-up)."""

    def __init__(self, backend: Backend, settings: Settings):
        self.backend, self.settings, self.batcher = backend, settings, None
        self.metrics = Metrics()
        self.metrics.compilations.set_function(lambda: getattr(backend, "compilations", 0))
        self.page = importlib.resources.files("tfx.serve").joinpath("page.html").read_text(encoding="utf-8")

    def endpoint(self, name: str, handle, forms: bool = False):
        """A POST route: the JSON body (or with `forms` a form-encoded one) to
        `handle(payload)`'s reply, errors as the module doc says."""
        async def route(http: HttpRequest) -> Response:
            start = time.perf_counter()
            form = forms and http.headers.get("content-type", "").startswith("application/x-www-form-urlencoded")
            try:
                body = await _body(http, self.settings.max_body)
                reply = JSONResponse(await handle(api.parse_form(body) if form else api.parse_json(body)))
            except api.BadRequest as error:
                reply = JSONResponse({"error": str(error)}, status_code=error.status)
            except _Refused as error:
                reply = JSONResponse({"error": str(error)}, status_code=error.status, headers=error.headers)
            except Exception as error:  # a failed decode: this request's reply, not the server's end.
                log.exception("%s failed", name)
                reply = JSONResponse({"error": f"translation failed: {error}"}, status_code=500)
            self.metrics.answered(name, reply.status_code, time.perf_counter() - start)
            return reply
        return route

    async def translate(self, request: api.Request) -> list[list[tuple[str, float]]]:
        self.backend.check(request)
        try:
            return await asyncio.wait_for(self.batcher.translate(request), self.settings.timeout)
        except QueueFull as error:
            raise _Refused(503, f"the server is busy: {error} Retry later.",
                           {"Retry-After": str(self.settings.retry_after)}) from None
        except TimeoutError:
            raise _Refused(504, f"the translation took longer than {self.settings.timeout:g} s.") from None

    async def libretranslate(self, payload: dict) -> dict:
        request, many = api.libretranslate_request(payload, self.backend.languages, self.settings.max_sentences)
        results = await self.translate(request)
        texts = [hypotheses[0][0] for hypotheses in results]
        reply = {"translatedText": texts if many else texts[0]}
        if request.nbest > 1:
            alternatives = [[text for text, _ in hypotheses[1:]] for hypotheses in results]
            reply["alternatives"] = alternatives if many else alternatives[0]
        return reply

    async def v1(self, payload: dict) -> dict:
        request, _ = api.v1_request(payload, self.backend.languages, self.settings.max_sentences)
        results = await self.translate(request)
        return {"translations": [{"text": hypotheses[0][0], "score": hypotheses[0][1],
                                  "hypotheses": [{"text": text, "score": score} for text, score in hypotheses]}
                                 for hypotheses in results]}

    async def health(self, _):
        languages = self.backend.languages
        return JSONResponse({"status": "ok", "backend": self.backend.name, "source": languages.source,
                             "target": languages.target})

    async def languages(self, _):
        languages = self.backend.languages
        return JSONResponse([{"code": code, "name": code, "targets": languages.targets(code)}
                             for code in languages.codes()])

    async def metrics_text(self, _):
        return Response(self.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def index(self, _):
        return HTMLResponse(self.page)


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
