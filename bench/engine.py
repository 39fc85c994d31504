"""Engine benchmark: patchpack's packed SigLIP 2 forward against transformers' padded one.

    python -m bench.engine [--model demo:base] [--quick] [--out bench/results]

Same images, same weights, same run, four ways:
1. patchpack packed, sdpa-segments attention: `Encoder.run` on packs filled greedily up to
   MAX_BATCH_TOKENS real tokens;
2. the same packs with the dense block-diagonal mask (the reference backend);
3. transformers `Siglip2VisionModel` (SDPA), padded batches: every image is padded to the
   largest budget of its batch and a batch holds floor(MAX_BATCH_TOKENS / that budget) images;
4. transformers, one image at a time, padded only to its own budget.

Preprocessing (patchpack's imaging for 1-2, `Siglip2ImageProcessorPil` for 3-4) happens once,
outside the timed region: this times the engines. Throughput counts real image tokens only.
Writes engine.md and engine.png (engine-quick.* with --quick) and prints the markdown.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import Siglip2VisionModel
from transformers.models.siglip2.image_processing_pil_siglip2 import Siglip2ImageProcessorPil

from app.engine.attention import PackLayout, make_backend
from app.engine.encoder import EncodeInput, Encoder
from app.engine.loader import (
    DEMO_PREFIX,
    DEMO_SEED,
    DEMO_SPECS,
    LoadedModel,
    demo_reference,
    load_model,
)
from app.engine.runtime import keep_freed_activations
from app.engine.siglip2 import VisionSpec, from_hf_state_dict
from app.imaging.patchify import patchify
from app.imaging.sizing import SizeRequest, plan_image
from bench.common import (
    ImageSpec,
    Timing,
    Workload,
    background_share,
    command_line,
    cpu_sample,
    extreme_workload,
    facts_table,
    fmt_num,
    fmt_share,
    grouped_bars,
    interleaved,
    load_average,
    machine_facts,
    markdown_table,
    matmul_flop,
    matmul_seconds,
    mixed_workload,
    random_rgb,
    repeat,
    run_date,
    uniform_workload,
    usable_cores,
)

MAX_BATCH_TOKENS = 4096
SEED = 0
PARITY_TOLERANCE = 1e-4  # max abs difference of pooled outputs, fp32 CPU
# The DESIGN.md attention example: 6 images, 2985 tokens (12 heads, head_dim 64 at base).
ATTENTION_GRIDS: tuple[tuple[int, int], ...] = (
    (27, 29),
    (27, 27),
    (23, 31),
    (14, 18),
    (12, 21),
    (8, 32),
)


@dataclass(frozen=True, slots=True)
class Sizing:
    """How much work one run does; --quick shrinks it to a smoke test."""

    mixed: int
    uniform: int
    extreme: int
    repeats: int
    attention_repeats: int


# Sized so the full run stays within ~6 minutes on a 2-core CPU at demo:base, with samples
# large enough that the padded baseline's batches show the workload's budget mix (6 images
# made only two padded batches, whose padding depended on which images met).
FULL = Sizing(mixed=18, uniform=16, extreme=12, repeats=2, attention_repeats=5)
QUICK = Sizing(mixed=4, uniform=4, extreme=3, repeats=3, attention_repeats=3)


def log(message: str) -> None:
    # stdout carries the markdown report; progress goes to stderr.
    print(f"[bench.engine] {message}", file=sys.stderr, flush=True)


# -- models ----------------------------------------------------------------------------------


def build_reference(
    spec: VisionSpec, device: torch.device, dtype: torch.dtype
) -> Siglip2VisionModel:
    """transformers' `Siglip2VisionModel` with the very weights `loader.demo_state` draws.

    Same config and the same seed under a forked RNG, exactly as `demo_state` builds its
    reference, so the two models hold identical tensors (checked by `same_weights`).
    """
    model = demo_reference(spec, DEMO_SEED)
    model.set_attn_implementation("sdpa")  # its default today; pinned so the baseline is known
    model = model.to(device=device, dtype=dtype)  # type: ignore[call-arg]  # HF's typed `to`
    return model.eval().requires_grad_(False)


def same_weights(ours: torch.nn.Module, reference: torch.nn.Module, spec: VisionSpec) -> bool:
    """Whether our module holds exactly the reference's tensors (after renaming/fusing)."""
    expected = from_hf_state_dict(spec, reference.state_dict())
    actual = ours.state_dict()
    return expected.keys() == actual.keys() and all(
        torch.equal(expected[k].to(actual[k]), actual[k]) for k in expected
    )


