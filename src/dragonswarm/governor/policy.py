"""Share arithmetic: pure functions over plain values, tested without a machine."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class OwnerPolicy:
    noise: float  # others' CPU below this is background noise, not the owner
    headroom: float  # kept free on top of the owner's use when the owner is busy
    min_share: float  # never throttle to zero: a started job still finishes


def effective_share(configured: float, owner_load: float, policy: OwnerPolicy) -> float:
    """The fraction of the machine we may use now, given what others are using.

    The owner comes first: when processes that are not ours use the CPU, we shrink to
    what is left after them plus a headroom, so the machine never freezes.
    """
    if owner_load < policy.noise:
        return configured
    room = 1.0 - owner_load - policy.headroom
    return max(policy.min_share, min(configured, room))


def smooth_owner_load(previous: float, sample: float, release: float = 0.5) -> float:
    """Fast attack, slow release: a burst of owner activity takes effect at once,
    its end is trusted only gradually so that we do not flap between samples."""
    if sample >= previous:
        return sample
    return previous * release + sample * (1.0 - release)


def threads_for(share: float, n_cpus: int) -> int:
    """llama.cpp threads for a share: enough cores to use it, never more than exist."""
    return max(1, min(n_cpus, math.ceil(share * n_cpus - 1e-9)))


def cfs_quota_us(share: float, n_cpus: int, period_us: int) -> int | None:
    """CFS quota for a share of the whole machine; None means unlimited."""
    if share >= 1.0:
        return None
    return max(1000, round(share * n_cpus * period_us))


def duty_cycle(share: float, n_cpus: int, threads: int) -> float:
    """Fraction of wall time a runner with `threads` busy threads may run."""
    return min(1.0, share * n_cpus / max(1, threads))


def ram_needed(model_bytes: int, n_ctx: int, margin_bytes: int) -> int:
    """RAM a model needs when loaded: weights, KV cache and compute buffers, plus margin.

    The KV cache estimate is deliberately generous (256 KiB per context token would be
    a 7B f16 model); small models are dominated by their weights anyway.
    """
    kv_and_buffers = min(n_ctx * 64 * 1024, model_bytes)
    return model_bytes + kv_and_buffers + margin_bytes
