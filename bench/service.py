"""HTTP service under load: a real `patchpack serve` process driven at rising concurrency.

    python -m bench.service [--model demo:base] [--levels 1,4,16,32] [--seconds 30] [--quick]

For each concurrency level, that many clients send one-image requests of the mixed workload
(JPEG bytes, raw `image/jpeg` bodies) back to back for a bounded time. Tokens per second come
from the server's own `/metrics` (`patchpack_tokens_total` before and after); latency and
status counts from the clients. In the same run, the engine alone (`Encoder.run` on packs of
`MAX_BATCH_TOKENS`, in this process, after the server has stopped) encodes the same images, so
the service/engine ratio compares like with like. Loopback only; bounded in requests and time.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from bench.common import (
    command_line,
    facts_table,
    fmt_num,
    load_average,
    machine_facts,
    markdown_table,
    mixed_workload,
    random_rgb,
    run_date,
    timed,
)

MAX_BATCH_TOKENS = 4096
JPEG_QUALITY = 90


def log(message: str) -> None:
    print(f"[bench.service] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True, slots=True)
class BenchImage:
    jpeg: bytes
    budget: int


@dataclass(frozen=True, slots=True)
class LevelResult:
    concurrency: int
    seconds: float
    requests: int
    statuses: dict[int, int]
    tokens: float
    batches: float
    batch_images: float
    latencies_s: tuple[float, ...]
    # (image index, seconds) per successful request, to compare with that image's own pass
    per_image: tuple[tuple[int, float], ...] = ()
    # Mean per-request stage times in ms, from the responses' timings_ms.
    stages_ms: dict[str, float] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def images_per_s(self) -> float:
        return self.statuses.get(200, 0) / self.seconds

    def latency(self, q: float) -> float:
        return float(np.quantile(self.latencies_s, q)) if self.latencies_s else float("nan")


def make_images(n: int, seed: int) -> list[BenchImage]:
    rng = np.random.default_rng(seed)
    images = []
    for spec in mixed_workload(n, rng).items:
        buf = io.BytesIO()
        Image.fromarray(random_rgb(spec, rng)).save(buf, "JPEG", quality=JPEG_QUALITY)
        images.append(BenchImage(buf.getvalue(), spec.budget))
    return images


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_server(model: str, port: int, max_wait_ms: float) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env.update(
        PATCHPACK_MODEL=model,
        PATCHPACK_PORT=str(port),
        PATCHPACK_MAX_BATCH_TOKENS=str(MAX_BATCH_TOKENS),
        PATCHPACK_MAX_WAIT_MS=str(max_wait_ms),
        PATCHPACK_LOG_LEVEL="warning",
    )
    return subprocess.Popen([sys.executable, "-m", "app.cli", "serve"], env=env)


def wait_ready(base: str, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    give_up = time.monotonic() + timeout_s
    while time.monotonic() < give_up:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready")
        try:
            if httpx.get(base + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server not ready after {timeout_s} s")


def scrape(base: str) -> dict[str, float]:
    """Counter and histogram sums/counts of interest, from the server's /metrics."""
    text = httpx.get(base + "/metrics", timeout=10).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in (
                "patchpack_tokens_total",
                "patchpack_batch_images_sum",
                "patchpack_batch_images_count",
                "patchpack_batch_compute_seconds_sum",
            ):
                out[sample.name] = out.get(sample.name, 0.0) + sample.value
    return out


STAGES = ("queue", "preprocess", "compute", "total")


async def drive(
    base: str, images: Sequence[BenchImage], concurrency: int, seconds: float, max_requests: int
) -> tuple[float, Counter[int], list[tuple[int, float]], list[dict[str, float]]]:
    """`concurrency` clients, each sending requests back to back until time or count runs out."""
    statuses: Counter[int] = Counter()
    latencies: list[tuple[int, float]] = []
    timings: list[dict[str, float]] = []
    sent = 0
    stop_at = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=300, limits=limits) as client:

        async def client_loop(worker: int) -> None:
            nonlocal sent
            i = worker
            while time.monotonic() < stop_at and sent < max_requests:
                sent += 1
                index = i % len(images)
                image = images[index]
                i += concurrency
                start = time.perf_counter()
                response = await client.post(
                    "/encode",
                    content=image.jpeg,
                    headers={"content-type": "image/jpeg"},
                    params={"token_budget": image.budget},
                )
                statuses[response.status_code] += 1
                if response.status_code == 200:
                    latencies.append((index, time.perf_counter() - start))
                    timings.append(response.json()["timings_ms"])
                elif response.status_code == 429:
                    await asyncio.sleep(float(response.headers.get("retry-after", "1")))

        started = time.perf_counter()
        await asyncio.gather(*(client_loop(w) for w in range(concurrency)))
        elapsed = time.perf_counter() - started
    return elapsed, statuses, latencies, timings


