"""DeviceWorker: results per index, failures contained to their batch, OOM split, death reported.

Every wait is on an Event with a timeout, so a broken worker fails the test instead of hanging.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator, Sequence

import numpy as np
import pytest
import torch

from app.engine.attention import make_backend
from app.engine.encoder import EncodeInput, EncodeOutput, Encoder, Staged
from app.engine.loader import load_model
from app.engine.worker import DeviceWorker
from app.imaging.sizing import Grid
from tests.engine.reference import random_patches

WAIT_S = 10.0


class RecordingBatch:
    """A Batch that records what the worker hands back, and signals when every item is in."""

    def __init__(self, inputs: Sequence[EncodeInput], staged: Staged | None = None) -> None:
        self._inputs = list(inputs)
        self._staged = staged
        self.results: dict[int, EncodeOutput] = {}
        self.errors: dict[int, BaseException] = {}
        self.compute_s: list[float] = []
        self._lock = threading.Lock()
        self._done = threading.Event()

    @property
    def inputs(self) -> Sequence[EncodeInput]:
        return self._inputs

    @property
    def staged(self) -> Staged | None:
        return self._staged

    def _record(self) -> None:
        if len(self.results) + len(self.errors) == len(self._inputs):
            self._done.set()

    def resolve(self, index: int, output: EncodeOutput, compute_s: float) -> None:
        with self._lock:
            assert index not in self.results and index not in self.errors, "answered twice"
            self.results[index] = output
            self.compute_s.append(compute_s)
            self._record()

    def reject(self, index: int, error: BaseException) -> None:
        with self._lock:
            assert index not in self.results and index not in self.errors, "answered twice"
            self.errors[index] = error
            self._record()

    def wait(self) -> None:
        assert self._done.wait(WAIT_S), (
            f"batch not finished in {WAIT_S}s: {len(self.results)} resolved, "
            f"{len(self.errors)} rejected of {len(self._inputs)}"
        )


class QueueSource:
    def __init__(self) -> None:
        self.queue: queue.Queue[RecordingBatch] = queue.Queue()

    def put(self, batch: RecordingBatch) -> RecordingBatch:
        self.queue.put(batch)
        return batch

    def take(self, timeout: float) -> RecordingBatch | None:
        try:
            return self.queue.get(timeout=timeout)
        except queue.Empty:
            return None


class Death:
    def __init__(self) -> None:
        self.event = threading.Event()
        self.error: BaseException | None = None

    def __call__(self, error: BaseException) -> None:
        self.error = error
        self.event.set()


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    return Encoder(
        load_model("demo:tiny", torch.device("cpu"), torch.float32), make_backend("sdpa-segments")
    )


@pytest.fixture
def harness(encoder: Encoder) -> Iterator[tuple[DeviceWorker, QueueSource, Death]]:
    source, death = QueueSource(), Death()
    worker = DeviceWorker(encoder, source, on_death=death)
    worker.start()
    yield worker, source, death
    worker.stop(timeout=WAIT_S)
    assert not worker.alive


GRIDS = [Grid(4, 4), Grid(3, 9), Grid(6, 2), Grid(1, 1)]


def _inputs(rng: np.random.Generator, grids: Sequence[Grid] = GRIDS) -> list[EncodeInput]:
    return [EncodeInput(random_patches(rng, [g], 16), (g,)) for g in grids]


def _wait_until_dead(worker: DeviceWorker) -> None:
    deadline = time.monotonic() + WAIT_S
    while worker.alive and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not worker.alive


def test_results_delivered_per_index(
    harness: tuple[DeviceWorker, QueueSource, Death], encoder: Encoder, rng: np.random.Generator
) -> None:
    worker, source, death = harness
    inputs = _inputs(rng)
    batch = source.put(RecordingBatch(inputs))
    batch.wait()
    assert not batch.errors
    assert sorted(batch.results) == list(range(len(inputs)))
    assert all(s >= 0 for s in batch.compute_s)
    # Each index got its own image's embedding: compare with that image encoded alone.
    for i, x in enumerate(inputs):
        (alone,) = encoder.run([x])
        diff = np.abs(batch.results[i].pooled - alone.pooled).max()
        assert diff <= 1e-5, f"index {i}: diff {diff}"
    # Different images, different embeddings: a mix-up would not go unnoticed.
    assert np.abs(batch.results[0].pooled - batch.results[1].pooled).max() > 1e-3
    assert worker.alive and not death.event.is_set()


def test_staged_batch_gives_the_same_results(
    harness: tuple[DeviceWorker, QueueSource, Death], encoder: Encoder, rng: np.random.Generator
) -> None:
    _, source, _ = harness
    inputs = _inputs(rng)
    plain = source.put(RecordingBatch(inputs))
    staged = source.put(RecordingBatch(inputs, encoder.stage(inputs)))
    plain.wait()
    staged.wait()
    assert sorted(staged.results) == [0, 1, 2, 3]
    for i in range(len(inputs)):
        diff = np.abs(staged.results[i].pooled - plain.results[i].pooled).max()
        assert diff <= 1e-6, f"index {i}: diff {diff}"


def test_failed_forward_fails_only_its_batch(
    harness: tuple[DeviceWorker, QueueSource, Death], rng: np.random.Generator
) -> None:
    worker, source, death = harness
    boom = RuntimeError("boom")
    worker.fail_next_forward = boom
    first = source.put(RecordingBatch(_inputs(rng)))
    second = source.put(RecordingBatch(_inputs(rng, GRIDS[:2])))
    first.wait()
    second.wait()
    assert not first.results
    assert sorted(first.errors) == [0, 1, 2, 3]
    assert all(e is boom for e in first.errors.values())
    assert sorted(second.results) == [0, 1] and not second.errors
    assert worker.alive and not death.event.is_set()


def test_out_of_memory_splits_in_halves(
    harness: tuple[DeviceWorker, QueueSource, Death],
    encoder: Encoder,
    monkeypatch: pytest.MonkeyPatch,
    rng: np.random.Generator,
) -> None:
    _, source, _ = harness
    calls: list[int] = []
    staged_seen: list[bool] = []
    real_run = encoder.run

    def run_oom_once(
        inputs: Sequence[EncodeInput], staged: Staged | None = None
    ) -> list[EncodeOutput]:
        calls.append(len(inputs))
        staged_seen.append(staged is not None)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real_run(inputs, staged)

    monkeypatch.setattr(encoder, "run", run_oom_once)
    inputs = _inputs(rng)
    batch = source.put(RecordingBatch(inputs, encoder.stage(inputs)))
    batch.wait()
    assert calls == [4, 2, 2]
    # The staged pack belongs to the whole batch; the halves are packed afresh.
    assert staged_seen == [True, False, False]
    assert not batch.errors
    assert sorted(batch.results) == [0, 1, 2, 3]
    # The halves kept the indices straight.
    for i, x in enumerate(inputs):
        (alone,) = real_run([x])
        assert np.abs(batch.results[i].pooled - alone.pooled).max() <= 1e-5, i


def test_out_of_memory_in_a_half_fails_only_that_half(
    harness: tuple[DeviceWorker, QueueSource, Death],
    encoder: Encoder,
    monkeypatch: pytest.MonkeyPatch,
    rng: np.random.Generator,
) -> None:
    worker, source, death = harness
    calls: list[int] = []
    real_run = encoder.run

    def run_oom_twice(
        inputs: Sequence[EncodeInput], staged: Staged | None = None
    ) -> list[EncodeOutput]:
        calls.append(len(inputs))
        if len(calls) <= 2:  # the whole batch, then its first half
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real_run(inputs, staged)

    monkeypatch.setattr(encoder, "run", run_oom_twice)
    batch = source.put(RecordingBatch(_inputs(rng)))
    batch.wait()
    # No further splitting: the first half fails, the second half succeeds.
    assert calls == [4, 2, 2]
    assert sorted(batch.errors) == [0, 1]
    assert all(isinstance(e, torch.OutOfMemoryError) for e in batch.errors.values())
    assert sorted(batch.results) == [2, 3]
    assert worker.alive and not death.event.is_set()


def test_out_of_memory_on_a_single_image_rejects_it(
    harness: tuple[DeviceWorker, QueueSource, Death], rng: np.random.Generator
) -> None:
    worker, source, _ = harness
    worker.fail_next_forward = torch.OutOfMemoryError("CUDA out of memory (injected)")
    lone = source.put(RecordingBatch(_inputs(rng, GRIDS[:1])))
    lone.wait()
    assert list(lone.errors) == [0] and not lone.results
    after = source.put(RecordingBatch(_inputs(rng, GRIDS[:1])))
    after.wait()
    assert list(after.results) == [0]


def test_on_batch_sees_every_forward(encoder: Encoder, rng: np.random.Generator) -> None:
    source, death = QueueSource(), Death()
    seen: list[tuple[int, float]] = []
    worker = DeviceWorker(encoder, source, death, on_batch=lambda xs, s: seen.append((len(xs), s)))
    worker.start()
    try:
        source.put(RecordingBatch(_inputs(rng))).wait()
        source.put(RecordingBatch(_inputs(rng, GRIDS[:1]))).wait()
    finally:
        worker.stop(timeout=WAIT_S)
    assert [n for n, _ in seen] == [4, 1]
    assert all(s >= 0 for _, s in seen)


def test_kill_loop_fires_on_death(encoder: Encoder) -> None:
    source, death = QueueSource(), Death()
    worker = DeviceWorker(encoder, source, on_death=death)
    fatal = RuntimeError("device lost")
    worker.kill_loop = fatal
    worker.start()
    assert death.event.wait(WAIT_S), "on_death never fired"
    assert death.error is fatal
    _wait_until_dead(worker)


def test_fatal_error_mid_batch_rejects_it_and_fires_on_death(
    encoder: Encoder, rng: np.random.Generator
) -> None:
    """A BaseException escapes the per-batch handling: the loop dies, but nobody hangs."""

    class Fatal(BaseException):
        pass

    source, death = QueueSource(), Death()
    worker = DeviceWorker(encoder, source, on_death=death)
    fatal = Fatal("device thread must die")
    worker.fail_next_forward = fatal
    batch = source.put(RecordingBatch(_inputs(rng)))
    worker.start()
    batch.wait()
    assert sorted(batch.errors) == [0, 1, 2, 3] and not batch.results
    assert all(e is fatal for e in batch.errors.values())
    assert death.event.wait(WAIT_S) and death.error is fatal
    _wait_until_dead(worker)


def test_source_failure_fires_on_death(encoder: Encoder) -> None:
    class Broken:
        def take(self, timeout: float) -> None:
            raise ValueError("queue corrupted")

    death = Death()
    worker = DeviceWorker(encoder, Broken(), on_death=death)
    worker.start()
    assert death.event.wait(WAIT_S)
    assert isinstance(death.error, ValueError)
    _wait_until_dead(worker)


def test_stop_ends_the_thread_without_death(encoder: Encoder) -> None:
    source, death = QueueSource(), Death()
    worker = DeviceWorker(encoder, source, on_death=death)
    worker.start()
    assert worker.alive
    worker.stop(timeout=WAIT_S)
    assert not worker.alive
    assert not death.event.is_set()
