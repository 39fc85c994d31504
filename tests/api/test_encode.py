"""POST /encode in every input form, checked against the pure planner and the encoder run alone."""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from tests.api.conftest import Served, alone, plan_for, serve
from tests.api.helpers import b64, floats

HIDDEN = 64  # demo:tiny
ATOL = 1e-5

ITEM_KEYS = {"index", "embedding", "tokens", "grid", "size", "original_size"}


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def check_item(item: dict[str, Any], index: int, plan: Any) -> None:
    """Shape and sizing of one response item, per API.md, against the planner's answer."""
    assert item["index"] == index
    assert item["tokens"] == plan.tokens
    assert item["grid"] == [plan.grids[0].rows, plan.grids[0].cols]
    assert item["size"] == list(plan.size)
    assert item["original_size"] == list(plan.original_size)


def check_envelope(body: dict[str, Any], n_images: int) -> None:
    assert set(body) == {"model", "data", "usage", "timings_ms"}
    assert body["model"] == "demo:tiny"
    assert [d["index"] for d in body["data"]] == list(range(n_images))
    assert body["usage"] == {
        "images": n_images,
        "tokens": sum(d["tokens"] for d in body["data"]),
    }
    timings = body["timings_ms"]
    assert set(timings) == {"queue", "preprocess", "compute", "total"}
    assert all(isinstance(v, int | float) and v >= 0 for v in timings.values())
    assert timings["total"] >= max(timings["queue"], timings["preprocess"])


async def test_json_raw_base64_follows_naflex_sizing_and_matches_alone(
    served: Served, images: Callable[..., bytes]
) -> None:
    shapes = [(480, 640), (30, 200), (100, 100), (37, 901), (1, 1)]
    data = [images(h, w) for h, w in shapes]
    response = await served.encode(images=[b64(d) for d in data])
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    check_envelope(body, len(shapes))
    for i, (item, (h, w)) in enumerate(zip(body["data"], shapes, strict=True)):
        plan = plan_for(h, w, 256)  # DEFAULT_TOKEN_BUDGET
        assert set(item) == ITEM_KEYS
        check_item(item, i, plan)
        assert item["tokens"] <= 256
        embedding = floats(item["embedding"])
        assert embedding.shape == (HIDDEN,)
        expected = (await alone(served.service, data[i], plan)).pooled[0]
        np.testing.assert_allclose(embedding, _unit(expected), atol=ATOL)


async def test_data_uri_and_raw_base64_give_the_same_answer(
    served: Served, images: Callable[..., bytes]
) -> None:
    data = images(120, 90)
    response = await served.encode(
        images=[b64(data), f"data:image/png;base64,{b64(data)}"], token_budget=64
    )
    assert response.status_code == 200, response.text
    first, second = response.json()["data"]
    check_item(second, 1, plan_for(120, 90, 64))
    np.testing.assert_array_equal(floats(first["embedding"]), floats(second["embedding"]))


async def test_object_entries_override_budget_and_pixel_caps_per_image(
    served: Served, images: Callable[..., bytes]
) -> None:
    shapes = [(300, 500), (300, 500), (64, 48), (300, 500), (200, 200)]
    data = [images(h, w) for h, w in shapes]
    entries: list[Any] = [
        b64(data[0]),  # the request-level fields
        {"data": b64(data[1]), "token_budget": 64},
        {"data": b64(data[2]), "min_pixels": 100_000},  # native, grown to min_pixels
        {"data": b64(data[3]), "max_pixels": 20_000, "token_budget": 1024},  # native, shrunk
        {"data": f"data:image/png;base64,{b64(data[4])}", "max_pixels": 10**8},
    ]
    response = await served.encode(images=entries, token_budget=128)
    assert response.status_code == 200, response.text
    body = response.json()
    check_envelope(body, len(shapes))
    plans = [
        plan_for(300, 500, 128),
        plan_for(300, 500, 64),
        plan_for(64, 48, 128, min_pixels=100_000),
        plan_for(300, 500, 1024, max_pixels=20_000),
        plan_for(200, 200, 128, max_pixels=10**8),
    ]
    # The overrides must really change the outcome, or this test would prove nothing.
    assert len({p.size for p in plans}) == len(plans)
    for i, (item, plan) in enumerate(zip(body["data"], plans, strict=True)):
        check_item(item, i, plan)
        expected = (await alone(served.service, data[i], plan)).pooled[0]
        np.testing.assert_allclose(floats(item["embedding"]), _unit(expected), atol=ATOL)


