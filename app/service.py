"""The encode service: everything between a parsed request and its per-image results.

It owns the pipeline's moving parts (model loading, preprocessing pool, admission, queue,
stager, device thread), their lifecycle (loading -> warming -> ready -> draining, or dead),
and the one async entry point the HTTP layer awaits: `encode`. It knows nothing of HTTP.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from app.batching.batcher import Batcher
from app.batching.queue import Admission, ImageResult, QueuedImage, Ticket, WorkQueue
from app.engine.attention import choose_backend
from app.engine.encoder import EncodeInput, Encoder
from app.engine.loader import LoadedModel, load_model, resolve_device, resolve_dtype
from app.engine.runtime import keep_freed_activations
from app.engine.worker import DeviceWorker
from app.errors import (
    DeadlineExceeded,
    InternalError,
    InvalidImage,
    InvalidRequest,
    NotReady,
    Overloaded,
    PatchpackError,
)
from app.imaging.decode import decode, probe
from app.imaging.patchify import patchify
from app.imaging.sizing import ImagePlan, SizeRequest, SizingError, Strategy, plan_image
from app.metrics import Metrics
from app.settings import Settings

log = logging.getLogger(__name__)

# Added to twice REQUEST_TIMEOUT_S: how long a request may wait on work already running.
GUARD_GRACE_S = 5.0


class State(StrEnum):
    LOADING = "loading"
    WARMING = "warming"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"
    FAILED = "failed"  # the model could not be loaded
    DEAD = "dead"  # the device thread died


@dataclass(frozen=True, slots=True)
class ImageSpec:
    """One image of a request as the HTTP layer received it, with its own overrides."""

    data: bytes | None = None
    base64: str | None = None
    url: str | None = None
    token_budget: int | None = None
    min_pixels: int | None = None
    max_pixels: int | None = None


@dataclass(frozen=True, slots=True)
class EncodeOptions:
    token_budget: int | None = None
    min_pixels: int | None = None
    max_pixels: int | None = None
    strategy: Strategy = Strategy.NAFLEX
    max_tiles: int = 4
    return_tokens: bool = False


@dataclass(frozen=True, slots=True)
class EncodedImage:
    index: int
    plan: ImagePlan
    pooled: np.ndarray  # (sequences, D): one row, or one per tile then the thumbnail
    tokens: np.ndarray | None
    preprocess_s: float
    queue_s: float
    compute_s: float


@dataclass(frozen=True, slots=True)
class _Admitted:
    index: int
    data: bytes
    plan: ImagePlan


def _decode_base64(text: str) -> bytes:
    if text.startswith("data:"):
        header, sep, text = text.partition(",")
        if not sep or not header.endswith(";base64"):
            raise InvalidImage("data URI must be of the form data:<type>;base64,<data>")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidImage("image is not valid base64") from exc


class EncodeService:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.state = State.LOADING
        self.model: LoadedModel | None = None
        self.encoder: Encoder | None = None
        self.worker: DeviceWorker | None = None
        self.batcher: Batcher | None = None
        self.on_fatal: Callable[[BaseException], None] = lambda _: None
        self.admission = Admission(settings.queue_tokens, on_change=metrics.queue_tokens.set)
        self.work = WorkQueue(
            settings.batch_tokens,
            settings.max_wait_ms / 1000,
            on_size=metrics.queue_images.set,
        )
        workers = settings.preprocess_workers or os.cpu_count() or 1
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="patchpack-preprocess")
        # Tokens per second of recent forward passes, for Retry-After; None until measured.
        self._tokens_per_s: float | None = None
        self._loader: threading.Thread | None = None
        self._resize_on_device = False

    # -- lifecycle ----------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.state is State.READY

    @property
    def alive(self) -> bool:
        if self.state in (State.FAILED, State.DEAD):
            return False
        if self.worker is not None and self.state in (State.READY, State.DRAINING):
            return self.worker.alive
        return True

    def _set_state(self, state: State) -> None:
        self.state = state
        self.metrics.ready.set(1 if state is State.READY else 0)
        log.info("service state: %s", state)

    def start(self) -> None:
        """Load, warm up and start the device thread in the background."""
        self._set_state(State.LOADING)
        self._loader = threading.Thread(target=self._load, name="patchpack-loader", daemon=True)
        self._loader.start()

    def _load(self) -> None:
        try:
            import torch

            if self.settings.torch_threads:
                torch.set_num_threads(self.settings.torch_threads)
            keep_freed_activations()
            device = resolve_device(self.settings.device)
            dtype = resolve_dtype(self.settings.dtype, device)
            self.model = load_model(self.settings.model, device, dtype)
            attention = choose_backend(self.settings.attention, device, dtype)
            self.encoder = Encoder(self.model, attention)
            setting = self.settings.resize_device
            self._resize_on_device = setting == "model" or (
                setting == "auto" and device.type == "cuda"
            )
            if self.settings.warmup:
                self._set_state(State.WARMING)
                self.encoder.warmup(self.settings.batch_tokens)
            self.batcher = Batcher(self.work, stage=self.encoder.stage)
            self.batcher.on_death = self._on_worker_death
            self.worker = DeviceWorker(
                self.encoder, self.batcher, on_death=self._on_worker_death, on_batch=self._on_batch
            )
            self.batcher.start()
            self.worker.start()
            if self.state in (State.LOADING, State.WARMING):
                self._set_state(State.READY)
        except BaseException as exc:
            log.critical("could not start the model: %s", exc)
            self._set_state(State.FAILED)
            self.on_fatal(exc)

    def _on_batch(self, inputs: Sequence[EncodeInput], seconds: float) -> None:
        tokens = sum(x.tokens for x in inputs)
        sequences = sum(len(x.grids) for x in inputs)
        self.metrics.record_batch(tokens, sequences, self.settings.batch_tokens, seconds)
        rate = tokens / seconds if seconds > 0 else None
        if rate is not None:
            prev = self._tokens_per_s
            self._tokens_per_s = rate if prev is None else 0.8 * prev + 0.2 * rate

    def _on_worker_death(self, error: BaseException) -> None:
        self._set_state(State.DEAD)
        dead = NotReady("the device worker stopped; the service cannot encode")
        self.work.close(dead)
        if self.batcher is not None:
            # Not just the slot: the stager may hold a packed batch it would put there next.
            self.batcher.abort(dead)

    def begin_drain(self) -> None:
        """Stop taking new work (readiness drops at once); admitted work carries on."""
        if self.state in (State.READY, State.LOADING, State.WARMING):
            self._set_state(State.DRAINING)
        # Nothing new can join a partial batch any more: waiting for a fuller one is moot.
        self.work.flush()

    async def drain(self, timeout: float) -> None:
        """Refuse new work, let admitted work finish (up to `timeout`), then stop threads."""
        self.begin_drain()
        give_up = time.monotonic() + timeout
        while self.admission.tokens > 0 and time.monotonic() < give_up and self.alive:
            await asyncio.sleep(0.02)
        await asyncio.get_running_loop().run_in_executor(None, self._stop_threads)
        if self.state is State.DRAINING:
            self._set_state(State.STOPPED)

    def _stop_threads(self) -> None:
        self.work.close()
        if self.batcher is not None:
            self.batcher.stop(5)
            self.batcher.drain_slot(NotReady("the service is shutting down"))
        if self.worker is not None:
            self.worker.stop(30)
        self.pool.shutdown(wait=True, cancel_futures=False)

    # -- encode -------------------------------------------------------------------------
    def _check_ready(self) -> None:
        if self.state is not State.READY:
            raise NotReady(f"the service is not ready ({self.state})")

    def retry_after_s(self) -> int:
        rate = self._tokens_per_s
        if not rate:
            return 1
        return max(1, min(60, math.ceil(self.admission.tokens / rate)))

    def _size(self, index: int, spec: ImageSpec, data: bytes, options: EncodeOptions) -> _Admitted:
        assert self.model is not None
        height, width = probe(data, self.settings.max_image_pixels)
        budget = spec.token_budget or options.token_budget or self.settings.default_token_budget
        request = SizeRequest(
            height,
            width,
            budget,
            spec.min_pixels if spec.min_pixels is not None else options.min_pixels,
            spec.max_pixels if spec.max_pixels is not None else options.max_pixels,
            options.strategy,
            options.max_tiles,
        )
        try:
            plan = plan_image(request, self.model.spec.patch_size)
        except SizingError as exc:
            raise InvalidRequest(str(exc)) from exc
        if plan.tokens > self.settings.batch_tokens:
            raise InvalidRequest(
                f"image needs {plan.tokens} tokens, more than one forward pass holds "
                f"(MAX_BATCH_TOKENS={self.settings.batch_tokens}); lower token_budget or max_tiles"
            )
        return _Admitted(index, data, plan)

    def _bytes_and_size(self, index: int, spec: ImageSpec, options: EncodeOptions) -> _Admitted:
        try:
            data = spec.data if spec.data is not None else _decode_base64(spec.base64 or "")
            return self._size(index, spec, data, options)
        except PatchpackError as exc:
            raise exc.at(index) from exc.__cause__

    def _preprocess(self, item: _Admitted, ticket: Ticket, return_tokens: bool) -> None:
        if ticket.abandoned:
            ticket.fail(asyncio.CancelledError())
            return
        assert self.model is not None
        start = time.perf_counter()
        try:
            image = decode(item.data, self.settings.max_image_pixels)
            if self._resize_on_device and item.plan.strategy is not Strategy.ANYRES:
                # Only the decode stays on the CPU; the device thread resizes while staging.
                encode_input = EncodeInput(
                    None, item.plan.grids, return_tokens, pixels=np.array(image)
                )
            else:
                patches = patchify(image, item.plan, self.model.spec.patch_size)
                encode_input = EncodeInput(patches, item.plan.grids, return_tokens)
        except PatchpackError as exc:
            ticket.fail(exc.at(item.index))
            return
        except Exception:
            # A bug, not a bad image: the log keeps the traceback, the client gets a plain 500.
            log.exception("preprocessing image %d failed", item.index)
            ticket.fail(InternalError("preprocessing failed").at(item.index))
            return
        elapsed = time.perf_counter() - start
        self.metrics.preprocess.observe(elapsed)
        self.work.put(QueuedImage(encode_input, ticket, time.monotonic(), elapsed))

    def _release(self, ticket: Ticket) -> None:
        self.admission.release(ticket.tokens)

    async def encode(
        self,
        images: Sequence[ImageSpec],
        options: EncodeOptions,
        fetch: Callable[[str], asyncio.Future[bytes]] | None = None,
    ) -> list[EncodedImage]:
        """Encode every image of one request; raises the first image's error, with its index."""
        self._check_ready()
        if not images:
            raise InvalidRequest("a request needs at least one image")
        if len(images) > self.settings.max_images_per_request:
            raise InvalidRequest(
                f"{len(images)} images in one request; the limit is "
                f"{self.settings.max_images_per_request}"
            )
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + self.settings.request_timeout_s
        specs = list(images)
        if any(s.url is not None for s in specs):
            if fetch is None:
                raise InvalidRequest("image URLs are not allowed on this server (ALLOW_URLS)")
            specs = await self._fetch_urls(specs, fetch)

        sized = await asyncio.gather(
            *(
                loop.run_in_executor(self.pool, self._bytes_and_size, i, s, options)
                for i, s in enumerate(specs)
            )
        )
        total = sum(a.plan.tokens for a in sized)
        self._check_ready()
        if not self.admission.try_admit(total):
            if total > self.admission.limit:
                # API.md makes every queue overflow a 429, this one included, although no
                # retry can succeed: the message says so, so a client can split the request.
                raise Overloaded(
                    f"this request needs {total} tokens, more than the whole queue holds "
                    f"(MAX_QUEUE_TOKENS={self.admission.limit}); split it or lower "
                    "token_budget: retrying it unchanged cannot succeed",
                    retry_after_s=self.retry_after_s(),
                )
            raise Overloaded(
                f"the queue holds {self.admission.tokens} tokens; this request needs {total} "
                f"more than MAX_QUEUE_TOKENS={self.admission.limit} allows",
                retry_after_s=self.retry_after_s(),
            )
        tickets = [Ticket(loop, a.plan.tokens, deadline, self._release) for a in sized]
        for ticket in tickets:
            # Siblings of a failed image end in errors nobody awaits; retrieve them quietly.
            ticket.future.add_done_callback(lambda f: f.cancelled() or f.exception())
        for item, ticket in zip(sized, tickets, strict=True):
            self.pool.submit(self._preprocess, item, ticket, options.return_tokens)
        # Work already on the device is allowed to finish past the deadline, but not forever:
        # a pass stuck far beyond it (a hung kernel) must not hold the request open.
        guard_s = 2 * self.settings.request_timeout_s + GUARD_GRACE_S
        try:
            results: list[ImageResult] = await asyncio.wait_for(
                asyncio.gather(*(t.future for t in tickets)), guard_s
            )
        except TimeoutError:
            for ticket in tickets:
                ticket.abandoned = True
            log.error("request outlived its deadline by %.0f s on the device", guard_s)
            raise DeadlineExceeded(
                "the request did not finish long after its deadline; the device may be stuck"
            ) from None
        except BaseException:
            for ticket in tickets:
                ticket.abandoned = True
            raise
        out = []
        for item, result in zip(sized, results, strict=True):
            self.metrics.tokens.inc(item.plan.tokens)
            self.metrics.images.labels(item.plan.strategy.value).inc()
            self.metrics.queue_wait.observe(result.queue_s)
            out.append(
                EncodedImage(
                    item.index,
                    item.plan,
                    result.output.pooled,
                    result.output.tokens,
                    result.preprocess_s,
                    result.queue_s,
                    result.compute_s,
                )
            )
        return out

    async def _fetch_urls(
        self, specs: list[ImageSpec], fetch: Callable[[str], asyncio.Future[bytes]]
    ) -> list[ImageSpec]:
        async def one(i: int, spec: ImageSpec) -> ImageSpec:
            if spec.url is None:
                return spec
            try:
                data = await fetch(spec.url)
            except PatchpackError as exc:
                raise exc.at(i) from exc
            return ImageSpec(data, None, None, spec.token_budget, spec.min_pixels, spec.max_pixels)

        return list(await asyncio.gather(*(one(i, s) for i, s in enumerate(specs))))
