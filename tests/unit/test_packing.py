"""`plan_batch`: which queued images go into the next forward pass, and when. Plain numbers."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.batching.packing import BatchPlan, Candidate, plan_batch

MAX_WAIT = 0.005


def _queue(*items: tuple[int, float]) -> list[Candidate]:
    return [Candidate(tokens, queued_at) for tokens, queued_at in items]


def test_empty_queue_plans_nothing() -> None:
    assert plan_batch([], 100, now=5.0, max_wait_s=MAX_WAIT) is None


def test_lone_young_item_waits_for_the_rest_of_its_max_wait() -> None:
    plan = plan_batch(_queue((10, 1.0)), 100, now=1.002, max_wait_s=MAX_WAIT)
    assert plan is not None
    assert plan.take == (0,)
    assert plan.tokens == 10
    assert not plan.launch
    assert plan.wait_s == pytest.approx(0.003)


def test_launches_once_the_oldest_has_waited_max_wait() -> None:
    # Binary-exact times, so "waited exactly max_wait" is exact in floating point too.
    queue = _queue((10, 1.0), (20, 1.125))
    exactly = plan_batch(queue, 100, now=1.25, max_wait_s=0.25)
    later = plan_batch(queue, 100, now=7.0, max_wait_s=0.25)
    for plan in (exactly, later):
        assert plan is not None
        assert plan.launch
        assert plan.wait_s == 0.0
        assert plan.take == (0, 1)
        assert plan.tokens == 30


def test_zero_max_wait_launches_at_once() -> None:
    plan = plan_batch(_queue((10, 3.0)), 100, now=3.0, max_wait_s=0.0)
    assert plan is not None and plan.launch and plan.take == (0,)


def test_only_the_oldest_items_age_counts() -> None:
    # The second item is ancient but behind a young head: the head's clock decides.
    plan = plan_batch(_queue((10, 9.999), (10, 0.0)), 100, now=10.0, max_wait_s=MAX_WAIT)
    assert plan is not None
    assert not plan.launch
    assert plan.wait_s == pytest.approx(0.004)


def test_launches_when_exactly_full() -> None:
    plan = plan_batch(_queue((60, 1.0), (40, 1.0)), 100, now=1.0, max_wait_s=MAX_WAIT)
    assert plan == BatchPlan(take=(0, 1), tokens=100, launch=True, wait_s=0.0)


def test_full_batch_stops_scanning_and_leaves_the_rest() -> None:
    plan = plan_batch(_queue((50, 1.0), (50, 1.0), (1, 1.0)), 100, now=1.0, max_wait_s=MAX_WAIT)
    assert plan is not None
    assert plan.take == (0, 1)
    assert plan.tokens == 100
    assert plan.launch


def test_launches_when_a_left_over_item_does_not_fit() -> None:
    # 70 + 40 > 100: nothing else can join, so waiting would only add latency.
    plan = plan_batch(_queue((70, 1.0), (40, 1.0)), 100, now=1.0, max_wait_s=MAX_WAIT)
    assert plan is not None
    assert plan.take == (0,)
    assert plan.tokens == 70
    assert plan.launch
    assert plan.wait_s == 0.0


def test_oldest_always_goes_first_even_when_younger_ones_pack_better() -> None:
    # Packing the two 50s would fill the batch exactly; the oldest 60 still goes first.
    plan = plan_batch(_queue((60, 1.0), (50, 2.0), (50, 3.0)), 100, now=3.0, max_wait_s=MAX_WAIT)
    assert plan is not None
    assert plan.take[0] == 0
    assert plan.take == (0,)


def test_skip_ahead_fills_the_remainder_with_younger_items() -> None:
    queue = _queue((60, 1.0), (50, 1.1), (30, 1.2), (20, 1.3), (10, 1.4))
    plan = plan_batch(queue, 100, now=1.4, max_wait_s=MAX_WAIT)
    assert plan is not None
    # 60 fits, 50 does not, 30 fits (90), 20 does not, 10 fits (100).
    assert plan.take == (0, 2, 4)
    assert plan.tokens == 100
    assert plan.launch


def test_skipped_items_keep_their_order_for_the_next_batch() -> None:
    queue = _queue((60, 1.0), (50, 1.1), (30, 1.2), (45, 1.3))
    first = plan_batch(queue, 100, now=1.3, max_wait_s=MAX_WAIT)
    assert first is not None and first.take == (0, 2)
    rest = [c for i, c in enumerate(queue) if i not in first.take]
    second = plan_batch(rest, 100, now=1.3, max_wait_s=MAX_WAIT)
    assert second is not None
    assert second.take == (0, 1)  # the skipped 50 now leads
    assert rest[0].tokens == 50


def test_an_item_of_exactly_max_tokens_fits_alone() -> None:
    plan = plan_batch(_queue((100, 1.0), (1, 1.0)), 100, now=1.0, max_wait_s=MAX_WAIT)
    assert plan is not None
    assert plan.take == (0,)
    assert plan.tokens == 100
    assert plan.launch


def test_a_lone_item_of_exactly_max_tokens_launches_at_once() -> None:
    plan = plan_batch(_queue((100, 1.0)), 100, now=1.0, max_wait_s=10.0)
    assert plan is not None and plan.launch and plan.take == (0,)


def test_an_item_larger_than_a_batch_is_refused_not_looped_on() -> None:
    with pytest.raises(ValueError, match="101"):
        plan_batch(_queue((101, 1.0)), 100, now=1.0, max_wait_s=MAX_WAIT)


# -- no starvation, under random traffic ----------------------------------------------------

arrivals = st.lists(
    st.tuples(st.integers(1, 64), st.floats(0.0, 0.02, allow_nan=False)),
    min_size=1,
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(
    arrivals=arrivals,
    max_tokens=st.integers(64, 256),
    max_wait=st.sampled_from([0.0, 0.001, 0.005, 0.05]),
)
def test_every_item_is_taken_within_its_place_in_line_plus_one_batches(
    arrivals: list[tuple[int, float]], max_tokens: int, max_wait: float
) -> None:
    """Simulate the queue: random arrivals, plan, launch or wait, remove what was taken.

    Each launched batch takes the head, so an item with k items ahead of it when it
    arrived must be in one of the next k + 1 batches; no batch may exceed `max_tokens`, and a
    launched batch must be greedy-maximal (no untaken item fits the room left).
    """
    # (id, tokens, arrival time) in arrival order; gaps between arrivals are the drawn floats.
    pending: list[tuple[int, int, float]] = []
    t = 0.0
    for i, (tokens, gap) in enumerate(arrivals):
        t += gap
        pending.append((i, tokens, t))
    queue: list[tuple[int, int, float]] = []
    ahead_at_arrival: dict[int, int] = {}
    batches_at_arrival: dict[int, int] = {}
    taken_in: dict[int, int] = {}
    batches = 0
    now = 0.0
    for _ in range(10_000):
        while pending and pending[0][2] <= now:
            item = pending.pop(0)
            ahead_at_arrival[item[0]] = len(queue)
            batches_at_arrival[item[0]] = batches
            queue.append(item)
        if not queue and not pending:
            break
        plan = plan_batch([Candidate(tok, at) for _, tok, at in queue], max_tokens, now, max_wait)
        if plan is None:
            now = pending[0][2]
            continue
        assert plan.take[0] == 0, "the oldest item must always be taken"
        assert list(plan.take) == sorted(set(plan.take))
        assert plan.tokens == sum(queue[k][1] for k in plan.take) <= max_tokens
        if plan.launch:
            left = [queue[k] for k in range(len(queue)) if k not in plan.take]
            room = max_tokens - plan.tokens
            assert all(item[1] > room for item in left), "skip-ahead left a fitting item"
            batches += 1
            for k in plan.take:
                taken_in[queue[k][0]] = batches
            queue = left
        else:
            assert plan.wait_s > 0
            # Nothing fits and nothing is left over, so the batch only waits for traffic.
            assert plan.tokens < max_tokens
            assert len(plan.take) == len(queue)
            # A real clock moves on past the wake-up; 1 ns keeps float rounding from stalling.
            wake = now + plan.wait_s + 1e-9
            now = min(wake, pending[0][2]) if pending else wake
    else:
        pytest.fail("the simulation did not drain the queue")

    assert set(taken_in) == set(range(len(arrivals)))
    for item_id, batch in taken_in.items():
        waited_batches = batch - batches_at_arrival[item_id]
        assert 1 <= waited_batches <= ahead_at_arrival[item_id] + 1
