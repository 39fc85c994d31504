"""naflex sizing is transformers' own `get_image_size_for_max_num_patches`, number for number."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from transformers.models.siglip2.image_processing_pil_siglip2 import (
    get_image_size_for_max_num_patches,
)

from app.imaging.sizing import SizeRequest, naflex_size, plan_image


@settings(max_examples=300, deadline=None)
@given(
    h=st.integers(1, 20_000),
    w=st.integers(1, 20_000),
    budget=st.integers(1, 4096),
    p=st.sampled_from([8, 14, 16]),
)
@example(h=480, w=640, budget=256, p=16)
@example(h=1, w=1, budget=1, p=16)
@example(h=1, w=20_000, budget=4096, p=14)
@example(h=20_000, w=20_000, budget=1, p=8)
def test_naflex_size_matches_transformers(h: int, w: int, budget: int, p: int) -> None:
    expected = get_image_size_for_max_num_patches(h, w, p, budget)
    assert naflex_size(h, w, p, budget) == expected
    assert plan_image(SizeRequest(h, w, budget), p).size == expected


@pytest.mark.parametrize("budget", [16, 64, 256, 576, 1024, 4096])
@pytest.mark.parametrize(
    ("h", "w"), [(1, 1), (1, 5000), (5000, 1), (1080, 1920), (1920, 1080), (333, 999), (17, 4)]
)
def test_naflex_size_matches_transformers_grid(h: int, w: int, budget: int) -> None:
    assert naflex_size(h, w, 16, budget) == get_image_size_for_max_num_patches(h, w, 16, budget)
