"""/healthz, /readyz (through loading and warm-up), /info, /docs, /openapi.json, and auth."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import pytest

from app.service import State
from tests.api.conftest import Served, serve
from tests.api.helpers import b64, wait_for

KEYS = "key-one, key-two"


async def test_health_and_readiness_when_ready(served: Served) -> None:
    health = await served.client.get("/healthz")
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "state": "ready"}
    ready = await served.client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "state": "ready"}


class _Held:
    """A loading step that waits for the test to let it go."""

    def __init__(self, real: Callable[..., Any]) -> None:
        self.real = real
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.entered.set()
        if not self.release.wait(30):
            raise RuntimeError("test never released the loader")
        return self.real(*args, **kwargs)


async def test_readyz_is_503_until_loaded_and_warmed_up(
    monkeypatch: pytest.MonkeyPatch, images: Callable[..., bytes]
) -> None:
    import app.service
    from app.engine.encoder import Encoder

    loading = _Held(app.service.load_model)
    warming = _Held(Encoder.warmup)
    monkeypatch.setattr(app.service, "load_model", loading)
    monkeypatch.setattr(Encoder, "warmup", lambda self, n: warming(self, n))
    async with serve(ready=False, warmup=True) as s:
        try:
            await asyncio.to_thread(loading.entered.wait, 10)
            for expected_state in ("loading", "warming"):
                ready = await s.client.get("/readyz")
                assert ready.status_code == 503
                assert ready.json()["state"] == expected_state
                health = await s.client.get("/healthz")
                assert health.status_code == 200  # alive, just not ready
                response = await s.encode(images=[b64(images(8, 8))])
                assert response.status_code == 503
                assert response.json()["error"]["type"] == "not_ready"
                assert (await s.scrape()).value("patchpack_ready") == 0
                info = await s.client.get("/info")
                assert info.status_code == 200
                assert info.json()["state"] == expected_state
                if expected_state == "loading":
                    loading.release.set()
                    await asyncio.to_thread(warming.entered.wait, 10)
        finally:
            loading.release.set()
            warming.release.set()
        await wait_for(lambda: s.service.state is State.READY)
        assert (await s.client.get("/readyz")).status_code == 200
        assert (await s.scrape()).value("patchpack_ready") == 1
        assert (await s.encode(images=[b64(images(8, 8))])).status_code == 200


async def test_state_after_shutdown(images: Callable[..., bytes]) -> None:
    async with serve() as s:
        assert (await s.encode(images=[b64(images(8, 8))])).status_code == 200
    assert s.service.state is State.STOPPED
    assert s.service.admission.tokens == 0


async def test_info_reports_model_device_and_limits(served: Served) -> None:
    response = await served.client.get("/info")
    assert response.status_code == 200
    info = response.json()
    assert info["model"] == "demo:tiny"
    assert info["weights"] == "random"
    assert info["patch_size"] == 16
    assert info["hidden_size"] == 64
    assert info["embedding_dim"] == 64
    assert info["device"] == "cpu"
    assert info["dtype"] == "float32"
    assert isinstance(info["attention_backend"], str) and info["attention_backend"]
    s = served.settings
    assert info["limits"] == {
        "max_batch_tokens": 4096,
        "max_queue_tokens": 8 * 4096,
        "max_wait_ms": s.max_wait_ms,
        "default_token_budget": 256,
        "max_token_budget": 4096,
        "max_images_per_request": 64,
        "max_request_bytes": 67108864,
        "max_image_pixels": 100000000,
        "request_timeout_s": 60.0,
        "allow_urls": False,
        "auth": False,
    }
    assert set(info["strategies"]) == {"naflex", "square", "anyres"}


async def test_info_shows_the_limits_in_force() -> None:
    async with serve(max_batch_tokens=1024, max_token_budget=512, max_wait_ms=7) as s:
        limits = (await s.client.get("/info")).json()["limits"]
    assert limits["max_batch_tokens"] == 1024
    assert limits["max_queue_tokens"] == 8 * 1024
    assert limits["max_token_budget"] == 512
    assert limits["max_wait_ms"] == 7


async def test_docs_and_openapi(served: Served) -> None:
    docs = await served.client.get("/docs")
    assert docs.status_code == 200
    assert "text/html" in docs.headers["content-type"]
    spec = await served.client.get("/openapi.json")
    assert spec.status_code == 200
    paths = spec.json()["paths"]
    assert {"/encode", "/healthz", "/readyz", "/info", "/metrics"} <= set(paths)
    content = paths["/encode"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data", "image/*"} <= set(content)
    assert "429" in paths["/encode"]["post"]["responses"]


async def test_metrics_is_prometheus_text(served: Served) -> None:
    response = await served.client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert "# TYPE patchpack_tokens_total counter" in response.text


# -- auth -----------------------------------------------------------------------------------


@pytest.fixture
async def keyed() -> Any:
    async with serve(api_keys=KEYS) as s:
        yield s


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        "Bearer wrong-key",
        "Bearer key-one-and-more",
        "Bearer key-on",
        "Basic key-one",
        "key-one",
        "Bearer key-one, key-two",
    ],
)
async def test_encode_without_a_valid_key_is_401(
    keyed: Served, images: Callable[..., bytes], authorization: str | None
) -> None:
    headers = {} if authorization is None else {"authorization": authorization}
    response = await keyed.client.post(
        "/encode", json={"images": [b64(images(8, 8))]}, headers=headers
    )
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "unauthorized"
    assert set(response.json()["error"]) == {"type", "message"}
    assert response.headers["www-authenticate"] == "Bearer"
    assert "key-one" not in response.text
    assert keyed.service.admission.tokens == 0


@pytest.mark.parametrize("key", ["key-one", "key-two"])
async def test_any_configured_key_works(
    keyed: Served, images: Callable[..., bytes], key: str
) -> None:
    headers = {"authorization": f"Bearer {key}"}
    response = await keyed.client.post(
        "/encode", json={"images": [b64(images(8, 8))]}, headers=headers
    )
    assert response.status_code == 200, response.text
    lower = await keyed.client.post(
        "/encode", json={"images": [b64(images(8, 8))]}, headers={"authorization": f"bearer {key}"}
    )
    assert lower.status_code == 200  # the scheme is case-insensitive


async def test_auth_is_checked_before_the_body(keyed: Served) -> None:
    response = await keyed.client.post(
        "/encode", content=b"not json", headers={"content-type": "text/plain"}
    )
    assert response.status_code == 401


async def test_probe_endpoints_are_open_and_info_is_not(keyed: Served) -> None:
    for path in ("/healthz", "/readyz", "/metrics"):
        assert (await keyed.client.get(path)).status_code == 200, path
    assert (await keyed.client.get("/info")).status_code == 401
    info = await keyed.client.get("/info", headers={"authorization": "Bearer key-two"})
    assert info.status_code == 200
    assert info.json()["limits"]["auth"] is True
    scrape = await keyed.scrape()
    assert scrape.value("patchpack_rejected_total", reason="unauthorized") == 1


@pytest.mark.parametrize("path", ["/docs", "/openapi.json"])
async def test_docs_need_a_key_too(keyed: Served, path: str) -> None:
    assert (await keyed.client.get(path)).status_code == 401
