"""Per-key rate limits as plain values: the limits hold over every 60 s window, refusals cost nothing."""

from __future__ import annotations

import copy
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from dragonswarm.scheduler.ratelimit import WINDOW_S, Charge, RateLimiter, Refusal, fits_ahead


def admitted(result: Charge | Refusal) -> Charge:
    assert isinstance(result, Charge), result
    return result


def refused(result: Charge | Refusal) -> Refusal:
    assert isinstance(result, Refusal), result
    return result


def test_the_issue_case_ten_big_requests_in_ten_seconds() -> None:
    # Issue 10: with 10,000 tokens/minute, ten requests of n=8 x 4096 tokens were admitted in 10 s.
    limits = RateLimiter(rpm=0, tpm=10_000)
    results = [limits.admit("a", 8 * 4096, now=float(t)) for t in range(10)]
    assert all(isinstance(r, Refusal) and r.wait is None for r in results)
    assert limits.charged("a", now=10.0) == (0, 0)
    # Requests that fit are admitted only up to the limit in any minute, refunds or not.
    charges = [limits.admit("a", 4096, now=float(t)) for t in range(10)]
    assert [isinstance(c, Charge) for c in charges] == [True, True] + [False] * 8


def test_refusal_charges_nothing() -> None:
    limits = RateLimiter(rpm=2, tpm=100)
    admitted(limits.admit("a", 90, now=0.0))
    refused(limits.admit("a", 90, now=1.0))  # tokens short: refused...
    assert limits.charged("a", now=1.0) == (1, 90)  # ... and charged neither a request nor tokens
    admitted(limits.admit("a", 10, now=2.0))  # so the second request is still there to use
    refused(limits.admit("a", 0, now=3.0))  # now requests are short: refused, again for free
    assert limits.charged("a", now=3.0) == (2, 100)


def test_cost_above_the_limit_is_refused_with_the_reason() -> None:
    limits = RateLimiter(rpm=10, tpm=1000)
    too_big = refused(limits.admit("a", 1001, now=0.0))
    assert too_big.wait is None  # no wait makes it fit
    assert "1001" in too_big.reason and "1000 tokens per minute" in too_big.reason
    assert limits.charged("a", now=0.0) == (0, 0)
    admitted(limits.admit("a", 1000, now=0.0))  # exactly the limit fits


def test_refund_never_exceeds_the_charge() -> None:
    limits = RateLimiter(rpm=0, tpm=1000)
    charge = admitted(limits.admit("a", 300, now=0.0))
    limits.refund(charge, used=500)  # used more than charged: the charge stays what it was
    assert charge.tokens == 300 and limits.charged("a", now=0.0) == (1, 300)
    limits.refund(charge, used=-50)  # nonsense counts give back at most the whole charge
    assert charge.tokens == 0 and limits.charged("a", now=0.0) == (1, 0)
    limits.refund(charge, used=200)  # a second refund cannot raise it again, nor give back twice
    assert charge.tokens == 0 and limits.charged("a", now=0.0) == (1, 0)
    # A refund after the charge left the window changes nothing in the window.
    late = admitted(limits.admit("a", 400, now=10.0))
    admitted(limits.admit("a", 600, now=70.5))
    limits.refund(late, used=0)
    assert limits.charged("a", now=70.5) == (1, 600)


def test_refund_frees_room_at_once() -> None:
    limits = RateLimiter(rpm=0, tpm=600)
    first = admitted(limits.admit("a", 500, now=0.0))
    assert refused(limits.admit("a", 500, now=0.0)).wait == WINDOW_S
    limits.refund(first, used=50)
    admitted(limits.admit("a", 500, now=0.0))


def test_cancel_takes_back_the_request_and_its_tokens() -> None:
    limits = RateLimiter(rpm=1, tpm=100)
    charge = admitted(limits.admit("a", 80, now=0.0))
    limits.cancel(charge)  # refused downstream (queue full): it was never served
    assert limits.charged("a", now=0.0) == (0, 0)
    admitted(limits.admit("a", 100, now=0.0))
    limits.cancel(charge)  # twice is harmless
    assert limits.charged("a", now=0.0) == (1, 100)


