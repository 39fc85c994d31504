"""The narrow interface between the service and the model: packed images in, arrays out.

One `run` is one forward pass: it concatenates the images' patches (pinned memory on CUDA so
the host-to-device copy is asynchronous), runs the packed model under `inference_mode`, and
splits the results back per image as float32 numpy arrays on the host.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from app.engine.attention import AttentionBackend
from app.engine.loader import LoadedModel
from app.imaging.device_resize import patchify_tensor
from app.imaging.sizing import Grid

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EncodeInput:
    """One image: its sequences' patches concatenated, and one grid per sequence.

    Either `patches` (preprocessed on the CPU) or `pixels` (the decoded (H, W, 3) uint8 image,
    one sequence, resized and cut on the device when the batch is staged) is set.
    """

    patches: np.ndarray | None  # (tokens, 3*p*p) float32
    grids: tuple[Grid, ...]
    return_tokens: bool = False
    pixels: np.ndarray | None = None

    def __post_init__(self) -> None:
        if (self.patches is None) == (self.pixels is None):
            raise ValueError("an EncodeInput needs exactly one of patches or pixels")
        if self.pixels is not None and len(self.grids) != 1:
            raise ValueError("device-side resizing takes single-sequence images only")

    @property
    def tokens(self) -> int:
        return sum(g.tokens for g in self.grids)


@dataclass(frozen=True, slots=True)
class EncodeOutput:
    pooled: np.ndarray  # (sequences, D) float32, the model's pooler_output per sequence
    tokens: np.ndarray | None  # (tokens, D) float32 after the post layer norm, when asked


@dataclass(frozen=True, slots=True)
class Staged:
    """Patches of a batch already concatenated (and on CUDA, on their way to the device)."""

    patches: torch.Tensor
    tokens: int


class Encoder:
    def __init__(self, model: LoadedModel, attention: AttentionBackend) -> None:
        self.model = model
        self.attention = attention

    @property
    def patch_size(self) -> int:
        return self.model.spec.patch_size

    def stage(self, inputs: Sequence[EncodeInput]) -> Staged:
        """Concatenate a batch's patches; callable from any thread, ahead of `run`."""
        return Staged(self._stage(inputs), sum(x.tokens for x in inputs))

    @staticmethod
    def pack_order(inputs: Sequence[EncodeInput]) -> list[int]:
        """The order of the inputs inside the pack: by sequence length, stable.

        Equal lengths then sit side by side, so length-grouped attention (sdpa-segments)
        slices contiguous runs instead of gathering and scattering tokens in every layer.
        """
        return sorted(range(len(inputs)), key=lambda i: inputs[i].grids[0].tokens)

    def _stage(self, inputs: Sequence[EncodeInput]) -> torch.Tensor:
        order = self.pack_order(inputs)
        if any(x.pixels is not None for x in inputs):
            return torch.cat([self._device_patches(inputs[i]) for i in order])
        total = sum(x.tokens for x in inputs)
        cuda = self.model.device.type == "cuda"
        host = torch.empty((total, self.model.spec.patch_dim), pin_memory=cuda)
        offset = 0
        for i in order:
            x = inputs[i]
            assert x.patches is not None
            host[offset : offset + x.tokens].copy_(torch.from_numpy(x.patches))
            offset += x.tokens
        return host.to(self.model.device, non_blocking=True) if cuda else host

    def _device_patches(self, x: EncodeInput) -> torch.Tensor:
        device = self.model.device
        cuda = device.type == "cuda"
        if x.patches is not None:
            host = torch.from_numpy(x.patches)
            return host.pin_memory().to(device, non_blocking=True) if cuda else host
        assert x.pixels is not None
        pixels = torch.from_numpy(x.pixels)
        # uint8 crosses the bus (4x less than float32 patches); the resize runs on the device.
        pixels = pixels.pin_memory().to(device, non_blocking=True) if cuda else pixels
        grid, p = x.grids[0], self.patch_size
        return patchify_tensor(pixels, (grid.rows * p, grid.cols * p), p)

    def run(
        self, inputs: Sequence[EncodeInput], staged: Staged | None = None
    ) -> list[EncodeOutput]:
        """One packed forward pass over every sequence of every input.

        `staged`, when given, must come from `stage(inputs)` for these same inputs.
        """
        if not inputs:
            return []
        total = sum(x.tokens for x in inputs)
        if staged is not None and staged.tokens != total:
            raise ValueError(f"staged batch has {staged.tokens} tokens, inputs have {total}")
        order = self.pack_order(inputs)
        grids = [g for i in order for g in inputs[i].grids]
        want_tokens = any(x.return_tokens for x in inputs)
        with torch.inference_mode():
            out = self.model.module(
                staged.patches if staged is not None else self._stage(inputs),
                grids,
                self.attention,
                return_tokens=want_tokens,
            )
            pooled = out.pooled.float().cpu().numpy()
            tokens = out.tokens.float().cpu().numpy() if out.tokens is not None else None
        results: list[EncodeOutput | None] = [None] * len(inputs)
        seq = tok = 0
        for i in order:
            x = inputs[i]
            n_seq = len(x.grids)
            mine = tokens[tok : tok + x.tokens] if tokens is not None and x.return_tokens else None
            results[i] = EncodeOutput(pooled[seq : seq + n_seq], mine)
            seq += n_seq
            tok += x.tokens
        return [r for r in results if r is not None]

    def warmup(self, max_batch_tokens: int) -> None:
        """Run packs shaped like real traffic so first requests pay no lazy set-up."""
        p = self.patch_size
        rng = np.random.default_rng(0)
        shapes = [(16, 16), (14, 18), (27, 27), (32, 32), (8, 32), (32, 8)]
        batch: list[EncodeInput] = []
        used = 0
        for rows, cols in shapes * 8:
            n = rows * cols
            if used + n > max_batch_tokens:
                break
            patches = rng.standard_normal((n, 3 * p * p), dtype=np.float32)
            batch.append(EncodeInput(patches, (Grid(rows, cols),)))
            used += n
        if not batch:
            rows = cols = max(1, int(max_batch_tokens**0.5))
            patches = rng.standard_normal((rows * cols, 3 * p * p), dtype=np.float32)
            batch.append(EncodeInput(patches, (Grid(rows, cols),)))
        self.run(batch)  # a full mixed pack
        self.run(batch[:1])  # and a lone small image, the low-load case
        log.info("warm-up done: %d sequences, %d tokens", len(batch), used)
