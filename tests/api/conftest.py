"""In-process service fixtures: a real app on demo:tiny, its lifespan run, an httpx client on it.

Every test gets a fresh app (demo:tiny loads in tens of milliseconds once torch is imported),
so metrics are exact per test and settings can differ per test.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import pytest

from app.imaging.sizing import ImagePlan, SizeRequest, Strategy, plan_image
from app.main import create_app
from app.service import EncodeService
from app.settings import Settings
from tests.api.helpers import PATCH, Scrape, wait_ready


@pytest.fixture(autouse=True)
def _no_patchpack_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("PATCHPACK_") and key != "PATCHPACK_TEST_SEED":
            monkeypatch.delenv(key)


@dataclass
class Served:
    app: Any
    client: httpx.AsyncClient

    @property
    def service(self) -> EncodeService:
        service: EncodeService = self.app.state.service
        return service

    @property
    def settings(self) -> Settings:
        settings: Settings = self.app.state.settings
        return settings

    async def scrape(self) -> Scrape:
        response = await self.client.get("/metrics")
        assert response.status_code == 200
        return Scrape.parse(response.text)

    async def encode(self, **body: Any) -> httpx.Response:
        return await self.client.post("/encode", json=body)


TINY = {"model": "demo:tiny", "device": "cpu", "warmup": False, "preprocess_workers": 2}


@asynccontextmanager
async def serve(*, ready: bool = True, **overrides: Any) -> AsyncIterator[Served]:
    """A fresh app on demo:tiny (overrides on top), lifespan running, client attached."""
    app = create_app(Settings(**{**TINY, **overrides}))
    async with app.router.lifespan_context(app):
        # raise_app_exceptions=False: see the 500 the client would get, not the exception.
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://test", timeout=60
        ) as client:
            if ready:
                await wait_ready(client)
            yield Served(app, client)


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    async with serve() as s:
        yield s


def plan_for(
    height: int,
    width: int,
    budget: int = 256,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    strategy: str = "naflex",
    max_tiles: int = 4,
) -> ImagePlan:
    """What API.md's sizing says for this image (computed by the pure planner)."""
    request = SizeRequest(
        height, width, budget, min_pixels, max_pixels, Strategy(strategy), max_tiles
    )
    return plan_image(request, PATCH)


def encode_alone(service: EncodeService, data: bytes, plan: ImagePlan) -> Any:
    """The image run on its own, one image per forward pass, bypassing queue and packing."""
    from app.engine.encoder import EncodeInput
    from app.imaging.decode import decode
    from app.imaging.patchify import patchify

    assert service.encoder is not None
    image = decode(data, service.settings.max_image_pixels)
    patches = patchify(image, plan, PATCH)
    return service.encoder.run([EncodeInput(patches, plan.grids, return_tokens=True)])[0]


async def alone(service: EncodeService, data: bytes, plan: ImagePlan) -> Any:
    return await asyncio.to_thread(encode_alone, service, data, plan)


@pytest.fixture
def blocked_forward(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Served], Gate]]:
    """Make a served app's forward passes wait at a gate the test opens."""
    gates: list[Gate] = []

    def install(served: Served) -> Gate:
        gate = Gate()
        encoder = served.service.encoder
        assert encoder is not None
        real_run = encoder.run

        def run(*args: Any, **kwargs: Any) -> Any:
            gate.entered.set()
            gate.calls += 1
            if not gate.opened.wait(30):
                raise RuntimeError("test gate never opened")
            return real_run(*args, **kwargs)

        monkeypatch.setattr(encoder, "run", run)
        gates.append(gate)
        return gate

    yield install
    for gate in gates:
        gate.opened.set()  # never leave the device thread stuck past the test


class Gate:
    def __init__(self) -> None:
        self.entered = threading.Event()
        self.opened = threading.Event()
        self.calls = 0

    def open(self) -> None:
        self.opened.set()


@pytest.fixture
def images(rng: np.random.Generator) -> Callable[..., bytes]:
    from tests.api.helpers import png

    def make(height: int, width: int, mode: str = "RGB") -> bytes:
        return png(height, width, rng, mode)

    return make
