"""MODEL -> a ready `PackedSiglip2Vision`: a hub id, a local checkpoint, or a demo architecture.

Checkpoints are read directly (config.json + safetensors), taking only the vision tower's
tensors, so a full `Siglip2Model` (text tower included) costs no more memory than a
vision-only one. Demo architectures get seeded random weights initialized by transformers'
own `Siglip2VisionModel`, so they are statistically like a real model and reproducible.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from app.engine.siglip2 import PackedSiglip2Vision, VisionSpec, from_hf_state_dict
from app.errors import ModelLoadError

log = logging.getLogger(__name__)

DEMO_PREFIX = "demo:"
DEMO_SEED = 0
DEMO_SPECS: dict[str, VisionSpec] = {
    # Small enough that a test's forward pass takes milliseconds.
    "tiny": VisionSpec(
        hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, patch_size=16
    ),
    # The shapes of google/siglip2-base-patch16-naflex and google/siglip2-so400m-patch16-naflex.
    "base": VisionSpec(
        hidden_size=768, intermediate_size=3072, num_layers=12, num_heads=12, patch_size=16
    ),
    "so400m": VisionSpec(
        hidden_size=1152, intermediate_size=4304, num_layers=27, num_heads=16, patch_size=16
    ),
}
FULL_MODEL_TYPE = "siglip2"
VISION_MODEL_TYPE = "siglip2_vision_model"
VISION_PREFIX = "vision_model."


@dataclass(frozen=True, slots=True)
class LoadedModel:
    model_id: str
    weights: Literal["random", "pretrained"]
    spec: VisionSpec
    module: PackedSiglip2Vision
    device: torch.device
    dtype: torch.dtype


def resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(f"DEVICE={setting} but CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ModelLoadError(
                f"DEVICE={setting} but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    return device


def resolve_dtype(setting: str, device: torch.device) -> torch.dtype:
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[setting]


def spec_from_config(config: dict[str, Any], source: str) -> VisionSpec:
    """The vision spec of a `siglip2` or `siglip2_vision_model` config; anything else refused."""
    model_type = config.get("model_type")
    if model_type == FULL_MODEL_TYPE:
        config = config.get("vision_config") or {}
    elif model_type != VISION_MODEL_TYPE:
        raise ModelLoadError(
            f"{source} is a {model_type or 'unknown'!s} checkpoint; patchpack serves SigLIP 2 "
            f"checkpoints only (model_type {FULL_MODEL_TYPE!r} or {VISION_MODEL_TYPE!r})"
        )
    patch = config.get("patch_size", 16)
    if isinstance(patch, list | tuple):
        patch = patch[0]
    try:
        return VisionSpec(
            hidden_size=int(config.get("hidden_size", 768)),
            intermediate_size=int(config.get("intermediate_size", 3072)),
            num_layers=int(config.get("num_hidden_layers", 12)),
            num_heads=int(config.get("num_attention_heads", 12)),
            patch_size=int(patch),
            num_patches=int(config.get("num_patches", 256)),
            layer_norm_eps=float(config.get("layer_norm_eps", 1e-6)),
            hidden_act=str(config.get("hidden_act", "gelu_pytorch_tanh")),
            use_head=bool(config.get("vision_use_head", True)),
        )
    except ValueError as exc:
        raise ModelLoadError(f"{source}: unsupported vision config: {exc}") from exc


def _weight_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / s for s in shards]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).is_file():
            return [directory / name]
    raise ModelLoadError(f"{directory} holds no model.safetensors or pytorch_model.bin")


def _vision_tensors(files: list[Path], prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    for file in files:
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
                    if key.startswith(prefix):
                        yield key[len(prefix) :], f.get_tensor(key)
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
            for key, value in state.items():
                if key.startswith(prefix):
                    yield key[len(prefix) :], value


def load_directory(directory: Path, source: str) -> tuple[VisionSpec, dict[str, torch.Tensor]]:
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{source}: no config.json in {directory}")
    config = json.loads(config_file.read_text())
    spec = spec_from_config(config, source)
    prefix = VISION_PREFIX if config.get("model_type") == FULL_MODEL_TYPE else ""
    state = dict(_vision_tensors(_weight_files(directory), prefix))
    try:
        return spec, from_hf_state_dict(spec, state)
    except KeyError as exc:
        raise ModelLoadError(f"{source}: checkpoint lacks vision tensor {exc}") from exc


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(
            repo_id,
            allow_patterns=["config.json", "*.safetensors", "model.safetensors.index.json"],
        )
    except Exception as exc:
        raise ModelLoadError(
            f"could not fetch {repo_id!r} from the Hugging Face hub ({type(exc).__name__}: "
            f"{exc}); for offline nodes point MODEL at a local checkpoint directory"
        ) from exc
    return Path(path)


def demo_reference(spec: VisionSpec, seed: int = DEMO_SEED) -> Any:
    """transformers' `Siglip2VisionModel` of `spec`, initialized its own way under `seed`.

    The source of the demo weights, and the reference benchmarks compare against.
    """
    from transformers import Siglip2VisionConfig, Siglip2VisionModel

    config = Siglip2VisionConfig(
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        patch_size=spec.patch_size,
        num_patches=spec.num_patches,
        layer_norm_eps=spec.layer_norm_eps,
        hidden_act=spec.hidden_act,
        vision_use_head=spec.use_head,
    )
    # A forked RNG: building demo weights must not move the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Siglip2VisionModel(config)


def demo_state(spec: VisionSpec, seed: int = DEMO_SEED) -> dict[str, torch.Tensor]:
    """Seeded random weights, initialized the way transformers initializes Siglip2."""
    return from_hf_state_dict(spec, demo_reference(spec, seed).state_dict())


def load_model(name: str, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    weights: Literal["random", "pretrained"]
    if name.startswith(DEMO_PREFIX):
        arch = name[len(DEMO_PREFIX) :]
        if arch not in DEMO_SPECS:
            raise ModelLoadError(
                f"unknown demo model {name!r}; choose from demo:{', demo:'.join(DEMO_SPECS)}"
            )
        spec, state, weights = DEMO_SPECS[arch], demo_state(DEMO_SPECS[arch]), "random"
    else:
        path = Path(name).expanduser()
        if not path.is_dir() and name.startswith(("/", ".", "~")):
            raise ModelLoadError(f"MODEL={name!r}: no such checkpoint directory")
        directory = path if path.is_dir() else _download(name)
        spec, state = load_directory(directory, name)
        weights = "pretrained"
    module = PackedSiglip2Vision(spec)
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelLoadError(
            f"{name}: weights do not fit (missing {missing}, unexpected {unexpected})"
        )
    module = module.to(device=device, dtype=dtype).eval().requires_grad_(False)
    log.info("loaded %s (%s weights) on %s as %s", name, weights, device, dtype)
    return LoadedModel(name, weights, spec, module, device, dtype)
