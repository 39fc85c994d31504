"""Resize + rescale + normalize + cut into patches: an RGB image -> (tokens, 3*p*p) float32.

Bit-identical to `Siglip2ImageProcessor` (PIL backend): PIL bilinear resize of the uint8 image,
then `float32(float64(v) / 255)`, then `(x - 0.5) / 0.5` in float32. Because the result
depends only on the uint8 value, the two float steps are one 256-entry lookup table applied
after the patches are cut, which is both exact and several times faster than the float math.
"""

from __future__ import annotations

from functools import cache

import numpy as np
from PIL import Image

from app.imaging.sizing import ImagePlan, Strategy


@cache
def level_table() -> np.ndarray:
    """float32 value of each uint8 level after rescale and normalize (256 entries)."""
    levels = np.arange(256, dtype=np.uint8)
    rescaled = (levels.astype(np.float64) * (1 / 255)).astype(np.float32)
    half = np.float32(0.5)
    return (rescaled - half) / half


def _resize(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    height, width = size
    resized = image.resize((width, height), resample=Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.uint8)


def _cut(pixels: np.ndarray, patch: int) -> np.ndarray:
    """(H, W, C) uint8 -> (H/p * W/p, p*p*C) uint8, patches row-major, each (py, px, c)."""
    height, width, channels = pixels.shape
    rows, cols = height // patch, width // patch
    blocks = pixels.reshape(rows, patch, cols, patch, channels).transpose(0, 2, 1, 3, 4)
    return blocks.reshape(rows * cols, patch * patch * channels)


def _tiles(canvas: np.ndarray, tiles: tuple[int, int], patch: int) -> list[np.ndarray]:
    rows, cols = tiles
    side = canvas.shape[0] // rows
    return [
        _cut(canvas[r * side : (r + 1) * side, c * side : (c + 1) * side], patch)
        for r in range(rows)
        for c in range(cols)
    ]


def patchify(image: Image.Image, plan: ImagePlan, patch: int) -> np.ndarray:
    """All sequences of `plan`, concatenated in plan order, as normalized float32 patches."""
    if image.mode != "RGB":
        raise ValueError(f"patchify needs an RGB image, got mode {image.mode}")
    if plan.strategy is not Strategy.ANYRES:
        sequences = [_cut(_resize(image, plan.size), patch)]
    else:
        assert plan.tiles is not None and plan.content_size is not None
        canvas = np.zeros((*plan.size, 3), dtype=np.uint8)
        content = _resize(image, plan.content_size)
        top = (plan.size[0] - content.shape[0]) // 2
        left = (plan.size[1] - content.shape[1]) // 2
        canvas[top : top + content.shape[0], left : left + content.shape[1]] = content
        thumb = plan.grids[-1]
        thumbnail = _resize(image, (thumb.rows * patch, thumb.cols * patch))
        sequences = [*_tiles(canvas, plan.tiles, patch), _cut(thumbnail, patch)]
    packed = sequences[0] if len(sequences) == 1 else np.concatenate(sequences)
    return level_table()[packed]
