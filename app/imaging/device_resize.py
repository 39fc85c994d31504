"""Resize + normalize + cut on the accelerator: for GPU nodes, where one CPU core decodes far
fewer images per second than the GPU encodes.

The CPU path (`patchify.py`) is bit-identical to transformers' PIL processor. This one uses
`F.interpolate(bilinear, antialias=True)`, torch's port of PIL's antialiased bilinear filter,
and rounds to uint8 levels as PIL does. It differs from the CPU path by at most one uint8
level, on 6-19% of values depending on the scale (tests/imaging/test_device_resize.py):
far below the bf16 rounding a GPU forward pass adds anyway. RESIZE_DEVICE decides when it
is used (by default: when the model runs on CUDA).
"""

from __future__ import annotations

from functools import cache

import torch
import torch.nn.functional as F

from app.imaging.patchify import level_table


@cache
def _device_level_table(device: torch.device) -> torch.Tensor:
    # Uploaded once per device: a per-image upload would be a synchronous copy every time.
    return torch.from_numpy(level_table()).to(device)


def patchify_tensor(pixels: torch.Tensor, size: tuple[int, int], patch: int) -> torch.Tensor:
    """(H, W, 3) uint8 on any device -> (tokens, 3*p*p) float32 patches of the image at `size`.

    Patches are row-major, each flattened as (py, px, channel), like `patchify.patchify`.
    """
    if pixels.dtype != torch.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"need (H, W, 3) uint8 pixels, got {tuple(pixels.shape)} {pixels.dtype}")
    height, width = size
    if height % patch or width % patch:
        raise ValueError(f"size {size} is not a multiple of the patch size {patch}")
    image = pixels.permute(2, 0, 1).unsqueeze(0).float()
    if (height, width) != tuple(pixels.shape[:2]):
        image = F.interpolate(
            image, size=(height, width), mode="bilinear", align_corners=False, antialias=True
        )
    # PIL resizes uint8 to uint8: round and clamp to levels, then normalize each level with
    # the CPU path's own table, so equal levels give bit-identical floats.
    levels = image.round_().clamp_(0, 255).to(torch.long)
    normalized = _device_level_table(pixels.device)[levels]
    rows, cols = height // patch, width // patch
    blocks = normalized[0].view(3, rows, patch, cols, patch).permute(1, 3, 2, 4, 0)
    return blocks.reshape(rows * cols, patch * patch * 3)
