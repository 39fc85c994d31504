"""Helpers shared by the in-process API tests and the e2e tests: images, metrics, references."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

PATCH = 16  # demo:tiny's patch size
READY_DEADLINE_S = 60.0


def clear_patchpack_env() -> dict[str, str]:
    """The environment without PATCHPACK_* settings (the test seed stays)."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PATCHPACK_") or k == "PATCHPACK_TEST_SEED"
    }


def png(height: int, width: int, rng: np.random.Generator, mode: str = "RGB") -> bytes:
    """A PNG of random pixels (noise, so every resize is visible in the embedding)."""
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    image = Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode=mode)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def floats(value: str | list[float]) -> np.ndarray:
    """A response vector in either encoding_format, as float32."""
    if isinstance(value, str):
        return np.frombuffer(base64.b64decode(value), dtype="<f4")
    return np.asarray(value, dtype=np.float32)


# -- metrics --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scrape:
    families: dict[str, Any]
    text: str

    @classmethod
    def parse(cls, text: str) -> Scrape:
        return cls({f.name: f for f in text_string_to_metric_families(text)}, text)

    def value(self, sample: str, **labels: str) -> float:
        """The sum of every sample called `sample` whose labels include `labels`."""
        total = 0.0
        for family in self.families.values():
            for s in family.samples:
                if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                    total += s.value
        return total

    def has(self, sample: str, **labels: str) -> bool:
        return any(
            s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
            for family in self.families.values()
            for s in family.samples
        )

    def names(self) -> set[str]:
        """Every family name, with counters also under their `_total` sample name."""
        out: set[str] = set()
        for family in self.families.values():
            out.add(family.name)
            if family.type == "counter":
                out.add(family.name + "_total")
        return out


# API.md's metric table.
API_METRICS = (
    "patchpack_tokens_total",
    "patchpack_images_total",
    "patchpack_requests_total",
    "patchpack_rejected_total",
    "patchpack_request_duration_seconds",
    "patchpack_queue_wait_seconds",
    "patchpack_preprocess_seconds",
    "patchpack_batch_compute_seconds",
    "patchpack_batch_tokens",
    "patchpack_batch_images",
    "patchpack_batch_fill_ratio",
    "patchpack_padding_tokens_total",
    "patchpack_queue_tokens",
    "patchpack_queue_images",
    "patchpack_ready",
)


# -- waiting on conditions ------------------------------------------------------------------


async def wait_for(
    condition: Callable[[], bool | Awaitable[bool]],
    timeout: float = 10.0,
    what: str = "",
    interval: float = 0.01,
) -> None:
    """Poll `condition` until true; fail after `timeout` seconds (a deadline, not a sleep)."""
    give_up = time.monotonic() + timeout
    while True:
        result = condition()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > give_up:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or condition}")
        await asyncio.sleep(interval)


async def wait_ready(client: httpx.AsyncClient, timeout: float = READY_DEADLINE_S) -> None:
    async def ready() -> bool:
        try:
            return (await client.get("/readyz")).status_code == 200
        except httpx.TransportError:
            return False

    await wait_for(ready, timeout, "/readyz to turn 200")
