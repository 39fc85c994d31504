"""Feeds the device thread: keeps exactly one batch chosen and staged ahead of it.

A stager thread takes the next batch from the queue as soon as the hand-off slot is free and
stages it (patches concatenated into one tensor, pinned and copied asynchronously on CUDA)
while the device is still busy with the current one, so the device never waits on packing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from app.batching.queue import ImageResult, QueuedImage, WorkQueue, settle_if_dead
from app.engine.encoder import EncodeInput, EncodeOutput, Staged

log = logging.getLogger(__name__)


class PackedBatch:
    """One forward pass worth of images; completes their tickets (implements worker.Batch)."""

    def __init__(self, items: list[QueuedImage], packed_at: float, staged: Staged | None) -> None:
        self.items = items
        self.packed_at = packed_at
        # When the device thread took it: queue wait runs until then, staged time included,
        # so queue + compute account for the whole time an image spends after preprocessing.
        self.started_at = packed_at
        self.staged = staged
        self._inputs = [i.input for i in items]

    @property
    def inputs(self) -> Sequence[EncodeInput]:
        return self._inputs

    def resolve(self, index: int, output: EncodeOutput, compute_s: float) -> None:
        item = self.items[index]
        wait = self.started_at - item.queued_at
        item.ticket.resolve(ImageResult(output, item.preprocess_s, wait, compute_s))

    def reject(self, index: int, error: BaseException) -> None:
        self.items[index].ticket.fail(error)


class Batcher:
    """Keeps one batch staged for the device thread, topped up until the device takes it.

    The stager forms a batch as soon as the slot is empty (`WorkQueue.take`: full, or the
    oldest image waited MAX_WAIT_MS) and stages it. While the device is still busy, images
    that arrive and fit the remaining room join that staged batch (it is re-staged), so a
    batch is as full as the traffic allows by the time the device takes it.
    """

    def __init__(
        self,
        work: WorkQueue,
        stage: Callable[[Sequence[EncodeInput]], Staged] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.work = work
        self._stage = stage
        self._clock = clock
        self._cond = threading.Condition()
        self._staged: PackedBatch | None = None
        self._stop = threading.Event()
        self._abort: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="patchpack-stager", daemon=True)
        self.on_death: Callable[[BaseException], None] = lambda _: None

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        self._thread.join(timeout)

    def abort(self, error: BaseException) -> None:
        """The device thread is gone: stop staging and fail every batch held here with `error`.

        Callable from any thread, the stager's own included (it does not join).
        """
        self._abort = error
        self._stop.set()
        self.drain_slot(error)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def staged(self) -> PackedBatch | None:
        return self._staged

    def _main(self) -> None:
        try:
            while not self._stop.is_set():
                staged = self._staged
                if staged is None:
                    items = self.work.take(0.05)
                    if items:
                        self._offer(self._pack(items), replacing=None)
                    continue
                room = self.work.max_batch_tokens - sum(i.tokens for i in staged.items)
                if room <= 0:
                    self._wait_taken(staged)  # full: nothing to add until the device takes it
                    continue
                extra = self.work.take_fitting(room, 0.05)
                if not extra:
                    continue
                if not self._offer(self._pack(staged.items + extra), replacing=staged):
                    # The device took `staged` meanwhile: the newcomers start the next batch.
                    self._offer(self._pack(extra), replacing=None)
            if self._abort is not None:
                # A batch offered while `abort` drained the slot would wait forever.
                self.drain_slot(self._abort)
        except BaseException as exc:
            log.critical("stager thread died: %r", exc)
            self.on_death(exc)

    def _wait_taken(self, staged: PackedBatch) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._staged is not staged or self._stop.is_set(), 0.05)

    def _offer(self, batch: PackedBatch, replacing: PackedBatch | None) -> bool:
        """Put `batch` in the slot if the slot still holds `replacing`."""
        with self._cond:
            if self._staged is not replacing:
                return False
            self._staged = batch
            self._cond.notify_all()
            return True

    def _pack(self, items: list[QueuedImage]) -> PackedBatch:
        packed_at = self._clock()
        staged = None
        if self._stage is not None:
            try:
                staged = self._stage([i.input for i in items])
            except Exception:
                # Staging is an optimization: the device thread can still pack on its own.
                log.exception("staging a batch failed; the device thread will pack it")
        return PackedBatch(items, packed_at, staged)

    def _pop(self, timeout: float) -> PackedBatch | None:
        with self._cond:
            if not self._cond.wait_for(lambda: self._staged is not None, timeout):
                return None
            batch, self._staged = self._staged, None
            self._cond.notify_all()
            return batch

    def take(self, timeout: float) -> PackedBatch | None:
        """For the device thread (worker.BatchSource).

        A staged batch may have waited behind a long forward pass: images whose client left
        or whose deadline passed meanwhile are dropped here, at the last moment before compute.
        """
        batch = self._pop(timeout)
        if batch is None:
            return None
        now = self._clock()
        batch.started_at = now
        live = [item for item in batch.items if not settle_if_dead(item, now)]
        if len(live) == len(batch.items):
            return batch
        # The staged tensor no longer matches: the device thread packs the survivors itself.
        if not live:
            return None
        survivors = PackedBatch(live, batch.packed_at, None)
        survivors.started_at = now
        return survivors

    def drain_slot(self, error: BaseException) -> None:
        """Fail a staged batch that the device thread will never take."""
        batch = self._pop(0)
        if batch is None:
            return
        for i in range(len(batch.items)):
            batch.reject(i, error)