async def test_request_level_pixel_caps_apply_to_every_image(
    served: Served, images: Callable[..., bytes]
) -> None:
    data = [images(400, 300), images(50, 80)]
    response = await served.encode(
        images=[b64(d) for d in data], token_budget=512, min_pixels=40_000, max_pixels=60_000
    )
    assert response.status_code == 200, response.text
    body = response.json()
    check_item(body["data"][0], 0, plan_for(400, 300, 512, 40_000, 60_000))
    check_item(body["data"][1], 1, plan_for(50, 80, 512, 40_000, 60_000))


async def test_multipart_with_several_image_parts_and_form_fields(
    served: Served, images: Callable[..., bytes]
) -> None:
    shapes = [(64, 64), (40, 160), (90, 30)]
    data = [images(h, w) for h, w in shapes]
    files = [("image", (f"{i}.png", d, "image/png")) for i, d in enumerate(data)]
    response = await served.client.post(
        "/encode",
        files=files,
        data={"token_budget": "64", "normalize": "false", "encoding_format": "base64"},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    check_envelope(body, 3)
    for i, (item, (h, w)) in enumerate(zip(body["data"], shapes, strict=True)):
        plan = plan_for(h, w, 64)
        check_item(item, i, plan)
        assert isinstance(item["embedding"], str)
        expected = (await alone(served.service, data[i], plan)).pooled[0]
        np.testing.assert_allclose(floats(item["embedding"]), expected, atol=ATOL, rtol=ATOL)


async def test_raw_image_body_with_query_parameters(
    served: Served, images: Callable[..., bytes]
) -> None:
    data = images(77, 333)
    response = await served.client.post(
        "/encode",
        content=data,
        headers={"content-type": "image/png"},
        params={"token_budget": "100", "strategy": "naflex", "return_patch_embeddings": "true"},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    check_envelope(body, 1)
    plan = plan_for(77, 333, 100)
    item = body["data"][0]
    check_item(item, 0, plan)
    assert np.asarray(item["patch_embeddings"]).shape == (plan.tokens, HIDDEN)


async def test_raw_body_with_an_unknown_query_parameter_is_refused(
    served: Served, images: Callable[..., bytes]
) -> None:
    response = await served.client.post(
        "/encode",
        content=images(20, 20),
        headers={"content-type": "image/png"},
        params={"token_bugdet": "100"},
    )
    assert response.status_code == 422
    assert response.json()["error"]["type"] == "invalid_request"


async def test_normalize_false_returns_the_raw_pooler_output(
    served: Served, images: Callable[..., bytes]
) -> None:
    data = images(150, 210)
    normed = await served.encode(images=[b64(data)], normalize=True)
    raw = await served.encode(images=[b64(data)], normalize=False)
    assert normed.status_code == raw.status_code == 200
    unit = floats(normed.json()["data"][0]["embedding"])
    pooled = floats(raw.json()["data"][0]["embedding"])
    assert np.linalg.norm(unit) == pytest.approx(1.0, abs=1e-5)
    assert abs(np.linalg.norm(pooled) - 1.0) > 1e-3  # demo weights do not pool to unit norm
    np.testing.assert_allclose(unit, _unit(pooled), atol=ATOL)
    expected = (await alone(served.service, data, plan_for(150, 210))).pooled[0]
    np.testing.assert_allclose(pooled, expected, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("normalize", [True, False])
async def test_base64_encoding_round_trips_to_the_float_response(
    served: Served, images: Callable[..., bytes], normalize: bool
) -> None:
    data = [images(64, 96), images(200, 50)]
    common = {"images": [b64(d) for d in data], "normalize": normalize}
    as_float = (await served.encode(**common, encoding_format="float")).json()
    as_b64 = (await served.encode(**common, encoding_format="base64")).json()
    for f_item, b_item in zip(as_float["data"], as_b64["data"], strict=True):
        assert isinstance(b_item["embedding"], str)
        decoded = np.frombuffer(base64.b64decode(b_item["embedding"]), dtype="<f4")
        assert decoded.shape == (HIDDEN,)
        np.testing.assert_allclose(decoded, np.asarray(f_item["embedding"]), atol=1e-6)
        assert {k: v for k, v in f_item.items() if k != "embedding"} == {
            k: v for k, v in b_item.items() if k != "embedding"
        }


@pytest.mark.parametrize("fmt", ["float", "base64"])
async def test_patch_embeddings_have_one_row_per_token(
    served: Served, images: Callable[..., bytes], fmt: str
) -> None:
    hidden = (await served.client.get("/info")).json()["hidden_size"]
    shapes = [(100, 60), (33, 250)]
    data = [images(h, w) for h, w in shapes]
    response = await served.encode(
        images=[b64(d) for d in data],
        token_budget=96,
        return_patch_embeddings=True,
        encoding_format=fmt,
    )
    assert response.status_code == 200, response.text
    for i, (item, (h, w)) in enumerate(zip(response.json()["data"], shapes, strict=True)):
        plan = plan_for(h, w, 96)
        raw = item["patch_embeddings"]
        if fmt == "base64":
            assert isinstance(raw, str)
            tokens = np.frombuffer(base64.b64decode(raw), dtype="<f4")
            assert tokens.size == plan.tokens * hidden
            tokens = tokens.reshape(plan.tokens, hidden)
        else:
            tokens = np.asarray(raw, dtype=np.float32)
            assert tokens.shape == (plan.tokens, hidden)
        expected = (await alone(served.service, data[i], plan)).tokens
        np.testing.assert_allclose(tokens, expected, atol=ATOL, rtol=ATOL)


async def test_patch_embeddings_are_absent_unless_asked(
    served: Served, images: Callable[..., bytes]
) -> None:
    body = (await served.encode(images=[b64(images(20, 20))])).json()
    assert "patch_embeddings" not in body["data"][0]


@pytest.mark.parametrize(("budget", "side"), [(256, 256), (200, 224), (64, 128), (1, 16)])
async def test_square_strategy_resizes_to_s_by_s(
    served: Served, images: Callable[..., bytes], budget: int, side: int
) -> None:
    data = images(90, 300)
    response = await served.encode(images=[b64(data)], strategy="square", token_budget=budget)
    assert response.status_code == 200, response.text
    item = response.json()["data"][0]
    n = side // 16
    assert item["size"] == [side, side]
    assert item["grid"] == [n, n]
    assert item["tokens"] == n * n
    assert item["original_size"] == [90, 300]
    plan = plan_for(90, 300, budget, strategy="square")
    check_item(item, 0, plan)
    expected = (await alone(served.service, data, plan)).pooled[0]
    np.testing.assert_allclose(floats(item["embedding"]), _unit(expected), atol=ATOL)


@pytest.mark.parametrize(
    ("shape", "max_tiles"), [((480, 640), 4), ((100, 500), 4), ((64, 64), 4), ((300, 900), 9)]
)
async def test_anyres_returns_tiles_and_thumbnail(
    served: Served, images: Callable[..., bytes], shape: tuple[int, int], max_tiles: int
) -> None:
    h, w = shape
    data = images(h, w)
    response = await served.encode(
        images=[b64(data)], strategy="anyres", token_budget=64, max_tiles=max_tiles
    )
    assert response.status_code == 200, response.text
    body = response.json()
    item = body["data"][0]
    plan = plan_for(h, w, 64, strategy="anyres", max_tiles=max_tiles)
    assert plan.tiles is not None
    rows, cols = plan.tiles
    side = 16 * 8  # S = p * floor(sqrt(64))
    assert item["tiles"] == [rows, cols]
    assert rows * cols <= max_tiles
    assert item["tokens"] == (rows * cols + 1) * (side // 16) ** 2
    assert item["size"] == [rows * side, cols * side]
    assert item["grid"] == [8, 8]
    check_item(item, 0, plan)
    assert body["usage"]["tokens"] == item["tokens"]
    tiles = [floats(t) for t in item["tile_embeddings"]]
    assert len(tiles) == rows * cols + 1
    # `embedding` is the thumbnail's, which comes last.
    np.testing.assert_array_equal(floats(item["embedding"]), tiles[-1])
    expected = (await alone(served.service, data, plan)).pooled
    assert expected.shape == (rows * cols + 1, HIDDEN)
    for got, want in zip(tiles, expected, strict=True):
        np.testing.assert_allclose(got, _unit(want), atol=ATOL)


async def test_anyres_prefers_a_wide_grid_for_a_wide_image(
    served: Served, images: Callable[..., bytes]
) -> None:
    response = await served.encode(
        images=[b64(images(100, 800))], strategy="anyres", token_budget=16, max_tiles=4
    )
    item = response.json()["data"][0]
    assert item["tiles"] == [1, 4]
    assert item["tokens"] == 5 * 16


async def test_anyres_base64_tile_embeddings(served: Served, images: Callable[..., bytes]) -> None:
    common = {"images": [b64(images(120, 240))], "strategy": "anyres", "token_budget": 16}
    as_float = (await served.encode(**common)).json()["data"][0]
    as_b64 = (await served.encode(**common, encoding_format="base64")).json()["data"][0]
    assert all(isinstance(t, str) for t in as_b64["tile_embeddings"])
    for f, b in zip(as_float["tile_embeddings"], as_b64["tile_embeddings"], strict=True):
        np.testing.assert_allclose(floats(b), np.asarray(f), atol=1e-6)


async def test_default_token_budget_setting_applies(images: Callable[..., bytes]) -> None:
    async with serve(default_token_budget=64) as s:
        body = (await s.encode(images=[b64(images(480, 640))])).json()
    check_item(body["data"][0], 0, plan_for(480, 640, 64))


async def test_image_modes_are_accepted(served: Served, images: Callable[..., bytes]) -> None:
    response = await served.encode(
        images=[b64(images(40, 50, "RGBA")), b64(images(40, 50, "L"))], token_budget=16
    )
    assert response.status_code == 200, response.text
    for item in response.json()["data"]:
        assert item["original_size"] == [40, 50]


async def test_resize_on_the_model_device_gives_nearly_the_same_embeddings(
    images: Callable[..., bytes],
) -> None:
    """RESIZE_DEVICE=model (the CUDA default) resizes with torch instead of PIL: same sizing,
    same tokens, embeddings a uint8 level's worth apart; anyres stays on the CPU path."""
    data = [b64(images(180, 320)), b64(images(300, 100))]
    async with serve() as cpu_side, serve(resize_device="model") as device_side:
        assert device_side.service._resize_on_device
        want = (await cpu_side.encode(images=data, token_budget=64)).json()["data"]
        got = (await device_side.encode(images=data, token_budget=64)).json()["data"]
        for a, b in zip(got, want, strict=True):
            assert (a["tokens"], a["grid"], a["size"]) == (b["tokens"], b["grid"], b["size"])
            cosine = float(floats(a["embedding"]) @ floats(b["embedding"]))
            assert cosine > 0.999, cosine
            assert not np.array_equal(floats(a["embedding"]), floats(b["embedding"]))
        tiles = await device_side.encode(images=data[:1], token_budget=16, strategy="anyres")
        assert tiles.status_code == 200