# -- preprocessing (outside the timed region) -------------------------------------------------


@dataclass(frozen=True, slots=True)
class Prepared:
    """One image preprocessed for both engines."""

    spec: ImageSpec
    ours: EncodeInput
    grid: tuple[int, int]
    hf_patches: np.ndarray  # (budget, 3*p*p): the processor pads to max_num_patches itself
    hf_mask: np.ndarray  # (budget,) int32, 1 for real patches
    identical: bool  # our patches bit-equal to the processor's

    @property
    def tokens(self) -> int:
        return self.grid[0] * self.grid[1]


def prepare(
    spec: ImageSpec, pixels: np.ndarray, processor: Siglip2ImageProcessorPil, patch: int
) -> Prepared:
    image = Image.fromarray(pixels, mode="RGB")
    plan = plan_image(SizeRequest(spec.height, spec.width, spec.budget), patch)
    patches = patchify(image, plan, patch)
    # Each image at its own budget, as the HTTP API sizes it; padding to the batch happens
    # later. Asking the processor for the batch's largest budget instead would resize a
    # 256-token image to ~1024 tokens: different pixels, different embeddings, more work.
    hf = processor(images=[image], max_num_patches=spec.budget, return_tensors="np")  # type: ignore[call-arg]
    grid = tuple(int(v) for v in hf["spatial_shapes"][0])
    tokens = grid[0] * grid[1]
    identical = (grid == (plan.grids[0].rows, plan.grids[0].cols)) and np.array_equal(
        hf["pixel_values"][0][:tokens], patches
    )
    return Prepared(
        spec=spec,
        ours=EncodeInput(patches, plan.grids),
        grid=(plan.grids[0].rows, plan.grids[0].cols),
        hf_patches=hf["pixel_values"][0],
        hf_mask=hf["pixel_attention_mask"][0],
        identical=identical,
    )


def prepare_workload(workload: Workload, patch: int, rng: np.random.Generator) -> list[Prepared]:
    processor = Siglip2ImageProcessorPil(patch_size=patch)
    return [prepare(s, random_rgb(s, rng), processor, patch) for s in workload.items]


# -- batching --------------------------------------------------------------------------------


def greedy_groups(sizes: Sequence[int], fits: Callable[[list[int]], bool]) -> list[list[int]]:
    """Consecutive runs of indices, each grown while `fits(sizes of the run)` holds."""
    groups: list[list[int]] = []
    current: list[int] = []
    for i, size in enumerate(sizes):
        if current and not fits([sizes[j] for j in current] + [size]):
            groups.append(current)
            current = []
        current.append(i)
    if current:
        groups.append(current)
    return groups


def packs(items: Sequence[Prepared], max_tokens: int) -> list[list[Prepared]]:
    """Arrival order, a new pack when the next image's real tokens would not fit."""
    groups = greedy_groups([p.tokens for p in items], lambda s: sum(s) <= max_tokens)
    return [[items[i] for i in g] for g in groups]


def padded_groups(items: Sequence[Prepared], max_tokens: int) -> list[list[Prepared]]:
    """Arrival order, grouped by nothing: a batch holds floor(max_tokens / largest budget)."""
    groups = greedy_groups([p.spec.budget for p in items], lambda b: len(b) * max(b) <= max_tokens)
    return [[items[i] for i in g] for g in groups]


@dataclass(frozen=True, slots=True)
class PaddedBatch:
    pixel_values: torch.Tensor  # (B, L, 3*p*p)
    mask: torch.Tensor  # (B, L)
    spatial_shapes: torch.Tensor  # (B, 2)

    @property
    def computed_tokens(self) -> int:
        return int(self.mask.numel())