def test_retry_after_is_the_real_wait() -> None:
    limits = RateLimiter(rpm=3, tpm=1000)
    for t, tokens in ((0.0, 400), (10.0, 400), (20.0, 100)):
        admitted(limits.admit("a", tokens, now=t))
    # Requests: the oldest of the three leaves the window at 60.
    wait = refused(limits.admit("a", 1, now=30.0)).wait
    assert wait == 30.0
    assert isinstance(copy.deepcopy(limits).admit("a", 1, now=59.9), Refusal)
    admitted(copy.deepcopy(limits).admit("a", 1, now=30.0 + wait))
    # Tokens: 900 are charged; 700 more need the first two gone (at 70).
    wait = refused(limits.admit("a", 700, now=30.0)).wait
    assert wait == 40.0
    assert isinstance(copy.deepcopy(limits).admit("a", 700, now=69.9), Refusal)
    admitted(limits.admit("a", 700, now=30.0 + wait))


def test_limits_hold_over_a_sliding_window_not_a_refilling_bucket() -> None:
    # A bucket refilling at rpm/60 per second let a full bucket plus a minute's refill through.
    limits = RateLimiter(rpm=3, tpm=0)
    assert [isinstance(limits.admit("a", 1, now=0.0), Charge) for _ in range(4)] == [True, True, True, False]
    assert isinstance(limits.admit("a", 1, now=20.0), Refusal)
    assert isinstance(limits.admit("a", 1, now=59.99), Refusal)
    assert [isinstance(limits.admit("a", 1, now=60.0), Charge) for _ in range(4)] == [True, True, True, False]


def test_keys_are_limited_apart_and_idle_keys_are_forgotten() -> None:
    limits = RateLimiter(rpm=1, tpm=0)
    admitted(limits.admit("a", 1, now=0.0))
    refused(limits.admit("a", 1, now=1.0))
    admitted(limits.admit("b", 1, now=1.0))
    admitted(limits.admit("c", 1, now=200.0))  # a sweep: a's and b's windows are long over
    assert set(limits._logs) == {"c"}


def test_no_limits_admit_everything() -> None:
    limits = RateLimiter(rpm=0, tpm=0)
    charges = [admitted(limits.admit("a", 10**9, now=0.0)) for _ in range(1000)]
    limits.refund(charges[0], used=5)
    limits.cancel(charges[1])
    assert limits.charged("a", now=0.0) == (0, 0)


# --- property: over every 60 s window ----------------------------------------------------------------


@dataclass
class Ask:
    key: str
    at: float
    estimate: int
    used: int  # what it will really use, at most the estimate
    ends_after: float  # when the refund comes, after admission
    refused_downstream: bool  # the queue refused it after the limiter admitted it


# Times on a 1/4 s grid, exact in binary floating point, so `at + wait` is the expiry time exactly.
times = st.integers(0, 4 * 300).map(lambda q: q / 4)


@st.composite
def asks(draw: st.DrawFn) -> Ask:
    estimate = draw(st.integers(0, 1200))
    return Ask(key=draw(st.sampled_from("ab")), at=draw(times), estimate=estimate, used=draw(st.integers(0, estimate)),
               ends_after=draw(st.integers(0, 4 * 120).map(lambda q: q / 4)),
               refused_downstream=draw(st.booleans()))  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(rpm=st.integers(0, 12), tpm=st.integers(0, 3000), stream=st.lists(asks(), max_size=80))
