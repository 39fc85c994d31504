"""Where a packed forward pass spends its time, by kind of operation (torch.profiler).

    python -m bench.profile [--model demo:base] [--tokens 4096] [--quick]

One full pack of the mixed workload's grid shapes is profiled after a warm-up; every ATen
operator's self time is put in a bucket (matmul, attention, activation, normalization, copies,
elementwise, other). Writes bench/results/profile.md and a stacked-bar PNG of the split, with
preprocessing of the same images beside it for scale.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bench.common import command_line, facts_table, fmt_num, machine_facts, markdown_table, run_date

# Operator name fragments -> bucket; first match wins, so specific names come first.
BUCKETS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attention", ("scaled_dot_product", "flash_attention", "_efficient_attention", "varlen")),
    ("matmul", ("addmm", "aten::mm", "aten::bmm", "matmul", "aten::linear")),
    ("activation (gelu)", ("gelu",)),
    ("layer norm", ("layer_norm",)),
    (
        "copies / layout",
        ("copy_", "aten::cat", "index_select", "index_copy", "contiguous", "clone"),
    ),
    ("elementwise", ("aten::add", "aten::mul", "aten::exp", "aten::div", "scatter", "index_add")),
)


def bucket_of(name: str) -> str:
    for label, fragments in BUCKETS:
        if any(f in name for f in fragments):
            return label
    return "other"


def mixed_pack(max_tokens: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Grid shapes of the mixed workload (budgets 256 / 729 / 1024) filling one pack."""
    shapes = [(14, 18), (16, 16), (27, 27), (18, 40), (32, 32), (8, 32), (20, 51)]
    weights = np.array([0.25, 0.25, 0.2, 0.13, 0.07, 0.05, 0.05])
    grids, used = [], 0
    while True:
        rows, cols = shapes[int(rng.choice(len(shapes), p=weights))]
        if used + rows * cols > max_tokens:
            return grids
        grids.append((rows, cols))
        used += rows * cols


def profile_split(model: str, max_tokens: int) -> tuple[dict[str, float], int, float]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from app.engine.attention import choose_backend
    from app.engine.encoder import EncodeInput, Encoder
    from app.engine.loader import load_model
    from app.engine.runtime import keep_freed_activations
    from app.imaging.sizing import Grid

    keep_freed_activations()  # as `patchpack serve` does
    loaded = load_model(model, torch.device("cpu"), torch.float32)
    encoder = Encoder(loaded, choose_backend("auto", loaded.device, loaded.dtype))
    rng = np.random.default_rng(0)
    dim = loaded.spec.patch_dim
    inputs = [
        EncodeInput(rng.standard_normal((r * c, dim), dtype=np.float32), (Grid(r, c),))
        for r, c in mixed_pack(max_tokens, rng)
    ]
    encoder.run(inputs)
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        encoder.run(inputs)
    wall = time.perf_counter() - start
    split: dict[str, float] = {}
    for event in prof.key_averages():
        if not event.key.startswith("aten::"):
            continue
        label = bucket_of(event.key)
        split[label] = split.get(label, 0.0) + event.self_cpu_time_total / 1e6
    return split, sum(x.tokens for x in inputs), wall


def plot(split: dict[str, float], path: Path, footnote: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 2.8))
    left = 0.0
    total = sum(split.values())
    for label, seconds in sorted(split.items(), key=lambda kv: -kv[1]):
        share = seconds / total
        ax.barh([0], [share], left=left, label=f"{label} {share:.0%}")
        left += share
    ax.set_yticks([])
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of operator time in one packed forward pass")
    ax.legend(ncol=3, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.35))
    fig.text(0.01, 0.01, footnote, fontsize=7, alpha=0.7)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo:base")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    if args.quick:
        args.model = "demo:tiny"
    split, tokens, wall = profile_split(args.model, args.tokens)
    stem = "profile_quick" if args.quick else "profile"
    date = run_date()
    plot(split, args.out / f"{stem}.png", f"{date} | {command_line('bench.profile')}")
    total = sum(split.values())
    rows = [
        (label, fmt_num(s * 1000), f"{s / total:.1%}")
        for label, s in sorted(split.items(), key=lambda kv: -kv[1])
    ]
    report = "\n".join(
        [
            "# Where the forward pass spends its time",
            "",
            f"- date: {date}",
            f"- command: `{command_line('bench.profile')}`",
            f"- one packed pass of {tokens} tokens (mixed-workload grids), `{args.model}` fp32 "
            f"CPU, wall {fmt_num(wall)} s under the profiler",
            "",
            facts_table(machine_facts()),
            "",
            f"![split]({stem}.png)",
            "",
            markdown_table(["bucket", "self ms", "share"], rows),
            "",
        ]
    )
    (args.out / f"{stem}.md").write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
