"""The fault plan: injected failures (:class:`Fault`), explicit rules for matching requests (:class:`FaultRule`)
and the per-sandbox plan of rules and random faults (:class:`Faults`) the gateway draws from per request.
"""

from __future__ import annotations

import math
import random
import threading
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal, cast

from sync.sandbox.model import Entity, Route

FaultKind = Literal["rate_limit", "server_error", "drop", "slow", "late_answer"]
RetryAfterStyle = Literal["seconds", "http-date", "body", "none"]
RETRY_AFTER_STYLES: tuple[RetryAfterStyle, ...] = ("seconds", "http-date", "body", "none")
WRITE_METHODS = frozenset({"PATCH", "POST", "DELETE"})
"""API methods that change records: PATCH (update), POST (``/customers``, ``/locations``, a record's
``/contacts``: create) and DELETE (a contact)."""


@dataclass(frozen=True)
class Fault:
    """One injected failure.

    - ``rate_limit``: 429; ``retry_after`` seconds announced per ``retry_after_style``: ``seconds`` (header
      ``Retry-After: N``), ``http-date`` (header with an HTTP-date), ``body`` (no header; the JSON title says
      "... try again in N seconds"), ``none`` (no hint at all).
    - ``server_error``: ``status`` 5xx; ``html`` gives a load balancer's HTML page instead of JSON.
    - ``drop``: the connection is closed without an answer.
    - ``slow``: ``delay_ms`` added before the request is handled normally.
    - ``late_answer``: the request is handled at once (a PATCH or create is applied) and its normal answer, the
      record as it was then, is held back ``delay_ms`` before it is sent: an answer that may arrive after later
      edits and pulls.

    ``after_apply`` (server_error, drop): the request is processed (a PATCH is applied, a POST creates its
    record) and only then does the answer fail, the case a client cannot tell from a failure before the write
    (for a create: the one a re-send must look up by external data first, or it makes a duplicate).
    ``echo_headers`` (server_error, any ``status``, 400 included): the JSON error body carries the request's
    headers, as a misconfigured gateway or a debugging error page does (credentials included): what a client
    must never copy into its logs, output or database.
    """

    kind: FaultKind
    status: int = 0
    retry_after: float = 1.0
    retry_after_style: RetryAfterStyle = "seconds"
    html: bool = False
    after_apply: bool = False
    delay_ms: float = 0.0
    echo_headers: bool = False

    @classmethod
    def rate_limited(cls, retry_after: float = 1.0, style: RetryAfterStyle = "seconds") -> Fault:
        return cls("rate_limit", status=429, retry_after=retry_after, retry_after_style=style)

    @classmethod
    def server_error(cls, status: int = 500, *, html: bool = False, after_apply: bool = False,
                     echo_headers: bool = False) -> Fault:
        return cls("server_error", status=status, html=html, after_apply=after_apply, echo_headers=echo_headers)

    @classmethod
    def dropped(cls, *, after_apply: bool = False) -> Fault:
        return cls("drop", after_apply=after_apply)

    @classmethod
    def slow(cls, delay_ms: float) -> Fault:
        return cls("slow", delay_ms=delay_ms)

    @classmethod
    def late_answer(cls, delay_ms: float) -> Fault:
        return cls("late_answer", delay_ms=delay_ms)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Fault:
        kind = data.get("kind")
        if kind not in ("rate_limit", "server_error", "drop", "slow", "late_answer"):
            raise ValueError("fault kind must be rate_limit, server_error, drop, slow or late_answer")
        style = data.get("retry_after_style", "seconds")
        if style not in RETRY_AFTER_STYLES:
            raise ValueError(f"retry_after_style must be one of {', '.join(RETRY_AFTER_STYLES)}")
        status = int(data.get("status") or (429 if kind == "rate_limit" else 500 if kind == "server_error" else 0))
        return cls(
            kind=kind,
            status=status,
            retry_after=float(data.get("retry_after", 1.0)),
            retry_after_style=style,
            html=bool(data.get("html", False)),
            after_apply=bool(data.get("after_apply", False)),
            delay_ms=float(data.get("delay_ms", 0.0)),
            echo_headers=bool(data.get("echo_headers", False)),
        )


@dataclass
class FaultRule:
    """An explicit fault for the matching requests: ``skip`` of them pass first, then ``times`` fail
    (``times=None``: every one). Unset criteria match anything; rules apply to token calls only when they
    name ``endpoint="POST /connect/token"``."""

    fault: Fault
    times: int | None = 1
    skip: int = 0
    endpoint: str | None = None
    method: str | None = None
    entity: Entity | None = None
    record_id: int | None = None
    hits: int = 0

    def matches(self, route: Route) -> bool:
        if route.kind == "token" and self.endpoint != route.endpoint:
            return False
        return (
            (self.endpoint is None or self.endpoint == route.endpoint)
            and (self.method is None or self.method.upper() == route.method)
            and (self.entity is None or self.entity == route.entity)
            and (self.record_id is None or self.record_id == route.record_id)
        )

    @property
    def exhausted(self) -> bool:
        return self.times is not None and self.times <= 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "fault": self.fault.to_dict(),
            "times": self.times,
            "skip": self.skip,
            "endpoint": self.endpoint,
            "method": self.method,
            "entity": self.entity,
            "record_id": self.record_id,
            "hits": self.hits,
        }


