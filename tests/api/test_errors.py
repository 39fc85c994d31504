"""Every error row of API.md: status, `{"error": {"type", "message"[, "index"]}}`, headers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from app.service import State
from tests.api.conftest import Gate, Served, serve
from tests.api.helpers import b64, wait_for

SECRET = "secret-internal-detail"


def check_error(
    response: httpx.Response, status: int, error_type: str, index: int | None = None
) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert error["type"] == error_type
    assert isinstance(error["message"], str) and error["message"]
    if index is None:
        assert set(error) == {"type", "message"}
    else:
        assert set(error) == {"type", "message", "index"}
        assert error["index"] == index
    return error


async def rejected(served: Served, reason: str) -> float:
    return (await served.scrape()).value("patchpack_rejected_total", reason=reason)


# -- 400 invalid_image ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(b64(b"this is not an image, just some bytes"), id="garbage"),
        pytest.param("@@not*base64!!", id="bad-base64"),
        pytest.param("QUJD=", id="bad-padding"),
        pytest.param("", id="empty"),
        pytest.param("data:image/png,iVBORw0KGgo=", id="data-uri-without-base64"),
        pytest.param(b64(b"\x89PNG\r\n\x1a\n"), id="png-signature-only"),
    ],
)
async def test_undecodable_second_image_is_400_with_its_index(
    served: Served, images: Callable[..., bytes], bad: str
) -> None:
    response = await served.encode(images=[b64(images(30, 30)), bad, b64(images(30, 30))])
    check_error(response, 400, "invalid_image", index=1)
    assert await rejected(served, "invalid_image") == 1


async def test_truncated_png_is_400_with_its_index(
    served: Served, images: Callable[..., bytes]
) -> None:
    good = images(64, 64)
    truncated = images(256, 256)[:2000]  # header intact: sized fine, fails while decoding
    response = await served.encode(images=[b64(good), b64(truncated)])
    check_error(response, 400, "invalid_image", index=1)
    # Its sibling's tokens are not stuck in the queue.
    await wait_for(lambda: served.service.admission.tokens == 0)


async def test_bad_image_in_multipart_and_raw_bodies(
    served: Served, images: Callable[..., bytes]
) -> None:
    files = [
        ("image", ("a.png", images(20, 20), "image/png")),
        ("image", ("b.png", b"GIF89a-not-really", "image/png")),
    ]
    check_error(await served.client.post("/encode", files=files), 400, "invalid_image", 1)
    raw = await served.client.post(
        "/encode", content=b"\x00" * 100, headers={"content-type": "image/jpeg"}
    )
    check_error(raw, 400, "invalid_image", 0)
    empty = await served.client.post("/encode", content=b"", headers={"content-type": "image/png"})
    check_error(empty, 400, "invalid_image", 0)


# -- 413 ------------------------------------------------------------------------------------


async def test_body_over_max_request_bytes_is_413(images: Callable[..., bytes]) -> None:
    async with serve(max_request_bytes=4000) as s:
        big = images(100, 100)  # ~30 kB of noise as PNG
        assert len(big) > 4000
        response = await s.encode(images=[b64(big)])
        check_error(response, 413, "payload_too_large")
        small = await s.encode(images=[b64(images(8, 8))])
        assert small.status_code == 200, small.text
        assert (await s.scrape()).value("patchpack_rejected_total", reason="payload_too_large") == 1


async def test_streamed_body_without_length_over_the_limit_is_413() -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"x" * 1000

    async with serve(max_request_bytes=4000) as s:
        response = await s.client.post(
            "/encode", content=chunks(), headers={"content-type": "application/json"}
        )
        check_error(response, 413, "payload_too_large")


async def test_multipart_over_the_limit_is_413(images: Callable[..., bytes]) -> None:
    async with serve(max_request_bytes=4000) as s:
        files = [("image", ("a.png", images(100, 100), "image/png"))]
        check_error(await s.client.post("/encode", files=files), 413, "payload_too_large")


async def test_image_over_max_image_pixels_is_413_with_its_index(
    images: Callable[..., bytes],
) -> None:
    async with serve(max_image_pixels=1000) as s:
        ok = images(20, 50)  # exactly 1000 pixels
        too_big = images(20, 51)
        response = await s.encode(images=[b64(ok), b64(too_big)])
        check_error(response, 413, "image_too_large", index=1)
        assert (await s.encode(images=[b64(ok)])).status_code == 200
        raw = await s.client.post("/encode", content=too_big, headers={"content-type": "image/png"})
        check_error(raw, 413, "image_too_large", index=0)


# -- 415 ------------------------------------------------------------------------------------


@pytest.mark.parametrize("ctype", ["text/plain", "application/xml", "application/octet-stream"])
async def test_unsupported_content_type_is_415(served: Served, ctype: str) -> None:
    response = await served.client.post(
        "/encode", content=b'{"images": []}', headers={"content-type": ctype}
    )
    check_error(response, 415, "unsupported_media_type")


async def test_missing_content_type_is_415(served: Served) -> None:
    response = await served.client.post("/encode", content=b"abc")
    check_error(response, 415, "unsupported_media_type")


# -- 422 invalid_request --------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"images": []}, id="empty-list"),
        pytest.param({}, id="no-images"),
        pytest.param({"images": "abc"}, id="images-not-a-list"),
        pytest.param({"images": [123]}, id="image-not-a-string"),
        pytest.param({"images": ["QUJD"], "token_budget": 0}, id="budget-zero"),
        pytest.param({"images": ["QUJD"], "token_budget": "many"}, id="budget-not-int"),
        pytest.param({"images": ["QUJD"], "strategy": "crop"}, id="bad-strategy"),
        pytest.param({"images": ["QUJD"], "encoding_format": "hex"}, id="bad-format"),
        pytest.param({"images": ["QUJD"], "max_tiles": 17}, id="too-many-tiles"),
        pytest.param({"images": ["QUJD"], "max_tiles": 0}, id="zero-tiles"),
        pytest.param({"images": ["QUJD"], "min_pixels": -1}, id="negative-min-pixels"),
        pytest.param({"images": ["QUJD"], "tokenbudget": 64}, id="unknown-field"),
        pytest.param({"images": [{"data": "QUJD", "budget": 64}]}, id="unknown-entry-field"),
        pytest.param({"images": [{"token_budget": 64}]}, id="entry-without-source"),
        pytest.param({"images": [{"data": "QUJD", "url": "http://x/y"}]}, id="entry-both"),
        pytest.param({"images": [{"data": "QUJD", "token_budget": 0}]}, id="entry-budget-zero"),
    ],
)
async def test_schema_errors_are_422(served: Served, body: dict[str, Any]) -> None:
    check_error(await served.encode(**body), 422, "invalid_request")


async def test_malformed_json_is_422(served: Served) -> None:
    response = await served.client.post(
        "/encode", content=b'{"images": [', headers={"content-type": "application/json"}
    )
    check_error(response, 422, "invalid_request")


async def test_budget_over_max_token_budget_is_422(
    served: Served, images: Callable[..., bytes]
) -> None:
    data = b64(images(20, 20))
    limit = served.settings.max_token_budget
    check_error(await served.encode(images=[data], token_budget=limit + 1), 422, "invalid_request")
    per_image = await served.encode(images=[data, {"data": data, "token_budget": limit + 1}])
    check_error(per_image, 422, "invalid_request", index=1)
    # The limit itself is fine.
    ok = await served.encode(images=[{"data": data, "token_budget": limit}], strategy="square")
    assert ok.status_code == 200, ok.text


async def test_too_many_images_is_422(images: Callable[..., bytes]) -> None:
    async with serve(max_images_per_request=2) as s:
        data = b64(images(8, 8))
        check_error(await s.encode(images=[data] * 3), 422, "invalid_request")
        assert (await s.encode(images=[data] * 2)).status_code == 200
        files = [("image", (f"{i}.png", images(8, 8), "image/png")) for i in range(3)]
        check_error(await s.client.post("/encode", files=files), 422, "invalid_request")


async def test_urls_are_422_when_not_allowed(served: Served, images: Callable[..., bytes]) -> None:
    # Refused before any fetch: port 9 (discard) on loopback would not answer anyway.
    response = await served.encode(images=[b64(images(8, 8)), {"url": "http://127.0.0.1:9/a.png"}])
    error = check_error(response, 422, "invalid_request")
    assert "URL" in error["message"]


async def test_min_pixels_above_max_pixels_is_422(
    served: Served, images: Callable[..., bytes]
) -> None:
    data = b64(images(40, 40))
    response = await served.encode(images=[data], min_pixels=5000, max_pixels=4000)
    check_error(response, 422, "invalid_request", index=0)
    per_image = await served.encode(
        images=[data, {"data": data, "min_pixels": 5000, "max_pixels": 4000}]
    )
    check_error(per_image, 422, "invalid_request", index=1)


async def test_an_image_larger_than_a_forward_pass_is_422(
    served: Served, images: Callable[..., bytes]
) -> None:
    # anyres at 16 tiles of 1024 tokens would need 17 x 1024 > MAX_BATCH_TOKENS (4096).
    response = await served.encode(
        images=[b64(images(64, 64)), b64(images(2000, 2000))],
        strategy="anyres",
        token_budget=1024,
        max_tiles=16,
    )
    error = check_error(response, 422, "invalid_request", index=1)
    assert "MAX_BATCH_TOKENS" in error["message"]


async def test_multipart_without_an_image_part_is_422(served: Served) -> None:
    response = await served.client.post("/encode", files={"picture": ("a.png", b"x")})
    check_error(response, 422, "invalid_request")
    fields_only = await served.client.post(
        "/encode", data={"token_budget": "64"}, files={"image": ("a.png", b"x")}
    )
    assert fields_only.status_code == 400  # has an image part (an undecodable one)


async def test_multipart_unknown_field_is_422(served: Served, images: Callable[..., bytes]) -> None:
    response = await served.client.post(
        "/encode",
        files=[("image", ("a.png", images(8, 8), "image/png"))],
        data={"budget": "64"},
    )
    check_error(response, 422, "invalid_request")


# -- 429 overloaded -------------------------------------------------------------------------


async def test_request_larger_than_the_whole_queue_is_429_and_says_it_cannot_fit(
    images: Callable[..., bytes],
) -> None:
    # API.md: every queue overflow is 429. Retrying this one unchanged can never succeed,
    # so the message tells the client to split it.
    async with serve(max_batch_tokens=256, max_token_budget=256, max_queue_tokens=256) as s:
        data = b64(images(64, 64))  # 16 tokens at budget 16, 256 at budget 256
        response = await s.encode(images=[data, data], token_budget=256)
        body = check_error(response, 429, "overloaded")
        assert "MAX_QUEUE_TOKENS=256" in body["message"] and "split" in body["message"]
        assert int(response.headers["retry-after"]) >= 1
        assert s.service.admission.tokens == 0  # nothing of it was admitted
        assert (await s.encode(images=[data], token_budget=256)).status_code == 200


async def test_full_queue_refuses_new_work_until_it_drains(
    images: Callable[..., bytes], blocked_forward: Callable[[Served], Gate]
) -> None:
    async with serve(
        max_batch_tokens=256, max_token_budget=256, max_queue_tokens=512, max_wait_ms=0
    ) as s:
        gate = blocked_forward(s)
        data = b64(images(64, 64))
        try:
            first = asyncio.ensure_future(s.encode(images=[data], token_budget=256))
            second = asyncio.ensure_future(s.encode(images=[data], token_budget=256))
            await wait_for(lambda: s.service.admission.tokens == 512)
            await asyncio.to_thread(gate.entered.wait, 10)
            refused = await s.encode(images=[data], token_budget=16)
            check_error(refused, 429, "overloaded")
            assert int(refused.headers["retry-after"]) >= 1
            assert s.service.admission.tokens == 512  # the refused request added nothing
            scrape = await s.scrape()
            assert scrape.value("patchpack_queue_tokens") == 512
            assert scrape.value("patchpack_rejected_total", reason="overloaded") == 1
            assert scrape.value("patchpack_requests_total", endpoint="/encode", status="429") == 1
        finally:
            gate.open()
        done = await asyncio.wait_for(asyncio.gather(first, second), 30)
        assert [r.status_code for r in done] == [200, 200]
        await wait_for(lambda: s.service.admission.tokens == 0)
        assert (await s.encode(images=[data], token_budget=16)).status_code == 200


# -- 503 not_ready --------------------------------------------------------------------------


@pytest.mark.parametrize("state", [State.LOADING, State.WARMING, State.DRAINING])
async def test_not_ready_states_are_503(
    served: Served, images: Callable[..., bytes], state: State
) -> None:
    served.service.state = state
    try:
        response = await served.encode(images=[b64(images(8, 8))])
        check_error(response, 503, "not_ready")
        assert (await served.client.get("/readyz")).status_code == 503
    finally:
        served.service.state = State.READY


async def test_draining_refuses_new_work_but_stays_alive(
    served: Served, images: Callable[..., bytes]
) -> None:
    served.service.begin_drain()
    check_error(await served.encode(images=[b64(images(8, 8))]), 503, "not_ready")
    ready = await served.client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["state"] == "draining"
    assert (await served.client.get("/healthz")).status_code == 200
    assert (await served.scrape()).value("patchpack_ready") == 0


async def test_a_model_that_cannot_load_is_503_and_unhealthy(
    images: Callable[..., bytes],
) -> None:
    async with serve(model="demo:nonexistent", ready=False) as s:
        await wait_for(lambda: s.service.state is State.FAILED)
        check_error(await s.encode(images=[b64(images(8, 8))]), 503, "not_ready")
        assert (await s.client.get("/readyz")).status_code == 503
        assert (await s.client.get("/healthz")).status_code == 503
        assert (await s.scrape()).value("patchpack_ready") == 0


# -- 504 timeout ----------------------------------------------------------------------------


async def test_work_queued_past_the_deadline_is_504(images: Callable[..., bytes]) -> None:
    # The deadline passes while the image is still being sized and preprocessed, so it is
    # expired when it reaches the queue: dropped before packing, never run.
    async with serve(request_timeout_s=1e-6) as s:
        response = await s.encode(images=[b64(images(32, 32)), b64(images(16, 48))])
        check_error(response, 504, "timeout")
        await wait_for(lambda: s.service.admission.tokens == 0)
        scrape = await s.scrape()
        assert scrape.value("patchpack_batch_images_count") == 0  # no forward pass ran
        assert scrape.value("patchpack_tokens_total") == 0
        assert scrape.value("patchpack_rejected_total", reason="timeout") == 1
        assert scrape.value("patchpack_requests_total", endpoint="/encode", status="504") == 1


# -- 500 internal ---------------------------------------------------------------------------


def check_internal(response: httpx.Response) -> None:
    check_error(response, 500, "internal")
    assert SECRET not in response.text
    assert "Traceback" not in response.text
    assert "RuntimeError" not in response.text


async def test_a_failing_forward_pass_is_500_without_internals(
    served: Served, images: Callable[..., bytes]
) -> None:
    data = b64(images(24, 24))
    assert served.service.worker is not None
    served.service.worker.fail_next_forward = RuntimeError(SECRET)
    check_internal(await served.encode(images=[data]))
    # Only that batch failed: the next request succeeds.
    assert (await served.encode(images=[data])).status_code == 200
    scrape = await served.scrape()
    assert scrape.value("patchpack_rejected_total", reason="internal") == 1
    assert scrape.value("patchpack_requests_total", endpoint="/encode", status="500") == 1


async def test_a_failing_preprocess_is_500_without_internals(
    served: Served, images: Callable[..., bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    def explode(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(SECRET)

    monkeypatch.setattr("app.service.patchify", explode)
    check_internal(await served.encode(images=[b64(images(24, 24))]))
    await wait_for(lambda: served.service.admission.tokens == 0)


async def test_a_failing_render_is_500_without_internals(
    served: Served, images: Callable[..., bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    def explode(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(SECRET)

    monkeypatch.setattr("app.api.routes.render_response", explode)
    check_internal(await served.encode(images=[b64(images(24, 24))]))
    scrape = await served.scrape()
    assert scrape.value("patchpack_requests_total", endpoint="/encode", status="500") == 1


# -- other HTTP errors keep the error shape -------------------------------------------------


async def test_unknown_path_and_wrong_method_keep_the_error_shape(served: Served) -> None:
    check_error(await served.client.get("/nope"), 404, "not_found")
    check_error(await served.client.get("/encode"), 405, "method_not_allowed")
    scrape = await served.scrape()
    assert scrape.value("patchpack_requests_total", endpoint="other", status="404") == 1


async def test_a_stuck_forward_pass_ends_in_504_not_a_hang(
    images: Callable[..., bytes], blocked_forward: Callable[[Served], Gate]
) -> None:
    # Work already running may finish past the deadline, but a pass stuck far beyond it
    # (2 x REQUEST_TIMEOUT_S + grace) must not hold the request open forever.
    async with serve(request_timeout_s=0.5) as s:
        gate = blocked_forward(s)
        try:
            response = await asyncio.wait_for(s.encode(images=[b64(images(32, 32))]), 30)
            body = check_error(response, 504, "timeout")
            assert "stuck" in body["message"]
        finally:
            gate.open()
        await wait_for(lambda: s.service.admission.tokens == 0)
        assert (await s.encode(images=[b64(images(32, 32))])).status_code == 200
