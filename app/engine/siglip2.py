"""The SigLIP 2 NaFlex vision encoder, run over one packed sequence of many images.

Same math as transformers' `Siglip2VisionModel`, rearranged for packing:
- one patch-embedding matmul over every token of every image;
- position embeddings resized per patch grid (cached: they depend only on the grid);
- q, k, v fused into one projection per layer; attention is variable-length over the pack;
- the attention-pooling head runs as a segment softmax over all images at once.
Nothing is padded, so the work is proportional to the real tokens.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from app.engine.attention import AttentionBackend, PackLayout
from app.imaging.sizing import Grid

_ACTIVATIONS = {"gelu_pytorch_tanh": "tanh", "gelu": "none"}


@dataclass(frozen=True, slots=True)
class VisionSpec:
    """The shape of a SigLIP 2 vision tower, as read from its config."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    patch_size: int
    num_patches: int = 256
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"
    use_head: bool = True

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be divisible by num_heads")
        if round(self.num_patches**0.5) ** 2 != self.num_patches:
            raise ValueError("num_patches must be a square (the position grid)")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"unsupported activation {self.hidden_act!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        return 3 * self.patch_size * self.patch_size

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs of one token in a sequence of `seq_len` (matmuls and attention)."""
        d, m = self.hidden_size, self.intermediate_size
        per_layer = 2 * (4 * d * d + 2 * d * m) + 2 * 2 * seq_len * d
        return 2 * self.patch_dim * d + self.num_layers * per_layer


class _MLP(nn.Module):
    def __init__(self, spec: VisionSpec) -> None:
        super().__init__()
        self.fc1 = nn.Linear(spec.hidden_size, spec.intermediate_size)
        self.fc2 = nn.Linear(spec.intermediate_size, spec.hidden_size)
        self.approximate = _ACTIVATIONS[spec.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


class _EncoderLayer(nn.Module):
    def __init__(self, spec: VisionSpec) -> None:
        super().__init__()
        d = spec.hidden_size
        self.layer_norm1 = nn.LayerNorm(d, eps=spec.layer_norm_eps)
        self.qkv = nn.Linear(d, 3 * d)
        self.out_proj = nn.Linear(d, d)
        self.layer_norm2 = nn.LayerNorm(d, eps=spec.layer_norm_eps)
        self.mlp = _MLP(spec)
        self.heads, self.head_dim = spec.num_heads, spec.head_dim
        self.scale = spec.head_dim**-0.5

    def forward(self, x: torch.Tensor, attention: AttentionBackend, plan: object) -> torch.Tensor:
        qkv = self.qkv(self.layer_norm1(x)).view(-1, 3, self.heads, self.head_dim)
        x = x + self.out_proj(attention(qkv, plan, self.scale))
        return x + self.mlp(self.layer_norm2(x))


class _PoolingHead(nn.Module):
    """A learned probe attends over each image's own tokens (nn.MultiheadAttention math)."""

    def __init__(self, spec: VisionSpec) -> None:
        super().__init__()
        d = spec.hidden_size
        self.probe = nn.Parameter(torch.zeros(1, 1, d))
        self.q_proj = nn.Linear(d, d)
        self.kv_proj = nn.Linear(d, 2 * d)
        self.out_proj = nn.Linear(d, d)
        self.layernorm = nn.LayerNorm(d, eps=spec.layer_norm_eps)
        self.mlp = _MLP(spec)
        self.heads, self.head_dim = spec.num_heads, spec.head_dim

    def forward(self, x: torch.Tensor, seq_ids: torch.Tensor, count: int) -> torch.Tensor:
        total, heads, dim = x.shape[0], self.heads, self.head_dim
        q = self.q_proj(self.probe.view(1, -1)).view(heads, dim).float() * dim**-0.5
        k, v = self.kv_proj(x).view(total, 2, heads, dim).float().unbind(1)
        scores = torch.einsum("thd,hd->th", k, q)
        # Softmax within each sequence: subtract the per-sequence max, normalize per sequence.
        ids = seq_ids[:, None].expand(total, heads)
        peak = scores.new_full((count, heads), float("-inf"))
        peak = peak.scatter_reduce(0, ids, scores, reduce="amax", include_self=True)
        weights = torch.exp(scores - peak[seq_ids])
        norm = weights.new_zeros(count, heads).index_add_(0, seq_ids, weights)
        weights = weights / norm[seq_ids]
        pooled = v.new_zeros(count, heads, dim).index_add_(0, seq_ids, weights[..., None] * v)
        o = self.out_proj(pooled.reshape(count, heads * dim).to(x.dtype))
        return o + self.mlp(self.layernorm(o))


@dataclass(frozen=True, slots=True)
class PackedOutput:
    pooled: torch.Tensor  # (N, D); zeros-free: one row per sequence
    tokens: torch.Tensor | None  # (T, D) after post layer norm, when asked for


