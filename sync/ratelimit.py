"""Rate limiting for ServiceTitan's 60 requests/s per application per tenant.

``RateLimiter`` spaces requests evenly (a GCRA / virtual-scheduling limiter: each caller reserves the next
free slot) so a backlog runs at the ceiling without bursting past it, and ``pause`` honours a 429's
Retry-After for every caller at once.
"""

from __future__ import annotations

import asyncio
import time


class RateLimiter:
    """At most ``rate`` acquisitions per second for this process, with a burst of ``burst``."""

    def __init__(self, rate: float, burst: int = 1, *, max_pause: float | None = None) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.max_pause = max_pause
        """Cap on how long one 429 stops every sender (the rejected request itself waits its full Retry-After)."""
        self.rate = rate
        self.interval = 1.0 / rate
        self.burst = max(1, burst)
        self._next = time.monotonic()
        self._paused_until = 0.0
        self._lock = asyncio.Lock()

    def set_rate(self, rate: float) -> None:
        self.rate = rate
        self.interval = 1.0 / rate

    async def acquire(self) -> None:
        """Wait for this caller's slot; a pause that begins while waiting moves the slot back."""
        while True:
            async with self._lock:
                now = time.monotonic()
                start = max(self._next, self._paused_until, now - (self.burst - 1) * self.interval)
                self._next = start + self.interval
                paused_until = self._paused_until
            delay = start - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if self._paused_until == paused_until:
                return

    def pause(self, seconds: float) -> None:
        """Nobody sends for ``seconds`` (a 429 told us so; capped at ``max_pause``).

        The slot schedule restarts at the end of the pause: callers already waiting re-reserve their slots
        after it, so slots reserved before it are not lost as a gap after the pause.
        """
        if self.max_pause is not None:
            seconds = min(seconds, self.max_pause)
        until = time.monotonic() + max(0.0, seconds)
        if until > self._paused_until:
            self._paused_until = until
            self._next = until
