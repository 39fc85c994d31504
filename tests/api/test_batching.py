"""Packing under concurrency, failure isolation, a dead device thread, and abandoned requests.

Where a test needs to know which images share a forward pass, it makes batching
deterministic instead of hoping: MAX_WAIT_MS is huge, so a batch launches only when it is
exactly full, and a gate holds the device thread inside a forward pass while the test lines
the queue up behind it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
import pytest

from app.service import EncodeOptions, ImageSpec, State
from tests.api.conftest import Gate, Served, alone, encode_alone, plan_for, serve
from tests.api.helpers import API_METRICS, b64, floats, wait_for

ATOL = 1e-5
NEVER_MS = 600_000.0  # a batch launches only when full
# Exactly-sized images under naflex (checked in `_sized`): 256 = 16 x 16, 128 = 8 x 16.
FULL, HALF = (256, 256, 256), (128, 256, 128)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _sized(images: Callable[..., bytes], spec: tuple[int, int, int]) -> dict[str, Any]:
    h, w, budget = spec
    assert plan_for(h, w, budget).tokens == budget
    return {"images": [b64(images(h, w))], "token_budget": budget}


def _deterministic(**overrides: Any) -> Any:
    values = {
        "max_batch_tokens": 256,
        "max_token_budget": 256,
        "max_queue_tokens": 4096,
        "max_wait_ms": NEVER_MS,
    }
    return serve(**{**values, **overrides})


async def _post(served: Served, body: dict[str, Any]) -> asyncio.Future[httpx.Response]:
    return asyncio.ensure_future(served.encode(**body))


# -- packing under concurrency --------------------------------------------------------------


async def test_concurrent_mixed_requests_are_packed_and_equal_to_alone(
    images: Callable[..., bytes], rng: np.random.Generator
) -> None:
    budgets = [16, 64, 100, 256, 1024]
    shapes = [(480, 640), (640, 480), (100, 1000), (1000, 90), (256, 256), (33, 47), (300, 200)]
    requests: list[list[tuple[bytes, int, int, int]]] = []
    for r in range(18):
        count = 1 + r % 3
        entries = []
        for _ in range(count):
            h, w = shapes[int(rng.integers(len(shapes)))]
            budget = budgets[int(rng.integers(len(budgets)))]
            entries.append((images(h, w), h, w, budget))
        requests.append(entries)

    async with serve(max_batch_tokens=2048, max_token_budget=1024, max_wait_ms=200) as s:

        async def send(entries: list[tuple[bytes, int, int, int]]) -> httpx.Response:
            body = [{"data": b64(d), "token_budget": b} for d, _, _, b in entries]
            return await s.encode(images=body, normalize=False)

        responses = await asyncio.wait_for(asyncio.gather(*(send(e) for e in requests)), 60)
        assert [r.status_code for r in responses] == [200] * len(requests)

        total_tokens = 0
        for entries, response in zip(requests, responses, strict=True):
            data = response.json()["data"]
            for i, ((png, h, w, budget), item) in enumerate(zip(entries, data, strict=True)):
                plan = plan_for(h, w, budget)
                assert item["index"] == i
                assert (item["tokens"], item["size"]) == (plan.tokens, list(plan.size))
                total_tokens += plan.tokens
                expected = (await alone(s.service, png, plan)).pooled[0]
                np.testing.assert_allclose(
                    floats(item["embedding"]), expected, atol=ATOL, rtol=ATOL
                )

        scrape = await s.scrape()
        count = scrape.value("patchpack_batch_images_count")
        assert count >= 1
        assert scrape.value("patchpack_batch_images_sum") / count > 1, "nothing was packed"
        assert scrape.value("patchpack_batch_images_sum") == sum(len(e) for e in requests)
        # No forward pass went over MAX_BATCH_TOKENS (2048 is a bucket bound).
        assert scrape.value("patchpack_batch_tokens_bucket", le="2048.0") == count
        assert scrape.value("patchpack_batch_tokens_sum") == total_tokens
        assert scrape.value("patchpack_tokens_total") == total_tokens


async def test_packed_requests_with_mixed_strategies_equal_alone(
    images: Callable[..., bytes],
) -> None:
    cases = [
        ("naflex", (200, 700), 64),
        ("square", (200, 700), 64),
        ("anyres", (200, 700), 16),
        ("naflex", (50, 50), 256),
    ]
    async with serve(max_wait_ms=200) as s:
        pngs = [images(*shape) for _, shape, _ in cases]

        async def send(k: int) -> httpx.Response:
            strategy, _, budget = cases[k]
            return await s.encode(images=[b64(pngs[k])], strategy=strategy, token_budget=budget)

        responses = await asyncio.wait_for(asyncio.gather(*(send(k) for k in range(4))), 60)
        for (strategy, (h, w), budget), png, response in zip(cases, pngs, responses, strict=True):
            assert response.status_code == 200, response.text
            item = response.json()["data"][0]
            plan = plan_for(h, w, budget, strategy=strategy)
            expected = (await alone(s.service, png, plan)).pooled
            got = [floats(t) for t in item.get("tile_embeddings", [item["embedding"]])]
            for g, e in zip(got, expected, strict=True):
                np.testing.assert_allclose(g, _unit(e), atol=ATOL)


async def test_batches_are_exactly_full_when_waiting_is_off(
    images: Callable[..., bytes], blocked_forward: Callable[[Served], Gate]
) -> None:
    async with _deterministic() as s:
        gate = blocked_forward(s)
        try:
            first = await _post(s, _sized(images, FULL))
            await asyncio.to_thread(gate.entered.wait, 10)
            halves = [await _post(s, _sized(images, HALF)) for _ in range(4)]
            await wait_for(lambda: s.service.admission.tokens == 256 * 3)
        finally:
            gate.open()
        responses = await asyncio.wait_for(asyncio.gather(first, *halves), 30)
        assert [r.status_code for r in responses] == [200] * 5
        scrape = await s.scrape()
        assert scrape.value("patchpack_batch_images_count") == 3
        assert scrape.value("patchpack_batch_images_sum") == 5
        assert scrape.value("patchpack_batch_fill_ratio_sum") == 3.0


# -- isolation ------------------------------------------------------------------------------


async def test_a_corrupt_image_fails_only_its_own_request(
    images: Callable[..., bytes],
) -> None:
    async with serve(max_wait_ms=200) as s:
        good = [images(64 + 8 * k, 96) for k in range(6)]
        truncated = images(200, 200)[:1500]

        async def send_good(k: int) -> httpx.Response:
            return await s.encode(images=[b64(good[k])], token_budget=64)

        bad = s.encode(images=[b64(good[0]), b64(truncated)], token_budget=64)
        results = await asyncio.wait_for(asyncio.gather(bad, *(send_good(k) for k in range(6))), 60)
        bad_response, *good_responses = results
        assert bad_response.status_code == 400
        assert bad_response.json()["error"]["type"] == "invalid_image"
        assert bad_response.json()["error"]["index"] == 1
        for k, response in enumerate(good_responses):
            assert response.status_code == 200, response.text
            plan = plan_for(64 + 8 * k, 96, 64)
            expected = (await alone(s.service, good[k], plan)).pooled[0]
            got = floats(response.json()["data"][0]["embedding"])
            np.testing.assert_allclose(got, _unit(expected), atol=ATOL)
        await wait_for(lambda: s.service.admission.tokens == 0)


async def test_a_failed_forward_pass_fails_only_its_batch(
    images: Callable[..., bytes], blocked_forward: Callable[[Served], Gate]
) -> None:
    secret = "secret-internal-detail"
    async with _deterministic() as s:
        worker = s.service.worker
        assert worker is not None
        gate = blocked_forward(s)
        try:
            a = await _post(s, _sized(images, FULL))  # batch 1, held in the forward pass
            await asyncio.to_thread(gate.entered.wait, 10)
            b = await _post(s, _sized(images, HALF))  # batch 2: b + c, exactly full
            c = await _post(s, _sized(images, HALF))
            await wait_for(lambda: s.service.admission.tokens == 512 and len(s.service.work) == 0)
            # Batch 1 is already past the check: the failure lands on batch 2.
            worker.fail_next_forward = RuntimeError(secret)
        finally:
            gate.open()
        ra, rb, rc = await asyncio.wait_for(asyncio.gather(a, b, c), 30)
        assert ra.status_code == 200
        for response in (rb, rc):
            assert response.status_code == 500
            assert response.json() == {
                "error": {"type": "internal", "message": "internal server error"}
            }
            assert secret not in response.text
        d = await asyncio.wait_for(s.encode(**_sized(images, FULL)), 30)
        assert d.status_code == 200
        assert (await s.client.get("/healthz")).status_code == 200
        await wait_for(lambda: s.service.admission.tokens == 0)


async def test_a_dead_device_thread_flips_health_and_fails_everything_pending(
    images: Callable[..., bytes], blocked_forward: Callable[[Served], Gate]
) -> None:
    async with _deterministic() as s:
        worker = s.service.worker
        assert worker is not None
        gate = blocked_forward(s)
        pending: list[asyncio.Future[httpx.Response]] = []
        try:
            running = await _post(s, _sized(images, FULL))  # in the forward pass
            await asyncio.to_thread(gate.entered.wait, 10)
            pending.append(await _post(s, _sized(images, FULL)))  # staged in the hand-off slot
            await wait_for(lambda: len(s.service.work) == 0 and s.service.admission.tokens == 512)
            # The staged batch is full, so these wait in the queue.
            pending.append(await _post(s, _sized(images, FULL)))
            await wait_for(lambda: len(s.service.work) == 1 and s.service.admission.tokens == 768)
            pending.append(await _post(s, _sized(images, HALF)))
            await wait_for(lambda: len(s.service.work) == 2)
            worker.kill_loop = RuntimeError("device lost")
        finally:
            gate.open()
        assert (await asyncio.wait_for(running, 30)).status_code == 200
        for k, future in enumerate(pending):
            try:
                response = await asyncio.wait_for(future, 10)  # must not hang
            except TimeoutError:
                pytest.fail(f"pending request {k} hangs after the device thread died")
            assert response.status_code == 503, response.text
            assert response.json()["error"]["type"] == "not_ready"
        await wait_for(lambda: s.service.state is State.DEAD)
        assert (await s.client.get("/healthz")).status_code == 503
        assert (await s.client.get("/readyz")).status_code == 503
        late = await asyncio.wait_for(s.encode(**_sized(images, HALF)), 10)
        assert late.status_code == 503
        await wait_for(lambda: s.service.admission.tokens == 0)
        assert (await s.scrape()).value("patchpack_ready") == 0


async def test_a_dead_idle_device_thread_is_reported(served: Served) -> None:
    worker = served.service.worker
    assert worker is not None
    worker.kill_loop = RuntimeError("device lost")
    await wait_for(lambda: not worker.alive)
    health = await served.client.get("/healthz")
    assert health.status_code == 503
    assert health.json()["status"] == "dead"
    assert (await served.client.get("/readyz")).status_code == 503


# -- abandoned work -------------------------------------------------------------------------


async def test_a_cancelled_encode_abandons_its_queued_images(
    images: Callable[..., bytes],
) -> None:
    async with _deterministic() as s:
        specs = [ImageSpec(data=images(64, 64)), ImageSpec(data=images(32, 96))]
        task = asyncio.ensure_future(s.service.encode(specs, EncodeOptions(token_budget=16)))
        await wait_for(lambda: len(s.service.work) == 2, what="both images to be queued")
        assert s.service.admission.tokens == 16 + plan_for(32, 96, 16).tokens
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_for(lambda: s.service.admission.tokens == 0 and len(s.service.work) == 0)
        scrape = await s.scrape()
        assert scrape.value("patchpack_batch_images_count") == 0  # skipped, never run
        assert scrape.value("patchpack_queue_tokens") == 0
        assert scrape.value("patchpack_queue_images") == 0
        # The room is really free: a full-size request fits and runs.
        assert (await s.encode(**_sized(images, FULL))).status_code == 200


async def test_a_client_that_disconnects_abandons_its_images(
    images: Callable[..., bytes],
) -> None:
    async with _deterministic() as s:
        body = json.dumps({"images": [b64(images(64, 64))], "token_budget": 16}).encode()
        left = asyncio.Event()
        sent: list[dict[str, Any]] = []
        delivered = False

        async def receive() -> dict[str, Any]:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await left.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/encode",
            "raw_path": b"/encode",
            "query_string": b"",
            "root_path": "",
            "headers": [
                (b"host", b"test"),
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
            "client": ("127.0.0.1", 40000),
            "server": ("test", 80),
        }
        call = asyncio.ensure_future(s.app(scope, receive, send))
        await wait_for(lambda: len(s.service.work) == 1, what="the image to be queued")
        assert s.service.admission.tokens == 16
        left.set()
        await asyncio.wait_for(call, 10)
        await wait_for(lambda: s.service.admission.tokens == 0 and len(s.service.work) == 0)
        assert sent[0]["status"] == 499
        scrape = await s.scrape()
        assert scrape.value("patchpack_batch_images_count") == 0
        assert scrape.value("patchpack_requests_total", endpoint="/encode", status="499") == 1


# -- metrics honesty ------------------------------------------------------------------------


async def test_metrics_count_exactly_what_was_served(images: Callable[..., bytes]) -> None:
    async with serve(max_batch_tokens=2048, max_token_budget=1024) as s:
        before = await s.scrape()
        assert before.value("patchpack_ready") == 1
        assert before.value("patchpack_tokens_total") == 0
        sent = [
            {"images": [b64(images(480, 640)), b64(images(20, 300))], "token_budget": 100},
            {"images": [b64(images(90, 90))], "strategy": "square", "token_budget": 64},
            {"images": [b64(images(300, 900))], "strategy": "anyres", "token_budget": 16},
            {"images": [{"data": b64(images(50, 70)), "token_budget": 1024}]},
            {"images": [b64(images(64, 64))] * 3, "min_pixels": 5000, "max_pixels": 9000},
        ]
        tokens = images_sent = sequences = 0
        per_strategy: dict[str, int] = {}
        for body in sent:
            response = await s.encode(**body)
            assert response.status_code == 200, response.text
            payload = response.json()
            assert payload["usage"]["tokens"] == sum(d["tokens"] for d in payload["data"])
            tokens += payload["usage"]["tokens"]
            images_sent += len(payload["data"])
            strategy = body.get("strategy", "naflex")
            per_strategy[strategy] = per_strategy.get(strategy, 0) + len(payload["data"])
            for item in payload["data"]:
                sequences += len(item.get("tile_embeddings", [None]))
        # One more request that fails: it must not count as encoded work.
        assert (await s.encode(images=["QUJD"])).status_code == 400

        m = await s.scrape()
        assert m.value("patchpack_tokens_total") == tokens
        assert m.value("patchpack_images_total") == images_sent
        for strategy, count in per_strategy.items():
            assert m.value("patchpack_images_total", strategy=strategy) == count
        assert m.value("patchpack_requests_total", endpoint="/encode", status="200") == len(sent)
        assert m.value("patchpack_requests_total", endpoint="/encode", status="400") == 1
        assert m.value("patchpack_rejected_total", reason="invalid_image") == 1
        assert m.value("patchpack_request_duration_seconds_count") == len(sent) + 1
        assert m.value("patchpack_queue_wait_seconds_count") == images_sent
        assert m.value("patchpack_preprocess_seconds_count") == images_sent
        assert m.value("patchpack_batch_tokens_sum") == tokens
        assert m.value("patchpack_batch_images_sum") == sequences
        batches = m.value("patchpack_batch_compute_seconds_count")
        assert batches == m.value("patchpack_batch_tokens_count") >= len(sent)
        assert m.value("patchpack_batch_fill_ratio_sum") == pytest.approx(tokens / 2048)
        assert m.value("patchpack_padding_tokens_total") == 0
        assert m.value("patchpack_queue_tokens") == 0
        assert m.value("patchpack_queue_images") == 0
        # /metrics scrapes count too, by their own endpoint label.
        assert m.has("patchpack_requests_total", endpoint="/metrics", status="200")


async def test_every_metric_of_the_api_table_is_exposed(served: Served) -> None:
    scrape = await served.scrape()
    missing = [name for name in API_METRICS if name not in scrape.names()]
    assert not missing
    types = {f.name: f.type for f in scrape.families.values()}
    assert types["patchpack_tokens"] == "counter"
    assert types["patchpack_request_duration_seconds"] == "histogram"
    assert types["patchpack_queue_tokens"] == "gauge"
    assert types["patchpack_ready"] == "gauge"
    # No `_created` series (they double the scrape for no dashboard).
    assert "_created" not in scrape.text


async def test_metrics_are_per_app(images: Callable[..., bytes]) -> None:
    async with serve() as first, serve() as second:
        assert (await first.encode(images=[b64(images(16, 16))])).status_code == 200
        assert (await second.scrape()).value("patchpack_tokens_total") == 0
        assert (await first.scrape()).value("patchpack_tokens_total") > 0


async def test_encode_alone_is_deterministic(served: Served, images: Callable[..., bytes]) -> None:
    # The reference the other tests compare with must itself be stable run to run.
    png = images(100, 140)
    plan = plan_for(100, 140)
    a = encode_alone(served.service, png, plan).pooled
    b = encode_alone(served.service, png, plan).pooled
    np.testing.assert_array_equal(a, b)