def test_no_window_of_60_s_ever_exceeds_the_limits(rpm: int, tpm: int, stream: list[Ask]) -> None:
    limits = RateLimiter(rpm=rpm, tpm=tpm)
    # Admissions and refunds in time order; refunds due by a request's time come before it.
    events = sorted([(a.at, 0, i) for i, a in enumerate(stream)], key=lambda e: e[:2])
    charges: dict[int, Charge] = {}
    pending: list[tuple[float, int, int]] = []
    for at, _, i in events:
        while pending and pending[0][0] <= at:
            _, _, j = pending.pop(0)
            if stream[j].refused_downstream:
                limits.cancel(charges[j])
            else:
                limits.refund(charges[j], stream[j].used)
        ask = stream[i]
        before = limits.charged(ask.key, at)
        result = limits.admit(ask.key, ask.estimate, at)
        if isinstance(result, Refusal):
            assert limits.charged(ask.key, at) == before  # a refusal charges nothing
            if result.wait is None:
                assert tpm and ask.estimate > tpm
            else:
                # The wait is exact: nothing fits a moment sooner, everything fits then.
                assert result.wait > 0
                assert isinstance(copy.deepcopy(limits).admit(ask.key, ask.estimate, at + result.wait), Charge)
                assert isinstance(copy.deepcopy(limits).admit(ask.key, ask.estimate, at + result.wait / 2), Refusal)
            continue
        assert result.tokens == ask.estimate
        charges[i] = result
        pending.append((at + ask.ends_after, 1, i))
        pending.sort(key=lambda p: p[:2])
    for _, _, j in pending:  # the rest end after the last request
        if stream[j].refused_downstream:
            limits.cancel(charges[j])
        else:
            limits.refund(charges[j], stream[j].used)

    served = {i: c for i, c in charges.items() if not stream[i].refused_downstream}
    for i, charge in served.items():
        assert 0 <= charge.tokens <= stream[i].estimate  # never above the charge, never below zero
        assert charge.tokens == min(stream[i].used, stream[i].estimate)
    assert all(charges[i].tokens == 0 for i in charges if stream[i].refused_downstream)
    # Every window's admissions are those from some admission's time to 60 s later.
    for start in {(c.key, c.at) for c in served.values()}:
        key, s = start
        inside = [c for c in served.values() if c.key == key and s <= c.at < s + WINDOW_S]
        if rpm:
            assert len(inside) <= rpm, (start, [(c.at, c.tokens) for c in inside])
        if tpm:
            assert sum(c.tokens for c in inside) <= tpm, (start, [(c.at, c.tokens) for c in inside])


@settings(max_examples=100, deadline=None)
@given(tpm=st.integers(1, 2000), stream=st.lists(st.tuples(times, st.integers(0, 2000)), max_size=60))
def test_a_request_that_fits_is_admitted(tpm: int, stream: list[tuple[float, int]]) -> None:
    # The other half of holding a limit: it does not refuse what the window has room for.
    limits = RateLimiter(rpm=0, tpm=tpm)
    log: list[tuple[float, int]] = []
    for at, estimate in sorted(stream):
        room = tpm - sum(tokens for t, tokens in log if t > at - WINDOW_S)
        result = limits.admit("a", estimate, at)
        assert isinstance(result, Charge) == (estimate <= room), (at, estimate, room)
        if isinstance(result, Charge):
            log.append((at, estimate))


def test_a_replica_admits_ahead_of_the_shared_window_only_in_its_lower_half() -> None:
    assert fits_ahead(requests=4, tokens_used=400, tokens=100, rpm=10, tpm=1000)  # up to half, not beyond
    assert not fits_ahead(requests=5, tokens_used=0, tokens=1, rpm=10, tpm=0)  # past half the requests
    assert not fits_ahead(requests=0, tokens_used=450, tokens=51, rpm=0, tpm=1000)  # past half the tokens
    assert not fits_ahead(requests=0, tokens_used=0, tokens=1, rpm=1, tpm=0)  # a limit of one: always exact
    assert fits_ahead(requests=10**6, tokens_used=10**9, tokens=10**9, rpm=0, tpm=0)  # no limits
