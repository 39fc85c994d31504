"""Device-side resize on CUDA: same levels as on the CPU, and the same embeddings as the
CPU-preprocessed path within bf16 tolerance. Skipped without CUDA (tests/conftest.py)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from app.engine.attention import available_backends, make_backend
from app.engine.encoder import EncodeInput, Encoder
from app.engine.loader import LoadedModel
from app.imaging.device_resize import patchify_tensor
from app.imaging.sizing import SizeRequest, plan_image

pytestmark = pytest.mark.gpu

LEVEL = 1 / 127.5


@pytest.mark.parametrize(("height", "width", "budget"), [(480, 640, 256), (100, 300, 1024)])
def test_cuda_resize_matches_cpu_resize(height: int, width: int, budget: int, seed: int) -> None:
    pixels = torch.from_numpy(
        np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    )
    plan = plan_image(SizeRequest(height, width, budget), 16)
    on_cpu = patchify_tensor(pixels, plan.size, 16)
    on_gpu = patchify_tensor(pixels.cuda(), plan.size, 16).cpu()
    assert (on_gpu - on_cpu).abs().max().item() <= LEVEL + 1e-6, f"seed {seed}"


def test_cuda_encoder_pixels_and_patches_agree(tiny_packed: Any, seed: int) -> None:
    from PIL import Image

    from app.imaging.patchify import patchify

    module = tiny_packed.to(device="cuda", dtype=torch.bfloat16)
    loaded = LoadedModel(
        "tiny", "random", module.spec, module, torch.device("cuda"), torch.bfloat16
    )
    backend = available_backends(loaded.device, loaded.dtype)[0]
    encoder = Encoder(loaded, make_backend(backend))
    rng = np.random.default_rng(seed)
    arrays = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(90, 120), (40, 300)]]
    plans = [plan_image(SizeRequest(a.shape[0], a.shape[1], 64), 16) for a in arrays]
    pixels = [EncodeInput(None, p.grids, pixels=a) for a, p in zip(arrays, plans, strict=True)]
    patches = [
        EncodeInput(patchify(Image.fromarray(a), p, 16), p.grids)
        for a, p in zip(arrays, plans, strict=True)
    ]
    for a, b in zip(encoder.run(pixels), encoder.run(patches), strict=True):
        rel = np.linalg.norm(a.pooled - b.pooled) / np.linalg.norm(b.pooled)
        assert rel <= 2e-2, f"seed {seed}: relative difference {rel:.3g}"
    tiny_packed.to(device="cpu", dtype=torch.float32)
    tiny_packed.clear_position_cache()
