"""The device-side resize + patchify against the bit-exact CPU path.

Run on the CPU here (torch's antialiased bilinear exists on both); tests/gpu repeats the
comparison on CUDA. The two paths are not bit-identical by design: torch's filter is a port
of PIL's computed in float32 rather than PIL's fixed point, so some values land one uint8
level apart after rounding.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from app.engine.encoder import EncodeInput
from app.imaging.device_resize import patchify_tensor
from app.imaging.patchify import patchify
from app.imaging.sizing import Grid, SizeRequest, Strategy, plan_image

LEVEL = 1 / 127.5  # one uint8 level after (x / 255 - 0.5) / 0.5


@pytest.mark.parametrize(
    ("height", "width", "budget", "strategy"),
    [
        (480, 640, 256, Strategy.NAFLEX),  # downscale
        (100, 300, 1024, Strategy.NAFLEX),  # upscale
        (1080, 1920, 64, Strategy.NAFLEX),  # strong downscale, aliasing-prone
        (37, 1000, 256, Strategy.NAFLEX),  # extreme aspect
        (224, 224, 196, Strategy.NAFLEX),  # already the target size: no resize at all
        (333, 500, 256, Strategy.SQUARE),  # aspect not kept
    ],
)
def test_device_path_matches_the_cpu_path_within_a_level(
    height: int, width: int, budget: int, strategy: Strategy, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    # Smooth content plus noise: like a photo, and it exercises the filter's edges.
    base = np.linspace(0, 255, width)[None, :, None] * np.linspace(0.3, 1, height)[:, None, None]
    noise = rng.normal(0, 20, (height, width, 3))
    pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
    plan = plan_image(SizeRequest(height, width, budget, strategy=strategy), 16)

    expected = patchify(Image.fromarray(pixels), plan, 16)
    got = patchify_tensor(torch.from_numpy(pixels), plan.size, 16).numpy()

    assert got.shape == expected.shape == (plan.tokens, 3 * 16 * 16)
    diff = np.abs(got - expected)
    # Measured: never more than one level apart, on 6-19% of values depending on the scale.
    assert diff.max() <= LEVEL + 1e-6, f"seed {seed}: {diff.max() / LEVEL:.2f} levels"
    assert (diff > LEVEL / 2).mean() < 0.25, f"seed {seed}"
    # Equal levels give bit-identical floats (same normalization table as the CPU path).
    same = diff < LEVEL / 2
    assert np.array_equal(got[same], expected[same])


def test_identity_size_is_exact(seed: int) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, (64, 48, 3), dtype=np.uint8)
    plan = plan_image(SizeRequest(64, 48, 12), 16)
    assert plan.size == (64, 48)
    got = patchify_tensor(torch.from_numpy(pixels), plan.size, 16).numpy()
    np.testing.assert_array_equal(got, patchify(Image.fromarray(pixels), plan, 16))


@pytest.mark.parametrize(
    ("pixels", "size", "match"),
    [
        (torch.zeros(8, 8, 3, dtype=torch.float32), (16, 16), "uint8"),
        (torch.zeros(8, 8, dtype=torch.uint8), (16, 16), "uint8"),
        (torch.zeros(8, 8, 3, dtype=torch.uint8), (16, 20), "multiple"),
    ],
)
def test_bad_arguments_are_refused(pixels: torch.Tensor, size: tuple[int, int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        patchify_tensor(pixels, size, 16)


def test_encode_input_takes_exactly_one_form() -> None:
    grid = (Grid(1, 1),)
    with pytest.raises(ValueError, match="exactly one"):
        EncodeInput(None, grid)
    with pytest.raises(ValueError, match="exactly one"):
        EncodeInput(np.zeros((1, 768), np.float32), grid, pixels=np.zeros((16, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="single-sequence"):
        EncodeInput(None, (Grid(1, 1), Grid(1, 1)), pixels=np.zeros((16, 16, 3), np.uint8))


def test_encoder_mixes_pixel_and_patch_inputs_in_one_pack(tiny_packed: Any, seed: int) -> None:
    """A pack may hold CPU-preprocessed and device-resized images side by side; each image's
    output must equal its own pass, whichever form it came in."""
    from app.engine.attention import make_backend
    from app.engine.encoder import Encoder
    from app.engine.loader import LoadedModel

    module = tiny_packed
    loaded = LoadedModel("tiny", "random", module.spec, module, torch.device("cpu"), torch.float32)
    encoder = Encoder(loaded, make_backend("sdpa-segments"))
    rng = np.random.default_rng(seed)
    p = module.spec.patch_size
    arrays = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(90, 120), (40, 300)]]
    plans = [plan_image(SizeRequest(a.shape[0], a.shape[1], 64), p) for a in arrays]
    as_pixels = EncodeInput(None, plans[0].grids, pixels=arrays[0])
    as_patches = EncodeInput(patchify(Image.fromarray(arrays[1]), plans[1], p), plans[1].grids)
    packed = encoder.run([as_pixels, as_patches])
    for single, out in zip([as_pixels, as_patches], packed, strict=True):
        alone = encoder.run([single])[0]
        np.testing.assert_allclose(out.pooled, alone.pooled, atol=1e-5)
    # And a staged pack gives the same as an unstaged one.
    staged = encoder.run([as_pixels, as_patches], encoder.stage([as_pixels, as_patches]))
    for a, b in zip(staged, packed, strict=True):
        np.testing.assert_allclose(a.pooled, b.pooled, atol=1e-6)
