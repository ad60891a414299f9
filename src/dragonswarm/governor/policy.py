"""Share arithmetic: pure functions over plain values, tested without a machine."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class OwnerPolicy:
    noise: float  # others' CPU below this is background noise, not the owner
    headroom: float  # kept free on top of the owner's use when the owner is busy
    min_share: float  # never throttle to zero: a started job still finishes
    # The owner counts as busy until this long after their last busy sample. Bursty work
    # (a build between files, a page render) has gaps shorter than this; a shorter hold
    # would hand the cores back and take them away again at every gap.
    hold_s: float = 1.0

    @property
    def full(self) -> float:
        """The machine is full when this much of it is busy: the owner then gets only what we
        leave them, so their reading says nothing about what they want. Half the headroom
        above where we settle (owner + room = 1 - headroom), so settling never reads as full."""
        return 1.0 - self.headroom / 2


def owner_active(owner_load: float, policy: OwnerPolicy) -> bool:
    """Others use more than background noise. A noise of 1.0 turns owner detection off (a
    dedicated machine, a test or a benchmark on a shared one): a reading is capped at 1.0,
    and a full machine must not then count as an owner at work."""
    return policy.noise < 1.0 and owner_load >= policy.noise


def effective_share(configured: float, owner_load: float, policy: OwnerPolicy, *, contended: bool = False) -> float:
    """The fraction of the machine we may use now, given what others are using.

    The owner comes first: when processes that are not ours use the CPU, we shrink to
    what is left after them plus a headroom, so the machine never freezes. While the
    owner and we contend for a full machine, the owner's reading is only what we left
    them: we drop to the floor at once, and their real demand shows in the next sample.
    Stepping down by what they got instead takes one sample per headroom step (seconds).
    """
    if not owner_active(owner_load, policy):
        return configured
    if contended:
        return min(configured, policy.min_share)
    room = 1.0 - owner_load - policy.headroom
    return max(policy.min_share, min(configured, room))


def held_owner_load(history: Sequence[tuple[float, float]], now: float, hold_s: float) -> float:
    """The owner's load to act on: the highest of the samples `(time, load)` in the last `hold_s`.

    Fast attack (a busy sample counts at once), a fixed, short release (quiet for
    `hold_s`, the share is back whole): unlike a gradual decay, the time to full speed
    does not grow with how hard the owner worked.
    """
    return max((load for at, load in history if now - at <= hold_s), default=0.0)


def machine_contended(cpu_total: float, owner_load: float, policy: OwnerPolicy) -> bool:
    """The owner is busy and the machine is full: we are taking CPU they would use."""
    return owner_active(owner_load, policy) and cpu_total >= policy.full


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


def spread_cores(allowed: Sequence[int], threads: int, taken: Sequence[Sequence[int]]) -> list[int]:
    """The `threads` cores for a runner: those the other runners use least, so runners
    spread over the machine instead of all sharing core 0. Ties go to the lower core."""
    use = {core: 0 for core in allowed}
    for cores in taken:
        for core in cores:
            if core in use:
                use[core] += 1
    ranked = sorted(allowed, key=lambda core: (use[core], core))
    return sorted(ranked[: max(1, min(threads, len(allowed)))])


def usable_cpus(affinity: int, quota_cpus: float | None) -> int:
    """Cores this process may run on: its affinity mask, within any CPU quota on its cgroups.

    A container given 1.5 CPUs of a 16-core host has 2 cores' worth of threads to run,
    not 16. Rounded up: the last part-core is still worth a thread.
    """
    if quota_cpus is None:
        return max(1, affinity)
    return max(1, min(affinity, math.ceil(quota_cpus - 1e-9)))


@dataclass(frozen=True)
class GpuPolicy:
    noise: float = 0.10  # owner utilisation below this is a desktop compositor, not the owner at work
    reserve_bytes: int = 512 << 20  # video memory always left free for the owner's next allocation


def owner_on_gpu(owner_util: float | None, policy: GpuPolicy) -> bool:
    """The owner is using the GPU (a game, a render). Unknown (NVML cannot split it) is not busy:
    our own use must not make us back off from ourselves."""
    return owner_util is not None and owner_util >= policy.noise


def gpu_budget(mem_total: int, mem_used: int, ours_mem: int, gpu_share: float, policy: GpuPolicy) -> int:
    """Video memory a new model of ours may fill: what is left of our share of the card after
    what our runners already hold, within the memory free now less a reserve for the owner."""
    ours_left = int(gpu_share * mem_total) - ours_mem
    free = mem_total - mem_used - policy.reserve_bytes
    return max(0, min(ours_left, free))


def gpu_layers(n_layers: int, model_bytes: int, budget: int, n_ctx: int) -> int:
    """llama.cpp's `n_gpu_layers` for weights, KV cache and buffers to fit the budget (0: the CPU only).

    The weights are taken as evenly spread over the layers; the KV cache and compute
    buffers as `ram_needed` counts them. When all of it fits, one more than the layers:
    llama.cpp then offloads the output layer too.
    """
    if n_layers <= 0 or model_bytes <= 0 or budget <= 0:
        return 0
    per_layer = model_bytes / n_layers
    fit = int((budget - kv_estimate(n_ctx, model_bytes)) // per_layer)
    return n_layers + 1 if fit >= n_layers else max(0, fit)


def mps_thread_percentage(gpu_share: float) -> int:
    """CUDA MPS's cap on the share of the GPU's multiprocessors one client may use, for our share.

    Only where an MPS daemon runs (the owner's choice; it needs setting up by an admin): then
    it bounds how much of the GPU our kernels may occupy at once. Without MPS it has no effect.
    """
    return max(1, min(100, round(gpu_share * 100)))


def ram_needed(model_bytes: int, n_ctx: int, margin_bytes: int) -> int:
    """RAM a model needs when loaded: weights, KV cache and compute buffers, plus margin.

    The KV cache estimate is deliberately generous (256 KiB per context token would be
    a 7B f16 model).
    """
    return model_bytes + kv_estimate(n_ctx, model_bytes) + margin_bytes


def kv_estimate(n_ctx: int, model_bytes: int) -> int:
    """KV cache and compute buffers of a loaded model, generously: 64 KiB per context token,
    never more than the weights (small models are dominated by their weights anyway)."""
    return min(n_ctx * 64 * 1024, model_bytes)


# On CPUs the gain flattens past 4 sequences: 1.6x at 4, 1.8x at 8 (2 cores, bench/results/batching.md).
MAX_PARALLEL = 4


def default_parallel(model_bytes: int, n_ctx: int, margin_bytes: int, ram_available: int, cpus: int,
                     share: float) -> int:  # fmt: skip
    """Sequences one model process decodes together when `--parallel` is not given.

    Two per core the work may use (batching pays where one stream leaves compute idle; below
    one core a second stream only halves the first's rate), at most `MAX_PARALLEL`, and no
    more than the free RAM holds a context for each beside the weights: 1 keeps the
    behaviour of a runner that serves one stream at a time."""
    by_cpu = max(1, min(MAX_PARALLEL, math.floor(2 * cpus * share)))
    for n in range(by_cpu, 1, -1):
        if ram_needed(model_bytes, n_ctx * n, margin_bytes) <= ram_available:
            return n
    return 1
