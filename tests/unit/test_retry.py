"""Failure classes (DESIGN.md table) and exponential backoff with jitter (sync.retry)."""

from __future__ import annotations

import random
from typing import Any

import pytest

from sync.core.retry import Outcome, backoff_seconds, classify

PROBLEM = {"type": "https://tools.ietf.org/html/rfc7231#section-6.5.1", "title": "One or more validation errors",
           "status": 400, "traceId": "abc", "errors": {"name": ["The name field is required."]}}


@pytest.mark.parametrize("status", [200, 201, 204, 299])
def test_2xx_with_a_json_object_succeeded(status: int) -> None:
    assert classify(status, {"id": 1, "name": "Ada"}) is Outcome.SUCCEEDED


@pytest.mark.parametrize("body", [None, "", "<html>proxy error</html>", [1, 2], 3, True])
def test_2xx_without_a_json_object_is_retried(body: Any) -> None:
    # the new base must be the response body: a 2xx we cannot read is not a success
    assert classify(200, body) is Outcome.RETRY


@pytest.mark.parametrize("status", [400, 404])
def test_validation_and_not_found_are_dead(status: int) -> None:
    assert classify(status, PROBLEM) is Outcome.DEAD
    assert classify(status, None) is Outcome.DEAD


def test_409_dependency_missing_is_retried() -> None:
    assert classify(409, {"title": "Customer not found", "status": 409}) is Outcome.RETRY


@pytest.mark.parametrize("body", [None, {"title": "Rate limit exceeded, try again in 7 seconds"}, "slow down"])
def test_429_is_rate_limited(body: Any) -> None:
    assert classify(429, body) is Outcome.RATE_LIMITED


@pytest.mark.parametrize("status", [500, 502, 503, 504, 599])
def test_5xx_is_retried(status: int) -> None:
    assert classify(status, None) is Outcome.RETRY
    assert classify(status, {"title": "Internal Server Error"}) is Outcome.RETRY


def test_no_answer_status_0_is_retried() -> None:
    assert classify(0, None) is Outcome.RETRY


@pytest.mark.parametrize("status", [402, 403, 405, 406, 410, 411, 413, 415, 422, 451])
def test_other_4xx_are_dead(status: int) -> None:
    assert classify(status, PROBLEM) is Outcome.DEAD


@pytest.mark.parametrize("status", [401, 408])
def test_leftover_401_and_request_timeout_408_are_transient(status: int) -> None:
    # The client already refreshed the token once on a 401 (DESIGN: "refresh token once, resend"); a 401 that
    # survives that, and a 408 (a timeout), are treated as transient: retried up to max_attempts, then dead.
    assert classify(status, None) is Outcome.RETRY


@pytest.mark.parametrize("status", [100, 301, 304, 307])
def test_other_statuses_are_not_success(status: int) -> None:
    assert classify(status, {}) is not Outcome.SUCCEEDED


# ------------------------------------------------------------------------------------------------ backoff


class FixedRandom(random.Random):
    """uniform() always returns its low or its high end."""

    def __init__(self, high: bool) -> None:
        super().__init__(0)
        self.high = high

    def uniform(self, a: float, b: float) -> float:
        return b if self.high else a


def test_backoff_grows_exponentially() -> None:
    lows = [backoff_seconds(n, 1.0, 1000.0, FixedRandom(high=False)) for n in range(1, 7)]
    highs = [backoff_seconds(n, 1.0, 1000.0, FixedRandom(high=True)) for n in range(1, 7)]
    assert lows == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0]
    assert highs == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]


def test_backoff_scales_with_base() -> None:
    assert backoff_seconds(3, 0.25, 1000.0, FixedRandom(high=True)) == 1.0


@pytest.mark.parametrize("attempt", range(1, 15))
def test_backoff_stays_within_half_ceiling_and_ceiling(attempt: int) -> None:
    rng = random.Random(attempt)
    ceiling = min(30.0, 1.0 * 2 ** (attempt - 1))
    samples = [backoff_seconds(attempt, 1.0, 30.0, rng) for _ in range(200)]
    assert all(ceiling / 2 <= s <= ceiling for s in samples)


def test_backoff_is_capped_at_max() -> None:
    assert backoff_seconds(60, 1.0, 300.0, FixedRandom(high=True)) == 300.0
    assert backoff_seconds(60, 1.0, 300.0, FixedRandom(high=False)) == 150.0
    assert backoff_seconds(100, 1.0, 300.0) <= 300.0  # the configured max_attempts ceiling


def test_backoff_has_jitter() -> None:
    rng = random.Random(1234)
    samples = {backoff_seconds(5, 1.0, 300.0, rng) for _ in range(50)}
    assert len(samples) > 40  # not one fixed delay: replicas retrying together must spread out


def test_backoff_attempt_zero_or_negative_uses_base() -> None:
    assert backoff_seconds(0, 2.0, 300.0, FixedRandom(high=True)) == 2.0
    assert backoff_seconds(-3, 2.0, 300.0, FixedRandom(high=True)) == 2.0


def test_backoff_without_rng_uses_module_random() -> None:
    s = backoff_seconds(4, 1.0, 300.0)
    assert isinstance(s, float)
    assert 4.0 <= s <= 8.0