def padded_batch(group: Sequence[Prepared], device: torch.device) -> PaddedBatch:
    """Stack processor outputs, zero-padding each to the batch's largest budget."""
    length = max(p.spec.budget for p in group)
    values = np.zeros((len(group), length, group[0].hf_patches.shape[1]), dtype=np.float32)
    mask = np.zeros((len(group), length), dtype=np.int32)
    for i, p in enumerate(group):
        values[i, : p.spec.budget] = p.hf_patches
        mask[i, : p.spec.budget] = p.hf_mask
    shapes = np.array([p.grid for p in group], dtype=np.int64)
    return PaddedBatch(
        torch.from_numpy(values).to(device),
        torch.from_numpy(mask).to(device),
        torch.from_numpy(shapes).to(device),
    )


# -- methods ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Method:
    label: str
    run: Callable[[], list[np.ndarray]]  # one pass over the workload -> pooled per image
    warmup: Callable[[], object]
    batches: int
    computed_tokens: int  # what the forward passes process, padding included


def packed_method(label: str, encoder: Encoder, groups: list[list[Prepared]]) -> Method:
    inputs = [[p.ours for p in g] for g in groups]

    def run() -> list[np.ndarray]:
        return [out.pooled[0] for batch in inputs for out in encoder.run(batch)]

    # The first forward of a process pays thread-pool and allocator set-up, whatever its
    # shape; the smallest pack pays it at the least cost.
    smallest = min(inputs, key=lambda batch: sum(x.tokens for x in batch))
    tokens = sum(p.tokens for g in groups for p in g)
    return Method(label, run, lambda: encoder.run(smallest), len(groups), tokens)


def reference_method(label: str, model: torch.nn.Module, batches: list[PaddedBatch]) -> Method:
    def forward(batch: PaddedBatch) -> torch.Tensor:
        with torch.inference_mode():
            out = model(
                pixel_values=batch.pixel_values,
                pixel_attention_mask=batch.mask,
                spatial_shapes=batch.spatial_shapes,
            )
        return out.pooler_output

    def run() -> list[np.ndarray]:
        # Host copy in the timed region too, as Encoder.run returns host arrays.
        return [row for b in batches for row in forward(b).float().cpu().numpy()]

    smallest = min(batches, key=lambda b: b.computed_tokens)
    computed = sum(b.computed_tokens for b in batches)
    return Method(label, run, lambda: forward(smallest), len(batches), computed)


# -- machine ceiling -------------------------------------------------------------------------


@dataclass
class MatmulProbe:
    """fp32 matmul timings sampled through the run: at the start and before each workload.

    The ceiling uses the fastest sample. A ceiling is an upper bound, and on a shared machine
    the median is dragged down by whatever else runs (fractions above 100% would follow).
    """

    shape: tuple[int, int, int]
    repeats: int = 5
    samples: list[float] = field(default_factory=list)

    def sample(self) -> None:
        self.samples += matmul_seconds(*self.shape, repeats=self.repeats).samples

    @property
    def best_flop_s(self) -> float:
        return matmul_flop(*self.shape) / min(self.samples)

    @property
    def median_flop_s(self) -> float:
        return matmul_flop(*self.shape) / statistics.median(self.samples)


# -- one workload ----------------------------------------------------------------------------

PACKED, DENSE, PADDED, SINGLE = (
    "patchpack packed (sdpa-segments)",
    "patchpack packed (dense mask)",
    "transformers padded",
    "transformers one at a time",
)


@dataclass(frozen=True, slots=True)
class MethodResult:
    label: str
    timing: Timing
    batches: int
    computed_tokens: int
    max_abs_diff: float  # pooled outputs vs patchpack packed (sdpa-segments)
    max_rel_err: float


@dataclass(frozen=True, slots=True)
class WorkloadResult:
    workload: Workload
    prepared: list[Prepared]
    methods: list[MethodResult]
    mean_seq_len: float
    flops_per_token: float  # at mean_seq_len
    background: float | None  # CPU share other processes took during the timed rounds

    @property
    def real_tokens(self) -> int:
        return sum(p.tokens for p in self.prepared)

    def by_label(self, label: str) -> MethodResult:
        return next(m for m in self.methods if m.label == label)


