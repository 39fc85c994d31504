"""GPU check: parity and speed of every CUDA attention backend, in bf16 at demo:base.

    python -m bench.gpu_check [--images 96] [--repeats 5] [--out FILE.md]

1. parity: each backend of `available_backends(cuda, bfloat16)` (plus sdpa-segments) against
   transformers' `Siglip2VisionModel` in fp32 on the same GPU: the relative error of every
   image's pooled output must stay within 2e-2 (PASS/FAIL; any FAIL exits 1);
2. speed: each backend packed at MAX_BATCH_TOKENS=16384 against transformers padded in bf16
   (SDPA) on the mixed workload; CUDA events, synchronized around every measurement;
3. the GPU's bf16 matmul rate, and each method's MFU against it;
4. GPU-side resize + patchify against the bit-exact CPU path.
Without CUDA it prints "no CUDA device: gpu_check skipped" and exits 0.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from app.engine.attention import available_backends, make_backend
from app.engine.encoder import Encoder
from app.engine.loader import LoadedModel, load_model
from app.imaging.sizing import SizeRequest, plan_image
from bench.common import (
    Timing,
    Workload,
    command_line,
    facts_table,
    fmt_num,
    machine_facts,
    markdown_table,
    mixed_workload,
    random_rgb,
    run_date,
)
from bench.engine import (
    Method,
    Prepared,
    build_reference,
    compare,
    packed_method,
    packs,
    padded_batch,
    padded_groups,
    prepare_workload,
    reference_method,
    token_weighted_seq_len,
)

MODEL = "demo:base"
MAX_BATCH_TOKENS = 16384
REL_TOLERANCE = 2e-2
SEED = 0


def log(message: str) -> None:
    print(f"[bench.gpu_check] {message}", file=sys.stderr, flush=True)


# -- CUDA timing -----------------------------------------------------------------------------


def cuda_timing(fn: Callable[[], object], repeats: int, warmup: int = 1, inner: int = 1) -> Timing:
    """Seconds per call of `fn` by CUDA events; `inner` calls per sample for tiny kernels.

    The device is synchronized before each sample so no earlier work is counted, and the end
    event is waited on so all of this work is.
    """
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / inner)
    return Timing(tuple(samples))


def matmul_shape(loaded: LoadedModel) -> tuple[int, int, int]:
    return MAX_BATCH_TOKENS, loaded.spec.hidden_size, loaded.spec.intermediate_size


def bf16_matmul_flops(m: int, k: int, n: int, repeats: int = 10) -> float:
    gen = torch.Generator().manual_seed(SEED)
    a = torch.randn(m, k, generator=gen).to("cuda", torch.bfloat16)
    b = torch.randn(k, n, generator=gen).to("cuda", torch.bfloat16)
    out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    timing = cuda_timing(lambda: torch.mm(a, b, out=out), repeats, warmup=3, inner=20)
    return 2.0 * m * k * n / timing.median


# -- checks ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outcome:
    label: str
    timing: Timing | None
    max_rel_err: float | None  # None: not a parity subject (the bf16 baseline)
    error: str = ""

    @property
    def passed(self) -> bool:
        if self.error:
            return False
        return self.max_rel_err is None or self.max_rel_err <= REL_TOLERANCE


def backend_names() -> list[str]:
    names = available_backends(torch.device("cuda"), torch.bfloat16)
    return list(dict.fromkeys([*names, "sdpa-segments"]))  # ordered, no duplicates


def run_method(method: Method, reference: list[np.ndarray] | None, repeats: int) -> Outcome:
    """Parity on the first (warm-up) pass, then the timed passes."""
    outputs = method.run()
    rel = compare(outputs, reference)[1] if reference is not None else None
    timing = cuda_timing(method.run, repeats, warmup=0)
    return Outcome(method.label, timing, rel)


def check_backend(
    name: str, loaded: LoadedModel, prepared: list[Prepared], ref: list[np.ndarray], repeats: int
) -> Outcome:
    try:
        backend = make_backend(name)
    except ImportError as exc:  # listed by find_spec but unusable (e.g. a broken wheel)
        return Outcome(f"patchpack packed ({name})", None, None, f"{type(exc).__name__}: {exc}")
    method = packed_method(
        f"patchpack packed ({name})", Encoder(loaded, backend), packs(prepared, MAX_BATCH_TOKENS)
    )
    method.warmup()
    return run_method(method, ref, repeats)


def gpu_resize_line(workload: Workload, patch: int, repeats: int) -> str:
    """Images/s of resize + patchify on the GPU (`device_resize.patchify_tensor`) against the
    bit-exact CPU path (`patchify.patchify`, one core), on the same decoded images, and how
    far apart their uint8 levels land."""
    import time

    from PIL import Image

    from app.imaging.device_resize import patchify_tensor
    from app.imaging.patchify import patchify

    log("timing GPU-side resize")
    rng = np.random.default_rng(SEED)
    images = [random_rgb(s, rng) for s in workload.items]
    plans = [plan_image(SizeRequest(s.height, s.width, s.budget), patch) for s in workload.items]
    on_gpu = [torch.from_numpy(a).cuda() for a in images]
    timing = cuda_timing(
        lambda: [
            patchify_tensor(px, plan.size, patch) for px, plan in zip(on_gpu, plans, strict=True)
        ],
        repeats,
    )
    pil = [Image.fromarray(a) for a in images]
    start = time.perf_counter()
    cpu = [patchify(im, plan, patch) for im, plan in zip(pil, plans, strict=True)]
    cpu_s = time.perf_counter() - start
    worst = 0.0
    for px, plan, ref in zip(on_gpu, plans, cpu, strict=True):
        got = patchify_tensor(px, plan.size, patch).cpu().numpy()
        worst = max(worst, float(np.abs(got - ref).max()) * 127.5)
    gpu_rate = len(images) / timing.median
    cpu_rate = len(images) / cpu_s
    return (
        f"Resize + patchify, {len(images)} images of the workload: GPU "
        f"{fmt_num(gpu_rate)} images/s vs CPU (one core, bit-exact PIL path) "
        f"{fmt_num(cpu_rate)} images/s = {gpu_rate / cpu_rate:.1f}x; largest difference "
        f"{worst:.1f} uint8 levels."
    )


# -- report ----------------------------------------------------------------------------------


def render(
    outcomes: Sequence[Outcome],
    prepared: Sequence[Prepared],
    loaded: LoadedModel,
    matmul_flop_s: float,
    resize_line: str,
) -> str:
    m, k, n = matmul_shape(loaded)
    tokens = sum(p.tokens for p in prepared)
    flops_per_token = loaded.spec.flops_per_token(
        round(token_weighted_seq_len([p.tokens for p in prepared]))
    )
    baseline = next(o for o in outcomes if o.max_rel_err is None and o.timing is not None)
    assert baseline.timing is not None
    rows = []
    for o in outcomes:
        if o.timing is None:
            rows.append((o.label, "-", "-", "-", "-", "-", f"FAIL ({o.error})"))
            continue
        tps = tokens / o.timing.median
        rel = "-" if o.max_rel_err is None else f"{o.max_rel_err:.1e}"
        verdict = "-" if o.max_rel_err is None else ("PASS" if o.passed else "FAIL")
        rows.append(
            (
                o.label,
                f"{1e3 * o.timing.median:.1f}",
                fmt_num(tps),
                f"{baseline.timing.median / o.timing.median:.2f}x",
                f"{100 * tps * flops_per_token / matmul_flop_s:.0f}%",
                rel,
                verdict,
            )
        )
    table = markdown_table(
        ["method", "ms / pass", "tokens/s", "vs padded bf16", "MFU", "max rel err", "parity"],
        rows,
    )
    return "\n".join(
        [
            "# GPU check: packed SigLIP 2 in bf16",
            "",
            f"- date: {run_date()}",
            f"- command: `{command_line('bench.gpu_check')}`",
            "",
            facts_table(machine_facts(("torch", "transformers", "flash-attn"))),
            "",
            f"`{MODEL}` in bf16, mixed workload: {len(prepared)} images, {tokens:,} real tokens, "
            f"packs of up to {MAX_BATCH_TOKENS} tokens; parity against transformers fp32 on the "
            f"same GPU (max over images of the pooled output's relative L2 error, tolerance "
            f"{REL_TOLERANCE:.0e}). bf16 matmul rate: {fmt_num(matmul_flop_s / 1e12)} TFLOP/s "
            f"(median, {m}x{k} @ {k}x{n}, the MLP's fc1 at a full pack); "
            "MFU = tokens/s x `VisionSpec.flops_per_token` / that rate.",
            "",
            table,
            "",
            resize_line,
        ]
    )


# -- main ------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check")
    parser.add_argument("--images", type=int, default=96, help="images in the mixed workload")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, help="also write the markdown report here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: gpu_check skipped")
        return 0
    # A true fp32 reference: no TF32 in its matmuls.
    torch.set_float32_matmul_precision("highest")
    device = torch.device("cuda")
    log(f"loading {MODEL} (bf16) and transformers references (fp32, bf16)")
    loaded = load_model(MODEL, device, torch.bfloat16)
    ref_fp32 = build_reference(loaded.spec, device, torch.float32)
    ref_bf16 = build_reference(loaded.spec, device, torch.bfloat16)

    rng = np.random.default_rng(SEED)
    workload = mixed_workload(args.images, rng)
    prepared = prepare_workload(workload, loaded.spec.patch_size, rng)
    groups = padded_groups(prepared, MAX_BATCH_TOKENS)
    log("fp32 reference outputs")
    fp32 = reference_method("fp32", ref_fp32, [padded_batch(g, device) for g in groups])
    reference = fp32.run()
    del ref_fp32, fp32
    torch.cuda.empty_cache()

    outcomes = []
    for name in backend_names():
        log(f"backend {name}")
        outcomes.append(check_backend(name, loaded, prepared, reference, args.repeats))
    log("transformers padded bf16")
    padded = reference_method(
        "transformers padded bf16 (sdpa)",
        ref_bf16,
        [padded_batch(g, device) for g in groups],
    )
    padded.warmup()
    outcomes.append(run_method(padded, None, args.repeats))

    log("bf16 matmul rate")
    flop_s = bf16_matmul_flops(*matmul_shape(loaded))
    resize = gpu_resize_line(workload, loaded.spec.patch_size, args.repeats)
    report = render(outcomes, prepared, loaded, flop_s, resize)
    print(report)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report + "\n")
    print()
    for o in outcomes:
        if o.max_rel_err is not None or o.error:
            detail = o.error or f"max relative error {o.max_rel_err:.2e}"
            print(f"{'PASS' if o.passed else 'FAIL'}: {o.label}: {detail}")
    ok = all(o.passed for o in outcomes)
    print(f"gpu_check: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
