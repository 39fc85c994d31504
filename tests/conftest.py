"""Shared test set-up.

torch and transformers are imported only inside hooks and fixtures that need them, so the pure
tests under tests/unit never pay for (or depend on) them.

Random inputs are fresh on every run. The run's seed is printed in the pytest header and by
the `seed` fixture's users in their assertion messages; `PATCHPACK_TEST_SEED=<n>` replays it.
"""

from __future__ import annotations

import os
import secrets
import zlib
from typing import Any

import numpy as np
import pytest

RUN_SEED = int(os.environ.get("PATCHPACK_TEST_SEED") or secrets.randbits(31))


def pytest_report_header(config: pytest.Config) -> str:
    return f"patchpack random seed: {RUN_SEED} (replay with PATCHPACK_TEST_SEED={RUN_SEED})"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    """A seed for this test: the run's seed mixed with the test's id (so tests differ)."""
    return (RUN_SEED + zlib.crc32(request.node.nodeid.encode())) % 2**31


@pytest.fixture
def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


@pytest.fixture(scope="session")
def run_seed() -> int:
    return RUN_SEED


@pytest.fixture
def random_image(rng: np.random.Generator) -> Any:
    """Factory: `random_image(height, width)` -> a random RGB PIL image from this test's rng."""
    from PIL import Image

    def make(height: int, width: int) -> Image.Image:
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        return Image.fromarray(pixels, "RGB")

    return make


@pytest.fixture(scope="session")
def tiny_hf() -> Any:
    """A seeded, perturbed tiny transformers `Siglip2VisionModel` (fp32, eval, CPU)."""
    from tests.engine.reference import random_hf_vision, tiny_vision_config

    return random_hf_vision(tiny_vision_config(), RUN_SEED)


@pytest.fixture(scope="session")
def tiny_packed(tiny_hf: Any) -> Any:
    """`PackedSiglip2Vision` holding `tiny_hf`'s weights via `from_hf_state_dict`."""
    from tests.engine.reference import packed_from_hf

    return packed_from_hf(tiny_hf)
