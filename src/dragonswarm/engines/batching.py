"""Continuous batching decisions (pure): which sequence a new job takes, and what each job
evaluates in the next decode step of a runner that serves several at once."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# Prompt tokens one step may read while other streams are generating: a new request joining
# mid-stream pauses the others for one chunk at a time (about 0.2 s for the 0.5B code model on
# 2 cores), not for its whole prompt.
PREFILL_CHUNK = 64


@dataclass(frozen=True)
class Want:
    """What one job still has to evaluate before it samples its next token."""

    left: int  # tokens to evaluate
    batchable: int  # of those, how many leading ones may be read in one batch (the rest go one at a time)


def plan_step(wants: Sequence[Want], n_batch: int, chunk: int = PREFILL_CHUNK, read_since: int = 0) -> list[int]:
    """How many tokens each job evaluates in the next step, in the order given (arrival).

    A step reads prompts or generates, not both: on a CPU the tokens of one batch cost
    nearly what they cost apart, so a new request's first token would otherwise wait for
    every running stream's token besides its prompt. Prompts go first, in order of arrival:
    the whole batch while nobody is generating; while someone is, no more than `chunk`
    prompt tokens between two of the streams' steps (`read_since`: those read since their
    last), so a long prompt pauses them one chunk at a time, never for the whole prompt.
    Jobs that go one token at a time (generating, or reading a failover's answer so far)
    are the streams."""
    counts = [0] * len(wants)
    streams = [i for i, want in enumerate(wants) if want.left > 0 and want.batchable == 0]
    readers = [i for i, want in enumerate(wants) if want.batchable > 0]
    budget = min(chunk - read_since, n_batch) if streams else n_batch
    if readers and budget > 0:
        for i in readers:
            take = min(wants[i].batchable, budget)
            counts[i] = take
            budget -= take
            if budget <= 0:
                break
        return counts
    for i in streams[:n_batch]:
        counts[i] = 1
    return counts


def shared_prefix(cached: Sequence[int], tokens: Sequence[int]) -> int:
    """How many leading tokens two token lists have in common."""
    n = min(len(cached), len(tokens))
    if n == 0:
        return 0
    differ = np.flatnonzero(np.asarray(cached[:n]) != np.asarray(tokens[:n]))
    return int(differ[0]) if differ.size else n


def pick_sequence(free: Sequence[tuple[Sequence[int], float]], tokens: Sequence[int]) -> int:
    """The free sequence (its cached tokens, when it was last used) a new prompt should take:
    the one whose cache shares the longest prefix with it, then the one idle longest, so a
    conversation's next turn finds its own cache and others are evicted last-used last."""
    best = max(range(len(free)), key=lambda i: (shared_prefix(free[i][0], tokens), -free[i][1]))
    return best
