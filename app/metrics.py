"""Every Prometheus metric of API.md, declared once, in a registry owned by one app instance.

A registry per instance (not the process-global default) lets tests build many apps in one
process and read exact counts. Buckets are chosen for this workload: CPU forward passes take
seconds, GPU ones milliseconds, so latency buckets span 1 ms .. 2 min.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
)  # fmt: skip
_TOKEN_BUCKETS = tuple(float(2**i) for i in range(4, 16))  # 16 .. 32768 tokens
_IMAGE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_FILL_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)


class Metrics:
    def __init__(self) -> None:
        # `*_created` series double the scrape size and no dashboard reads them.
        disable_created_metrics()
        self.registry = r = CollectorRegistry()
        self.tokens = Counter("patchpack_tokens", "Patch tokens encoded", registry=r)
        self.images = Counter("patchpack_images", "Images encoded", ["strategy"], registry=r)
        self.requests = Counter(
            "patchpack_requests", "HTTP requests by status code", ["endpoint", "status"], registry=r
        )
        self.rejected = Counter(
            "patchpack_rejected", "Requests refused, by error type", ["reason"], registry=r
        )
        self.request_duration = Histogram(
            "patchpack_request_duration_seconds",
            "Whole /encode request",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "patchpack_queue_wait_seconds",
            "Per image, from queued (preprocessed) to its forward pass starting",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.preprocess = Histogram(
            "patchpack_preprocess_seconds",
            "Per image: decode + resize + patchify",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_compute = Histogram(
            "patchpack_batch_compute_seconds",
            "Per forward pass",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_tokens = Histogram(
            "patchpack_batch_tokens", "Tokens per forward pass", buckets=_TOKEN_BUCKETS, registry=r
        )
        self.batch_images = Histogram(
            "patchpack_batch_images",
            "Sequences per forward pass",
            buckets=_IMAGE_BUCKETS,
            registry=r,
        )
        self.batch_fill = Histogram(
            "patchpack_batch_fill_ratio",
            "Batch tokens / MAX_BATCH_TOKENS",
            buckets=_FILL_BUCKETS,
            registry=r,
        )
        self.padding_tokens = Counter(
            "patchpack_padding_tokens",
            "Tokens computed that belonged to no image",
            registry=r,
        )
        self.queue_tokens = Gauge(
            "patchpack_queue_tokens", "Admitted tokens not yet encoded", registry=r
        )
        self.queue_images = Gauge("patchpack_queue_images", "Images waiting", registry=r)
        self.ready = Gauge("patchpack_ready", "1 when ready to serve", registry=r)

    def record_batch(
        self, tokens: int, sequences: int, max_batch_tokens: int, seconds: float
    ) -> None:
        self.batch_compute.observe(seconds)
        self.batch_tokens.observe(tokens)
        self.batch_images.observe(sequences)
        self.batch_fill.observe(tokens / max_batch_tokens)
