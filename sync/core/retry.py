"""Failure classes (docs/contract.md) and backoff. Pure."""

from __future__ import annotations

import random
from enum import StrEnum
from typing import Any


class Outcome(StrEnum):
    SUCCEEDED = "succeeded"
    DEAD = "dead"
    """Permanent: 400 validation, 404 gone, other 4xx."""
    RETRY = "retry"
    """Transient: 5xx, timeout, connection error, 409 (dependency may land), garbage 2xx."""
    RATE_LIMITED = "rate_limited"
    """429: wait Retry-After; does not use up an attempt."""


def classify(status: int, body: Any) -> Outcome:
    if 200 <= status < 300:
        return Outcome.SUCCEEDED if isinstance(body, dict) else Outcome.RETRY
    if status == 429:
        return Outcome.RATE_LIMITED
    if status in (400, 404):
        return Outcome.DEAD
    if status == 0 or status >= 500 or status in (401, 408, 409):
        return Outcome.RETRY
    return Outcome.DEAD


def backoff_seconds(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with jitter: half fixed, half random, of min(cap, base * 2**(attempt-1))."""
    r: Any = rng or random
    ceiling = min(cap, base * (2 ** max(0, attempt - 1)))
    return float(ceiling / 2 + r.uniform(0, ceiling / 2))