def run_level(
    base: str, images: Sequence[BenchImage], concurrency: int, seconds: float, max_requests: int
) -> LevelResult:
    before = scrape(base)
    elapsed, statuses, latencies, timings = asyncio.run(
        drive(base, images, concurrency, seconds, max_requests)
    )
    stages = {k: float(np.mean([t[k] for t in timings])) for k in STAGES} if timings else {}
    after = scrape(base)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    return LevelResult(
        concurrency,
        elapsed,
        sum(statuses.values()),
        dict(statuses),
        delta("patchpack_tokens_total"),
        delta("patchpack_batch_images_count"),
        delta("patchpack_batch_images_sum"),
        tuple(seconds for _, seconds in latencies),
        tuple(latencies),
        stages,
    )


@dataclass(frozen=True, slots=True)
class EngineResult:
    tokens_per_s: float
    alone_s: tuple[float, ...]  # per image: one forward pass of it alone
    preprocess_s: tuple[float, ...]  # per image: decode + resize + patchify
    mean_tokens: float


def engine_tokens_per_s(model: str, images: Sequence[BenchImage], repeats: int) -> EngineResult:
    """The engine alone on the same images: packs of MAX_BATCH_TOKENS, preprocessing untimed."""
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
    inputs, preprocess_s = [], []
    for image in images:
        start = time.perf_counter()
        rgb = decode(image.jpeg, 10**9)
        plan = plan_image(SizeRequest(rgb.height, rgb.width, image.budget), p)
        inputs.append(EncodeInput(patchify(rgb, plan, p), plan.grids))
        preprocess_s.append(time.perf_counter() - start)
    packs: list[list[EncodeInput]] = [[]]
    for x in inputs:
        if sum(i.tokens for i in packs[-1]) + x.tokens > MAX_BATCH_TOKENS:
            packs.append([])
        packs[-1].append(x)
    encoder.run(packs[0])  # warm-up
    # Each image alone: what one request costs the device at low load.
    alone_s = [min(timed(lambda x=x: encoder.run([x]))[0] for _ in range(2)) for x in inputs]
    rates = []
    for _ in range(repeats):
        seconds = sum(timed(lambda pack=pack: encoder.run(pack))[0] for pack in packs)
        rates.append(sum(x.tokens for x in inputs) / seconds)
    return EngineResult(
        float(np.median(rates)),
        tuple(alone_s),
        tuple(preprocess_s),
        float(np.mean([x.tokens for x in inputs])),
    )


