"""Preprocessing cost: decode + resize + patchify per image, per core, and against compute.

    python -m bench.preprocess [--model demo:base] [--repeats 5] [--quick]

For JPEGs of 640x480, 1920x1080 and 4000x3000 at budgets 256 and 1024 it times each stage on
one thread (images/s per core), then the whole preprocessing over a thread pool of 1..N
workers (PIL and the patchify lookup release the GIL, so threads scale across cores), and
sets it against the engine's forward-pass time for the same tokens measured in the same run.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from bench.common import (
    command_line,
    facts_table,
    fmt_num,
    machine_facts,
    markdown_table,
    repeat,
    run_date,
    usable_cores,
)

SIZES = ((480, 640), (1080, 1920), (3000, 4000))
BUDGETS = (256, 1024)


def log(message: str) -> None:
    print(f"[bench.preprocess] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True, slots=True)
class StageTimes:
    size: tuple[int, int]
    budget: int
    tokens: int
    decode_s: float
    resize_patchify_s: float
    forward_s: float

    @property
    def total_s(self) -> float:
        return self.decode_s + self.resize_patchify_s


def photo_jpeg(height: int, width: int, rng: np.random.Generator) -> bytes:
    """A smooth gradient plus noise: compresses like a photo (pure noise would not)."""
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None, None]
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    base = (y * 0.6 + x * 0.4) * np.array([1.0, 0.8, 0.6], dtype=np.float32)
    noise = rng.normal(0, 12, size=(height, width, 3)).astype(np.float32)
    pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of `repeats` calls after one warm-up call."""
    return repeat(fn, repeats, warmup=1).median


def measure_stages(
    model: str, jpegs: dict[tuple[int, int], bytes], repeats: int
) -> list[StageTimes]:
    import torch

    from app.engine.attention import choose_backend
    from app.engine.encoder import EncodeInput, Encoder
    from app.engine.loader import load_model
    from app.engine.runtime import keep_freed_activations
    from app.imaging.decode import decode
    from app.imaging.patchify import patchify
    from app.imaging.sizing import SizeRequest, plan_image

    keep_freed_activations()  # as `patchpack serve` does
    loaded = load_model(model, torch.device("cpu"), torch.float32)
    encoder = Encoder(loaded, choose_backend("auto", loaded.device, loaded.dtype))
    p = loaded.spec.patch_size
    rows = []
    for size, data in jpegs.items():
        rgb = decode(data, 10**9)
        decode_s = best_of(lambda data=data: decode(data, 10**9), repeats)
        for budget in BUDGETS:
            plan = plan_image(SizeRequest(rgb.height, rgb.width, budget), p)
            resize_s = best_of(lambda plan=plan, rgb=rgb: patchify(rgb, plan, p), repeats)
            one = [EncodeInput(patchify(rgb, plan, p), plan.grids)]
            forward_s = best_of(lambda one=one: encoder.run(one), max(2, repeats // 2))
            rows.append(StageTimes(size, budget, plan.tokens, decode_s, resize_s, forward_s))
            log(
                f"{size} @ {budget}: decode {decode_s * 1e3:.1f} ms, resize+patchify "
                f"{resize_s * 1e3:.1f} ms, forward {forward_s * 1e3:.0f} ms"
            )
    return rows


def pool_throughput(jpegs: Sequence[bytes], budget: int, workers: int, rounds: int) -> float:
    """Images/s of the full preprocessing over a pool of `workers` threads."""
    from app.imaging.decode import decode
    from app.imaging.patchify import patchify
    from app.imaging.sizing import SizeRequest, plan_image

    def one(data: bytes) -> int:
        rgb = decode(data, 10**9)
        plan = plan_image(SizeRequest(rgb.height, rgb.width, budget), 16)
        return int(patchify(rgb, plan, 16).shape[0])

    work = list(jpegs) * rounds
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, work[: len(jpegs)]))  # warm
        start = time.perf_counter()
        list(pool.map(one, work))
        return len(work) / (time.perf_counter() - start)


def render(args: argparse.Namespace, rows: Sequence[StageTimes], scaling: dict[int, float]) -> str:
    table = [
        (
            f"{r.size[1]}x{r.size[0]}",
            r.budget,
            r.tokens,
            fmt_num(r.decode_s * 1e3),
            fmt_num(r.resize_patchify_s * 1e3),
            fmt_num(1 / r.total_s),
            fmt_num(r.forward_s * 1e3),
            f"{r.total_s / r.forward_s:.1%}",
        )
        for r in rows
    ]
    base = scaling[min(scaling)]
    scale_rows = [(w, fmt_num(v), f"{v / base:.2f}x") for w, v in sorted(scaling.items())]
    return "\n".join(
        [
            "# Preprocessing benchmark",
            "",
            f"- date: {run_date()}",
            f"- command: `{command_line('bench.preprocess')}`",
            f"- model for the forward pass: `{args.model}` fp32 CPU, one image per pass",
            "",
            facts_table(machine_facts()),
            "",
            "## Per image, one thread",
            "",
            "Decode is the JPEG decode to RGB (PIL); resize + patchify is the bilinear resize, "
            "normalization and patch cut (bit-identical to transformers). *Share* is "
            "preprocessing time over the forward-pass time of the same image.",
            "",
            markdown_table(
                [
                    "JPEG (WxH)",
                    "budget",
                    "tokens",
                    "decode ms",
                    "resize+patchify ms",
                    "images/s per core",
                    "forward ms",
                    "share",
                ],
                table,
            ),
            "",
            f"## Thread-pool scaling (1920x1080 JPEGs, budget 256, {usable_cores()} cores)",
            "",
            markdown_table(["workers", "images/s", "vs 1 worker"], scale_rows),
            "",
        ]
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo:base")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.repeats = "demo:tiny", 2
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    rng = np.random.default_rng(0)
    jpegs = {size: photo_jpeg(*size, rng) for size in SIZES}
    rows = measure_stages(args.model, jpegs, args.repeats)
    hd = [photo_jpeg(1080, 1920, rng) for _ in range(4)]
    scaling = {
        w: pool_throughput(hd, 256, w, rounds=2 if args.quick else 4)
        for w in range(1, usable_cores() + 1)
    }
    report = render(args, rows, scaling)
    name = "preprocess_quick.md" if args.quick else "preprocess.md"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / name).write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
