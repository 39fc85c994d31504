"""Which queued images go into the next forward pass, and whether to launch it now.

Pure: plain numbers in, a decision out; no clock, no locks, no torch.

The rule, oldest first:
- the oldest image always goes in (each fits an empty batch: larger budgets are refused at
  validation), so every image is at the head of the queue after finitely many batches and
  none can starve;
- younger images that fit the remaining room are added, skipping over those that do not,
  so small images fill the gaps a large one leaves;
- launch when nothing more can be added (the batch is full, or images are left over that did
  not fit) or once the oldest image has waited `max_wait_s`; otherwise wait for more traffic;
- `fill` alone serves to top up a batch already staged while the device is busy: there the
  waiting rule is moot, as the batch cannot run before the device is free anyway.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Candidate:
    tokens: int
    queued_at: float


@dataclass(frozen=True, slots=True)
class BatchPlan:
    """`take`: indices into the candidates, oldest first. `wait_s`: if not `launch`, how long
    until the oldest candidate's wait runs out."""

    take: tuple[int, ...]
    tokens: int
    launch: bool
    wait_s: float


def plan_batch(
    candidates: Sequence[Candidate], max_tokens: int, now: float, max_wait_s: float
) -> BatchPlan | None:
    """`candidates` must be ordered oldest first. None when there is nothing to pack."""
    if not candidates:
        return None
    if candidates[0].tokens > max_tokens:
        raise ValueError(
            f"an item of {candidates[0].tokens} tokens can never fit a batch of {max_tokens}"
        )
    take = fill([c.tokens for c in candidates], max_tokens)
    used = sum(candidates[i].tokens for i in take)
    left_over = len(take) < len(candidates)
    waited = now - candidates[0].queued_at
    full = used == max_tokens or left_over
    launch = full or waited >= max_wait_s
    return BatchPlan(tuple(take), used, launch, 0.0 if launch else max_wait_s - waited)


def fill(tokens: Sequence[int], room: int) -> tuple[int, ...]:
    """Indices of the items (oldest first) that fit `room`, skipping those that do not."""
    take: list[int] = []
    used = 0
    for i, n in enumerate(tokens):
        if used == room:
            break
        if used + n <= room:
            take.append(i)
            used += n
    return tuple(take)
