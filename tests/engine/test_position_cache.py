"""Resized position embeddings: transformers' values, cached per grid, LRU-bounded."""

from __future__ import annotations

import pytest
import torch
from transformers import Siglip2VisionModel
from transformers.models.siglip2.modeling_siglip2 import Siglip2VisionEmbeddings

from app.engine.siglip2 import PackedSiglip2Vision
from tests.engine.reference import packed_from_hf


def _hf_resized(model: Siglip2VisionModel, rows: int, cols: int) -> torch.Tensor:
    weight = model.embeddings.position_embedding.weight.detach()
    side = int(weight.shape[0] ** 0.5)
    out = Siglip2VisionEmbeddings.resize_positional_embeddings(
        weight.reshape(side, side, -1), torch.tensor([[rows, cols]]), max_length=rows * cols
    )
    return out[0]


@pytest.fixture
def fresh(tiny_hf: Siglip2VisionModel) -> PackedSiglip2Vision:
    return packed_from_hf(tiny_hf)


@pytest.mark.parametrize(
    ("rows", "cols"),
    [(16, 16), (1, 1), (14, 18), (32, 32), (1, 256), (256, 1), (7, 3), (27, 38), (64, 16)],
)
def test_matches_transformers(
    tiny_hf: Siglip2VisionModel, fresh: PackedSiglip2Vision, rows: int, cols: int
) -> None:
    ours = fresh.resized_positions(rows, cols)
    ref = _hf_resized(tiny_hf, rows, cols)
    assert ours.shape == (rows * cols, tiny_hf.config.hidden_size)
    assert torch.allclose(ours, ref, rtol=0, atol=1e-6), (ours - ref).abs().max()


def test_16x16_is_the_learned_grid(fresh: PackedSiglip2Vision) -> None:
    """Resizing to the native grid is the identity: row-major order of the 16x16 table."""
    assert torch.allclose(
        fresh.resized_positions(16, 16), fresh.position_embedding.detach(), atol=1e-6
    )


def test_transposed_grid_differs(fresh: PackedSiglip2Vision) -> None:
    # (rows, cols) is not (cols, rows): a swapped key would hand a 3x7 image 7x3 positions.
    a = fresh.resized_positions(3, 7).reshape(3, 7, -1)
    b = fresh.resized_positions(7, 3).reshape(7, 3, -1)
    assert not torch.allclose(a, b.transpose(0, 1), atol=1e-4)


def test_second_call_returns_the_cached_tensor(fresh: PackedSiglip2Vision) -> None:
    first = fresh.resized_positions(14, 18)
    assert fresh.resized_positions(14, 18) is first
    assert fresh.resized_positions(18, 14) is not first


def test_lru_eviction(tiny_hf: Siglip2VisionModel) -> None:
    model = PackedSiglip2Vision(packed_from_hf(tiny_hf).spec, position_cache_size=2)
    model.load_state_dict(packed_from_hf(tiny_hf).state_dict())
    a = model.resized_positions(2, 2)
    b = model.resized_positions(3, 3)
    assert model.resized_positions(2, 2) is a  # touch (2, 2): now (3, 3) is the oldest
    model.resized_positions(4, 4)  # over the size: evicts (3, 3)
    assert model.resized_positions(2, 2) is a
    b_again = model.resized_positions(3, 3)
    assert b_again is not b  # recomputed ...
    assert torch.equal(b_again, b)  # ... to the same values


def test_clear_position_cache(fresh: PackedSiglip2Vision) -> None:
    first = fresh.resized_positions(5, 5)
    fresh.clear_position_cache()
    again = fresh.resized_positions(5, 5)
    assert again is not first and torch.equal(again, first)


def test_bfloat16_cache_matches_transformers(tiny_hf: Siglip2VisionModel) -> None:
    """In bf16 on CPU both sides upcast to float32 to interpolate, then cast back."""
    model = packed_from_hf(tiny_hf).to(torch.bfloat16)
    hf = Siglip2VisionModel(tiny_hf.config)
    hf.load_state_dict(tiny_hf.state_dict())
    hf = hf.to(torch.bfloat16)
    ours = model.resized_positions(11, 23)
    assert ours.dtype == torch.bfloat16
    assert torch.equal(ours, _hf_resized(hf, 11, 23))