def plot(results: Sequence[LevelResult], engine_tps: float, path: Path, footnote: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = [r.concurrency for r in results]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.2))
    ax1.plot(levels, [r.tokens_per_s for r in results], "o-", label="service (from /metrics)")
    ax1.axhline(engine_tps, color="gray", linestyle="--", label="engine alone")
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("concurrent clients")
    ax1.set_ylabel("tokens / s")
    ax1.set_title("Throughput")
    ax1.legend()
    ax1.grid(alpha=0.3)
    ax2.plot(levels, [r.latency(0.5) for r in results], "o-", label="p50")
    ax2.plot(levels, [r.latency(0.99) for r in results], "s-", label="p99")
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("concurrent clients")
    ax2.set_ylabel("seconds")
    ax2.set_title("Request latency")
    ax2.legend()
    ax2.grid(alpha=0.3)
    # Where a request's time goes, by stage (server-side timings_ms, mean per request).
    labels = [str(level) for level in levels]
    bottom = np.zeros(len(results))
    for stage in ("preprocess", "queue", "compute"):
        values = np.array([r.stages_ms.get(stage, 0.0) / 1000 for r in results])
        ax3.bar(labels, values, bottom=bottom, label=stage)
        bottom += values
    other = np.array([r.stages_ms.get("total", 0.0) / 1000 for r in results]) - bottom
    ax3.bar(labels, np.maximum(other, 0), bottom=bottom, label="other (HTTP, sizing)")
    ax3.set_xlabel("concurrent clients")
    ax3.set_ylabel("seconds per request (mean)")
    ax3.set_title("Time split by stage")
    ax3.legend(fontsize=8)
    ax3.grid(axis="y", alpha=0.3)
    fig.text(0.01, 0.01, footnote, fontsize=7, alpha=0.7)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render(
    args: argparse.Namespace,
    results: Sequence[LevelResult],
    engine: EngineResult,
    png: str,
    date: str,
) -> str:
    saturated = max(results, key=lambda r: r.tokens_per_s)
    low = results[0]
    rows = [
        (
            r.concurrency,
            r.requests,
            r.statuses.get(200, 0),
            r.statuses.get(429, 0),
            sum(v for k, v in r.statuses.items() if k not in (200, 429)),
            fmt_num(r.tokens_per_s),
            fmt_num(r.images_per_s),
            fmt_num(r.latency(0.5)),
            fmt_num(r.latency(0.99)),
            fmt_num(r.batch_images / r.batches) if r.batches else "-",
            f"{r.tokens_per_s / engine.tokens_per_s:.0%}",
            *(fmt_num(r.stages_ms.get(k, float("nan"))) for k in STAGES),
        )
        for r in results
    ]
    # Low load: each request against its own image's forward pass (plus MAX_WAIT_MS), the
    # smallest latency the service could have given it.
    wait_s = args.max_wait_ms / 1000
    overheads = [seconds - engine.alone_s[i] for i, seconds in low.per_image]
    # What the service adds beyond the two stages a lone request cannot overlap.
    residuals = [
        seconds - engine.alone_s[i] - engine.preprocess_s[i] for i, seconds in low.per_image
    ]
    bound = wait_s + float(np.median([engine.alone_s[i] for i, _ in low.per_image]))
    lines = [
        "# Service benchmark",
        "",
        f"- date: {date}",
        f"- command: `{command_line('bench.service')}`",
        f"- model: `{args.model}` (random weights), fp32 CPU, "
        f"`MAX_BATCH_TOKENS={MAX_BATCH_TOKENS}`, `MAX_WAIT_MS={args.max_wait_ms}`",
        f"- workload: {args.images_desc}; one image per request as a raw `image/jpeg` body",
        f"- load average at the end: {load_average()}",
        "",
        facts_table(machine_facts()),
        "",
        f"![throughput and latency]({png})",
        "",
        markdown_table(
            [
                "clients",
                "requests",
                "200",
                "429",
                "other",
                "tokens/s",
                "images/s",
                "p50 s",
                "p99 s",
                "images/batch",
                "of engine",
                *(f"{k} ms" for k in STAGES),
            ],
            rows,
        ),
        "",
        "## Against the engine alone (same images, same run)",
        "",
        f"- engine alone: {fmt_num(engine.tokens_per_s)} tokens/s "
        f"(packs of {MAX_BATCH_TOKENS} tokens, preprocessing not timed; mean "
        f"{fmt_num(engine.mean_tokens)} tokens per image)",
        f"- service at saturation ({saturated.concurrency} clients): "
        f"{fmt_num(saturated.tokens_per_s)} tokens/s = "
        f"**{saturated.tokens_per_s / engine.tokens_per_s:.1%} of the engine** "
        "(target >= 90%)",
        f"- p50 latency at {low.concurrency} client(s): {fmt_num(low.latency(0.5))} s, against "
        f"MAX_WAIT_MS + the median single-image forward pass of the same requests = "
        f"{fmt_num(bound)} s. Per request, latency minus that image's own forward pass "
        f"(measured alone in this run): p50 {fmt_num(float(np.median(overheads)) * 1000)} ms; "
        "minus that image's own preprocessing too (which a lone request cannot overlap): p50 "
        f"{fmt_num(float(np.median(residuals)) * 1000)} ms, of which MAX_WAIT_MS is "
        f"{fmt_num(args.max_wait_ms)} ms.",
        f"- preprocessing (decode + resize + patchify) per image, mean: "
        f"{fmt_num(float(np.mean(engine.preprocess_s)) * 1000)} ms",
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo:base")
    parser.add_argument("--levels", default="1,4,16,32", help="client counts, comma-separated")
    parser.add_argument("--seconds", type=float, default=40.0, help="per level")
    parser.add_argument("--max-requests", type=int, default=2000, help="per level")
    parser.add_argument("--images", type=int, default=48, help="distinct images in the workload")
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--engine-repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny model, short levels")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.levels, args.seconds, args.images = "demo:tiny", "1,8", 5.0, 12
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    levels = [int(x) for x in args.levels.split(",")]
    images = make_images(args.images, seed=0)
    args.images_desc = mixed_workload(args.images, np.random.default_rng(0)).description
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log(f"starting {args.model} on port {port}")
    proc = start_server(args.model, port, args.max_wait_ms)
    results = []
    try:
        wait_ready(base, proc, timeout_s=300)
        for concurrency in levels:
            log(f"{concurrency} clients for up to {args.seconds:.0f} s")
            result = run_level(base, images, concurrency, args.seconds, args.max_requests)
            log(
                f"  {fmt_num(result.tokens_per_s)} tokens/s, p50 {fmt_num(result.latency(0.5))} s,"
                f" statuses {result.statuses}"
            )
            results.append(result)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
    log("engine alone on the same images")
    engine = engine_tokens_per_s(args.model, images, args.engine_repeats)
    stem = "service_quick" if args.quick else "service"
    png = f"{stem}.png"
    date = run_date()
    plot(results, engine.tokens_per_s, args.out / png, f"{date} | {command_line('bench.service')}")
    report = render(args, results, engine, png, date)
    (args.out / f"{stem}.md").write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
