"""Optional bearer-key auth. Keys are compared in constant time against every configured key."""

from __future__ import annotations

import hmac

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
