"""Reference side of the engine tests: tiny transformers SigLIP 2 models and their padded forward.

Everything compared against lives here, so the parity, packing and GPU tests all measure
patchpack against the same thing: transformers' own `Siglip2VisionModel`, fed by its own
`Siglip2ImageProcessorPil`, run the padded way (one batch, `pixel_attention_mask`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from transformers import Siglip2VisionConfig, Siglip2VisionModel
from transformers.models.siglip2.image_processing_pil_siglip2 import Siglip2ImageProcessorPil

from app.engine.encoder import EncodeInput
from app.engine.siglip2 import PackedSiglip2Vision, VisionSpec, from_hf_state_dict
from app.imaging.patchify import patchify
from app.imaging.sizing import Grid, SizeRequest, plan_image

# demo:tiny's shape: a forward pass over a few thousand tokens takes milliseconds.
TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "patch_size": 16,
}


def tiny_vision_config(**overrides: object) -> Siglip2VisionConfig:
    return Siglip2VisionConfig(**{**TINY, **overrides})


def perturb_(module: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    """Add noise to every parameter in place.

    transformers initializes biases to zero and layer norms to identity; with those a swapped
    q/k bias or a dropped layer-norm weight would go unnoticed, so nothing stays at its init.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            param.add_((noise * scale).to(param.dtype))


def random_hf_vision(config: Siglip2VisionConfig, seed: int) -> Siglip2VisionModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Siglip2VisionModel(config)
    perturb_(model, seed + 1)
    return model.eval()


def spec_of(config: Siglip2VisionConfig) -> VisionSpec:
    return VisionSpec(
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_layers=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        patch_size=config.patch_size,
        num_patches=config.num_patches,
        layer_norm_eps=config.layer_norm_eps,
        hidden_act=config.hidden_act,
        use_head=config.vision_use_head,
    )


def packed_from_hf(model: Siglip2VisionModel) -> PackedSiglip2Vision:
    spec = spec_of(model.config)
    packed = PackedSiglip2Vision(spec)
    # strict: every tensor of ours must come from the checkpoint and vice versa.
    packed.load_state_dict(from_hf_state_dict(spec, model.state_dict()), strict=True)
    return packed.eval().requires_grad_(False)


def smooth_rgb(rng: np.random.Generator, height: int, width: int) -> Image.Image:
    """Random low-frequency content plus noise: closer to a photo than pure noise."""
    coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    base = np.asarray(
        Image.fromarray(coarse, "RGB").resize((width, height), Image.Resampling.BILINEAR),
        dtype=np.int16,
    )
    noise = rng.integers(-20, 21, (height, width, 3), dtype=np.int16)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


# -- our side --------------------------------------------------------------------------------
def our_inputs(
    images: Sequence[Image.Image], budgets: Sequence[int], patch: int, return_tokens: bool = True
) -> list[EncodeInput]:
    """patchpack's own preprocessing (sizing + patchify), naflex strategy."""
    inputs = []
    for image, budget in zip(images, budgets, strict=True):
        plan = plan_image(SizeRequest(image.height, image.width, budget), patch)
        inputs.append(EncodeInput(patchify(image, plan, patch), plan.grids, return_tokens))
    return inputs


def random_patches(rng: np.random.Generator, grids: Sequence[Grid], patch: int) -> np.ndarray:
    total = sum(g.tokens for g in grids)
    return rng.uniform(-1, 1, (total, 3 * patch * patch)).astype(np.float32)


# -- transformers' side ----------------------------------------------------------------------
@dataclass(frozen=True)
class HFResult:
    pooled: np.ndarray  # (B, D)
    tokens: list[np.ndarray]  # per image (n_i, D), post layer norm
    grids: list[tuple[int, int]]
    counts: list[int]


def hf_processor_batch(
    images: Sequence[Image.Image], budgets: Sequence[int], patch: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One padded batch built by transformers' PIL processor, one image at a time.

    The processor pads every image of one call to that call's `max_num_patches`; to give each
    image its own budget it runs per image, and the results are padded (zeros, mask 0) to the
    largest budget here, exactly as the processor itself pads.
    """
    processor = Siglip2ImageProcessorPil(patch_size=patch)
    length = max(budgets)
    pixel_values = np.zeros((len(images), length, 3 * patch * patch), dtype=np.float32)
    mask = np.zeros((len(images), length), dtype=np.int32)
    shapes = np.zeros((len(images), 2), dtype=np.int64)
    for i, (image, budget) in enumerate(zip(images, budgets, strict=True)):
        out = processor(images=[image], max_num_patches=budget, return_tensors="np")
        n = int(out["pixel_attention_mask"][0].sum())
        rows, cols = (int(v) for v in out["spatial_shapes"][0])
        assert n == rows * cols <= budget
        pixel_values[i, :n] = out["pixel_values"][0][:n]
        mask[i, :n] = 1
        shapes[i] = (rows, cols)
    return pixel_values, mask, shapes


def hf_forward(
    model: Siglip2VisionModel,
    images: Sequence[Image.Image],
    budgets: Sequence[int],
    patch: int,
    device: torch.device | str = "cpu",
) -> HFResult:
    pixel_values, mask, shapes = hf_processor_batch(images, budgets, patch)
    with torch.no_grad():
        out = model(
            pixel_values=torch.from_numpy(pixel_values).to(device),
            pixel_attention_mask=torch.from_numpy(mask).to(device),
            spatial_shapes=torch.from_numpy(shapes).to(device),
        )
    counts = [int(m.sum()) for m in mask]
    hidden = out.last_hidden_state.float().cpu().numpy()
    return HFResult(
        pooled=out.pooler_output.float().cpu().numpy(),
        tokens=[hidden[i, :n] for i, n in enumerate(counts)],
        grids=[(int(r), int(c)) for r, c in shapes],
        counts=counts,
    )