def token_weighted_seq_len(lengths: Sequence[int]) -> float:
    """Mean length of the sequence a token sits in: attention FLOPs per token grow with it."""
    return sum(n * n for n in lengths) / sum(lengths)


def compare(outputs: list[np.ndarray], reference: list[np.ndarray]) -> tuple[float, float]:
    diffs = [np.abs(a - b).max() for a, b in zip(outputs, reference, strict=True)]
    rels = [
        float(np.linalg.norm(a - b)) / max(float(np.linalg.norm(b)), 1e-12)
        for a, b in zip(outputs, reference, strict=True)
    ]
    return float(max(diffs)), float(max(rels))


def run_workload(
    workload: Workload,
    loaded: LoadedModel,
    reference: torch.nn.Module,
    sizing: Sizing,
    probe: MatmulProbe,
    rng: np.random.Generator,
) -> WorkloadResult:
    log(f"{workload.name}: preprocessing {len(workload.items)} images")
    prepared = prepare_workload(workload, loaded.spec.patch_size, rng)
    device = loaded.device
    methods = [
        packed_method(
            PACKED,
            Encoder(loaded, make_backend("sdpa-segments")),
            packs(prepared, MAX_BATCH_TOKENS),
        ),
        packed_method(
            DENSE, Encoder(loaded, make_backend("dense-mask")), packs(prepared, MAX_BATCH_TOKENS)
        ),
        reference_method(
            PADDED,
            reference,
            [padded_batch(g, device) for g in padded_groups(prepared, MAX_BATCH_TOKENS)],
        ),
        reference_method(SINGLE, reference, [padded_batch([p], device) for p in prepared]),
    ]
    for m in methods:
        log(f"{workload.name}: warm-up {m.label} ({m.batches} batches)")
        m.warmup()
    probe.sample()
    before = cpu_sample()
    timings, outputs = interleaved(
        {m.label: m.run for m in methods},
        sizing.repeats,
        progress=lambda msg: log(f"{workload.name}: {msg}"),
    )
    background = background_share(before, cpu_sample())
    mean_len = token_weighted_seq_len([p.tokens for p in prepared])
    results = []
    for m in methods:
        diff, rel = compare(outputs[m.label], outputs[PACKED])
        results.append(
            MethodResult(m.label, timings[m.label], m.batches, m.computed_tokens, diff, rel)
        )
    flops = loaded.spec.flops_per_token(round(mean_len))
    return WorkloadResult(workload, prepared, results, mean_len, flops, background)


# -- attention alone -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AttentionResult:
    grids: tuple[tuple[int, int], ...]
    heads: int
    head_dim: int
    timings: dict[str, Timing]
    max_abs_diff: float


def attention_alone(spec: VisionSpec, device: torch.device, repeats: int) -> AttentionResult:
    """One attention call over one pack, backends head to head (plan built once, untimed)."""
    lengths = tuple(r * c for r, c in ATTENTION_GRIDS)
    layout = PackLayout(lengths, device)
    gen = torch.Generator().manual_seed(SEED)
    qkv = torch.randn(layout.total, 3, spec.num_heads, spec.head_dim, generator=gen).to(device)
    timings: dict[str, Timing] = {}
    outputs: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        for name in ("dense-mask", "sdpa-segments"):
            backend = make_backend(name)
            call = functools.partial(backend, qkv, backend.plan(layout), spec.head_dim**-0.5)
            outputs[name] = call()
            timings[name] = repeat(call, repeats, warmup=1)
    diff = (outputs["dense-mask"] - outputs["sdpa-segments"]).abs().max().item()
    return AttentionResult(ATTENTION_GRIDS, spec.num_heads, spec.head_dim, timings, diff)


# -- report ----------------------------------------------------------------------------------


def tokens_per_s(result: WorkloadResult, m: MethodResult) -> float:
    return result.real_tokens / m.timing.median


