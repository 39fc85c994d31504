"""Per-image results -> the JSON body of API.md (normalization, float or base64 encoding)."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

import numpy as np

from app.imaging.sizing import Strategy
from app.service import EncodedImage


def _l2_normalize(rows: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(rows, axis=-1, keepdims=True)
    return rows / np.maximum(norms, np.finfo(np.float32).tiny)


def _encode(array: np.ndarray, fmt: str) -> Any:
    array = np.asarray(array, dtype="<f4")
    if fmt == "base64":
        return base64.b64encode(array.tobytes()).decode("ascii")
    return array.tolist()


def render_image(image: EncodedImage, normalize: bool, fmt: str) -> dict[str, Any]:
    pooled = _l2_normalize(image.pooled) if normalize else image.pooled
    plan = image.plan
    first = plan.grids[0]
    item: dict[str, Any] = {
        "index": image.index,
        # anyres: the thumbnail (last sequence) stands for the whole image.
        "embedding": _encode(pooled[-1], fmt),
        "tokens": plan.tokens,
        "grid": [first.rows, first.cols],
        "size": list(plan.size),
        "original_size": list(plan.original_size),
    }
    if plan.strategy is Strategy.ANYRES:
        item["tiles"] = list(plan.tiles or ())
        item["tile_embeddings"] = [_encode(row, fmt) for row in pooled]
    if image.tokens is not None:
        item["patch_embeddings"] = _encode(image.tokens, fmt)
    return item


def render_response(
    model: str,
    images: Sequence[EncodedImage],
    normalize: bool,
    fmt: str,
    total_s: float,
) -> dict[str, Any]:
    def ms(seconds: float) -> float:
        return round(seconds * 1000, 3)

    return {
        "model": model,
        "data": [render_image(i, normalize, fmt) for i in images],
        "usage": {"images": len(images), "tokens": sum(i.plan.tokens for i in images)},
        # Images of one request run side by side, so each stage reports its slowest image.
        "timings_ms": {
            "queue": ms(max(i.queue_s for i in images)),
            "preprocess": ms(max(i.preprocess_s for i in images)),
            "compute": ms(max(i.compute_s for i in images)),
            "total": ms(total_s),
        },
    }
