"""The device thread: the only thread that touches the model.

It takes batches from a `BatchSource`, runs one packed forward pass per batch and hands each
image's result (or error) back to the batch. Failures stay as small as possible: a forward pass
that raises fails only its own batch; an out-of-memory error splits the batch in two and retries
each half once. If the loop itself dies, `on_death` fires so the service can flip its health
and fail everything pending: nothing hangs on a dead thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from app.engine.encoder import EncodeInput, EncodeOutput, Encoder, Staged

log = logging.getLogger(__name__)


class Batch(Protocol):
    @property
    def inputs(self) -> Sequence[EncodeInput]: ...

    @property
    def staged(self) -> Staged | None:
        """The inputs already concatenated by `Encoder.stage`, if the source did that."""
        ...

    def resolve(self, index: int, output: EncodeOutput, compute_s: float) -> None: ...

    def reject(self, index: int, error: BaseException) -> None: ...


class BatchSource(Protocol):
    def take(self, timeout: float) -> Batch | None:
        """The next batch, or None if none is ready within `timeout` seconds."""
        ...


class DeviceWorker:
    def __init__(
        self,
        encoder: Encoder,
        source: BatchSource,
        on_death: Callable[[BaseException], None],
        on_batch: Callable[[Sequence[EncodeInput], float], None] | None = None,
    ) -> None:
        self.encoder = encoder
        self.source = source
        self.on_death = on_death
        self.on_batch = on_batch
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name="patchpack-device", daemon=True)
        # Test hooks: make the next forward pass raise, or make the loop itself die.
        self.fail_next_forward: BaseException | None = None
        self.kill_loop: BaseException | None = None
        self._current: Batch | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        self._stop.set()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _main(self) -> None:
        try:
            while not self._stop.is_set():
                if self.kill_loop is not None:
                    raise self.kill_loop
                batch = self.source.take(0.05)
                if batch is not None:
                    self._current = batch
                    self._process(batch, list(range(len(batch.inputs))), split_on_oom=True)
                    self._current = None
        except BaseException as exc:  # the thread must never die silently
            log.critical("device thread died: %r", exc)
            if self._current is not None:
                for i in range(len(self._current.inputs)):
                    self._current.reject(i, exc)
            self.on_death(exc)

    def _forward(
        self, inputs: list[EncodeInput], staged: Staged | None
    ) -> tuple[list[EncodeOutput], float]:
        if self.fail_next_forward is not None:
            error, self.fail_next_forward = self.fail_next_forward, None
            raise error
        start = time.perf_counter()
        outputs = self.encoder.run(inputs, staged)
        elapsed = time.perf_counter() - start
        if self.on_batch is not None:
            self.on_batch(inputs, elapsed)
        return outputs, elapsed

    def _process(self, batch: Batch, indices: list[int], split_on_oom: bool) -> None:
        inputs = [batch.inputs[i] for i in indices]
        whole = len(indices) == len(batch.inputs)
        try:
            outputs, elapsed = self._forward(inputs, batch.staged if whole else None)
        except torch.OutOfMemoryError as exc:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if split_on_oom and len(indices) > 1:
                log.warning("out of memory on %d images; retrying as two halves", len(indices))
                half = len(indices) // 2
                self._process(batch, indices[:half], split_on_oom=False)
                self._process(batch, indices[half:], split_on_oom=False)
                return
            for i in indices:
                batch.reject(i, exc)
            return
        except Exception as exc:
            log.exception("forward pass failed for a batch of %d images", len(indices))
            for i in indices:
                batch.reject(i, exc)
            return
        for i, output in zip(indices, outputs, strict=True):
            batch.resolve(i, output, elapsed)
