"""HTTP routes: parse the request into service calls, await the service, render the result."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from app.api.render import render_response
from app.api.schemas import EncodeParams, EncodeRequest, EncodeResponse, ErrorResponse, ImageObject
from app.errors import InvalidRequest, PayloadTooLarge, UnsupportedMediaType
from app.service import EncodeOptions, EncodeService, ImageSpec

router = APIRouter()

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 413, 415, 422, 429, 503, 504)
}
_JSON_BODY = {
    "requestBody": {
        "content": {
            "application/json": {"schema": EncodeRequest.model_json_schema()},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"image": {"type": "array", "items": {"format": "binary"}}},
                }
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
        "required": True,
    }
}
_DISCONNECT_POLL_S = 0.1


def _service(request: Request) -> EncodeService:
    service: EncodeService = request.app.state.service
    return service


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body exceeds MAX_REQUEST_BYTES={limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body exceeds MAX_REQUEST_BYTES={limit}")
        chunks.append(chunk)
    return b"".join(chunks)


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "body"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def _params(values: dict[str, Any]) -> EncodeParams:
    try:
        return EncodeParams.model_validate(values)
    except ValidationError as exc:
        raise InvalidRequest(_validation_message(exc)) from exc


async def _parse_multipart(request: Request, body: bytes) -> tuple[list[ImageSpec], EncodeParams]:
    async def replay() -> AsyncGenerator[bytes, None]:
        yield body

    limit = request.app.state.settings.max_request_bytes
    parser = MultiPartParser(request.headers, replay(), max_part_size=limit)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise InvalidRequest(f"malformed multipart body: {exc.message}") from exc
    images, fields = [], {}
    for key, value in form.multi_items():
        if key == "image":
            if not isinstance(value, UploadFile):
                raise InvalidRequest("form field 'image' must be a file part")
            images.append(ImageSpec(data=await value.read()))
        elif isinstance(value, UploadFile):
            raise InvalidRequest(f"unexpected file part {key!r}; images go in parts named 'image'")
        else:
            fields[key] = value
    await form.close()
    if not images:
        raise InvalidRequest("multipart request has no file part named 'image'")
    return images, _params(fields)


def _parse_json(body: bytes) -> tuple[list[ImageSpec], EncodeParams]:
    try:
        req = EncodeRequest.model_validate_json(body)
    except ValidationError as exc:
        raise InvalidRequest(_validation_message(exc)) from exc
    images = []
    for entry in req.images:
        if isinstance(entry, ImageObject):
            images.append(
                ImageSpec(
                    base64=entry.data,
                    url=entry.url,
                    token_budget=entry.token_budget,
                    min_pixels=entry.min_pixels,
                    max_pixels=entry.max_pixels,
                )
            )
        else:
            images.append(ImageSpec(base64=entry))
    return images, EncodeParams.model_validate(req.model_dump(exclude={"images"}))


def _check_budgets(images: list[ImageSpec], params: EncodeParams, limit: int) -> None:
    for i, spec in enumerate([None, *images]):
        budget = params.token_budget if spec is None else spec.token_budget
        if budget is not None and budget > limit:
            raise InvalidRequest(
                f"token_budget {budget} exceeds MAX_TOKEN_BUDGET={limit}",
                index=None if spec is None else i - 1,
            )


async def _until_disconnected(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(_DISCONNECT_POLL_S)


@router.post(
    "/encode",
    response_model=EncodeResponse,
    responses=_ERRORS,
    openapi_extra=_JSON_BODY,
    summary="Encode images into embeddings",
)
async def encode(request: Request) -> Response:
    started = time.perf_counter()
    service = _service(request)
    settings = service.settings
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in ("application/json", "multipart/form-data") and not ctype.startswith("image/"):
        raise UnsupportedMediaType(
            f"content type {ctype or 'none'!r} is not accepted; send application/json, "
            "multipart/form-data or image/*"
        )
    body = await _read_body(request, settings.max_request_bytes)
    if ctype == "application/json":
        images, params = _parse_json(body)
    elif ctype == "multipart/form-data":
        images, params = await _parse_multipart(request, body)
    else:
        images, params = [ImageSpec(data=body)], _params(dict(request.query_params))
    _check_budgets(images, params, settings.max_token_budget)
    options = EncodeOptions(
        token_budget=params.token_budget,
        min_pixels=params.min_pixels,
        max_pixels=params.max_pixels,
        strategy=params.strategy,
        max_tiles=params.max_tiles,
        return_tokens=params.return_patch_embeddings,
    )
    fetcher = request.app.state.fetcher
    work = asyncio.ensure_future(
        service.encode(images, options, fetch=fetcher.fetch if fetcher else None)
    )
    watcher = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not work.done():
        # The client left: abandon its images (skipped before packing) and answer nobody.
        work.cancel()
        return Response(status_code=499)
    results = work.result()
    payload = render_response(
        service.model.model_id if service.model else settings.model,
        results,
        params.normalize,
        params.encoding_format,
        time.perf_counter() - started,
    )
    return JSONResponse(payload)


def _probe(ok: bool, words: tuple[str, str], state: str) -> Response:
    return JSONResponse(
        {"status": words[0] if ok else words[1], "state": state}, status_code=200 if ok else 503
    )


@router.get("/healthz", summary="Liveness: the process and its device worker are alive")
async def healthz(request: Request) -> Response:
    service = _service(request)
    return _probe(service.alive, ("ok", "dead"), service.state.value)


@router.get("/readyz", summary="Readiness: loaded, warmed up and accepting work")
async def readyz(request: Request) -> Response:
    service = _service(request)
    return _probe(service.ready, ("ready", "not_ready"), service.state.value)


@router.get("/info", summary="Model, device and limits in force")
async def info(request: Request) -> Response:
    service = _service(request)
    s = service.settings
    model = service.model
    body: dict[str, Any] = {
        "model": s.model,
        "state": service.state.value,
        "limits": {
            "max_batch_tokens": s.max_batch_tokens,
            "max_queue_tokens": s.max_queue_tokens,
            "max_wait_ms": s.max_wait_ms,
            "default_token_budget": s.default_token_budget,
            "max_token_budget": s.max_token_budget,
            "max_images_per_request": s.max_images_per_request,
            "max_request_bytes": s.max_request_bytes,
            "max_image_pixels": s.max_image_pixels,
            "request_timeout_s": s.request_timeout_s,
            "allow_urls": s.allow_urls,
            "auth": bool(s.api_key_list),
        },
        "strategies": ["naflex", "square", "anyres"],
    }
    if model is not None and service.encoder is not None:
        body.update(
            weights=model.weights,
            patch_size=model.spec.patch_size,
            hidden_size=model.spec.hidden_size,
            embedding_dim=model.spec.hidden_size,
            layers=model.spec.num_layers,
            device=str(model.device),
            dtype=str(model.dtype).removeprefix("torch."),
            attention_backend=service.encoder.attention.name,
        )
    return JSONResponse(body)


@router.get("/metrics", summary="Prometheus metrics")
async def metrics(request: Request) -> Response:
    registry = request.app.state.metrics.registry
    return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
