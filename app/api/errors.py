"""Domain error -> HTTP response: the one table, and the JSON error body of API.md."""

from __future__ import annotations

import logging

from fastapi.responses import JSONResponse

from app.errors import (
    DeadlineExceeded,
    ImageTooLarge,
    InternalError,
    InvalidImage,
    InvalidRequest,
    NotReady,
    Overloaded,
    PatchpackError,
    PayloadTooLarge,
    Unauthorized,
    UnsupportedMediaType,
)

log = logging.getLogger(__name__)

STATUS: dict[type[PatchpackError], int] = {
    InvalidImage: 400,
    Unauthorized: 401,
    PayloadTooLarge: 413,
    ImageTooLarge: 413,
    UnsupportedMediaType: 415,
    InvalidRequest: 422,
    Overloaded: 429,
    InternalError: 500,
    NotReady: 503,
    DeadlineExceeded: 504,
}


def error_body(error_type: str, message: str, index: int | None = None) -> dict[str, object]:
    body: dict[str, object] = {"type": error_type, "message": message}
    if index is not None:
        body["index"] = index
    return {"error": body}


def error_response(error: PatchpackError) -> JSONResponse:
    status = STATUS.get(type(error), 500)
    if status == 500:
        # Internals (paths, tensors, stack) stay in the log, never in the response.
        return internal_response()
    headers = {}
    if isinstance(error, Overloaded):
        headers["Retry-After"] = str(error.retry_after_s)
    elif isinstance(error, Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(
        error_body(error.type, error.message, error.index), status_code=status, headers=headers
    )


def internal_response() -> JSONResponse:
    return JSONResponse(error_body("internal", "internal server error"), status_code=500)
