"""Helpers every benchmark shares: machine facts, workloads, timing, markdown, matmul ceiling.

Nothing here knows about the engine or the HTTP service, so the engine benchmark and the
service benchmark describe their machine, draw their images and time their calls the same way.
torch and matplotlib are imported only inside the functions that need them: a benchmark
client that only sends HTTP requests can use the rest without loading them.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")

# -- machine ---------------------------------------------------------------------------------


def run_date() -> str:
    """The date as `date` prints it, so the report reads like the shell the run came from."""
    try:
        return subprocess.run(["date"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return time.strftime("%a %b %d %H:%M:%S %Z %Y")


def command_line(module: str) -> str:
    """The command that reproduces this run (`python -m <module> <the same arguments>`)."""
    return " ".join(["python", "-m", module, *sys.argv[1:]])


def _cpuinfo_fields() -> dict[str, str]:
    """The first processor block of /proc/cpuinfo (Linux); empty elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def cpu_model() -> str:
    """CPU model name, with family/model/stepping: VMs often report only 'AMD EPYC'."""
    info = _cpuinfo_fields()
    name = info.get("model name") or platform.processor() or "unknown CPU"
    if "cpu family" in info:
        name += f" (family {info['cpu family']}, model {info.get('model', '?')}"
        name += f", stepping {info.get('stepping', '?')})"
    if "hypervisor" in info.get("flags", "").split():
        name += ", virtualized"
    return name


def usable_cores() -> int:
    """Cores this process may run on (affinity / cgroup cpusets), not the host's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def load_average() -> str:
    """1/5/15-minute load average: a shared machine's other work shows here."""
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "n/a"
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"


@dataclass(frozen=True, slots=True)
class CpuSample:
    """CPU seconds spent so far: by the whole machine (/proc/stat) and by this process."""

    machine_busy_s: float  # all CPUs, all processes, hypervisor steal included
    own_s: float  # this process and its waited-for children
    wall_s: float


