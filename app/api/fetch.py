"""Server-side image fetching for `{"url": ...}` entries (only when ALLOW_URLS is on)."""

from __future__ import annotations

from urllib.parse import urlsplit

import httpx

from app.errors import InvalidImage, InvalidRequest, PayloadTooLarge


class UrlFetcher:
    def __init__(self, timeout_s: float, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_s), follow_redirects=True, max_redirects=3
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def fetch(self, url: str) -> bytes:
        if urlsplit(url).scheme not in ("http", "https"):
            raise InvalidRequest("image URLs must be http or https")
        try:
            async with self._client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise InvalidImage(
                        f"fetching the image URL returned HTTP {response.status_code}"
                    )
                declared = response.headers.get("content-length")
                if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
                    raise PayloadTooLarge(f"the image at the URL exceeds {self.max_bytes} bytes")
                chunks, size = [], 0
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise PayloadTooLarge(
                            f"the image at the URL exceeds {self.max_bytes} bytes"
                        )
                    chunks.append(chunk)
                return b"".join(chunks)
        except httpx.HTTPError as exc:
            raise InvalidImage(f"could not fetch the image URL ({type(exc).__name__})") from exc
