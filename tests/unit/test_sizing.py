"""Sizing rules of API.md, with plain numbers. No torch, no PIL: sizing is pure arithmetic."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from app.imaging.sizing import (
    DEFAULT_MAX_TILES,
    MAX_TILES_LIMIT,
    Grid,
    ImagePlan,
    SizeRequest,
    SizingError,
    Strategy,
    anyres_tiles,
    fit_in_canvas,
    naflex_size,
    native_size,
    plan_image,
    square_side,
)

sides = st.integers(1, 20_000)
budgets = st.integers(1, 4096)
patches = st.sampled_from([8, 14, 16])
pixel_caps = st.integers(1, 10**8)

FAST = settings(max_examples=200, deadline=None)


def _naflex(h: int, w: int, budget: int, p: int = 16, **caps: int | None) -> ImagePlan:
    return plan_image(SizeRequest(h, w, budget, **caps), p)


def _check_grid(plan: ImagePlan, p: int) -> None:
    (grid,) = plan.grids
    h, w = plan.size
    assert h % p == 0 and w % p == 0, plan
    assert h >= p and w >= p, plan
    assert (grid.rows, grid.cols) == (h // p, w // p), plan
    assert plan.tokens == grid.rows * grid.cols


def test_sizing_imports_nothing_heavy() -> None:
    """The pure layer must stay importable without torch, numpy or PIL."""
    code = (
        "import sys, app.imaging.sizing\n"
        "heavy = {'torch', 'numpy', 'PIL', 'transformers', 'fastapi'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, cwd=root)


# -- naflex (no caps) ------------------------------------------------------------------------
@FAST
@given(h=sides, w=sides, budget=budgets, p=patches)
def test_naflex_fits_budget_on_patch_multiples(h: int, w: int, budget: int, p: int) -> None:
    plan = _naflex(h, w, budget, p)
    _check_grid(plan, p)
    assert plan.tokens <= budget
    assert plan.original_size == (h, w)
    assert plan.strategy is Strategy.NAFLEX
    assert plan.size == naflex_size(h, w, p, budget)


@FAST
@given(h=sides, w=sides, budget=budgets, p=patches)
def test_naflex_fills_the_budget(h: int, w: int, budget: int, p: int) -> None:
    """No larger grid of the same image fits: one more row and column overflows the budget.

    The search only gives up short of the budget when the scale hits its ceiling of 100x
    (tiny images with a huge budget), so that case is set aside.
    """
    assume(max(h, w) * 100 > p * budget)
    rows, cols = (s // p for s in naflex_size(h, w, p, budget))
    assert (rows + 1) * (cols + 1) > budget, (rows, cols)


@pytest.mark.parametrize(
    ("h", "w", "budget", "p", "expected"),
    [
        # API.md's response example: 480x640 at 256 tokens -> 224x288, grid 14x18, 252 tokens.
        (480, 640, 256, 16, (224, 288)),
        # A square fills a square budget exactly, upscaled: 224 -> 16 patches a side.
        (224, 224, 256, 16, (256, 256)),
        (224, 224, 1024, 16, (512, 512)),
        # Downscaled square.
        (4096, 4096, 256, 16, (256, 256)),
        # 1xN: the short side is pinned to one patch, the long side takes the whole budget.
        (1, 20_000, 256, 16, (16, 4096)),
        (20_000, 1, 256, 16, (4096, 16)),
        # 1x1 with budget 1: one patch.
        (1, 1, 1, 16, (16, 16)),
        # ... but never more than 100x: HF's search tops out at scale 100 (ceil(100/16)*16).
        (1, 1, 4096, 16, (112, 112)),
        # Budget 1 always gives exactly one patch.
        (7000, 300, 1, 14, (14, 14)),
    ],
)
def test_naflex_worked_examples(
    h: int, w: int, budget: int, p: int, expected: tuple[int, int]
) -> None:
    plan = _naflex(h, w, budget, p)
    assert plan.size == expected
    _check_grid(plan, p)


# -- native resolution with min/max pixels ---------------------------------------------------
@pytest.mark.parametrize(
    ("h", "w", "budget", "caps", "expected"),
    [
        # Inside both caps: just rounded to patch multiples (480 = 30*16, 640 = 40*16).
        (480, 640, 4096, {"max_pixels": 1_000_000}, (480, 640)),
        (470, 650, 4096, {"min_pixels": 1, "max_pixels": 1_000_000}, (464, 656)),
        # Over max_pixels: b = sqrt(1000*2000/200000) = sqrt(10);
        # h = floor(1000/b/16)*16 = 19*16, w = floor(2000/b/16)*16 = 39*16.
        (1000, 2000, 4096, {"max_pixels": 200_000}, (304, 624)),
        # Under min_pixels: rounded 96x48 = 4608 < 50000; b = sqrt(50000/5000) = sqrt(10);
        # h = ceil(100*b/16)*16 = 20*16, w = ceil(50*b/16)*16 = 10*16.
        (100, 50, 4096, {"min_pixels": 50_000}, (320, 160)),
        # A tiny image under a large max: at least one patch a side.
        (10, 10, 4096, {"max_pixels": 10**6}, (16, 16)),
        # max_pixels below one patch: the one-patch floor wins.
        (10, 10, 4096, {"max_pixels": 100}, (16, 16)),
    ],
)
def test_native_worked_examples(
    h: int, w: int, budget: int, caps: dict[str, int], expected: tuple[int, int]
) -> None:
    plan = _naflex(h, w, budget, 16, **caps)
    assert plan.size == expected
    _check_grid(plan, 16)


def test_native_over_budget_falls_back_to_naflex() -> None:
    # Native 480x640 is 30x40 = 1200 tokens: over a 1024 budget, so naflex decides.
    plan = _naflex(480, 640, 1024, 16, max_pixels=10**7)
    assert plan.size == naflex_size(480, 640, 16, 1024)
    assert plan.size != (480, 640)
    assert plan.tokens <= 1024
    # min_pixels pushing the image past the budget: naflex too.
    plan = _naflex(100, 50, 64, 16, min_pixels=50_000)
    assert plan.size == naflex_size(100, 50, 16, 64)
    assert plan.tokens <= 64


@FAST
@given(h=sides, w=sides, budget=budgets, p=patches, max_pixels=pixel_caps)
def test_native_max_pixels_respected(h: int, w: int, budget: int, p: int, max_pixels: int) -> None:
    plan = _naflex(h, w, budget, p, max_pixels=max_pixels)
    _check_grid(plan, p)
    assert plan.tokens <= budget
    ph, pw = plan.size
    # Only the one-patch floor may push an image over its max_pixels.
    assert ph * pw <= max_pixels or min(ph, pw) == p, plan


@FAST
@given(h=sides, w=sides, budget=budgets, p=patches, min_pixels=pixel_caps)
def test_native_min_pixels_respected_when_budget_allows(
    h: int, w: int, budget: int, p: int, min_pixels: int
) -> None:
    plan = _naflex(h, w, budget, p, min_pixels=min_pixels)
    _check_grid(plan, p)
    assert plan.tokens <= budget
    ph, pw = plan.size
    if ph * pw < min_pixels:
        # Allowed only when meeting min_pixels would cost more tokens than the budget, in
        # which case the no-caps rule decides.
        assert plan.size == naflex_size(h, w, p, budget), plan


@FAST
@given(
    h=sides,
    w=sides,
    budget=budgets,
    p=patches,
    a=pixel_caps,
    b=pixel_caps,
)
def test_native_both_caps(h: int, w: int, budget: int, p: int, a: int, b: int) -> None:
    lo, hi = min(a, b), max(a, b)
    plan = _naflex(h, w, budget, p, min_pixels=lo, max_pixels=hi)
    _check_grid(plan, p)
    assert plan.tokens <= budget
    # Agrees with the bare function (plan_image adds nothing for naflex).
    assert plan.size == native_size(h, w, p, budget, lo, hi)


@pytest.mark.parametrize(("lo", "hi"), [(1001, 1000), (10**6, 1)])
def test_min_pixels_above_max_pixels_raises(lo: int, hi: int) -> None:
    with pytest.raises(SizingError, match="min_pixels"):
        _naflex(100, 100, 256, min_pixels=lo, max_pixels=hi)


def test_equal_caps_accepted() -> None:
    plan = _naflex(100, 100, 256, min_pixels=4096, max_pixels=4096)
    # 96x96 = 9216 px > 4096: b = sqrt(10000/4096) = 1.5625, each side floor(64/16)*16 = 64.
    assert plan.size == (64, 64)


# -- square ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("budget", "p", "side"),
    [(256, 16, 256), (255, 16, 240), (1024, 16, 512), (1000, 16, 496), (576, 14, 336), (1, 8, 8)],
)
def test_square_side(budget: int, p: int, side: int) -> None:
    assert square_side(p, budget) == side
    plan = plan_image(SizeRequest(300, 1000, budget, strategy=Strategy.SQUARE), p)
    assert plan.size == (side, side)
    assert plan.grids == (Grid(side // p, side // p),)
    assert plan.original_size == (300, 1000)


@FAST
@given(h=sides, w=sides, budget=budgets, p=patches)
def test_square_properties(h: int, w: int, budget: int, p: int) -> None:
    plan = plan_image(SizeRequest(h, w, budget, strategy=Strategy.SQUARE), p)
    _check_grid(plan, p)
    n = plan.grids[0].rows
    assert plan.grids[0].cols == n
    # The largest square grid within the budget.
    assert n * n <= budget < (n + 1) * (n + 1)


# -- anyres ----------------------------------------------------------------------------------
def _anyres(h: int, w: int, budget: int, p: int, max_tiles: int = DEFAULT_MAX_TILES) -> ImagePlan:
    return plan_image(SizeRequest(h, w, budget, strategy=Strategy.ANYRES, max_tiles=max_tiles), p)


def test_anyres_api_example() -> None:
    # API.md / DESIGN.md: 672x672 at p=14, budget 576 -> S=336, 2x2 tiles, 5 * 576 = 2880 tokens.
    plan = _anyres(672, 672, 576, 14)
    assert plan.tiles == (2, 2)
    assert plan.size == (672, 672)
    assert plan.content_size == (672, 672)
    assert plan.tokens == 2880
    assert plan.grids == (Grid(24, 24),) * 5


@pytest.mark.parametrize(
    ("h", "w", "max_tiles", "tiles"),
    [
        (1344, 336, 4, (4, 1)),  # tall 4:1 fills a column exactly
        (336, 1344, 4, (1, 4)),  # wide 1:4 fills a row exactly
        (672, 1008, 6, (2, 3)),  # 2:3 fills 2x3 exactly
        (672, 1008, 4, (2, 2)),  # 2x3 not allowed; 2x2 keeps the most pixels
        (1000, 1000, 2, (1, 1)),  # 1x2 keeps no more than 1x1 and wastes more
        (2000, 2000, 16, (4, 4)),  # big square: 4x4 keeps 1344^2 < 2000^2, the most possible
        (5000, 300, 16, (15, 1)),  # very tall: 15 rows already keep every pixel, 16 waste more
        (100, 100, 4, (1, 1)),  # small: one tile already holds every pixel
        (700, 500, 1, (1, 1)),  # max_tiles 1: one tile, always
    ],
)
def test_anyres_tile_choice(h: int, w: int, max_tiles: int, tiles: tuple[int, int]) -> None:
    side = 336
    assert anyres_tiles(h, w, side, max_tiles) == tiles
    plan = _anyres(h, w, 576, 14, max_tiles)
    assert plan.tiles == tiles
    rows, cols = tiles
    assert plan.size == (rows * side, cols * side)
    assert plan.tokens == (rows * cols + 1) * 24 * 24
    assert len(plan.grids) == rows * cols + 1


def _llava_key(h: int, w: int, rows: int, cols: int, side: int) -> tuple[float, float]:
    """API.md's rule, written out independently: (effective, waste) of a candidate canvas."""
    ch, cw = rows * side, cols * side
    scale = min(ch / h, cw / w)
    effective = min(h * scale * w * scale, float(h * w))
    return effective, ch * cw - effective