def cpu_sample() -> CpuSample | None:
    """None where /proc/stat is unavailable (not Linux)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    # cpu user nice system idle iowait irq softirq steal ...: all but idle and iowait is busy.
    ticks = [int(v) for v in fields[1:9]]
    busy = sum(ticks) - ticks[3] - ticks[4]
    own = os.times()
    return CpuSample(
        machine_busy_s=busy / os.sysconf("SC_CLK_TCK"),
        own_s=own.user + own.system + own.children_user + own.children_system,
        wall_s=time.monotonic(),
    )


def background_share(start: CpuSample | None, end: CpuSample | None) -> float | None:
    """Share of the machine's CPU capacity other processes (or the hypervisor) took between
    two samples: on a shared machine, how much the timings in between were disturbed."""
    if start is None or end is None or end.wall_s <= start.wall_s:
        return None
    others = (end.machine_busy_s - start.machine_busy_s) - (end.own_s - start.own_s)
    capacity = (end.wall_s - start.wall_s) * (os.cpu_count() or 1)
    return min(1.0, max(0.0, others / capacity))


def fmt_share(share: float | None) -> str:
    return "n/a" if share is None else f"{100 * share:.0f}%"


def package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine_facts(packages: Sequence[str] = ("torch", "numpy", "pillow")) -> list[tuple[str, str]]:
    """(label, value) rows describing the machine and software a result was measured on."""
    mem = memory_gib()
    facts = [
        ("CPU", cpu_model()),
        ("cores", f"{usable_cores()} usable of {os.cpu_count()} logical"),
        ("memory", f"{mem:.1f} GiB" if mem is not None else "unknown"),
        ("OS", platform.platform()),
        ("Python", platform.python_version()),
    ]
    facts += [(name, package_version(name)) for name in packages]
    if "torch" in packages:
        import torch

        facts.append(("torch threads", str(torch.get_num_threads())))
        facts.append(("torch CPU capability", torch.backends.cpu.get_cpu_capability()))
        if torch.cuda.is_available():
            names = {torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())}
            facts.append(("GPU", ", ".join(sorted(names))))
    return facts


# -- workloads -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ImageSpec:
    """One benchmark image: its size in pixels and the token budget asked for it."""

    height: int
    width: int
    budget: int
    kind: str = "photo"


@dataclass(frozen=True, slots=True)
class Workload:
    name: str
    description: str
    items: tuple[ImageSpec, ...]


# Sizes people send, aspect ratios 1:4 .. 4:1 ([height, width]): photos, video frames,
# screenshots (a phone's 9:19.5), scans and documents.
COMMON_SIZES: tuple[tuple[int, int], ...] = (
    (480, 640),
    (640, 480),
    (768, 1024),
    (1024, 1024),
    (512, 512),
    (720, 1280),
    (1080, 1920),
    (1920, 1080),
    (2532, 1170),
    (1536, 2048),
    (1754, 1240),
    (300, 1200),
    (1200, 300),
    (2000, 500),
    (500, 2000),
)
EXTREME_BUDGETS: tuple[int, ...] = (256, 576, 729, 1024)


def _shuffled(items: list[ImageSpec], rng: np.random.Generator) -> tuple[ImageSpec, ...]:
    # Arrival order is random in a real queue: no method may profit from sorted input.
    order = rng.permutation(len(items))
    return tuple(items[i] for i in order)


def _common_size(rng: np.random.Generator) -> tuple[int, int]:
    return COMMON_SIZES[int(rng.integers(len(COMMON_SIZES)))]


def mixed_workload(n: int, rng: np.random.Generator) -> Workload:
    """1/2 of the images at budget 256, 1/3 at 729, the rest at 1024; common sizes."""
    n256, n729 = round(n / 2), round(n / 3)
    budgets = [256] * n256 + [729] * n729 + [1024] * (n - n256 - n729)
    items = [ImageSpec(*_common_size(rng), budget=b) for b in budgets]
    return Workload(
        "mixed",
        f"{n} images: {n256} at budget 256, {n729} at 729, {n - n256 - n729} at 1024; "
        "common sizes, aspect 1:4 .. 4:1",
        _shuffled(items, rng),
    )


def uniform_workload(n: int, rng: np.random.Generator) -> Workload:
    """Every image at budget 256 (retrieval traffic), common sizes."""
    items = [ImageSpec(*_common_size(rng), budget=256) for _ in range(n)]
    return Workload(
        "uniform", f"{n} images, all at budget 256; common sizes, aspect 1:4 .. 4:1", tuple(items)
    )


def _extreme_image(kind: str, budget: int, rng: np.random.Generator) -> ImageSpec:
    if kind == "receipt":  # tall, 1:3 .. 1:6
        width = int(rng.integers(380, 641))
        return ImageSpec(round(width * rng.uniform(3.0, 6.0)), width, budget, kind)
    if kind == "banner":  # 8:1 wide
        height = int(rng.integers(90, 251))
        return ImageSpec(height, 8 * height, budget, kind)
    return ImageSpec(32, 32, budget, "icon")


def extreme_workload(n: int, rng: np.random.Generator) -> Workload:
    """Receipts (1:3 .. 1:6 tall), 8:1 banners and 32x32 icons in equal shares."""
    kinds = ("receipt", "banner", "icon")
    items = [
        _extreme_image(kinds[i % len(kinds)], int(rng.choice(EXTREME_BUDGETS)), rng)
        for i in range(n)
    ]
    budgets = "/".join(str(b) for b in EXTREME_BUDGETS)
    return Workload(
        "extreme",
        f"{n} images: receipts (1:3 .. 1:6 tall), 8:1 banners, 32x32 icons; "
        f"budgets drawn from {budgets}",
        _shuffled(items, rng),
    )


def random_rgb(spec: ImageSpec, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) uint8 noise: content does not change the cost of anything benchmarked."""
    return rng.integers(0, 256, size=(spec.height, spec.width, 3), dtype=np.uint8)


# -- timing ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Timing:
    """Wall-clock seconds of repeated runs of one thing."""

    samples: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def max(self) -> float:
        return max(self.samples)


def timed(fn: Callable[[], T], sync: Callable[[], None] | None = None) -> tuple[float, T]:
    """Seconds one call of `fn` takes; `sync` (e.g. torch.cuda.synchronize) brackets it so
    asynchronous device work is inside the measurement and earlier work is not."""
    if sync is not None:
        sync()
    start = time.perf_counter()
    result = fn()
    if sync is not None:
        sync()
    return time.perf_counter() - start, result