class Faults:
    """The fault plan of a sandbox: explicit rules first (in order), then random faults.

    Random faults hit API calls only (never the token endpoint), optionally only ``endpoints`` (counter keys)
    and only requests about ``record_ids``. One uniform draw per request picks at most one of 429 / 5xx /
    drop / slow by their probabilities, from an RNG seeded with ``seed`` (deterministic for a given order of
    requests). Set attributes directly, or use :meth:`configure` (also what ``POST /_sandbox/faults`` calls).
    """

    SETTINGS = (
        "seed",
        "rate_limit_probability",
        "server_error_probability",
        "drop_probability",
        "slow_probability",
        "server_error_statuses",
        "html_502",
        "slow_ms",
        "retry_after_seconds",
        "retry_after_styles",
        "after_apply_probability",
        "late_answer_probability",
        "late_answer_ms",
        "endpoints",
        "record_ids",
    )

    def __init__(
        self,
        seed: int = 0,
        *,
        rate_limit_probability: float = 0.0,
        server_error_probability: float = 0.0,
        drop_probability: float = 0.0,
        slow_probability: float = 0.0,
        server_error_statuses: tuple[int, ...] = (500, 502, 503),
        html_502: bool = True,
        slow_ms: tuple[float, float] = (1000.0, 3000.0),
        retry_after_seconds: float = 1.0,
        retry_after_styles: tuple[RetryAfterStyle, ...] = ("seconds", "http-date", "body"),
        after_apply_probability: float = 0.0,
        late_answer_probability: float = 0.0,
        late_answer_ms: tuple[float, float] = (500.0, 1500.0),
        endpoints: Iterable[str] | None = None,
        record_ids: Iterable[int] | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self._seed = seed
        self._rng = random.Random(seed)
        self.rate_limit_probability = rate_limit_probability
        self.server_error_probability = server_error_probability
        self.drop_probability = drop_probability
        self.slow_probability = slow_probability
        self.server_error_statuses = tuple(server_error_statuses)
        self.html_502 = html_502
        """A random 502 comes as an HTML page (as from a load balancer) rather than JSON."""
        self.slow_ms = slow_ms
        self.retry_after_seconds = retry_after_seconds
        self.retry_after_styles = tuple(retry_after_styles)
        self.after_apply_probability = after_apply_probability
        """Share of random 5xx/drops on writes (PATCH, create POST) that happen after the change was applied."""
        self.late_answer_probability = late_answer_probability
        """Share of writes (PATCH, create POST) applied at once and answered ``late_answer_ms`` later (drawn after
        the others)."""
        self.late_answer_ms = late_answer_ms
        self.endpoints: frozenset[str] | None = None if endpoints is None else frozenset(endpoints)
        self.record_ids: frozenset[int] | None = None if record_ids is None else frozenset(record_ids)
        self.rules: list[FaultRule] = []

    @property
    def seed(self) -> int:
        return self._seed

    @seed.setter
    def seed(self, value: int) -> None:
        with self._lock:
            self._seed = value
            self._rng = random.Random(value)

    # Short aliases (probabilities; slow_seconds sets a fixed slow delay).
    @property
    def rate_429(self) -> float:
        return self.rate_limit_probability

    @rate_429.setter
    def rate_429(self, value: float) -> None:
        self.rate_limit_probability = value

    @property
    def rate_5xx(self) -> float:
        return self.server_error_probability

    @rate_5xx.setter
    def rate_5xx(self, value: float) -> None:
        self.server_error_probability = value

    @property
    def rate_drop(self) -> float:
        return self.drop_probability

    @rate_drop.setter
    def rate_drop(self, value: float) -> None:
        self.drop_probability = value

    @property
    def rate_slow(self) -> float:
        return self.slow_probability

    @rate_slow.setter
    def rate_slow(self, value: float) -> None:
        self.slow_probability = value

    @property
    def slow_seconds(self) -> float:
        return (self.slow_ms[0] + self.slow_ms[1]) / 2000.0

    @slow_seconds.setter
    def slow_seconds(self, value: float) -> None:
        self.slow_ms = (value * 1000.0, value * 1000.0)

    def add(
        self,
        fault: Fault,
        *,
        times: int | None = 1,
        skip: int = 0,
        endpoint: str | None = None,
        method: str | None = None,
        entity: Entity | None = None,
        record_id: int | None = None,
    ) -> FaultRule:
        """Schedule ``fault`` for the next matching requests; returns the rule (``hits`` counts its uses)."""
        rule = FaultRule(fault, times, skip, endpoint, method, entity, record_id)
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        """No rules, no random faults (the seed is kept)."""
        with self._lock:
            self.rules.clear()
            self.rate_limit_probability = self.server_error_probability = 0.0
            self.drop_probability = self.slow_probability = self.after_apply_probability = 0.0
            self.late_answer_probability = 0.0
            self.endpoints = self.record_ids = None

    def configure(self, **settings: Any) -> None:
        """Set any of :attr:`SETTINGS` (JSON-friendly values: lists for tuples/sets)."""
        unknown = set(settings) - set(self.SETTINGS)
        if unknown:
            raise ValueError(f"unknown fault settings: {', '.join(sorted(unknown))}")
        for name, value in settings.items():
            if name == "seed":
                self.seed = int(value)
            elif name.endswith("_probability"):
                p = float(value)
                if not 0.0 <= p <= 1.0:
                    raise ValueError(f"{name} must be between 0 and 1")
                setattr(self, name, p)
            elif name == "server_error_statuses":
                statuses = tuple(int(s) for s in value)
                if not statuses or any(not 500 <= s <= 599 for s in statuses):
                    raise ValueError("server_error_statuses must be 5xx codes")
                self.server_error_statuses = statuses
            elif name == "retry_after_styles":
                styles = tuple(value)
                if not styles or any(s not in RETRY_AFTER_STYLES for s in styles):
                    raise ValueError(f"retry_after_styles must be among {', '.join(RETRY_AFTER_STYLES)}")
                self.retry_after_styles = cast("tuple[RetryAfterStyle, ...]", styles)
            elif name in ("slow_ms", "late_answer_ms"):
                lo, hi = (float(v) for v in value)
                setattr(self, name, (lo, hi))
            elif name == "endpoints":
                self.endpoints = None if value is None else frozenset(str(v) for v in value)
            elif name == "record_ids":
                self.record_ids = None if value is None else frozenset(int(v) for v in value)
            elif name == "html_502":
                self.html_502 = bool(value)
            else:
                setattr(self, name, float(value))

    def to_dict(self) -> dict[str, Any]:
        with self._lock:
            rules = [r.to_dict() for r in self.rules]
        return {
            "seed": self.seed,
            "rate_limit_probability": self.rate_limit_probability,
            "server_error_probability": self.server_error_probability,
            "drop_probability": self.drop_probability,
            "slow_probability": self.slow_probability,
            "server_error_statuses": list(self.server_error_statuses),
            "html_502": self.html_502,
            "slow_ms": list(self.slow_ms),
            "retry_after_seconds": self.retry_after_seconds,
            "retry_after_styles": list(self.retry_after_styles),
            "after_apply_probability": self.after_apply_probability,
            "late_answer_probability": self.late_answer_probability,
            "late_answer_ms": list(self.late_answer_ms),
            "endpoints": None if self.endpoints is None else sorted(self.endpoints),
            "record_ids": None if self.record_ids is None else sorted(self.record_ids),
            "rules": rules,
        }

    def draw(self, route: Route) -> Fault | None:
        """The fault for this request, if any (consumes rules)."""
        with self._lock:
            for rule in self.rules:
                if rule.exhausted or not rule.matches(route):
                    continue
                if rule.skip > 0:
                    rule.skip -= 1
                    continue
                rule.hits += 1
                if rule.times is not None:
                    rule.times -= 1
                self.rules = [r for r in self.rules if not r.exhausted]
                return rule.fault
            return self._random(route)

    def _random(self, route: Route) -> Fault | None:
        p429, p5xx = self.rate_limit_probability, self.server_error_probability
        pdrop, pslow = self.drop_probability, self.slow_probability
        write = route.kind == "api" and route.method in WRITE_METHODS
        plate = self.late_answer_probability if write else 0.0
        if route.kind != "api" or not (p429 or p5xx or pdrop or pslow or plate):
            return None
        if self.endpoints is not None and route.endpoint not in self.endpoints:
            return None
        if self.record_ids is not None and route.record_id not in self.record_ids:
            return None
        rng = self._rng
        r = rng.random()
        if r < p429:
            style = self.retry_after_styles[int(rng.random() * len(self.retry_after_styles))]
            return Fault.rate_limited(self.retry_after_seconds, style)
        after_apply = write and rng.random() < self.after_apply_probability
        if r < p429 + p5xx:
            status = self.server_error_statuses[int(rng.random() * len(self.server_error_statuses))]
            return Fault.server_error(status, html=status == 502 and self.html_502, after_apply=after_apply)
        if r < p429 + p5xx + pdrop:
            return Fault.dropped(after_apply=after_apply)
        if r < p429 + p5xx + pdrop + pslow:
            return Fault.slow(rng.uniform(*self.slow_ms))
        if r < p429 + p5xx + pdrop + pslow + plate:
            return Fault.late_answer(rng.uniform(*self.late_answer_ms))
        return None


def retry_after_header_seconds(seconds: float) -> int:
    return max(0, math.ceil(seconds))