def workload_section(result: WorkloadResult, flop_s: float) -> str:
    ceiling = flop_s / result.flops_per_token
    padded = result.by_label(PADDED)
    single = result.by_label(SINGLE)
    rows = []
    for m in result.methods:
        tps = tokens_per_s(result, m)
        rows.append(
            (
                m.label,
                m.batches,
                f"{fmt_num(m.timing.median)} ({fmt_num(m.timing.min)}-{fmt_num(m.timing.max)})",
                fmt_num(tps),
                fmt_num(len(result.prepared) / m.timing.median),
                f"{padded.timing.median / m.timing.median:.2f}x",
                f"{single.timing.median / m.timing.median:.2f}x",
                f"{100 * (1 - result.real_tokens / m.computed_tokens):.1f}%",
                f"{100 * tps / ceiling:.0f}%",
                f"{m.max_abs_diff:.1e}",
            )
        )
    table = markdown_table(
        [
            "method",
            "batches",
            "s / pass, median (min-max)",
            "tokens/s",
            "images/s",
            "vs padded",
            "vs one at a time",
            "padding",
            "of ceiling",
            "max abs diff",
        ],
        rows,
    )
    images = markdown_table(
        ["#", "kind", "size (HxW)", "budget", "grid", "tokens"],
        [
            (
                i,
                p.spec.kind,
                f"{p.spec.height}x{p.spec.width}",
                p.spec.budget,
                f"{p.grid[0]}x{p.grid[1]}",
                p.tokens,
            )
            for i, p in enumerate(result.prepared)
        ],
    )
    return "\n".join(
        [
            f"### {result.workload.name}",
            "",
            f"{result.workload.description}. {result.real_tokens:,} real tokens; "
            f"token-weighted mean sequence length {result.mean_seq_len:.0f}; "
            f"{fmt_num(result.flops_per_token / 1e6)} MFLOP per token; "
            f"ceiling {fmt_num(ceiling)} tokens/s. Other processes took "
            f"{fmt_share(result.background)} of the machine's CPU during the timed rounds.",
            "",
            table,
            "",
            "<details><summary>images</summary>",
            "",
            images,
            "",
            "</details>",
            "",
        ]
    )


def summary_table(results: Sequence[WorkloadResult]) -> str:
    labels = [m.label for m in results[0].methods]
    rows = [
        (label, *(fmt_num(tokens_per_s(r, r.by_label(label))) for r in results)) for label in labels
    ]
    rows.append(
        (
            "**packed sdpa-segments / padded**",
            *(
                f"**{r.by_label(PADDED).timing.median / r.by_label(PACKED).timing.median:.2f}x**"
                for r in results
            ),
        )
    )
    # The fastest round of each method is the one least disturbed by other processes.
    rows.append(
        (
            "same, fastest round of each",
            *(
                f"{r.by_label(PADDED).timing.min / r.by_label(PACKED).timing.min:.2f}x"
                for r in results
            ),
        )
    )
    rows.append(("CPU taken by other processes", *(fmt_share(r.background) for r in results)))
    return markdown_table(["tokens/s", *(r.workload.name for r in results)], rows)


def attention_section(att: AttentionResult) -> str:
    lengths = [r * c for r, c in att.grids]
    dense, segments = att.timings["dense-mask"], att.timings["sdpa-segments"]
    rows = [
        (name, f"{1e3 * t.median:.1f}", f"{1e3 * t.min:.1f}-{1e3 * t.max:.1f}", len(t.samples))
        for name, t in att.timings.items()
    ]
    return "\n".join(
        [
            "## Attention alone",
            "",
            f"One self-attention call over one pack of {len(lengths)} images, "
            f"{sum(lengths):,} tokens (grids {', '.join(f'{r}x{c}' for r, c in att.grids)}), "
            f"{att.heads} heads, head_dim {att.head_dim}, fp32; the backend's plan is built "
            "once outside the timing (it is built once per forward pass, not per layer).",
            "",
            markdown_table(["backend", "ms / call, median", "min-max", "calls"], rows),
            "",
            f"sdpa-segments is {dense.median / segments.median:.1f}x faster than the dense mask; "
            f"outputs agree to {att.max_abs_diff:.1e} (max abs).",
            "",
        ]
    )


