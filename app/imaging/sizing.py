"""Where each image goes: (H, W, budget, caps, strategy) -> resized size, patch grids, tokens.

Pure arithmetic: no torch, no PIL, no I/O, so every rule is tested with plain numbers.
`naflex` reproduces Hugging Face's `get_image_size_for_max_num_patches` exactly (same binary
search, same float ops) because SigLIP 2 NaFlex was trained on exactly those sizes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum


class Strategy(StrEnum):
    NAFLEX = "naflex"
    SQUARE = "square"
    ANYRES = "anyres"


DEFAULT_MAX_TILES = 4
MAX_TILES_LIMIT = 16


class SizingError(ValueError):
    """Arguments no sizing rule accepts (bad budget, min_pixels > max_pixels, ...)."""


@dataclass(frozen=True, slots=True)
class Grid:
    """A patch grid: one packed sequence of `rows * cols` tokens."""

    rows: int
    cols: int

    @property
    def tokens(self) -> int:
        return self.rows * self.cols


@dataclass(frozen=True, slots=True)
class SizeRequest:
    """Everything sizing needs to know about one image and what was asked for it."""

    height: int
    width: int
    token_budget: int
    min_pixels: int | None = None
    max_pixels: int | None = None
    strategy: Strategy = Strategy.NAFLEX
    max_tiles: int = DEFAULT_MAX_TILES


@dataclass(frozen=True, slots=True)
class ImagePlan:
    """The sizing decision for one image.

    `size` is the resized image (for `anyres`, the padded canvas of tiles); `grids` holds one
    entry per packed sequence: one for `naflex`/`square`, tiles row-major then the thumbnail
    for `anyres`.
    """

    strategy: Strategy
    original_size: tuple[int, int]
    size: tuple[int, int]
    grids: tuple[Grid, ...]
    tiles: tuple[int, int] | None = None
    # anyres only: the image's size inside the canvas, before centring and padding.
    content_size: tuple[int, int] | None = None

    @property
    def tokens(self) -> int:
        return sum(g.tokens for g in self.grids)


def _scaled_side(scale: float, side: int, patch: int) -> int:
    return max(patch, math.ceil(side * scale / patch) * patch)


def naflex_size(height: int, width: int, patch: int, max_patches: int) -> tuple[int, int]:
    """HF `get_image_size_for_max_num_patches`: the largest scale whose grid fits the budget."""
    eps = 1e-5
    lo, hi = eps / 10, 100.0
    while hi - lo >= eps:
        scale = (lo + hi) / 2
        h = _scaled_side(scale, height, patch)
        w = _scaled_side(scale, width, patch)
        if (h / patch) * (w / patch) <= max_patches:
            lo = scale
        else:
            hi = scale
    return _scaled_side(lo, height, patch), _scaled_side(lo, width, patch)


def native_size(
    height: int,
    width: int,
    patch: int,
    max_patches: int,
    min_pixels: int | None,
    max_pixels: int | None,
) -> tuple[int, int]:
    """Qwen2-VL style native resolution bounded by pixel caps; the token budget still rules."""
    h = max(patch, round(height / patch) * patch)
    w = max(patch, round(width / patch) * patch)
    if max_pixels is not None and h * w > max_pixels:
        b = math.sqrt(height * width / max_pixels)
        h = max(patch, math.floor(height / b / patch) * patch)
        w = max(patch, math.floor(width / b / patch) * patch)
    elif min_pixels is not None and h * w < min_pixels:
        b = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * b / patch) * patch
        w = math.ceil(width * b / patch) * patch
    if (h // patch) * (w // patch) > max_patches:
        return naflex_size(height, width, patch, max_patches)
    return h, w


def square_side(patch: int, token_budget: int) -> int:
    return patch * math.isqrt(token_budget)


def anyres_tiles(height: int, width: int, side: int, max_tiles: int) -> tuple[int, int]:
    """LLaVA-NeXT's choice of tile grid: most of the image kept, then least canvas wasted."""
    best: tuple[int, int] | None = None
    best_effective, best_waste = -1.0, math.inf
    for rows in range(1, max_tiles + 1):
        for cols in range(1, max_tiles // rows + 1):
            canvas_h, canvas_w = rows * side, cols * side
            scale = min(canvas_h / height, canvas_w / width)
            effective = min(height * scale * width * scale, float(height * width))
            waste = canvas_h * canvas_w - effective
            if effective > best_effective or (effective == best_effective and waste < best_waste):
                best, best_effective, best_waste = (rows, cols), effective, waste
    assert best is not None  # max_tiles >= 1 always yields (1, 1)
    return best


def fit_in_canvas(height: int, width: int, canvas_h: int, canvas_w: int) -> tuple[int, int]:
    """Size of the image scaled to fit the canvas with its aspect ratio kept (LLaVA-NeXT).

    Integer arithmetic: float division turns an exact 1:2 image into 337x672 on a 336 canvas.
    """
    if canvas_w * height < canvas_h * width:  # width binds
        return min(-(-height * canvas_w // width), canvas_h), canvas_w
    return canvas_h, min(-(-width * canvas_h // height), canvas_w)


def plan_image(req: SizeRequest, patch: int) -> ImagePlan:
    """Apply the strategy's sizing rule. Raises SizingError for arguments no rule accepts."""
    if req.height < 1 or req.width < 1:
        raise SizingError(f"image has no pixels ({req.height}x{req.width})")
    if req.token_budget < 1:
        raise SizingError(f"token_budget must be >= 1, got {req.token_budget}")
    if (
        req.min_pixels is not None
        and req.max_pixels is not None
        and req.min_pixels > req.max_pixels
    ):
        raise SizingError(f"min_pixels ({req.min_pixels}) exceeds max_pixels ({req.max_pixels})")
    original = (req.height, req.width)

    if req.strategy is Strategy.NAFLEX:
        if req.min_pixels is None and req.max_pixels is None:
            h, w = naflex_size(req.height, req.width, patch, req.token_budget)
        else:
            h, w = native_size(
                req.height, req.width, patch, req.token_budget, req.min_pixels, req.max_pixels
            )
        return ImagePlan(req.strategy, original, (h, w), (Grid(h // patch, w // patch),))

    side = square_side(patch, req.token_budget)
    square = Grid(side // patch, side // patch)
    if req.strategy is Strategy.SQUARE:
        return ImagePlan(req.strategy, original, (side, side), (square,))

    if not 1 <= req.max_tiles <= MAX_TILES_LIMIT:
        raise SizingError(f"max_tiles must be in 1..{MAX_TILES_LIMIT}, got {req.max_tiles}")
    rows, cols = anyres_tiles(req.height, req.width, side, req.max_tiles)
    canvas = (rows * side, cols * side)
    content = fit_in_canvas(req.height, req.width, *canvas)
    grids = (square,) * (rows * cols) + (square,)
    return ImagePlan(
        req.strategy, original, canvas, grids, tiles=(rows, cols), content_size=content
    )