class PackedSiglip2Vision(nn.Module):
    def __init__(self, spec: VisionSpec, position_cache_size: int = 1024) -> None:
        super().__init__()
        self.spec = spec
        d = spec.hidden_size
        self.patch_embedding = nn.Linear(spec.patch_dim, d)
        self.position_embedding = nn.Parameter(torch.zeros(spec.num_patches, d))
        self.layers = nn.ModuleList(_EncoderLayer(spec) for _ in range(spec.num_layers))
        self.post_layernorm = nn.LayerNorm(d, eps=spec.layer_norm_eps)
        self.head = _PoolingHead(spec) if spec.use_head else None
        self._positions: OrderedDict[tuple[object, ...], torch.Tensor] = OrderedDict()
        self._position_cache_size = position_cache_size

    # -- position embeddings ------------------------------------------------------------
    def resized_positions(self, rows: int, cols: int) -> torch.Tensor:
        """The 16x16 learned grid resized to (rows, cols), flattened row-major; LRU-cached."""
        weight = self.position_embedding.detach()
        # Device and dtype are part of the key: a module moved after a forward pass must not
        # reuse tensors resized for its old placement.
        key = (rows, cols, weight.device, weight.dtype)
        cached = self._positions.get(key)
        if cached is not None:
            self._positions.move_to_end(key)
            return cached
        side = round(self.spec.num_patches**0.5)
        grid = weight.view(side, side, -1).permute(2, 0, 1).unsqueeze(0)
        # Resized in float32 everywhere (transformers does so on CPU only): it is computed once
        # per grid, and a bf16 resize would add its rounding to the bf16 forward pass's.
        source = grid.float()
        resized = F.interpolate(
            source, size=(rows, cols), mode="bilinear", align_corners=False, antialias=True
        )
        flat = resized.reshape(weight.shape[1], rows * cols).t().to(weight.dtype).contiguous()
        self._positions[key] = flat
        if len(self._positions) > self._position_cache_size:
            self._positions.popitem(last=False)
        return flat

    def clear_position_cache(self) -> None:
        self._positions.clear()

    # -- forward ------------------------------------------------------------------------
    def forward(
        self,
        patches: torch.Tensor,
        grids: Sequence[Grid],
        attention: AttentionBackend,
        return_tokens: bool = False,
    ) -> PackedOutput:
        """`patches`: (T, 3*p*p), the sequences of `grids` concatenated in order."""
        lengths = tuple(g.tokens for g in grids)
        if patches.shape[0] != sum(lengths):
            raise ValueError(f"{patches.shape[0]} patches for grids totalling {sum(lengths)}")
        weight = self.patch_embedding.weight
        x = self.patch_embedding(patches.to(device=weight.device, dtype=weight.dtype))
        positions = [self.resized_positions(g.rows, g.cols) for g in grids]
        x = x + (positions[0] if len(positions) == 1 else torch.cat(positions))

        layout = PackLayout(lengths, weight.device)
        plan = attention.plan(layout)
        for layer in self.layers:
            x = layer(x, attention, plan)
        x = self.post_layernorm(x)

        if self.head is None:
            raise RuntimeError("this checkpoint has no pooling head (vision_use_head=false)")
        seq_ids = torch.repeat_interleave(
            torch.arange(len(lengths), device=weight.device),
            torch.tensor(lengths, device=weight.device),
        )
        pooled = self.head(x, seq_ids, len(lengths))
        return PackedOutput(pooled=pooled, tokens=x if return_tokens else None)


def from_hf_state_dict(
    spec: VisionSpec, state: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Rename (and fuse) a transformers `Siglip2VisionModel` state dict into ours.

    `state` uses vision-tower keys without prefix (`embeddings.patch_embedding.weight`, ...).
    """
    out: dict[str, torch.Tensor] = {
        "patch_embedding.weight": state["embeddings.patch_embedding.weight"],
        "patch_embedding.bias": state["embeddings.patch_embedding.bias"],
        "position_embedding": state["embeddings.position_embedding.weight"],
        "post_layernorm.weight": state["post_layernorm.weight"],
        "post_layernorm.bias": state["post_layernorm.bias"],
    }
    for i in range(spec.num_layers):
        src, dst = f"encoder.layers.{i}.", f"layers.{i}."
        for part in ("weight", "bias"):
            out[dst + f"qkv.{part}"] = torch.cat(
                [state[src + f"self_attn.{p}_proj.{part}"] for p in ("q", "k", "v")]
            )
            out[dst + f"out_proj.{part}"] = state[src + f"self_attn.out_proj.{part}"]
            for norm in ("layer_norm1", "layer_norm2"):
                out[dst + f"{norm}.{part}"] = state[src + f"{norm}.{part}"]
            for fc in ("fc1", "fc2"):
                out[dst + f"mlp.{fc}.{part}"] = state[src + f"mlp.{fc}.{part}"]
    if spec.use_head:
        d = spec.hidden_size
        out["head.probe"] = state["head.probe"]
        in_w, in_b = state["head.attention.in_proj_weight"], state["head.attention.in_proj_bias"]
        out["head.q_proj.weight"], out["head.kv_proj.weight"] = in_w[:d], in_w[d:]
        out["head.q_proj.bias"], out["head.kv_proj.bias"] = in_b[:d], in_b[d:]
        for part in ("weight", "bias"):
            out[f"head.out_proj.{part}"] = state[f"head.attention.out_proj.{part}"]
            out[f"head.layernorm.{part}"] = state[f"head.layernorm.{part}"]
            for fc in ("fc1", "fc2"):
                out[f"head.mlp.{fc}.{part}"] = state[f"head.mlp.{fc}.{part}"]
    return out
