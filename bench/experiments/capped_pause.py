"""Experiment, not a benchmark: `stsync ...` with a changed 429 handling in the shared rate limiter.

- ``STSYNC_EXP_MAX_PAUSE`` (seconds): the pause every sender takes after a 429 is capped at this (the rejected
  request itself still waits its Retry-After: its outbox row's next_attempt_at).
- ``STSYNC_EXP_REWIND=1``: the pause restarts the slot schedule at its end (``_next = until``) instead of
  ``max(_next, until)``: callers already waiting for a slot re-reserve one after the pause anyway, so the slots
  they had reserved are otherwise lost (a gap of up to max_concurrency / rate seconds after every pause).

- ``STSYNC_EXP_WINDOW_GUARD`` (seconds): replace the slot schedule by a sliding window over the instants
  callers are actually released: at most ``rate`` releases in any ``1 s + guard`` (ServiceTitan's own rule,
  with a guard for arrival jitter), at least half an interval apart. A caller released late (event loop busy)
  then pushes the next window back instead of being followed 1 s later by a caller released on time.

Used by ``bench/push_utilization.py --exp-max-pause S [--exp-rewind] [--exp-window-guard G]`` to show what
the proposed limiter change would do; nothing in sync/ is modified.
"""

from __future__ import annotations

import asyncio
import collections
import os
import time

from sync.cli import main
from sync.servicetitan import ratelimit

CAP = float(os.environ.get("STSYNC_EXP_MAX_PAUSE", "1e9"))
REWIND = os.environ.get("STSYNC_EXP_REWIND") == "1"
GUARD = os.environ.get("STSYNC_EXP_WINDOW_GUARD")


def pause(self: ratelimit.RateLimiter, seconds: float) -> None:
    until = time.monotonic() + max(0.0, min(seconds, CAP))
    if until > self._paused_until:
        self._paused_until = until
        self._next = until if REWIND else max(self._next, until)


async def acquire_window(self: ratelimit.RateLimiter) -> None:
    guard = float(GUARD or 0)
    released: collections.deque[float] = self.__dict__.setdefault("_released", collections.deque())
    while True:
        async with self._lock:
            now = time.monotonic()
            window = 1.0 + guard
            while released and released[0] <= now - window:
                released.popleft()
            last = released[-1] if released else -1e9
            wait = max(self._paused_until - now, last + 0.5 * self.interval - now,
                       released[0] + window - now if len(released) >= int(self.rate) else 0.0)
            if wait <= 0:
                released.append(now)
                return
        await asyncio.sleep(wait)


ratelimit.RateLimiter.pause = pause  # type: ignore[method-assign]
if GUARD is not None:
    ratelimit.RateLimiter.acquire = acquire_window  # type: ignore[method-assign]

if __name__ == "__main__":
    main()
