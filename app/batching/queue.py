"""Admission by tokens, completion tickets, and the queue of preprocessed images.

Three things cross threads here, so each is guarded by its own lock:
- `Admission` counts admitted-but-unfinished tokens (the 429 decision);
- `Ticket` completes one image's asyncio future from any thread, exactly once;
- `WorkQueue` holds images whose patches are ready and hands out batches chosen by
  `packing.plan_batch`, dropping abandoned and expired images before they are packed.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from app.batching.packing import Candidate, fill, plan_batch
from app.engine.encoder import EncodeInput, EncodeOutput
from app.errors import DeadlineExceeded, NotReady


class Admission:
    """Bounded admitted tokens: a request is admitted whole or not at all."""

    def __init__(self, limit: int, on_change: Callable[[int], None] = lambda _: None) -> None:
        self.limit = limit
        self._tokens = 0
        self._lock = threading.Lock()
        self._on_change = on_change

    @property
    def tokens(self) -> int:
        return self._tokens

    def try_admit(self, tokens: int) -> bool:
        with self._lock:
            if self._tokens + tokens > self.limit:
                return False
            self._tokens += tokens
            self._on_change(self._tokens)
            return True

    def release(self, tokens: int) -> None:
        with self._lock:
            self._tokens -= tokens
            self._on_change(self._tokens)


@dataclass(frozen=True, slots=True)
class ImageResult:
    output: EncodeOutput
    preprocess_s: float
    queue_s: float
    compute_s: float


class Ticket:
    """The completion of one image, settable once from any thread."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        tokens: int,
        deadline: float,
        on_done: Callable[[Ticket], None],
    ) -> None:
        self.future: asyncio.Future[ImageResult] = loop.create_future()
        self.tokens = tokens
        self.deadline = deadline
        self._loop = loop
        self._on_done = on_done
        self._lock = threading.Lock()
        self._settled = False
        # Set by the request when its client left or a sibling image failed: skip, don't run.
        self.abandoned = False

    @property
    def settled(self) -> bool:
        return self._settled

    def _settle(self, setter: Callable[..., None], value: Any) -> bool:
        with self._lock:
            if self._settled:
                return False
            self._settled = True
        self._on_done(self)
        # A closed loop means nobody is waiting any more.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(_set_if_pending, self.future, setter, value)
        return True

    def resolve(self, result: ImageResult) -> bool:
        return self._settle(asyncio.Future.set_result, result)

    def fail(self, error: BaseException) -> bool:
        return self._settle(asyncio.Future.set_exception, error)


def _set_if_pending(future: asyncio.Future[Any], setter: Callable[..., None], value: Any) -> None:
    if not future.done():
        setter(future, value)


@dataclass(frozen=True, slots=True)
class QueuedImage:
    """An image whose patches are ready, waiting for a batch."""

    input: EncodeInput
    ticket: Ticket
    queued_at: float
    preprocess_s: float

    @property
    def tokens(self) -> int:
        return self.input.tokens


def settle_if_dead(item: QueuedImage, now: float) -> bool:
    """Fail an image that must not run any more; True if it was one.

    Its client left (or a sibling image failed): cancelled, nobody waits for it. Its deadline
    passed: 504. Checked when packing and again when a staged batch reaches the device.
    """
    ticket = item.ticket
    if ticket.abandoned or ticket.settled:
        ticket.fail(asyncio.CancelledError())
        return True
    if now > ticket.deadline:
        ticket.fail(DeadlineExceeded("the request deadline passed before its images ran"))
        return True
    return False


class WorkQueue:
    def __init__(
        self,
        max_batch_tokens: int,
        max_wait_s: float,
        clock: Callable[[], float] = time.monotonic,
        on_size: Callable[[int], None] = lambda _: None,
    ) -> None:
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_s
        self._clock = clock
        self._items: deque[QueuedImage] = deque()
        self._cond = threading.Condition()
        self._closed: BaseException | None = None
        self._on_size = on_size

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: QueuedImage) -> None:
        with self._cond:
            if self._closed is not None:
                item.ticket.fail(self._closed)
                return
            self._items.append(item)
            self._on_size(len(self._items))
            self._cond.notify_all()

    def _drop_dead(self, now: float) -> None:
        kept = deque(item for item in self._items if not settle_if_dead(item, now))
        if len(kept) != len(self._items):
            self._items = kept
            self._on_size(len(kept))

    def _remove(self, chosen: set[int]) -> list[QueuedImage]:
        """Take the items at positions `chosen` out of the queue, oldest first."""
        batch = [item for k, item in enumerate(self._items) if k in chosen]
        self._items = deque(item for k, item in enumerate(self._items) if k not in chosen)
        self._on_size(len(self._items))
        return batch

    def take(self, timeout: float) -> list[QueuedImage] | None:
        """Block until a batch should launch (see `plan_batch`), at most `timeout` seconds."""
        give_up = self._clock() + timeout
        with self._cond:
            while True:
                now = self._clock()
                self._drop_dead(now)
                candidates = [Candidate(i.tokens, i.queued_at) for i in self._items]
                plan = plan_batch(candidates, self.max_batch_tokens, now, self.max_wait_s)
                if plan is not None and plan.launch:
                    return self._remove(set(plan.take))
                remaining = give_up - now
                if remaining <= 0:
                    return None
                wait = remaining if plan is None else min(remaining, plan.wait_s)
                self._cond.wait(wait)

    def flush(self) -> None:
        """Launch batches as soon as anything is queued (MAX_WAIT_MS no longer applies)."""
        with self._cond:
            self.max_wait_s = 0.0
            self._cond.notify_all()

    def take_fitting(self, room: int, timeout: float) -> list[QueuedImage]:
        """Items that fit `room` tokens, oldest first, as soon as any is queued (no waiting
        rule: for topping up a batch that waits for the device anyway). At most `timeout` s."""
        give_up = self._clock() + timeout
        with self._cond:
            while True:
                now = self._clock()
                self._drop_dead(now)
                chosen = set(fill([i.tokens for i in self._items], room))
                if chosen:
                    return self._remove(chosen)
                remaining = give_up - now
                if remaining <= 0:
                    return []
                self._cond.wait(remaining)

    def close(self, error: BaseException | None = None) -> None:
        """Refuse new items and fail the waiting ones with `error` (default: not ready)."""
        with self._cond:
            self._closed = error or NotReady("the service is shutting down")
            for item in self._items:
                item.ticket.fail(self._closed)
            self._items.clear()
            self._on_size(0)
            self._cond.notify_all()
