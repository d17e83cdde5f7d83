"""Rate limiting for ServiceTitan's 60 requests/s per application per tenant.

``RateLimiter`` spaces requests evenly (a GCRA / virtual-scheduling limiter: each caller reserves the next
free slot) so a backlog runs at the ceiling without bursting past it. A 429 (``rate_limited``) lowers the
rate one step, and the rate creeps back towards the ceiling (additive increase, multiplicative decrease):
the margin below ServiceTitan's limit follows the arrival jitter actually seen instead of a fixed guess.
Only a burst of 429s (``storm`` of them within ``storm_window`` seconds) stops every sender (``pause``) for
the Retry-After: an isolated 429 is one request arriving a few ms early, so the others skip one slot (the
window is full right now) instead of stopping for a second, which costs far more than the rejected request.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque


class RateLimiter:
    """At most ``rate`` acquisitions per second for this process, with a burst of ``burst``."""

    def __init__(self, rate: float, burst: int = 1, *, max_pause: float | None = None, storm: int = 1,
                 storm_window: float = 2.0, step: float = 0.01, floor: float = 0.8,
                 recover_per_s: float = 0.001) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.max_pause = max_pause
        """Cap on how long a 429 stops every sender (the rejected request itself waits its full Retry-After)."""
        self.storm = max(1, storm)
        """How many 429s within ``storm_window`` seconds pause every sender (1: every 429 does)."""
        self.storm_window = storm_window
        self.step = step
        """A 429 multiplies the rate by (1 - step) ..."""
        self.floor = floor
        """... down to floor x the ceiling ..."""
        self.recover_per_s = recover_per_s
        """... and it climbs back by this fraction of the ceiling per second."""
        self.ceiling = rate
        self.factor = 1.0
        self.rate = rate
        self.interval = 1.0 / rate
        self.burst = max(1, burst)
        self._next = time.monotonic()
        self._factor_at = self._next
        self._paused_until = 0.0
        self._recent_429: deque[float] = deque(maxlen=self.storm)
        self._lock = asyncio.Lock()

    def set_rate(self, rate: float) -> None:
        """The ceiling (this process's share of the tenant's limit); the current factor is kept."""
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.ceiling = rate
        self._apply_factor()

    def _apply_factor(self) -> None:
        self.rate = self.ceiling * self.factor
        self.interval = 1.0 / self.rate

    def _factor_at_time(self, now: float) -> float:
        """The factor after climbing back since it was last updated."""
        return min(1.0, self.factor + self.recover_per_s * max(0.0, now - self._factor_at))

    def _recover(self, now: float) -> None:
        if self.factor < 1.0:
            self.factor = self._factor_at_time(now)
            self._apply_factor()
        self._factor_at = now

    def current_rate(self) -> float:
        """The rate allowed right now, recovery since the last request included (changes nothing)."""
        return self.ceiling * self._factor_at_time(time.monotonic())

    def rate_limited(self, retry_after: float) -> None:
        """ServiceTitan answered 429: one step slower; a storm of them also pauses every sender."""
        now = time.monotonic()
        self._recover(now)
        self.factor = max(self.floor, self.factor * (1.0 - self.step))
        self._apply_factor()
        self._recent_429.append(now)
        if len(self._recent_429) == self.storm and now - self._recent_429[0] <= self.storm_window:
            self.pause(retry_after)
        else:  # the window is full right now: the next slot would most likely be rejected too, skip it
            self.pause(min(retry_after, self.interval))

    async def acquire(self) -> None:
        """Wait for this caller's slot; a pause that begins while waiting moves the slot back."""
        while True:
            async with self._lock:
                now = time.monotonic()
                self._recover(now)
                start = max(self._next, self._paused_until, now - (self.burst - 1) * self.interval)
                self._next = start + self.interval
                paused_until = self._paused_until
            delay = start - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if self._paused_until == paused_until:
                return

    def pause(self, seconds: float, *, capped: bool = True) -> None:
        """Nobody sends for ``seconds`` (a 429 told us so; capped at ``max_pause`` unless ``capped`` is False).

        The slot schedule restarts at the end of the pause: callers already waiting re-reserve their slots
        after it, so slots reserved before it are not lost as a gap after the pause.
        """
        if capped and self.max_pause is not None:
            seconds = min(seconds, self.max_pause)
        until = time.monotonic() + max(0.0, seconds)
        if until > self._paused_until:
            self._paused_until = until
            self._next = until
