"""An image's output does not depend on what it is packed with, or where (no cross-talk)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import pytest
import torch

from app.engine.attention import (
    DenseMask,
    PackLayout,
    SdpaSegments,
    available_backends,
    make_backend,
)
from app.engine.siglip2 import PackedSiglip2Vision
from app.imaging.sizing import Grid
from tests.engine.reference import random_patches

TOLERANCE = 1e-5
BACKENDS = available_backends(torch.device("cpu"), torch.float32)
GRIDS = [Grid(8, 8), Grid(10, 10), Grid(8, 8), Grid(3, 7), Grid(1, 1), Grid(16, 4), Grid(1, 33)]


def _forward(
    model: PackedSiglip2Vision,
    patches: Sequence[np.ndarray],
    grids: Sequence[Grid],
    backend: str,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """One packed pass; returns pooled (N, D) and each sequence's tokens."""
    with torch.inference_mode():
        out = model(torch.from_numpy(np.concatenate(patches)), grids, make_backend(backend), True)
    assert out.tokens is not None
    tokens = out.tokens.numpy()
    offsets = np.cumsum([0] + [g.tokens for g in grids])
    return out.pooled.numpy(), [tokens[a:b] for a, b in itertools.pairwise(offsets)]


def _split(rng: np.random.Generator, grids: Sequence[Grid]) -> list[np.ndarray]:
    return [random_patches(rng, [g], 16) for g in grids]


def _assert_close(a: np.ndarray, b: np.ndarray, what: str) -> None:
    diff = np.abs(a - b).max()
    assert diff <= TOLERANCE, f"{what}: max abs diff {diff}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_order_and_grouping_do_not_matter(
    tiny_packed: PackedSiglip2Vision, backend: str, rng: np.random.Generator, seed: int
) -> None:
    patches = _split(rng, GRIDS)
    n = len(GRIDS)
    pooled, tokens = _forward(tiny_packed, patches, GRIDS, backend)
    assert pooled.shape == (n, tiny_packed.spec.hidden_size)

    # Each image alone.
    for i in range(n):
        alone_pooled, alone_tokens = _forward(tiny_packed, [patches[i]], [GRIDS[i]], backend)
        _assert_close(alone_pooled[0], pooled[i], f"image {i} alone vs packed, seed {seed}")
        _assert_close(alone_tokens[0], tokens[i], f"image {i} tokens alone, seed {seed}")

    # Shuffled.
    perm = rng.permutation(n)
    shuffled_pooled, shuffled_tokens = _forward(
        tiny_packed, [patches[i] for i in perm], [GRIDS[i] for i in perm], backend
    )
    for j, i in enumerate(perm):
        _assert_close(shuffled_pooled[j], pooled[i], f"image {i} shuffled, seed {seed}")
        _assert_close(shuffled_tokens[j], tokens[i], f"image {i} shuffled tokens, seed {seed}")

    # Split in two packs at a random point.
    cut = int(rng.integers(1, n))
    first, _ = _forward(tiny_packed, patches[:cut], GRIDS[:cut], backend)
    second, _ = _forward(tiny_packed, patches[cut:], GRIDS[cut:], backend)
    _assert_close(np.concatenate([first, second]), pooled, f"split at {cut}, seed {seed}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_neighbours_do_not_leak(
    tiny_packed: PackedSiglip2Vision, backend: str, rng: np.random.Generator, seed: int
) -> None:
    """Changing one image's pixels changes its output and nobody else's."""
    grids = [Grid(6, 6), Grid(6, 6), Grid(5, 9)]
    patches = _split(rng, grids)
    before, _ = _forward(tiny_packed, patches, grids, backend)
    patches[1] = random_patches(rng, [grids[1]], 16)
    after, _ = _forward(tiny_packed, patches, grids, backend)
    assert np.abs(after[1] - before[1]).max() > 1e-3, f"image 1 did not change, seed {seed}"
    _assert_close(after[0], before[0], f"image 0 moved with its neighbour, seed {seed}")
    _assert_close(after[2], before[2], f"image 2 moved with its neighbour, seed {seed}")


def _plan_paths(grids: Sequence[Grid]) -> dict[int, str]:
    layout = PackLayout(tuple(g.tokens for g in grids), torch.device("cpu"))
    return {
        group.length: "contiguous" if group.start is not None else "gathered"
        for group in SdpaSegments().plan(layout)
    }


@pytest.mark.parametrize(
    ("grids", "paths"),
    [
        # the two 64s are apart: gathered with an index
        ([Grid(8, 8), Grid(10, 10), Grid(8, 8)], {64: "gathered", 100: "contiguous"}),
        # the two 64s are adjacent: one contiguous slice
        ([Grid(8, 8), Grid(8, 8), Grid(10, 10)], {64: "contiguous", 100: "contiguous"}),
        # every sequence the same length: the single-group fast path
        ([Grid(8, 8), Grid(4, 16), Grid(16, 4)], {64: "contiguous"}),
        # mixed: a gathered run of three, and singletons
        (
            [Grid(4, 4), Grid(2, 3), Grid(4, 4), Grid(1, 1), Grid(4, 4), Grid(2, 3)],
            {16: "gathered", 6: "gathered", 1: "contiguous"},
        ),
    ],
)
def test_sdpa_segments_paths_equal_dense_mask(
    tiny_packed: PackedSiglip2Vision,
    grids: list[Grid],
    paths: dict[int, str],
    rng: np.random.Generator,
    seed: int,
) -> None:
    assert _plan_paths(grids) == paths  # the case really exercises the path it claims
    patches = _split(rng, grids)
    seg_pooled, seg_tokens = _forward(tiny_packed, patches, grids, SdpaSegments.name)
    ref_pooled, ref_tokens = _forward(tiny_packed, patches, grids, DenseMask.name)
    _assert_close(seg_pooled, ref_pooled, f"{grids} pooled, seed {seed}")
    for i, (a, b) in enumerate(zip(seg_tokens, ref_tokens, strict=True)):
        _assert_close(a, b, f"{grids} tokens of {i}, seed {seed}")


def test_attention_backends_on_raw_qkv(rng: np.random.Generator, seed: int) -> None:
    """Backend level: sdpa-segments == dense-mask == per-sequence softmax attention by hand."""
    lengths = (5, 9, 5, 1, 9, 5)
    heads, dim = 3, 8
    total = sum(lengths)
    qkv = torch.from_numpy(rng.standard_normal((total, 3, heads, dim)).astype(np.float32))
    layout = PackLayout(lengths, torch.device("cpu"))
    scale = dim**-0.5

    expected = torch.empty(total, heads, dim)
    start = 0
    for n in lengths:
        q, k, v = qkv[start : start + n].unbind(1)  # (n, H, D)
        weights = torch.softmax(torch.einsum("qhd,khd->hqk", q, k) * scale, dim=-1)
        expected[start : start + n] = torch.einsum("hqk,khd->qhd", weights, v)
        start += n
    expected = expected.reshape(total, heads * dim)

    for name in BACKENDS:
        backend = make_backend(name)
        got = backend(qkv, backend.plan(layout), scale)
        assert got.shape == (total, heads * dim)
        diff = (got - expected).abs().max().item()
        assert diff <= TOLERANCE, f"{name}: max abs diff {diff}, seed {seed}"


def test_pack_length_mismatch_raises(tiny_packed: PackedSiglip2Vision) -> None:
    patches = torch.zeros(10, 3 * 16 * 16)
    with pytest.raises(ValueError, match="10 patches"):
        tiny_packed(patches, [Grid(3, 3)], make_backend(SdpaSegments.name))
