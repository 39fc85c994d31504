"""MODEL -> LoadedModel: demo architectures, local checkpoints, refusals, device and dtype."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import pytest
import torch
from transformers import Siglip2VisionModel

from app.engine.loader import (
    DEMO_SPECS,
    demo_state,
    load_model,
    resolve_device,
    resolve_dtype,
    spec_from_config,
)
from app.engine.siglip2 import VisionSpec
from app.errors import ModelLoadError
from tests.engine.reference import random_hf_vision, spec_of, tiny_vision_config

CPU = torch.device("cpu")


def _state(loaded_module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in loaded_module.state_dict().items()}


# -- demo ------------------------------------------------------------------------------------
def test_demo_tiny_loads_random_and_deterministic() -> None:
    first = load_model("demo:tiny", CPU, torch.float32)
    torch.manual_seed(12345)  # the demo seed is its own, whatever the global RNG holds
    second = load_model("demo:tiny", CPU, torch.float32)
    assert first.weights == second.weights == "random"
    assert first.model_id == "demo:tiny"
    assert first.spec == DEMO_SPECS["tiny"]
    assert first.device == CPU and first.dtype == torch.float32
    a, b = _state(first.module), _state(second.module)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # Really random (not all zeros or ones) and different for another seed.
    assert a["layers.0.qkv.weight"].std() > 0
    other = demo_state(DEMO_SPECS["tiny"], seed=1)
    assert not torch.equal(other["layers.0.qkv.weight"], a["layers.0.qkv.weight"])


def test_demo_seeding_leaves_global_rng_alone() -> None:
    before = torch.random.get_rng_state()
    demo_state(DEMO_SPECS["tiny"])
    assert torch.equal(torch.random.get_rng_state(), before)


def test_demo_module_is_inference_ready() -> None:
    loaded = load_model("demo:tiny", CPU, torch.bfloat16)
    assert not loaded.module.training
    assert all(not p.requires_grad for p in loaded.module.parameters())
    assert all(p.dtype == torch.bfloat16 for p in loaded.module.parameters())


def test_demo_specs_match_the_hub_checkpoints() -> None:
    # Only the specs: so400m is never instantiated in tests.
    assert DEMO_SPECS["tiny"] == VisionSpec(
        hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, patch_size=16
    )
    base, so400m = DEMO_SPECS["base"], DEMO_SPECS["so400m"]
    assert (base.hidden_size, base.intermediate_size, base.num_layers, base.num_heads) == (
        768,
        3072,
        12,
        12,
    )
    assert (so400m.hidden_size, so400m.intermediate_size, so400m.num_layers) == (1152, 4304, 27)
    assert so400m.num_heads == 16
    for spec in (base, so400m):
        assert spec.patch_size == 16
        assert spec.num_patches == 256
        assert spec.layer_norm_eps == 1e-6
        assert spec.hidden_act == "gelu_pytorch_tanh"
        assert spec.use_head


def test_unknown_demo_refused() -> None:
    with pytest.raises(ModelLoadError, match="demo:tiny"):
        load_model("demo:huge", CPU, torch.float32)


# -- local checkpoints -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_model(run_seed: int) -> Siglip2VisionModel:
    return random_hf_vision(tiny_vision_config(), run_seed)


def test_sharded_safetensors_loads(tmp_path: Path, hf_model: Siglip2VisionModel) -> None:
    hf_model.save_pretrained(tmp_path, max_shard_size="40KB")
    shards = list(tmp_path.glob("*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    sharded = load_model(str(tmp_path), CPU, torch.float32)
    assert sharded.weights == "pretrained"
    assert sharded.spec == spec_of(hf_model.config)

    single_dir = tmp_path / "single"
    hf_model.save_pretrained(single_dir)
    single = load_model(str(single_dir), CPU, torch.float32)
    a, b = _state(sharded.module), _state(single.module)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # And they are the checkpoint's weights, fused: qkv = [q; k; v].
    layer = hf_model.encoder.layers[1].self_attn
    fused = torch.cat([layer.q_proj.weight, layer.k_proj.weight, layer.v_proj.weight])
    assert torch.equal(a["layers.1.qkv.weight"], fused)


def test_pytorch_bin_checkpoint_loads(tmp_path: Path, hf_model: Siglip2VisionModel) -> None:
    hf_model.save_pretrained(tmp_path)
    state = hf_model.state_dict()
    (tmp_path / "model.safetensors").unlink()
    torch.save(state, tmp_path / "pytorch_model.bin")
    loaded = load_model(str(tmp_path), CPU, torch.float32)
    assert torch.equal(
        loaded.module.patch_embedding.weight, hf_model.embeddings.patch_embedding.weight
    )


@pytest.mark.parametrize("model_type", ["siglip", "clip_vision_model", "siglip_vision_model"])
def test_other_architectures_refused(
    tmp_path: Path, hf_model: Siglip2VisionModel, model_type: str
) -> None:
    hf_model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["model_type"] = model_type
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="SigLIP 2") as info:
        load_model(str(tmp_path), CPU, torch.float32)
    assert model_type in str(info.value)


def test_missing_local_directory_refused_without_network(tmp_path: Path) -> None:
    # An absolute path that does not exist is not a valid hub id either, so the hub client
    # refuses it before any request is made.
    missing = tmp_path / "no" / "such" / "checkpoint"
    with pytest.raises(ModelLoadError, match="checkpoint"):
        load_model(str(missing), CPU, torch.float32)


def test_missing_model_type_refused() -> None:
    with pytest.raises(ModelLoadError, match="SigLIP 2"):
        spec_from_config({"hidden_size": 64}, "somewhere")


def test_directory_without_config_refused(tmp_path: Path, hf_model: Siglip2VisionModel) -> None:
    hf_model.save_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(ModelLoadError, match=r"config\.json"):
        load_model(str(tmp_path), CPU, torch.float32)


def test_directory_without_weights_refused(tmp_path: Path, hf_model: Siglip2VisionModel) -> None:
    hf_model.config.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match=r"model\.safetensors"):
        load_model(str(tmp_path), CPU, torch.float32)


def test_checkpoint_missing_a_tensor_refused(tmp_path: Path, hf_model: Siglip2VisionModel) -> None:
    from safetensors.torch import save_file

    hf_model.config.save_pretrained(tmp_path)
    state = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    del state["post_layernorm.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"post_layernorm\.weight"):
        load_model(str(tmp_path), CPU, torch.float32)


def test_unsupported_activation_refused() -> None:
    config = {"model_type": "siglip2_vision_model", "hidden_act": "relu"}
    with pytest.raises(ModelLoadError, match="relu"):
        spec_from_config(config, "x")


def test_spec_from_full_config_reads_vision_tower() -> None:
    config = {
        "model_type": "siglip2",
        "text_config": {"hidden_size": 32},
        "vision_config": {
            "hidden_size": 96,
            "intermediate_size": 200,
            "num_hidden_layers": 3,
            "num_attention_heads": 6,
            "patch_size": 14,
            "num_patches": 64,
        },
    }
    spec = spec_from_config(config, "x")
    assert (spec.hidden_size, spec.intermediate_size, spec.num_layers, spec.num_heads) == (
        96,
        200,
        3,
        6,
    )
    assert (spec.patch_size, spec.num_patches) == (14, 64)


# -- device and dtype ------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA refusal")
@pytest.mark.parametrize("setting", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_cuda_refused(setting: str) -> None:
    with pytest.raises(ModelLoadError, match="CUDA"):
        resolve_device(setting)


def test_resolve_device() -> None:
    assert resolve_device("cpu") == CPU
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected


@pytest.mark.parametrize(
    ("setting", "device", "dtype"),
    [
        ("auto", "cpu", torch.float32),
        ("auto", "cuda", torch.bfloat16),
        ("float32", "cuda", torch.float32),
        ("bfloat16", "cpu", torch.bfloat16),
        ("float16", "cuda", torch.float16),
        ("float32", "cpu", torch.float32),
    ],
)
def test_resolve_dtype(setting: str, device: str, dtype: torch.dtype) -> None:
    assert resolve_dtype(setting, torch.device(device)) == dtype


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_allocator_tuning_applies_on_glibc() -> None:
    from app.engine.runtime import keep_freed_activations

    assert keep_freed_activations() is True