def sanity_lines(results: Sequence[WorkloadResult], weights_equal: bool) -> list[str]:
    images = sum(len(r.prepared) for r in results)
    identical = sum(p.identical for r in results for p in r.prepared)
    worst = max(
        (m.max_abs_diff, m.label, r.workload.name)
        for r in results
        for m in r.methods
        if m.label != PACKED
    )
    verdict = "PASS" if worst[0] <= PARITY_TOLERANCE else "FAIL"
    same = "identical to" if weights_equal else "DIFFERENT FROM"
    return [
        f"- weights: patchpack's `demo` tensors are {same} the transformers model's "
        "(after renaming and fusing q/k/v).",
        f"- preprocessing: {identical}/{images} images bit-identical between "
        "`app.imaging` and `Siglip2ImageProcessorPil` (same grid, same float32 patches).",
        f"- outputs: largest pooled-output difference to patchpack packed (sdpa-segments) over "
        f"all {images} images and methods: {worst[0]:.1e} ({worst[1]}, {worst[2]}); "
        f"tolerance {PARITY_TOLERANCE:.0e}: **{verdict}**.",
    ]


@dataclass(frozen=True, slots=True)
class RunInfo:
    date: str
    command: str
    facts: list[tuple[str, str]]
    load_before: str
    background: float | None  # over the whole run
    seconds: float
    model: str
    spec: VisionSpec
    probe: MatmulProbe
    sizing: Sizing
    weights_equal: bool


def render(info: RunInfo, results: Sequence[WorkloadResult], att: AttentionResult, png: str) -> str:
    m, k, n = info.probe.shape
    spec, probe = info.spec, info.probe
    return "\n".join(
        [
            "# Engine benchmark: packed SigLIP 2 vs transformers padded",
            "",
            f"- date: {info.date}",
            f"- command: `{info.command}`",
            f"- wall time of the whole run: {info.seconds:.0f} s",
            f"- shared machine: load average (1/5/15 min) before the run {info.load_before}; "
            f"other processes took {fmt_share(info.background)} of its CPU during the run "
            "(from /proc/stat less this process's own CPU time)",
            "",
            "## Machine",
            "",
            facts_table(info.facts),
            "",
            "## Setup",
            "",
            f"- model `{info.model}` ({spec.hidden_size} wide, {spec.num_layers} layers, "
            f"{spec.num_heads} heads, MLP {spec.intermediate_size}, patch {spec.patch_size}), "
            "random seeded weights, fp32 on CPU, "
            f"`MAX_BATCH_TOKENS` = {MAX_BATCH_TOKENS}.",
            f"- {PACKED}: `Encoder.run` on packs filled greedily in arrival order up to "
            f"{MAX_BATCH_TOKENS} real tokens; {DENSE}: the same packs, one SDPA call with a "
            "block-diagonal boolean mask.",
            f"- {PADDED}: `Siglip2VisionModel` (attention `sdpa`), batches in arrival order "
            f"grouped by nothing: each holds floor({MAX_BATCH_TOKENS} / largest budget) images, "
            "every image padded to that budget. Each image is resized at its *own* budget by "
            "`Siglip2ImageProcessorPil` (`max_num_patches` = its budget) so every method "
            "encodes the same pixels into the same embeddings; padding then brings it to the "
            "batch's largest budget.",
            f"- {SINGLE}: the same model, batch of 1, padded to the image's own budget.",
            "- timed: the forward passes of one pass over the workload, host copy of the "
            "pooled outputs included; preprocessing and batch assembly happen before. Each "
            "method first runs its smallest batch once (warm-up: the first forward pays "
            "one-time set-up); then "
            f"{info.sizing.repeats} rounds, each running every method once (round-robin, so "
            "background load drifts over all methods alike); the median is reported.",
            "- tokens/s and images/s count real image tokens only; padding = share of computed "
            "tokens that belong to no image; vs padded / vs one at a time = speed-up in time "
            "per pass on the same images.",
            f"- ceiling: this machine's fp32 matmul rate, `torch.mm` of ({m}x{k}) @ ({k}x{n}) "
            f"(the MLP's fc1 at a full pack), {len(probe.samples)} samples taken at the start "
            "and before each workload's timed rounds: best "
            f"**{probe.best_flop_s / 1e9:.1f} GFLOP/s** (median "
            f"{probe.median_flop_s / 1e9:.1f}; the best is the ceiling, as background load "
            "only slows samples down), divided by `VisionSpec.flops_per_token` at the "
            "workload's token-weighted mean sequence length. 'of ceiling' = tokens/s / "
            "ceiling tokens/s (useful work only).",
            "- max abs diff: largest |difference| of any pooled output element against "
            f"{PACKED} on the same image.",
            "",
            "Sanity checks:",
            "",
            *sanity_lines(results, info.weights_equal),
            "",
            "## Throughput (real tokens / s, median)",
            "",
            summary_table(results),
            "",
            f"![engine throughput]({png})",
            "",
            "## Per workload",
            "",
            *(workload_section(r, probe.best_flop_s) for r in results),
            attention_section(att),
        ]
    )