def repeat(
    fn: Callable[[], object],
    repeats: int,
    warmup: int = 1,
    sync: Callable[[], None] | None = None,
) -> Timing:
    for _ in range(warmup):
        fn()
    return Timing(tuple(timed(fn, sync)[0] for _ in range(repeats)))


def interleaved(
    fns: Mapping[str, Callable[[], T]],
    repeats: int,
    sync: Callable[[], None] | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[dict[str, Timing], dict[str, T]]:
    """Time every function `repeats` times, round-robin (each runs once per round).

    On a shared machine the background load drifts; round-robin spreads that drift over all
    methods alike instead of penalizing whichever ran during a busy minute. Returns the
    timings and each function's result from the last round. Warm up before calling this.
    """
    samples: dict[str, list[float]] = {name: [] for name in fns}
    results: dict[str, T] = {}
    for round_ in range(repeats):
        for name, fn in fns.items():
            seconds, results[name] = timed(fn, sync)
            samples[name].append(seconds)
            if progress is not None:
                progress(f"round {round_ + 1}/{repeats} {name}: {seconds:.2f} s")
    return {name: Timing(tuple(s)) for name, s in samples.items()}, results


# -- compute ceiling -------------------------------------------------------------------------


def matmul_seconds(
    m: int,
    k: int,
    n: int,
    *,
    device: Any = "cpu",
    dtype: Any = None,
    repeats: int = 7,
    sync: Callable[[], None] | None = None,
) -> Timing:
    """Seconds per (m, k) @ (k, n) matmul: what this machine's GEMM really delivers.

    Shape it like the model's largest matmul so the ceiling reflects the kernels that run;
    FLOP/s = `matmul_flop(m, k, n)` / seconds.
    """
    import torch

    dtype = dtype or torch.float32
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(m, k, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(k, n, generator=gen).to(device=device, dtype=dtype)
    out = torch.empty(m, n, device=device, dtype=dtype)
    return repeat(lambda: torch.mm(a, b, out=out), repeats, warmup=2, sync=sync)


def matmul_flop(m: int, k: int, n: int) -> float:
    return 2.0 * m * k * n


# -- reporting -------------------------------------------------------------------------------


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table; the first column left-aligned, the others right-aligned."""
    align = [":---"] + ["---:"] * (len(headers) - 1)
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def facts_table(facts: Sequence[tuple[str, str]]) -> str:
    return markdown_table(["", ""], [(f"**{label}**", value) for label, value in facts])


def fmt_num(x: float, digits: int = 3) -> str:
    """`digits` significant digits without scientific notation for everyday magnitudes."""
    if x == 0 or not math.isfinite(x):
        return str(x)
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(x))))
    return f"{x:,.{decimals}f}"


def grouped_bars(
    path: Path,
    groups: Sequence[str],
    series: Mapping[str, Sequence[float]],
    *,
    ylabel: str,
    title: str,
    footnote: str = "",
) -> None:
    """One bar per (group, series), series side by side within a group; writes a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 1.8 * len(groups) * max(1, len(series)) / 2), 4.5))
    width = 0.8 / max(1, len(series))
    positions = np.arange(len(groups))
    for i, (label, values) in enumerate(series.items()):
        bars = ax.bar(positions + (i - (len(series) - 1) / 2) * width, values, width, label=label)
        ax.bar_label(bars, labels=[fmt_num(v, 3) for v in values], fontsize=7, padding=2)
    ax.set_xticks(positions, groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    # Headroom above the tallest bar keeps the legend off the bars.
    top = max((v for values in series.values() for v in values), default=1.0)
    ax.set_ylim(0, top * (1.15 + 0.07 * math.ceil(len(series) / 2)))
    ax.legend(fontsize=8, ncol=2, loc="upper center")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    if footnote:
        fig.text(0.01, 0.01, footnote, fontsize=7, alpha=0.7)
    fig.tight_layout(rect=(0, 0.04 if footnote else 0, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
