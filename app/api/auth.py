"""Optional bearer-key auth. Keys are compared in constant time against every configured key."""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.errors import error_response
from app.errors import Unauthorized

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


def check_bearer(authorization: str | None, keys: tuple[str, ...]) -> None:
    if not keys:
        return
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("missing bearer token: send 'Authorization: Bearer <key>'")
    presented = token.strip().encode()
    # No early exit: the time taken must not reveal which key, or how much of one, matched.
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(presented, key.encode())
    if not matched:
        raise Unauthorized("invalid API key")


class BearerAuth:
    """Every path but the probes and /metrics needs a key (the docs too: they list the API)."""

    def __init__(self, app: ASGIApp, keys: tuple[str, ...], on_reject: object = None) -> None:
        self.app = app
        self.keys = keys
        self.on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.keys and scope["path"] not in OPEN_PATHS:
            headers = dict(scope.get("headers") or [])
            raw = headers.get(b"authorization")
            try:
                check_bearer(raw.decode("latin-1") if raw is not None else None, self.keys)
            except Unauthorized as exc:
                if callable(self.on_reject):
                    self.on_reject(exc.type)
                await error_response(exc)(scope, receive, send)
                return
        await self.app(scope, receive, send)
