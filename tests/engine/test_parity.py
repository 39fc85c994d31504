"""The acceptance core: one packed forward pass == transformers' padded Siglip2VisionModel.

Checkpoints are written with `save_pretrained` (vision-only, and a full Siglip2Model with a text
tower) and loaded through `load_model`, so the loader's renaming and fusing is covered too. The
reference is transformers end to end: its PIL processor (each image at its own budget, padded
into one batch) and its model's forward with `pixel_attention_mask`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import Siglip2Config, Siglip2Model, Siglip2VisionModel

from app.engine.attention import available_backends, make_backend
from app.engine.encoder import Encoder
from app.engine.loader import LoadedModel, load_model
from tests.engine.reference import (
    hf_forward,
    our_inputs,
    perturb_,
    random_hf_vision,
    smooth_rgb,
    tiny_vision_config,
)

TOLERANCE = 1e-4
CPU = torch.device("cpu")
BACKENDS = available_backends(CPU, torch.float32)

# (height, width, budget): every aspect ratio the brief names, each budget more than once.
CASES = [
    (224, 224, 256),  # 1:1
    (180, 320, 1024),  # 16:9
    (320, 180, 64),  # 9:16
    (90, 270, 256),  # 1:3
    (100, 400, 64),  # 4:1
    (5, 7, 64),  # tiny: upscaled
    (1, 50, 256),  # 1xN
    (61, 1, 64),  # Nx1
    (333, 517, 256),  # odd
    (700, 90, 1024),  # very tall, downscaled
]


def _text_config() -> dict[str, int]:
    return {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "vocab_size": 64,
        "max_position_embeddings": 16,
        "projection_size": 64,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }


@pytest.fixture(scope="module")
def vision_checkpoint(
    tmp_path_factory: pytest.TempPathFactory, run_seed: int
) -> tuple[Path, Siglip2VisionModel]:
    model = random_hf_vision(tiny_vision_config(), run_seed)
    directory = tmp_path_factory.mktemp("siglip2-vision")
    model.save_pretrained(directory)
    return directory, model


@pytest.fixture(scope="module")
def full_checkpoint(
    tmp_path_factory: pytest.TempPathFactory, run_seed: int
) -> tuple[Path, Siglip2VisionModel]:
    config = Siglip2Config(vision_config=tiny_vision_config().to_dict(), text_config=_text_config())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(run_seed + 7)
        model = Siglip2Model(config).eval()
    perturb_(model, run_seed + 8)
    directory = tmp_path_factory.mktemp("siglip2-full")
    model.save_pretrained(directory)
    # The reference for the vision tower is the full model's own vision_model.
    return directory, model.vision_model


def _check_parity(
    loaded: LoadedModel, reference: Siglip2VisionModel, backend: str, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(CASES))
    cases = [CASES[i] for i in order]
    images = [smooth_rgb(rng, h, w) for h, w, _ in cases]
    budgets = [b for _, _, b in cases]
    p = loaded.spec.patch_size

    ref = hf_forward(reference, images, budgets, p)
    inputs = our_inputs(images, budgets, p)
    outputs = Encoder(loaded, make_backend(backend)).run(inputs)  # ONE packed pass

    assert len(outputs) == len(cases)
    for i, (x, out) in enumerate(zip(inputs, outputs, strict=True)):
        h, w, budget = cases[i]
        where = f"image {i} ({h}x{w}, budget {budget}), backend {backend}, seed {seed}"
        (grid,) = x.grids
        assert (grid.rows, grid.cols) == ref.grids[i], where
        assert x.tokens == ref.counts[i], where
        assert out.pooled.shape == (1, loaded.spec.hidden_size), where
        pooled_diff = np.abs(out.pooled[0] - ref.pooled[i]).max()
        assert pooled_diff <= TOLERANCE, f"{where}: pooled max abs diff {pooled_diff}"
        assert out.tokens is not None and out.tokens.shape == ref.tokens[i].shape, where
        token_diff = np.abs(out.tokens - ref.tokens[i]).max()
        assert token_diff <= TOLERANCE, f"{where}: per-token max abs diff {token_diff}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_vision_checkpoint_parity(
    vision_checkpoint: tuple[Path, Siglip2VisionModel], backend: str, seed: int
) -> None:
    directory, reference = vision_checkpoint
    loaded = load_model(str(directory), CPU, torch.float32)
    assert loaded.weights == "pretrained"
    _check_parity(loaded, reference, backend, seed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_checkpoint_parity(
    full_checkpoint: tuple[Path, Siglip2VisionModel], backend: str, seed: int
) -> None:
    directory, reference = full_checkpoint
    loaded = load_model(str(directory), CPU, torch.float32)
    _check_parity(loaded, reference, backend, seed)


def test_backends_listed() -> None:
    # Both CPU paths must be covered above: the default and the independent reference.
    assert {"sdpa-segments", "dense-mask"} <= set(BACKENDS)


@pytest.mark.parametrize(
    "overrides",
    [
        # patch 14 (a budget of 576 is 24x24), exact gelu, no vision_use_head change
        {"patch_size": 14, "hidden_act": "gelu"},
        # a position grid other than 16x16, and another width/head split
        {"num_patches": 64, "hidden_size": 48, "num_attention_heads": 3, "layer_norm_eps": 1e-5},
    ],
)
def test_other_architectures_parity(
    tmp_path: Path, overrides: dict[str, object], seed: int
) -> None:
    """Config fields the tiny demo does not vary must still flow through loader and forward."""
    config = tiny_vision_config(**overrides)
    reference = random_hf_vision(config, seed)
    reference.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), CPU, torch.float32)
    assert loaded.spec.patch_size == config.patch_size
    assert loaded.spec.hidden_act == config.hidden_act
    assert loaded.spec.num_patches == config.num_patches
    assert loaded.spec.layer_norm_eps == config.layer_norm_eps

    rng = np.random.default_rng(seed)
    shapes = [(50, 120, 64), (200, 100, 144), (3, 3, 16)]
    images = [smooth_rgb(rng, h, w) for h, w, _ in shapes]
    budgets = [b for _, _, b in shapes]
    ref = hf_forward(reference, images, budgets, config.patch_size)
    outputs = Encoder(loaded, make_backend("sdpa-segments")).run(
        our_inputs(images, budgets, config.patch_size)
    )
    for i, out in enumerate(outputs):
        diff = np.abs(out.pooled[0] - ref.pooled[i]).max()
        assert diff <= TOLERANCE, f"{overrides} image {i}: pooled diff {diff}, seed {seed}"
        assert out.tokens is not None
        diff = np.abs(out.tokens - ref.tokens[i]).max()
        assert diff <= TOLERANCE, f"{overrides} image {i}: token diff {diff}, seed {seed}"


def test_tokens_only_for_inputs_that_ask(
    vision_checkpoint: tuple[Path, Siglip2VisionModel], rng: np.random.Generator
) -> None:
    directory, _ = vision_checkpoint
    loaded = load_model(str(directory), CPU, torch.float32)
    images = [smooth_rgb(rng, 40, 60), smooth_rgb(rng, 60, 40)]
    inputs = our_inputs(images, [64, 64], 16, return_tokens=False)
    outputs = Encoder(loaded, make_backend("sdpa-segments")).run(inputs)
    assert all(o.tokens is None for o in outputs)
    mixed = [inputs[0], our_inputs(images[1:], [64], 16, return_tokens=True)[0]]
    outputs = Encoder(loaded, make_backend("sdpa-segments")).run(mixed)
    assert outputs[0].tokens is None
    assert outputs[1].tokens is not None and outputs[1].tokens.shape[0] == mixed[1].tokens
