"""Domain errors shared by every stage.

Each carries the wire `type` of API.md; the HTTP status lives in one table in `api/errors.py`
so that nothing below the HTTP layer knows about HTTP.
"""

from __future__ import annotations


class PatchpackError(Exception):
    type = "internal"

    def __init__(self, message: str, index: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.index = index

    def at(self, index: int) -> PatchpackError:
        """The same error, attributed to the image at `index` of its request."""
        self.index = index
        return self


class InvalidImage(PatchpackError):
    type = "invalid_image"


class ImageTooLarge(PatchpackError):
    type = "image_too_large"


class PayloadTooLarge(PatchpackError):
    type = "payload_too_large"


class InvalidRequest(PatchpackError):
    type = "invalid_request"


class Unauthorized(PatchpackError):
    type = "unauthorized"


class UnsupportedMediaType(PatchpackError):
    type = "unsupported_media_type"


class Overloaded(PatchpackError):
    type = "overloaded"

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NotReady(PatchpackError):
    type = "not_ready"


class DeadlineExceeded(PatchpackError):
    type = "timeout"


class InternalError(PatchpackError):
    type = "internal"


class ModelLoadError(Exception):
    """The configured model cannot be loaded; raised at start-up, never per request."""
