"""`{"url": ...}` images with ALLOW_URLS on, served by a loopback HTTP server in the test."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import pytest

from tests.api.conftest import plan_for, serve
from tests.api.helpers import b64, floats

_PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


@pytest.fixture
def site(images: Callable[..., bytes], monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A loopback server: /a.png, /big.png, /redirect, /missing (404), /text (not an image)."""
    for var in _PROXY_VARS:  # the fetcher must go straight to loopback
        monkeypatch.delenv(var, raising=False)
    files = {"/a.png": images(120, 200), "/big.png": images(400, 400), "/text": b"hello"}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", "/a.png")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = files.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        server.files = files  # type: ignore[attr-defined]
        server.base = f"http://127.0.0.1:{server.server_address[1]}"  # type: ignore[attr-defined]
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_url_image_is_fetched_and_encoded_like_inline_bytes(site: Any) -> None:
    async with serve(allow_urls=True) as s:
        inline = b64(site.files["/a.png"])
        response = await s.encode(
            images=[
                {"url": f"{site.base}/a.png", "token_budget": 64},
                {"data": inline, "token_budget": 64},
                {"url": f"{site.base}/redirect", "token_budget": 64},
            ]
        )
        assert response.status_code == 200, response.text
        fetched, sent, redirected = response.json()["data"]
        plan = plan_for(120, 200, 64)
        assert fetched["original_size"] == [120, 200]
        assert (fetched["tokens"], fetched["size"]) == (plan.tokens, list(plan.size))
        np.testing.assert_allclose(
            floats(fetched["embedding"]), floats(sent["embedding"]), atol=1e-6
        )
        np.testing.assert_allclose(
            floats(redirected["embedding"]), floats(sent["embedding"]), atol=1e-6
        )


async def test_url_returning_404_is_400_with_its_index(site: Any) -> None:
    async with serve(allow_urls=True) as s:
        response = await s.encode(
            images=[{"url": f"{site.base}/a.png"}, {"url": f"{site.base}/missing"}]
        )
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["type"] == "invalid_image"
        assert error["index"] == 1
        assert "404" in error["message"]


async def test_url_that_is_not_an_image_is_400(site: Any) -> None:
    async with serve(allow_urls=True) as s:
        response = await s.encode(images=[{"url": f"{site.base}/text"}])
        assert response.status_code == 400
        assert response.json()["error"] == {
            "type": "invalid_image",
            "message": response.json()["error"]["message"],
            "index": 0,
        }


async def test_unreachable_url_is_400(site: Any) -> None:
    async with serve(allow_urls=True) as s:
        response = await s.encode(images=[{"url": f"http://127.0.0.1:{_closed_port()}/a.png"}])
        assert response.status_code == 400
        assert response.json()["error"]["type"] == "invalid_image"


@pytest.mark.parametrize(
    "url", ["ftp://127.0.0.1/a.png", "file:///etc/passwd", "gopher://x", "127.0.0.1/a.png"]
)
async def test_non_http_scheme_is_422(site: Any, url: str) -> None:
    async with serve(allow_urls=True) as s:
        response = await s.encode(images=[{"url": f"{site.base}/a.png"}, {"url": url}])
        assert response.status_code == 422
        error = response.json()["error"]
        assert error["type"] == "invalid_request"
        assert error["index"] == 1


async def test_url_body_over_the_byte_limit_is_413(site: Any) -> None:
    big = len(site.files["/big.png"])
    async with serve(allow_urls=True, max_request_bytes=big - 1) as s:
        response = await s.encode(images=[{"url": f"{site.base}/big.png"}])
        assert response.status_code == 413
        assert response.json()["error"]["type"] == "payload_too_large"
        assert response.json()["error"]["index"] == 0


async def test_info_reports_urls_allowed(site: Any) -> None:
    async with serve(allow_urls=True) as s:
        assert (await s.client.get("/info")).json()["limits"]["allow_urls"] is True
