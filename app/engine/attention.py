"""Variable-length self-attention over a packed sequence, several interchangeable ways.

Every backend takes the fused projections `qkv` of shape (T, 3, H, D) for T packed tokens and
returns (T, H*D), with each token attending only to tokens of its own sequence. The layout of
the pack (sequence lengths, offsets) is turned into a backend-specific plan once per forward
pass, not once per layer.

- cuda-varlen: PyTorch's `varlen_attn` (flash / cuDNN kernels, CUDA, torch >= 2.10).
- flash-attn: `flash_attn_varlen_qkvpacked_func` from the flash-attn package.
- sdpa-segments: one SDPA call per distinct sequence length, equal-length sequences stacked
  into a batch. The CPU default: it never materializes a mask, and its cost grows with the
  sum of squared lengths rather than the square of the total.
- dense-mask: one SDPA call over the whole pack with a block-diagonal boolean mask. Quadratic
  in the pack length; kept as an independent reference for tests and benchmarks.
"""

from __future__ import annotations

import importlib.util
import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PackLayout:
    """Where each sequence lies in the pack; built once per forward pass."""

    lengths: tuple[int, ...]
    device: torch.device

    @property
    def offsets(self) -> tuple[int, ...]:
        out, total = [], 0
        for n in self.lengths:
            out.append(total)
            total += n
        return tuple(out)

    @property
    def total(self) -> int:
        return sum(self.lengths)


class AttentionBackend(Protocol):
    name: str

    def plan(self, layout: PackLayout) -> Any: ...

    def __call__(self, qkv: torch.Tensor, plan: Any, scale: float) -> torch.Tensor: ...


def _cu_seqlens(layout: PackLayout) -> torch.Tensor:
    cu = [0]
    for n in layout.lengths:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32, device=layout.device)


@dataclass(frozen=True, slots=True)
class _LengthGroup:
    length: int
    # Contiguous runs are sliced (no copy); scattered ones are gathered with an index.
    start: int | None
    index: torch.Tensor | None
    count: int


class SdpaSegments:
    name = "sdpa-segments"

    def plan(self, layout: PackLayout) -> list[_LengthGroup]:
        by_length: dict[int, list[int]] = {}
        for offset, length in zip(layout.offsets, layout.lengths, strict=True):
            by_length.setdefault(length, []).append(offset)
        groups = []
        for length, starts in by_length.items():
            contiguous = all(b - a == length for a, b in itertools.pairwise(starts))
            if contiguous:
                groups.append(_LengthGroup(length, starts[0], None, len(starts)))
            else:
                base = torch.tensor(starts, dtype=torch.long)[:, None]
                index = (base + torch.arange(length)).reshape(-1).to(layout.device)
                groups.append(_LengthGroup(length, None, index, len(starts)))
        return groups

    def __call__(self, qkv: torch.Tensor, plan: list[_LengthGroup], scale: float) -> torch.Tensor:
        total, _, heads, dim = qkv.shape
        if len(plan) == 1 and plan[0].start == 0:
            return self._attend(qkv, plan[0], scale).reshape(total, heads * dim)
        out = qkv.new_empty(total, heads, dim)
        for group in plan:
            if group.start is not None:
                span = group.length * group.count
                chunk = qkv.narrow(0, group.start, span)
                out.narrow(0, group.start, span).copy_(self._attend(chunk, group, scale))
            else:
                assert group.index is not None
                chunk = qkv.index_select(0, group.index)
                out.index_copy_(0, group.index, self._attend(chunk, group, scale))
        return out.reshape(total, heads * dim)

    @staticmethod
    def _attend(chunk: torch.Tensor, group: _LengthGroup, scale: float) -> torch.Tensor:
        _, _, heads, dim = chunk.shape
        # (count*L, 3, H, D) -> 3 x (count, H, L, D)
        q, k, v = chunk.view(group.count, group.length, 3, heads, dim).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, scale=scale)
        return o.transpose(1, 2).reshape(group.count * group.length, heads, dim)


class DenseMask:
    name = "dense-mask"

    def plan(self, layout: PackLayout) -> torch.Tensor:
        ids = torch.repeat_interleave(
            torch.arange(len(layout.lengths)), torch.tensor(layout.lengths)
        ).to(layout.device)
        return ids[:, None] == ids[None, :]

    def __call__(self, qkv: torch.Tensor, plan: torch.Tensor, scale: float) -> torch.Tensor:
        total, _, heads, dim = qkv.shape
        q, k, v = qkv.permute(1, 2, 0, 3).unsqueeze(1)  # 3 x (1, H, T, D)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=plan, scale=scale)
        return o[0].transpose(0, 1).reshape(total, heads * dim)


