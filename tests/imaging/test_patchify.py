"""patchify is bit-identical to transformers' Siglip2ImageProcessorPil; anyres lays out right."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image
from transformers.models.siglip2.image_processing_pil_siglip2 import Siglip2ImageProcessorPil

from app.imaging.patchify import patchify
from app.imaging.sizing import Grid, SizeRequest, Strategy, plan_image
from tests.engine.reference import smooth_rgb

SHAPES = [
    (1, 1),
    (1, 37),  # 1xN
    (53, 1),  # Nx1
    (2, 3),
    (9, 16),  # 9:16, smaller than a patch: upscaled
    (90, 160),  # 9:16
    (160, 90),  # 16:9
    (450, 800),  # 16:9, downscaled at small budgets
    (100, 300),  # 1:3
    (400, 100),  # 4:1
    (33, 77),  # odd
    (257, 129),  # odd, just over powers of two
    (224, 224),  # square
]


@pytest.fixture(scope="module")
def processor() -> Siglip2ImageProcessorPil:
    return Siglip2ImageProcessorPil()


@pytest.mark.parametrize("p", [8, 14, 16])
@pytest.mark.parametrize("budget", [16, 64, 256, 1024])
def test_naflex_matches_transformers_exactly(
    processor: Siglip2ImageProcessorPil,
    random_image: Callable[[int, int], Image.Image],
    seed: int,
    budget: int,
    p: int,
) -> None:
    for h, w in SHAPES:
        image = random_image(h, w)
        plan = plan_image(SizeRequest(h, w, budget), p)
        ours = patchify(image, plan, p)
        ref = processor(images=[image], patch_size=p, max_num_patches=budget, return_tensors="np")
        where = f"{h}x{w} budget={budget} p={p} seed={seed}"
        n = plan.tokens
        assert ours.dtype == np.float32, where
        assert ours.shape == (n, 3 * p * p), where
        assert tuple(ref["spatial_shapes"][0]) == (plan.grids[0].rows, plan.grids[0].cols), where
        assert int(ref["pixel_attention_mask"][0].sum()) == n, where
        diff = np.abs(ours - ref["pixel_values"][0][:n]).max()
        assert diff == 0, f"{where}: max abs diff {diff}"


def test_patch_layout_is_py_px_channel(rng: np.random.Generator) -> None:
    """A hand check of the flattening order, independent of transformers."""
    pixels = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGB")
    plan = plan_image(SizeRequest(32, 48, 6), 16)  # exactly 2x3 patches, no resize
    assert plan.size == (32, 48)
    out = patchify(image, plan, 16)
    normalized = (pixels / 255 - 0.5) / 0.5
    for k in range(6):
        r, c = divmod(k, 3)  # patches row-major
        for py, px, ch in [(0, 0, 0), (3, 5, 2), (15, 0, 1), (7, 15, 2), (15, 15, 0)]:
            want = normalized[r * 16 + py, c * 16 + px, ch]
            assert out[k, (py * 16 + px) * 3 + ch] == pytest.approx(want, abs=1e-6), (k, py, px)
    assert out.min() >= -1 and out.max() <= 1


def test_normalization_extremes() -> None:
    black = Image.new("RGB", (16, 16), (0, 0, 0))
    white = Image.new("RGB", (16, 16), (255, 255, 255))
    plan = plan_image(SizeRequest(16, 16, 1), 16)
    assert np.all(patchify(black, plan, 16) == -1.0)
    assert np.all(patchify(white, plan, 16) == 1.0)


def test_patchify_refuses_non_rgb() -> None:
    plan = plan_image(SizeRequest(16, 16, 1), 16)
    with pytest.raises(ValueError, match="RGB"):
        patchify(Image.new("L", (16, 16)), plan, 16)


def test_square_matches_transformers_on_presized_square(
    processor: Siglip2ImageProcessorPil, rng: np.random.Generator
) -> None:
    """square = PIL bilinear resize to SxS, then the same patches as the HF processor."""
    image = smooth_rgb(rng, 90, 250)
    plan = plan_image(SizeRequest(90, 250, 100, strategy=Strategy.SQUARE), 14)
    assert plan.size == (140, 140) and plan.grids == (Grid(10, 10),)
    resized = image.resize((140, 140), Image.Resampling.BILINEAR)
    ref = processor(
        images=[resized], patch_size=14, do_resize=False, max_num_patches=100, return_tensors="np"
    )
    assert np.array_equal(patchify(image, plan, 14), ref["pixel_values"][0])


@pytest.mark.parametrize(
    ("h", "w", "max_tiles", "tiles"),
    [(100, 250, 4, (1, 3)), (700, 200, 4, (4, 1)), (250, 250, 4, (2, 2)), (640, 480, 6, None)],
)
def test_anyres_tiles_row_major_then_thumbnail(
    processor: Siglip2ImageProcessorPil,
    rng: np.random.Generator,
    h: int,
    w: int,
    max_tiles: int,
    tiles: tuple[int, int] | None,
) -> None:
    p, budget = 14, 64  # S = 14 * 8 = 112: tiles of 8x8 patches
    side = 112
    image = smooth_rgb(rng, h, w)
    plan = plan_image(SizeRequest(h, w, budget, strategy=Strategy.ANYRES, max_tiles=max_tiles), p)
    assert plan.tiles is not None and plan.content_size is not None
    if tiles is not None:
        assert plan.tiles == tiles
    rows, cols = plan.tiles
    out = patchify(image, plan, p)
    per_seq = (side // p) ** 2
    assert out.shape == ((rows * cols + 1) * per_seq, 3 * p * p)
    assert out.shape[0] == plan.tokens

    # Build the canvas independently: resize to the content size, centre on black, cut tiles.
    ch, cw = plan.content_size
    canvas = np.zeros((rows * side, cols * side, 3), dtype=np.uint8)
    top, left = (rows * side - ch) // 2, (cols * side - cw) // 2
    content = np.asarray(image.resize((cw, ch), Image.Resampling.BILINEAR))
    canvas[top : top + ch, left : left + cw] = content
    for k in range(rows * cols):
        r, c = divmod(k, cols)  # row-major
        tile = Image.fromarray(canvas[r * side : (r + 1) * side, c * side : (c + 1) * side])
        ref = processor(
            images=[tile],
            patch_size=p,
            do_resize=False,
            max_num_patches=per_seq,
            return_tensors="np",
        )
        got = out[k * per_seq : (k + 1) * per_seq]
        assert np.array_equal(got, ref["pixel_values"][0]), f"tile {k} ({r},{c}) of {plan.tiles}"

    # The thumbnail comes last and is exactly the square strategy at the same budget.
    square = plan_image(SizeRequest(h, w, budget, strategy=Strategy.SQUARE), p)
    assert np.array_equal(out[rows * cols * per_seq :], patchify(image, square, p))


def test_anyres_padding_is_outside_the_content() -> None:
    """A white 1:3 image in one 112x112 tile: content rows white, padding black, centred."""
    image = Image.new("RGB", (300, 100), (255, 255, 255))  # w=300, h=100
    plan = plan_image(SizeRequest(100, 300, 64, strategy=Strategy.ANYRES, max_tiles=1), 14)
    # 112 * 100/300 = 37.33 -> 38 rows of content; top = (112 - 38) // 2 = 37.
    assert plan.tiles == (1, 1) and plan.content_size == (38, 112)
    tile = patchify(image, plan, 14)[:64].reshape(8, 8, 14, 14, 3)
    pixels = tile.transpose(0, 2, 1, 3, 4).reshape(112, 112, 3)
    assert np.all(pixels[37:75] == 1.0)
    assert np.all(pixels[:37] == -1.0) and np.all(pixels[75:] == -1.0)
