"""`create_app(settings)`: the FastAPI app, its lifespan (load, warm up, drain) and plumbing."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import __version__
from app.api.auth import OPEN_PATHS, BearerAuth
from app.api.errors import error_body, error_response, internal_response
from app.api.fetch import UrlFetcher
from app.api.routes import router
from app.engine.loader import resolve_device
from app.errors import ModelLoadError, PatchpackError
from app.metrics import Metrics
from app.service import EncodeService
from app.settings import Settings

log = logging.getLogger(__name__)

_KNOWN_ENDPOINTS = frozenset({"/encode", "/info", "/docs", "/openapi.json", *OPEN_PATHS})


class RequestMetrics:
    """Counts every response by endpoint and status, and times /encode end to end."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        # Unknown paths share one label so scanners cannot blow up the series count.
        endpoint = path if path in _KNOWN_ENDPOINTS else "other"
        status = 500
        started = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.requests.labels(endpoint, str(status)).inc()
            if endpoint == "/encode":
                self.metrics.request_duration.observe(time.perf_counter() - started)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    try:
        cuda = resolve_device(settings.device).type == "cuda"
    except ModelLoadError as exc:
        raise SystemExit(str(exc)) from exc
    settings = settings.resolve(cuda=cuda)
    metrics = Metrics()
    service = EncodeService(settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        fetcher = (
            UrlFetcher(settings.url_timeout_s, settings.max_request_bytes)
            if settings.allow_urls
            else None
        )
        app.state.fetcher = fetcher
        service.start()
        try:
            yield
        finally:
            await service.drain(timeout=settings.request_timeout_s)
            if fetcher is not None:
                await fetcher.aclose()

    app = FastAPI(
        title="patchpack",
        version=__version__,
        summary="Any-resolution image embeddings (SigLIP 2 NaFlex, patch-n'-pack batching)",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.service = service
    app.state.fetcher = None
    app.include_router(router)

    def rejected(error_type: str) -> None:
        metrics.rejected.labels(error_type).inc()

    # Added last = outermost: refused requests are still counted by RequestMetrics.
    app.add_middleware(BearerAuth, keys=settings.api_key_list, on_reject=rejected)
    app.add_middleware(RequestMetrics, metrics=metrics)

    @app.exception_handler(PatchpackError)
    async def _domain_error(request: Request, exc: PatchpackError) -> JSONResponse:
        rejected(exc.type)
        if exc.type == "internal":
            log.error("internal error on %s: %s", request.url.path, exc.message)
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        rejected("invalid_request")
        first: dict[str, Any] = exc.errors()[0] if exc.errors() else {}
        message = f"{'.'.join(str(p) for p in first.get('loc', ()))}: {first.get('msg', '')}"
        return JSONResponse(error_body("invalid_request", message), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(
            error_body(kind, str(exc.detail)), status_code=exc.status_code, headers=exc.headers
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        rejected("internal")
        return internal_response()

    return app