def plot(results: Sequence[WorkloadResult], path: Path, info: RunInfo) -> None:
    labels = [m.label for m in results[0].methods]
    grouped_bars(
        path,
        [r.workload.name for r in results],
        {label: [tokens_per_s(r, r.by_label(label)) for r in results] for label in labels},
        ylabel="real image tokens / s (median)",
        title=f"{info.model} fp32 CPU, MAX_BATCH_TOKENS={MAX_BATCH_TOKENS}",
        footnote=(
            f"{info.facts[0][1]}, {torch.get_num_threads()} threads; {info.date}; other "
            f"processes took {fmt_share(info.background)} of the CPU during the run"
        ),
    )


# -- main ------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.engine", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--model",
        default="demo:base",
        choices=[DEMO_PREFIX + name for name in DEMO_SPECS],
        help="a demo architecture: the baseline is rebuilt from the same seed",
    )
    parser.add_argument("--quick", action="store_true", help="a few images: a smoke test")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started, cpu_start = time.perf_counter(), cpu_sample()
    date, load_before = run_date(), load_average()
    sizing = QUICK if args.quick else FULL
    # Every core: a serving process owns its machine (or its container's CPU quota).
    torch.set_num_threads(usable_cores())
    # The allocator tuning `patchpack serve` applies; process-wide, so transformers gets it too.
    keep_freed_activations()
    device, dtype = torch.device("cpu"), torch.float32

    log(f"loading {args.model} (patchpack) and its transformers twin")
    loaded = load_model(args.model, device, dtype)
    reference = build_reference(loaded.spec, device, dtype)
    weights_equal = same_weights(loaded.module, reference, loaded.spec)
    spec = loaded.spec
    probe = MatmulProbe((MAX_BATCH_TOKENS, spec.hidden_size, spec.intermediate_size))
    log(f"matmul ceiling {probe.shape}")
    probe.sample()

    rng = np.random.default_rng(SEED)
    workloads = [
        mixed_workload(sizing.mixed, rng),
        uniform_workload(sizing.uniform, rng),
        extreme_workload(sizing.extreme, rng),
    ]
    results = [run_workload(w, loaded, reference, sizing, probe, rng) for w in workloads]
    log("attention alone")
    att = attention_alone(spec, device, sizing.attention_repeats)

    stem = "engine-quick" if args.quick else "engine"
    info = RunInfo(
        date=date,
        command=command_line("bench.engine"),
        facts=machine_facts(("torch", "transformers", "numpy", "pillow")),
        load_before=load_before,
        background=background_share(cpu_start, cpu_sample()),
        seconds=time.perf_counter() - started,
        model=args.model,
        spec=spec,
        probe=probe,
        sizing=sizing,
        weights_equal=weights_equal,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    plot(results, args.out / f"{stem}.png", info)
    report = render(info, results, att, f"{stem}.png")
    (args.out / f"{stem}.md").write_text(report + "\n")
    print(report)
    log(f"wrote {args.out / stem}.md and .png in {time.perf_counter() - started:.0f} s")
    ok = weights_equal and all(
        m.max_abs_diff <= PARITY_TOLERANCE for r in results for m in r.methods
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