@FAST
@given(
    h=sides,
    w=sides,
    budget=budgets,
    p=patches,
    max_tiles=st.integers(1, MAX_TILES_LIMIT),
)
def test_anyres_properties(h: int, w: int, budget: int, p: int, max_tiles: int) -> None:
    plan = _anyres(h, w, budget, p, max_tiles)
    side = p * math.isqrt(budget)
    assert plan.tiles is not None and plan.content_size is not None
    rows, cols = plan.tiles
    assert 1 <= rows * cols <= max_tiles
    assert plan.size == (rows * side, cols * side)
    assert plan.grids == (Grid(side // p, side // p),) * (rows * cols + 1)
    assert plan.tokens == (rows * cols + 1) * (side // p) ** 2

    # The chosen grid is the best by (most effective, then least waste) among all candidates.
    chosen = _llava_key(h, w, rows, cols, side)
    for r in range(1, max_tiles + 1):
        for c in range(1, max_tiles // r + 1):
            eff, waste = _llava_key(h, w, r, c, side)
            assert eff < chosen[0] or (eff == chosen[0] and waste >= chosen[1]), (r, c)

    # The content fits the canvas, touches it on one side, and keeps the aspect ratio
    # (the other side is the exact scaled length, rounded up).
    ch, cw = plan.content_size
    canvas_h, canvas_w = plan.size
    assert 1 <= ch <= canvas_h and 1 <= cw <= canvas_w
    assert ch == canvas_h or cw == canvas_w
    if cw == canvas_w and ch < canvas_h:
        assert abs(ch - h * cw / w) < 1 + 1e-9
    if ch == canvas_h and cw < canvas_w:
        assert abs(cw - w * ch / h) < 1 + 1e-9


@pytest.mark.parametrize(
    ("image", "canvas", "content"),
    [
        ((672, 672), (672, 672), (672, 672)),
        ((672, 1008), (672, 672), (448, 672)),  # wide: width fills
        ((1008, 672), (672, 672), (672, 448)),  # tall: height fills
        ((100, 100), (336, 672), (336, 336)),  # upscaled to the short side
        ((1, 20_000), (336, 1344), (1, 1344)),  # never below one pixel
    ],
)
def test_fit_in_canvas(
    image: tuple[int, int], canvas: tuple[int, int], content: tuple[int, int]
) -> None:
    assert fit_in_canvas(*image, *canvas) == content


@pytest.mark.parametrize(
    ("image", "canvas", "content"),
    [((300, 600), (672, 672), (336, 672)), ((600, 300), (672, 672), (672, 336))],
)
def test_fit_in_canvas_exact_aspect(
    image: tuple[int, int], canvas: tuple[int, int], content: tuple[int, int]
) -> None:
    assert fit_in_canvas(*image, *canvas) == content


@pytest.mark.parametrize("max_tiles", [0, -1, MAX_TILES_LIMIT + 1])
def test_anyres_max_tiles_bounds(max_tiles: int) -> None:
    with pytest.raises(SizingError, match="max_tiles"):
        _anyres(100, 100, 256, 16, max_tiles)


def test_anyres_max_tiles_limit_allowed() -> None:
    plan = _anyres(16 * 336, 336, 576, 14, MAX_TILES_LIMIT)
    assert plan.tiles == (16, 1)
    assert plan.tokens == 17 * 576


# -- edges -----------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", list(Strategy))
@example(h=1, w=1, budget=1)
@given(h=st.integers(1, 3), w=st.integers(1, 20_000), budget=st.integers(1, 8))
@settings(max_examples=30, deadline=None)
def test_tiny_images_and_budgets(strategy: Strategy, h: int, w: int, budget: int) -> None:
    for height, width in ((h, w), (w, h)):
        plan = plan_image(SizeRequest(height, width, budget, strategy=strategy), 16)
        assert all(g.rows >= 1 and g.cols >= 1 for g in plan.grids)
        per_sequence = max(g.tokens for g in plan.grids)
        assert per_sequence <= budget


@pytest.mark.parametrize("strategy", list(Strategy))
@pytest.mark.parametrize(("h", "w"), [(0, 10), (10, 0), (0, 0), (-5, 10)])
def test_zero_size_raises(strategy: Strategy, h: int, w: int) -> None:
    with pytest.raises(SizingError, match="no pixels"):
        plan_image(SizeRequest(h, w, 256, strategy=strategy), 16)


@pytest.mark.parametrize("budget", [0, -1])
def test_bad_budget_raises(budget: int) -> None:
    with pytest.raises(SizingError, match="token_budget"):
        plan_image(SizeRequest(100, 100, budget), 16)


def test_plan_is_frozen() -> None:
    plan = _naflex(100, 100, 64)
    with pytest.raises(AttributeError):
        plan.size = (1, 1)  # type: ignore[misc]
