"""Every CPU benchmark in one command (`make bench`), each in its own process so no
process-wide setting (threads, allocator) leaks from one into the next.

    python -m bench.all [--quick]

Writes bench/results/{engine,service,preprocess,profile}.md and their PNGs.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Sequence

BENCHMARKS = ("bench.engine", "bench.service", "bench.preprocess", "bench.profile")


def main(argv: Sequence[str] | None = None) -> int:
    extra = list(sys.argv[1:] if argv is None else argv)
    started = time.perf_counter()
    failed = []
    for module in BENCHMARKS:
        print(f"[bench.all] {module} {' '.join(extra)}", file=sys.stderr, flush=True)
        begin = time.perf_counter()
        code = subprocess.call([sys.executable, "-m", module, *extra], stdout=subprocess.DEVNULL)
        print(
            f"[bench.all] {module}: exit {code} after {time.perf_counter() - begin:.0f} s",
            file=sys.stderr,
            flush=True,
        )
        if code:
            failed.append(module)
    print(f"[bench.all] done in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    if failed:
        print(f"[bench.all] failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
