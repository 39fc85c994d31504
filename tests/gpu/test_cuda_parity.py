"""bf16 on CUDA: every backend against transformers' fp32 reference, and against each other.

Skipped without CUDA (tests/conftest.py). The reference is the same as tests/engine/test_parity:
transformers' processor and padded Siglip2VisionModel forward, here in fp32 on the CPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import Siglip2VisionModel

from app.engine.attention import SdpaSegments, available_backends, make_backend
from app.engine.encoder import EncodeInput, Encoder
from app.engine.loader import LoadedModel, load_model
from tests.engine.reference import (
    hf_forward,
    our_inputs,
    random_hf_vision,
    smooth_rgb,
    tiny_vision_config,
)

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")
BF16 = torch.bfloat16
# Listing backends needs no GPU (it checks which packages exist), so collection works anywhere.
BACKENDS = available_backends(CUDA, BF16)
VARLEN = [name for name in BACKENDS if name != SdpaSegments.name and name != "dense-mask"]

REL_TOLERANCE_VS_FP32 = 2e-2
REL_TOLERANCE_BETWEEN_BACKENDS = 2e-2

CASES = [
    (224, 224, 256),
    (180, 320, 1024),
    (320, 180, 64),
    (90, 270, 256),
    (100, 400, 64),
    (5, 7, 64),
    (1, 50, 256),
    (333, 517, 256),
    (700, 90, 1024),
    (224, 224, 256),  # a duplicate grid, so equal lengths are grouped
]


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def checkpoint(
    tmp_path_factory: pytest.TempPathFactory, run_seed: int
) -> tuple[Path, Siglip2VisionModel]:
    model = random_hf_vision(tiny_vision_config(), run_seed)
    directory = tmp_path_factory.mktemp("siglip2-gpu")
    model.save_pretrained(directory)
    return directory, model


@pytest.fixture(scope="module")
def loaded_bf16(checkpoint: tuple[Path, Siglip2VisionModel]) -> LoadedModel:
    directory, _ = checkpoint
    loaded = load_model(str(directory), CUDA, BF16)
    assert loaded.device.type == "cuda" and loaded.dtype == BF16
    return loaded


def _images(seed: int) -> tuple[list, list[int]]:
    rng = np.random.default_rng(seed)
    images = [smooth_rgb(rng, h, w) for h, w, _ in CASES]
    return images, [b for _, _, b in CASES]


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_cuda_vs_fp32_transformers(
    checkpoint: tuple[Path, Siglip2VisionModel],
    loaded_bf16: LoadedModel,
    backend: str,
    seed: int,
) -> None:
    _, reference = checkpoint
    images, budgets = _images(seed)
    p = loaded_bf16.spec.patch_size
    ref = hf_forward(reference, images, budgets, p)
    inputs = our_inputs(images, budgets, p)
    outputs = Encoder(loaded_bf16, make_backend(backend)).run(inputs)
    for i, out in enumerate(outputs):
        where = f"image {i} {CASES[i]}, backend {backend}, seed {seed}"
        assert (inputs[i].grids[0].rows, inputs[i].grids[0].cols) == ref.grids[i], where
        assert out.pooled.dtype == np.float32, where
        rel = _relative(out.pooled[0], ref.pooled[i])
        assert rel <= REL_TOLERANCE_VS_FP32, f"{where}: pooled relative error {rel}"
        assert out.tokens is not None
        rel = _relative(out.tokens, ref.tokens[i])
        assert rel <= REL_TOLERANCE_VS_FP32, f"{where}: token relative error {rel}"


@pytest.mark.parametrize("backend", VARLEN)
def test_varlen_backends_vs_sdpa_segments_bf16(
    loaded_bf16: LoadedModel, backend: str, seed: int
) -> None:
    images, budgets = _images(seed)
    inputs = our_inputs(images, budgets, loaded_bf16.spec.patch_size)
    base = Encoder(loaded_bf16, make_backend(SdpaSegments.name)).run(inputs)
    other = Encoder(loaded_bf16, make_backend(backend)).run(inputs)
    for i, (a, b) in enumerate(zip(other, base, strict=True)):
        where = f"image {i} {CASES[i]}, {backend} vs sdpa-segments, seed {seed}"
        rel = _relative(a.pooled[0], b.pooled[0])
        assert rel <= REL_TOLERANCE_BETWEEN_BACKENDS, f"{where}: pooled relative error {rel}"
        assert a.tokens is not None and b.tokens is not None
        rel = _relative(a.tokens, b.tokens)
        assert rel <= REL_TOLERANCE_BETWEEN_BACKENDS, f"{where}: token relative error {rel}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_packing_invariance_on_cuda(loaded_bf16: LoadedModel, backend: str, seed: int) -> None:
    """Alone or packed, an image's embedding is the same (no leakage in the varlen kernels)."""
    images, budgets = _images(seed)
    inputs = our_inputs(images, budgets, loaded_bf16.spec.patch_size)
    encoder = Encoder(loaded_bf16, make_backend(backend))
    packed = encoder.run(inputs)
    for i, x in enumerate(inputs):
        (alone,) = encoder.run([x])
        rel = _relative(packed[i].pooled[0], alone.pooled[0])
        assert rel <= 1e-2, f"image {i} {CASES[i]}, {backend}, seed {seed}: {rel}"


def test_staged_pinned_batch_equals_unstaged(loaded_bf16: LoadedModel, seed: int) -> None:
    images, budgets = _images(seed)
    inputs: list[EncodeInput] = our_inputs(images, budgets, loaded_bf16.spec.patch_size)
    encoder = Encoder(loaded_bf16, make_backend(BACKENDS[0]))
    staged = encoder.stage(inputs)
    assert staged.patches.device.type == "cuda"
    a = encoder.run(inputs, staged)
    b = encoder.run(inputs)
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        assert np.array_equal(x.pooled, y.pooled), f"image {i}"


def test_cuda_position_cache_matches_cpu(loaded_bf16: LoadedModel) -> None:
    """On CUDA the antialiased resize runs in bf16 directly; it must stay close to fp32."""
    module = loaded_bf16.module
    cpu = module.position_embedding.detach().float().cpu()
    side = round(cpu.shape[0] ** 0.5)
    grid = cpu.view(side, side, -1).permute(2, 0, 1).unsqueeze(0)
    for rows, cols in [(14, 18), (32, 32), (1, 64)]:
        expected = torch.nn.functional.interpolate(
            grid, size=(rows, cols), mode="bilinear", align_corners=False, antialias=True
        )
        expected = expected.reshape(cpu.shape[1], rows * cols).t()
        got = module.resized_positions(rows, cols).float().cpu()
        rel = float((got - expected).norm() / expected.norm())
        assert rel <= 1e-2, f"{rows}x{cols}: {rel}"
