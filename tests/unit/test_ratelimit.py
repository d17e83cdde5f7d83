"""Rate limiting (sync.servicetitan.ratelimit): even spacing at the ceiling, never more than `rate` per second, shared pauses.

Exact properties run on a virtual clock (deterministic, instant); a few real-time tests check the wiring.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Callable, Coroutine
from types import SimpleNamespace
from typing import Any

import pytest

import sync.servicetitan.ratelimit
from sync.servicetitan.ratelimit import RateLimiter

EPS = 1e-9


class VirtualClock:
    """A discrete-event clock: `sleep` parks the caller until the driver advances time to its wake-up."""

    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._heap, (self.now + max(0.0, delay), next(self._seq), fut))
        await fut

    async def run(self, coros: list[Coroutine[Any, Any, None]]) -> None:
        tasks = [asyncio.create_task(c) for c in coros]
        while True:
            for _ in range(20):  # let every runnable task reach its next sleep
                await asyncio.sleep(0)
            if all(t.done() for t in tasks):
                break
            assert self._heap, "deadlock: tasks are waiting but nobody sleeps"
            wake, _, fut = heapq.heappop(self._heap)
            self.now = max(self.now, wake)
            fut.set_result(None)
        for t in tasks:
            t.result()


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> VirtualClock:
    c = VirtualClock()
    monkeypatch.setattr(sync.servicetitan.ratelimit, "time", SimpleNamespace(monotonic=c.monotonic))
    monkeypatch.setattr(sync.servicetitan.ratelimit, "asyncio", SimpleNamespace(Lock=asyncio.Lock, sleep=c.sleep))
    return c


def max_in_window(stamps: list[float], window: float = 1.0) -> int:
    """The most timestamps in any half-open window [t, t + window) (float noise forgiven)."""
    s = sorted(stamps)
    best, j = 0, 0
    for i in range(len(s)):
        while j < len(s) and s[j] < s[i] + window - EPS:
            j += 1
        best = max(best, j - i)
    return best


def worker(limiter: RateLimiter, n: int, stamps: list[float], now: Callable[[], float],
           ) -> Callable[[], Coroutine[Any, Any, None]]:
    async def go() -> None:
        for _ in range(n):
            await limiter.acquire()
            stamps.append(now())
    return go


def test_rate_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        RateLimiter(rate=0)


# ------------------------------------------------------------------------------------------ virtual clock


def test_requests_are_spaced_evenly_at_the_ceiling(clock: VirtualClock) -> None:
    limiter = RateLimiter(rate=50)
    stamps: list[float] = []
    asyncio.run(clock.run([worker(limiter, 100, stamps, clock.monotonic)()]))
    assert len(stamps) == 100
    assert stamps[0] == 0.0
    assert stamps[-1] == pytest.approx(99 / 50)  # 100 acquisitions at 50/s: about 2 s, no faster, no slower
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    assert min(gaps) == pytest.approx(0.02) and max(gaps) == pytest.approx(0.02)


def test_never_more_than_rate_in_any_one_second_window_with_many_callers(clock: VirtualClock) -> None:
    limiter = RateLimiter(rate=60)
    stamps: list[float] = []
    asyncio.run(clock.run([worker(limiter, 25, stamps, clock.monotonic)() for _ in range(12)]))
    assert len(stamps) == 300
    assert max_in_window(stamps) == 60
    assert stamps[-1] == pytest.approx(299 / 60)  # and the backlog runs at the ceiling


def test_an_idle_limiter_does_not_bank_a_burst(clock: VirtualClock) -> None:
    limiter = RateLimiter(rate=10)
    stamps: list[float] = []

    async def scenario() -> None:
        await limiter.acquire()
        stamps.append(clock.now)
        await clock.sleep(5.0)  # idle
        for _ in range(12):
            await limiter.acquire()
            stamps.append(clock.now)

    asyncio.run(clock.run([scenario()]))
    assert max_in_window(stamps) == 10
    assert stamps[1] == 5.0 and stamps[2] == pytest.approx(5.1)


def test_pause_delays_every_later_caller(clock: VirtualClock) -> None:
    limiter = RateLimiter(rate=100)
    stamps: list[float] = []
    limiter.pause(0.3)
    asyncio.run(clock.run([worker(limiter, 3, stamps, clock.monotonic)() for _ in range(5)]))
    assert len(stamps) == 15
    assert min(stamps) == pytest.approx(0.3)
    assert max_in_window(stamps) <= 100


def test_a_shorter_pause_does_not_shorten_a_longer_one(clock: VirtualClock) -> None:
    limiter = RateLimiter(rate=100)
    stamps: list[float] = []
    limiter.pause(0.5)
    limiter.pause(0.1)
    asyncio.run(clock.run([worker(limiter, 1, stamps, clock.monotonic)()]))
    assert stamps == [pytest.approx(0.5)]


def test_pause_delays_callers_already_waiting_for_their_slot(clock: VirtualClock) -> None:
    limiter = RateLimiter(rate=100)
    stamps: list[float] = []
    paused_at: list[float] = []

    async def rate_limited_answer() -> None:
        await clock.sleep(0.025)  # a 429 arrives while 20 callers hold slots up to 0.19 s
        limiter.pause(0.3)
        paused_at.append(clock.now)

    asyncio.run(clock.run([*(worker(limiter, 1, stamps, clock.monotonic)() for _ in range(20)),
                           rate_limited_answer()]))
    start = paused_at[0]
    during_pause = [s for s in stamps if start <= s < start + 0.3 - EPS]
    assert during_pause == []


def test_set_rate_changes_the_spacing(clock: VirtualClock) -> None:
    limiter = RateLimiter(rate=10)
    limiter.set_rate(100)
    stamps: list[float] = []
    asyncio.run(clock.run([worker(limiter, 11, stamps, clock.monotonic)()]))
    assert stamps[-1] == pytest.approx(0.1)


def adaptive(rate: float = 100) -> RateLimiter:
    """As the ServiceTitan client builds it: three 429s within 1 s are a storm."""
    return RateLimiter(rate=rate, storm=3, storm_window=1.0, step=0.01, floor=0.8, recover_per_s=0.001)


def test_an_isolated_429_slows_one_step_and_skips_one_slot(clock: VirtualClock) -> None:
    limiter = adaptive(100)
    limiter.rate_limited(1.0)
    assert limiter.rate == pytest.approx(99.0)
    stamps: list[float] = []
    asyncio.run(clock.run([worker(limiter, 3, stamps, clock.monotonic)()]))
    assert stamps[0] == pytest.approx(1 / 99)  # one slot, not the second Retry-After asks for
    assert stamps[2] - stamps[1] == pytest.approx(1 / 99, rel=1e-3)


def test_the_rate_climbs_back_to_the_ceiling(clock: VirtualClock) -> None:
    limiter = adaptive(100)
    for _ in range(2):
        limiter.rate_limited(1.0)
    assert limiter.rate == pytest.approx(100 * 0.99 * 0.99)
    clock.now = 5.0
    stamps: list[float] = []
    asyncio.run(clock.run([worker(limiter, 1, stamps, clock.monotonic)()]))
    assert limiter.rate == pytest.approx(100 * (0.99 * 0.99 + 0.005))  # 0.1% of the ceiling per second
    clock.now = 60.0
    asyncio.run(clock.run([worker(limiter, 1, stamps, clock.monotonic)()]))
    assert limiter.rate == pytest.approx(100.0)  # and no further


def test_a_storm_of_429s_pauses_every_sender(clock: VirtualClock) -> None:
    limiter = adaptive(100)
    limiter.rate_limited(1.0)
    clock.now = 0.5
    limiter.rate_limited(1.0)
    stamps: list[float] = []
    asyncio.run(clock.run([worker(limiter, 1, stamps, clock.monotonic)()]))
    assert stamps[0] < 0.52  # two within 1 s: a slot skipped, no more
    at = clock.now
    limiter.rate_limited(1.0)  # the third within 1 s
    asyncio.run(clock.run([worker(limiter, 1, stamps, clock.monotonic)()]))
    assert stamps[1] == pytest.approx(at + 1.0)


def test_429s_spread_out_never_pause_and_the_rate_stops_at_the_floor(clock: VirtualClock) -> None:
    limiter = adaptive(100)
    limiter.recover_per_s = 0.0
    for k in range(60):
        clock.now = k * 1.5  # never three within 1 s
        limiter.rate_limited(1.0)
    assert limiter.rate == pytest.approx(80.0)
    at = clock.now
    stamps: list[float] = []
    asyncio.run(clock.run([worker(limiter, 1, stamps, clock.monotonic)()]))
    assert stamps == [pytest.approx(at + 1 / 80)]  # one slot skipped, never the whole second


def test_the_current_rate_includes_recovery_while_idle(clock: VirtualClock) -> None:
    # (what /metrics shows: an idle limiter must not look throttled long after its last 429)
    limiter = adaptive(100)
    limiter.rate_limited(1.0)
    clock.now = 5.0
    assert limiter.current_rate() == pytest.approx(100 * (0.99 + 0.005))
    clock.now = 3600.0
    assert limiter.current_rate() == pytest.approx(100.0)
    assert limiter.rate == pytest.approx(99.0)  # nothing changed by looking


def test_set_rate_moves_the_ceiling_and_keeps_the_slowdown(clock: VirtualClock) -> None:
    limiter = adaptive(100)
    limiter.rate_limited(1.0)
    limiter.set_rate(50)
    assert (limiter.ceiling, limiter.rate) == (50, pytest.approx(49.5))


# --------------------------------------------------------------------------------------------- real time


def test_real_time_throughput_at_the_ceiling() -> None:
    async def scenario() -> float:
        limiter = RateLimiter(rate=200)
        stamps: list[float] = []
        started = time.monotonic()
        await asyncio.gather(*(worker(limiter, 10, stamps, time.monotonic)() for _ in range(10)))
        assert len(stamps) == 100
        return time.monotonic() - started

    elapsed = asyncio.run(scenario())
    assert 0.45 <= elapsed <= 0.9  # 99 intervals of 5 ms: about 0.5 s


def test_real_time_pause_delays_everyone() -> None:
    async def scenario() -> list[float]:
        limiter = RateLimiter(rate=1000)
        stamps: list[float] = []
        started = time.monotonic()
        limiter.pause(0.3)
        await asyncio.gather(*(worker(limiter, 2, stamps, time.monotonic)() for _ in range(5)))
        return [s - started for s in stamps]

    offsets = asyncio.run(scenario())
    assert len(offsets) == 10
    assert min(offsets) >= 0.29
    assert max(offsets) < 0.6