@dataclass(frozen=True, slots=True)
class _VarlenPlan:
    cu_seqlens: torch.Tensor
    max_len: int


class CudaVarlen:
    name = "cuda-varlen"

    def __init__(self) -> None:
        from torch.nn.attention.varlen import varlen_attn

        self._fn: Callable[..., Any] = varlen_attn

    def plan(self, layout: PackLayout) -> _VarlenPlan:
        return _VarlenPlan(_cu_seqlens(layout), max(layout.lengths))

    def __call__(self, qkv: torch.Tensor, plan: _VarlenPlan, scale: float) -> torch.Tensor:
        total, _, heads, dim = qkv.shape
        # The flash/cuDNN kernels want dense (T, H, D) inputs, not strided views of the pack.
        q, k, v = (t.contiguous() for t in qkv.unbind(1))
        cu, n = plan.cu_seqlens, plan.max_len
        o: torch.Tensor = self._fn(q, k, v, cu, cu, n, n, scale=scale)
        return o.reshape(total, heads * dim)


class FlashAttn:
    name = "flash-attn"

    def __init__(self) -> None:
        from flash_attn import flash_attn_varlen_qkvpacked_func

        self._fn: Callable[..., torch.Tensor] = flash_attn_varlen_qkvpacked_func

    def plan(self, layout: PackLayout) -> _VarlenPlan:
        return _VarlenPlan(_cu_seqlens(layout), max(layout.lengths))

    def __call__(self, qkv: torch.Tensor, plan: _VarlenPlan, scale: float) -> torch.Tensor:
        total, _, heads, dim = qkv.shape
        o = self._fn(qkv, plan.cu_seqlens, plan.max_len, softmax_scale=scale)
        return o.reshape(total, heads * dim)


def _has_varlen_attn() -> bool:
    return importlib.util.find_spec("torch.nn.attention.varlen") is not None


def _has_flash_attn() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def available_backends(device: torch.device, dtype: torch.dtype) -> list[str]:
    """Backends that can run on `device` in `dtype`, best first."""
    names = []
    # The flash kernels behind both varlen APIs take only half precision.
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        if _has_varlen_attn():
            names.append(CudaVarlen.name)
        if _has_flash_attn():
            names.append(FlashAttn.name)
    names += [SdpaSegments.name, DenseMask.name]
    return names


_CONSTRUCTORS: dict[str, Callable[[], AttentionBackend]] = {
    CudaVarlen.name: CudaVarlen,
    FlashAttn.name: FlashAttn,
    SdpaSegments.name: SdpaSegments,
    DenseMask.name: DenseMask,
}


def make_backend(name: str) -> AttentionBackend:
    try:
        return _CONSTRUCTORS[name]()
    except KeyError:
        raise ValueError(f"unknown attention backend {name!r}") from None


def choose_backend(
    requested: str, device: torch.device, dtype: torch.dtype, candidates: Sequence[str] = ()
) -> AttentionBackend:
    """`auto` takes the first that works on this machine; a named one must be available."""
    usable = list(candidates) or available_backends(device, dtype)
    if requested != "auto":
        if requested not in usable:
            raise ValueError(
                f"attention backend {requested!r} is not available on {device} in {dtype}; "
                f"available: {', '.join(usable)}"
            )
        return make_backend(requested)
    # dense-mask is a reference, never an automatic choice.
    for name in usable:
        if name == DenseMask.name:
            continue
        try:
            backend = make_backend(name)
            if device.type == "cuda":
                _probe(backend, device, dtype)
            return backend
        except Exception as exc:  # an importable kernel may still not run on this GPU
            log.warning("attention backend %s unusable here (%s); trying the next", name, exc)
    return make_backend(SdpaSegments.name)


def _probe(backend: AttentionBackend, device: torch.device, dtype: torch.dtype) -> None:
    """One tiny call, checked against sdpa-segments: a kernel that loads but cannot run on
    this GPU (or computes garbage) is caught at start-up, not on the first request."""
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(24, 3, 2, 64, generator=gen).to(device=device, dtype=dtype)
    layout = PackLayout((8, 16), device)
    got = backend(qkv, backend.plan(layout), 0.125).float()
    reference = SdpaSegments()
    want = reference(qkv, reference.plan(layout), 0.125).float()
    if not torch.allclose(got, want, atol=2e-2, rtol=2e-2):
        raise RuntimeError("probe output differs from sdpa-segments")
