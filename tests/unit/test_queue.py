"""Admission, completion tickets and the work queue, with a fake clock and a real event loop."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from app.batching.batcher import Batcher
from app.batching.queue import Admission, ImageResult, QueuedImage, Ticket, WorkQueue
from app.engine.encoder import EncodeInput, EncodeOutput
from app.errors import DeadlineExceeded, NotReady
from app.imaging.sizing import Grid

PATCH_DIM = 3 * 4 * 4


class FakeClock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _result(value: float = 1.0) -> ImageResult:
    output = EncodeOutput(np.full((1, 4), value, dtype=np.float32), None)
    return ImageResult(output, preprocess_s=0.1, queue_s=0.2, compute_s=0.3)


class Done:
    """Counts `on_done` calls per ticket."""

    def __init__(self) -> None:
        self.calls: list[Ticket] = []

    def __call__(self, ticket: Ticket) -> None:
        self.calls.append(ticket)


async def _settled(future: asyncio.Future[ImageResult]) -> BaseException | ImageResult:
    try:
        return await asyncio.wait_for(asyncio.shield(future), 2)
    except (DeadlineExceeded, NotReady, asyncio.CancelledError, RuntimeError) as exc:
        return exc


# -- Admission ------------------------------------------------------------------------------


def test_admission_admits_up_to_the_limit_and_not_past_it() -> None:
    seen: list[int] = []
    admission = Admission(100, on_change=seen.append)
    assert admission.try_admit(60)
    assert admission.try_admit(40)
    assert admission.tokens == 100
    assert not admission.try_admit(1)
    assert admission.tokens == 100
    assert seen == [60, 100]


def test_admission_is_all_or_nothing() -> None:
    admission = Admission(100)
    assert admission.try_admit(70)
    # 50 would overflow by 20: nothing of it is admitted, the room stays for smaller work.
    assert not admission.try_admit(50)
    assert admission.tokens == 70
    assert admission.try_admit(30)


def test_admission_release_makes_room_again() -> None:
    seen: list[int] = []
    admission = Admission(100, on_change=seen.append)
    assert admission.try_admit(100)
    admission.release(60)
    assert admission.tokens == 40
    assert admission.try_admit(60)
    admission.release(100)
    assert admission.tokens == 0
    assert seen == [100, 40, 100, 0]


def test_a_request_larger_than_the_limit_is_never_admitted() -> None:
    admission = Admission(100)
    assert not admission.try_admit(101)
    assert admission.tokens == 0


def test_admission_holds_its_limit_under_threads() -> None:
    peak = [0]
    admission = Admission(50, on_change=lambda n: peak.__setitem__(0, max(peak[0], n)))
    admitted = [0] * 8

    def hammer(k: int) -> None:
        for _ in range(2000):
            if admission.try_admit(7):
                admitted[k] += 1
                admission.release(7)

    threads = [threading.Thread(target=hammer, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert admission.tokens == 0
    assert peak[0] <= 50
    assert sum(admitted) > 0


# -- Ticket ---------------------------------------------------------------------------------


async def test_ticket_resolves_once_and_calls_on_done_once() -> None:
    done = Done()
    ticket = Ticket(asyncio.get_running_loop(), 16, deadline=1e9, on_done=done)
    assert not ticket.settled
    first = _result(1.0)
    assert ticket.resolve(first)
    assert ticket.settled
    assert not ticket.resolve(_result(2.0))
    assert not ticket.fail(RuntimeError("late"))
    assert await asyncio.wait_for(ticket.future, 2) is first
    assert done.calls == [ticket]


async def test_ticket_fail_then_resolve_keeps_the_failure() -> None:
    done = Done()
    ticket = Ticket(asyncio.get_running_loop(), 16, deadline=1e9, on_done=done)
    assert ticket.fail(DeadlineExceeded("too late"))
    assert not ticket.resolve(_result())
    with pytest.raises(DeadlineExceeded):
        await asyncio.wait_for(ticket.future, 2)
    assert len(done.calls) == 1


async def test_ticket_settles_from_another_thread() -> None:
    done = Done()
    loop = asyncio.get_running_loop()
    tickets = [Ticket(loop, 8, deadline=1e9, on_done=done) for _ in range(3)]
    results = [_result(float(i)) for i in range(3)]
    start = threading.Barrier(3)

    def settle(i: int) -> None:
        start.wait(5)
        # Every thread tries every ticket: exactly one wins each.
        for k, ticket in enumerate(tickets):
            if (k + i) % 2 == 0:
                ticket.resolve(results[k])
            else:
                ticket.fail(RuntimeError("x"))

    threads = [threading.Thread(target=settle, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    outcomes = [await _settled(t.future) for t in tickets]
    for t in threads:
        t.join(5)
    assert len(done.calls) == 3
    assert sorted(id(t) for t in done.calls) == sorted(id(t) for t in tickets)
    for outcome, result in zip(outcomes, results, strict=True):
        assert outcome is result or isinstance(outcome, RuntimeError)


async def test_ticket_on_a_cancelled_future_still_settles_quietly() -> None:
    done = Done()
    ticket = Ticket(asyncio.get_running_loop(), 8, deadline=1e9, on_done=done)
    ticket.future.cancel()
    assert ticket.resolve(_result())
    await asyncio.sleep(0)  # let the loop run the threadsafe callback
    assert ticket.future.cancelled()
    assert len(done.calls) == 1


def test_ticket_settles_after_its_loop_closed() -> None:
    loop = asyncio.new_event_loop()
    done = Done()
    ticket = Ticket(loop, 8, deadline=1e9, on_done=done)
    loop.close()
    assert ticket.fail(NotReady("gone"))
    assert len(done.calls) == 1


# -- WorkQueue ------------------------------------------------------------------------------


def _item(
    loop: asyncio.AbstractEventLoop,
    tokens: int,
    queued_at: float,
    deadline: float = 1e9,
    done: Done | None = None,
) -> QueuedImage:
    rows = tokens
    patches = np.zeros((tokens, PATCH_DIM), dtype=np.float32)
    ticket = Ticket(loop, tokens, deadline, done if done is not None else Done())
    return QueuedImage(EncodeInput(patches, (Grid(rows, 1),)), ticket, queued_at, 0.0)


async def test_take_returns_none_when_nothing_is_due() -> None:
    clock = FakeClock(10.0)
    queue = WorkQueue(100, max_wait_s=1.0, clock=clock)
    assert queue.take(0) is None
    loop = asyncio.get_running_loop()
    queue.put(_item(loop, 10, queued_at=10.0))
    # Young and not full: not due yet, and the timeout has run out.
    assert queue.take(0) is None
    assert len(queue) == 1


async def test_take_launches_an_aged_batch_oldest_first() -> None:
    clock = FakeClock(10.0)
    sizes: list[int] = []
    queue = WorkQueue(100, max_wait_s=1.0, clock=clock, on_size=sizes.append)
    loop = asyncio.get_running_loop()
    a, b, c = (_item(loop, 60, 10.0), _item(loop, 50, 10.1), _item(loop, 40, 10.2))
    for item in (a, b, c):
        queue.put(item)
    # 60 + 50 does not fit, so the left-over makes the batch due at once: [a, c].
    batch = queue.take(0)
    assert batch == [a, c]
    assert len(queue) == 1
    clock.now = 12.0
    assert queue.take(0) == [b]
    assert len(queue) == 0
    assert sizes[-1] == 0


async def test_take_drops_abandoned_items_before_packing() -> None:
    clock = FakeClock(10.0)
    queue = WorkQueue(100, max_wait_s=1.0, clock=clock)
    loop = asyncio.get_running_loop()
    done = Done()
    gone = _item(loop, 90, 10.0, done=done)
    kept = _item(loop, 20, 10.5)
    queue.put(gone)
    queue.put(kept)
    gone.ticket.abandoned = True
    clock.now = 12.0
    batch = queue.take(0)
    # Had `gone` been packed, 90 + 20 > 100 would have left `kept` behind.
    assert batch == [kept]
    assert isinstance(await _settled(gone.ticket.future), asyncio.CancelledError)
    assert done.calls == [gone.ticket]  # its tokens were released


async def test_take_fails_expired_items_with_deadline_exceeded_before_packing() -> None:
    clock = FakeClock(10.0)
    queue = WorkQueue(100, max_wait_s=1.0, clock=clock)
    loop = asyncio.get_running_loop()
    done = Done()
    late = _item(loop, 70, 10.0, deadline=11.0, done=done)
    timely = _item(loop, 50, 10.2, deadline=100.0)
    queue.put(late)
    queue.put(timely)
    clock.now = 11.5
    batch = queue.take(0)
    assert batch == [timely]
    assert isinstance(await _settled(late.ticket.future), DeadlineExceeded)
    assert done.calls == [late.ticket]
    assert not timely.ticket.settled


async def test_take_at_exactly_the_deadline_still_runs_the_item() -> None:
    clock = FakeClock(10.0)
    queue = WorkQueue(100, max_wait_s=1.0, clock=clock)
    item = _item(asyncio.get_running_loop(), 10, 10.0, deadline=11.0)
    queue.put(item)
    clock.now = 11.0
    assert queue.take(0) == [item]


async def test_take_wakes_up_when_an_item_arrives() -> None:
    queue = WorkQueue(100, max_wait_s=0.0)
    loop = asyncio.get_running_loop()
    item = _item(loop, 10, queued_at=0.0)
    got: list[list[QueuedImage] | None] = []
    taker = threading.Thread(target=lambda: got.append(queue.take(30)))
    taker.start()
    queue.put(item)
    await asyncio.to_thread(taker.join, 30)
    assert got == [[item]]


async def test_close_fails_waiting_items_and_later_puts() -> None:
    clock = FakeClock(10.0)
    sizes: list[int] = []
    queue = WorkQueue(100, max_wait_s=1.0, clock=clock, on_size=sizes.append)
    loop = asyncio.get_running_loop()
    waiting = [_item(loop, 10, 10.0), _item(loop, 20, 10.0)]
    for item in waiting:
        queue.put(item)
    queue.close()
    assert len(queue) == 0
    assert sizes[-1] == 0
    for item in waiting:
        assert isinstance(await _settled(item.ticket.future), NotReady)
    late = _item(loop, 10, 10.0)
    queue.put(late)
    assert isinstance(await _settled(late.ticket.future), NotReady)
    assert len(queue) == 0
    assert queue.take(0) is None


async def test_close_with_an_error_passes_that_error_on() -> None:
    queue = WorkQueue(100, max_wait_s=1.0, clock=FakeClock())
    loop = asyncio.get_running_loop()
    item = _item(loop, 10, 100.0)
    queue.put(item)
    dead = NotReady("the device worker stopped")
    queue.close(dead)
    assert await _settled(item.ticket.future) is dead
    late = _item(loop, 10, 100.0)
    queue.put(late)
    assert await _settled(late.ticket.future) is dead


# -- Batcher: what the stager holds when the device thread is gone --------------------------


async def _until_len(queue: WorkQueue, n: int) -> None:
    for _ in range(1000):
        if len(queue) == n:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"queue never reached {n} items")


async def test_batcher_abort_fails_the_staged_and_the_held_batch() -> None:
    loop = asyncio.get_running_loop()
    work = WorkQueue(10, max_wait_s=0.0)
    batcher = Batcher(work)
    items = [_item(loop, 10, 0.0) for _ in range(3)]  # each a full batch on its own
    for item in items:
        work.put(item)
    batcher.start()
    try:
        # No device thread takes anything: the first batch fills the hand-off slot (full: no
        # room to top up), the other two stay queued.
        await _until_len(work, 2)
        assert batcher.staged is not None and batcher.staged.items == items[:1]
        dead = NotReady("the device worker stopped")
        work.close(dead)
        batcher.abort(dead)
        for item in items:
            assert await _settled(item.ticket.future) is dead
        await asyncio.to_thread(batcher._thread.join, 10)
        assert not batcher.alive
        assert batcher.take(0) is None
    finally:
        batcher.stop(5)


async def test_batcher_stop_then_drain_fails_the_staged_batch_as_not_ready() -> None:
    loop = asyncio.get_running_loop()
    work = WorkQueue(10, max_wait_s=0.0)
    batcher = Batcher(work)
    items = [_item(loop, 10, 0.0) for _ in range(2)]
    for item in items:
        work.put(item)
    batcher.start()
    await _until_len(work, 1)
    batcher.stop(10)
    assert not batcher.alive
    batcher.drain_slot(NotReady("the service is shutting down"))
    work.close()
    for item in items:
        assert isinstance(await _settled(item.ticket.future), NotReady)


async def test_batcher_tops_up_the_staged_batch_while_the_device_is_busy() -> None:
    """Images arriving while a staged batch waits for the device join it if they fit, instead
    of waiting for the batch after: batches are as full as the traffic allows."""
    loop = asyncio.get_running_loop()
    work = WorkQueue(100, max_wait_s=0.0)
    staged_sizes: list[int] = []

    def stage(inputs: object) -> object:
        staged_sizes.append(len(inputs))  # type: ignore[arg-type]
        return object()

    batcher = Batcher(work, stage=stage)  # type: ignore[arg-type]
    first, second, third, big = (
        _item(loop, 30, 0.0),
        _item(loop, 30, 0.0),
        _item(loop, 30, 0.0),
        _item(loop, 90, 0.0),
    )
    work.put(first)
    batcher.start()
    try:
        for _ in range(1000):
            if batcher.staged is not None:
                break
            await asyncio.sleep(0.01)
        for item in (second, big, third):  # the device is "busy": nobody takes the slot
            work.put(item)
        await _until_len(work, 1)
        for _ in range(1000):  # re-staging happens after the items leave the queue
            staged = batcher.staged
            if staged is not None and len(staged.items) == 3:
                break
            await asyncio.sleep(0.01)
        batch = batcher.take(5)
        assert batch is not None
        # 30 + 30 + 30 fit the 100-token room; the 90-token image waits for the next batch.
        assert batch.items == [first, second, third]
        assert staged_sizes[0] == 1 and staged_sizes[-1] == 3
        nxt = batcher.take(5)
        assert nxt is not None and nxt.items == [big]
    finally:
        batcher.stop(5)


async def test_flush_launches_a_partial_batch_without_waiting() -> None:
    clock = FakeClock(10.0)
    queue = WorkQueue(100, max_wait_s=60.0, clock=clock)
    item = _item(asyncio.get_running_loop(), 10, queued_at=10.0)
    queue.put(item)
    assert queue.take(0) is None  # young, small: would wait up to a minute for company
    queue.flush()
    assert queue.take(0) == [item]


async def test_batcher_take_drops_staged_items_that_expired_or_were_abandoned() -> None:
    # A batch can sit staged behind a long forward pass; it is re-checked at hand-over.
    loop = asyncio.get_running_loop()
    clock = FakeClock(10.0)
    work = WorkQueue(100, max_wait_s=0.0, clock=clock)
    staged_tokens: list[int] = []

    def stage(inputs: object) -> object:
        staged_tokens.append(sum(x.tokens for x in inputs))  # type: ignore[attr-defined]
        return object()

    batcher = Batcher(work, stage=stage, clock=clock)  # type: ignore[arg-type]
    late = _item(loop, 30, 10.0, deadline=11.0)
    gone = _item(loop, 20, 10.0)
    live = _item(loop, 10, 10.0, deadline=100.0)
    for item in (late, gone, live):
        work.put(item)
    batcher.start()
    try:
        await _until_len(work, 0)
        for _ in range(1000):  # the stager puts the batch into the slot
            if batcher.staged is not None:
                break
            await asyncio.sleep(0.01)
        assert staged_tokens == [60]
        clock.now = 12.0
        gone.ticket.abandoned = True
        batch = batcher.take(1)
        assert batch is not None
        assert batch.items == [live]
        assert batch.staged is None  # stale: the device thread packs the survivor itself
        assert isinstance(await _settled(late.ticket.future), DeadlineExceeded)
        assert isinstance(await _settled(gone.ticket.future), asyncio.CancelledError)
        assert not live.ticket.settled
    finally:
        batcher.stop(5)
