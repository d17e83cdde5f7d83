"""The sandbox's tenant: records, tokens, rate limiter, fault plan, counters and request log, behind one lock.

Everything here is synchronous and thread-safe: the ASGI app (``sync.sandbox.app``) calls it from uvicorn's
event loop thread while tests call the Python API from theirs. Nothing here awaits while holding the lock.

Storage: one ``_Table`` per entity with records in ServiceTitan's response shape keyed by id, plus an
ordering index ``[(modified µs, id), ...]`` kept sorted for the export feeds. Stored record dicts are never
mutated once published (copy on write), so the app may serialise them outside the lock; the Python API
returns deep copies.
"""

from __future__ import annotations

import bisect
import gc
import hmac
import math
import random
import re
import secrets
import threading
import time
import uuid
from base64 import urlsafe_b64decode, urlsafe_b64encode
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, Literal, cast

from sync.sandbox import seed as fake
from sync.sandbox.seed import iso_from_us
from sync.sandbox.validation import update_fields, validate_update

Entity = Literal["customer", "location"]
ENTITIES: tuple[Entity, ...] = ("customer", "location")
COLLECTIONS: dict[Entity, str] = {"customer": "customers", "location": "locations"}
ENTITY_OF_COLLECTION: dict[str, Entity] = {"customers": "customer", "locations": "location"}

LIST_MAX_PAGE_SIZE = 5000
LIST_DEFAULT_PAGE_SIZE = 50
LOCATION_IDS_MAX = 50
OAUTH_SCOPE = "tn.crm.customers:r tn.crm.customers:w tn.crm.locations:r tn.crm.locations:w"

PROBLEM_TYPES: dict[int, str] = {
    400: "https://tools.ietf.org/html/rfc7231#section-6.5.1",
    401: "https://tools.ietf.org/html/rfc7235#section-3.1",
    404: "https://tools.ietf.org/html/rfc7231#section-6.5.4",
    405: "https://tools.ietf.org/html/rfc7231#section-6.5.5",
    409: "https://tools.ietf.org/html/rfc7231#section-6.5.8",
    415: "https://tools.ietf.org/html/rfc7231#section-6.5.13",
    429: "https://tools.ietf.org/html/rfc6585#section-4",
    500: "https://tools.ietf.org/html/rfc7231#section-6.6.1",
    502: "https://tools.ietf.org/html/rfc7231#section-6.6.3",
    503: "https://tools.ietf.org/html/rfc7231#section-6.6.4",
    504: "https://tools.ietf.org/html/rfc7231#section-6.6.5",
}
VALIDATION_TITLE = "One or more validation errors occurred."
TITLE_NO_APP_KEY = "Application key not present, check ST-App-Key header value."
TITLE_BAD_APP_KEY = "Application key is not valid, check ST-App-Key header value."
TITLE_NO_BEARER = "Authorization header with a bearer token is required."
TITLE_BAD_BEARER = "The access token is invalid or has expired."
TITLE_WRONG_TENANT = "The access token was not issued for this tenant."

# Fields ServiceTitan itself changes (accounting, merges, dispatch zones): remote edits may set them, PATCH may not.
REMOTE_ONLY_FIELDS: dict[Entity, frozenset[str]] = {
    "customer": frozenset({"balance", "mergedToId", "createdById"}),
    "location": frozenset({"zoneId", "mergedToId", "taxExempt", "createdById"}),
}
_ADDRESS_TEXT = ("street", "unit", "city", "state", "zip", "country")
_ADDRESS_REQUIRED_TEXT = ("street", "city", "zip")
_GUID = re.compile(r"^\{?[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}\}?$")
_CONTINUATION_PREFIX = "stx1"
_MAX_ID = 2**63 - 1


# ------------------------------------------------------------------------------------------------- errors


class ApiError(Exception):
    """An answer ServiceTitan would give as an RFC 7807 ``ApiErrorResponse``."""

    def __init__(
        self,
        status: int,
        title: str,
        errors: Mapping[str, list[str]] | None = None,
        data: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(title)
        self.status = status
        self.title = title
        self.errors: dict[str, list[str]] = dict(errors or {})
        self.data: dict[str, Any] = dict(data or {})

    def body(self) -> dict[str, Any]:
        return problem(self.status, self.title, self.errors, self.data)

    def __str__(self) -> str:
        return f"{self.status} {self.title} {self.errors}" if self.errors else f"{self.status} {self.title}"


class RecordNotFound(ApiError, LookupError):
    def __init__(self, entity: Entity, record_id: int) -> None:
        super().__init__(404, f"{entity.capitalize()} with id {record_id} not found.", data={"id": record_id})
        self.entity = entity
        self.record_id = record_id


class OAuthError(Exception):
    """A token endpoint refusal, answered as ``{"error": code}`` with status 400 (OAuth2, RFC 6749 5.2)."""

    def __init__(self, error: str, description: str | None = None) -> None:
        super().__init__(error)
        self.error = error
        self.description = description

    def body(self) -> dict[str, str]:
        out = {"error": self.error}
        if self.description:
            out["error_description"] = self.description
        return out


def trace_id() -> str:
    return f"00-{uuid.uuid4().hex}-{secrets.token_hex(8)}-00"


def problem(
    status: int, title: str, errors: Mapping[str, list[str]] | None = None, data: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """An ``ApiErrorResponse`` body."""
    return {
        "type": PROBLEM_TYPES.get(status, "https://tools.ietf.org/html/rfc7231"),
        "title": title,
        "status": status,
        "traceId": trace_id(),
        "errors": dict(errors or {}),
        "data": dict(data or {}),
    }


# ------------------------------------------------------------------------------------------------- routes, log


RouteKind = Literal["token", "api", "admin", "other"]


@dataclass(frozen=True, slots=True)
class Route:
    """What a request addresses, as the gateway classified it."""

    kind: RouteKind
    method: str
    endpoint: str
    """Counter key, e.g. ``PATCH /customers/{id}``, ``GET /export/locations``, ``POST /connect/token``."""
    entity: Entity | None = None
    record_id: int | None = None
    tenant: str | None = None


@dataclass(slots=True)
class RequestRecord:
    """One request the sandbox received (API and token calls; admin calls are not logged)."""

    method: str
    path: str
    query: str
    body: Any
    """Parsed JSON body (PATCH), the token form without the secret, or None."""
    status: int
    """HTTP status answered; 0 when the connection was dropped without an answer."""
    time: float
    """Sandbox clock (epoch seconds) when the request arrived."""
    duration_ms: float
    endpoint: str
    entity: Entity | None
    record_id: int | None
    fault: str | None
    """``rate_limit``/``server_error``/``drop``/``slow`` (injected), ``limiter`` (enforced limit), or None."""
    applied: bool
    """A write was applied (even if its answer was then replaced by a fault)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------------- faults

FaultKind = Literal["rate_limit", "server_error", "drop", "slow"]
RetryAfterStyle = Literal["seconds", "http-date", "body", "none"]
RETRY_AFTER_STYLES: tuple[RetryAfterStyle, ...] = ("seconds", "http-date", "body", "none")


@dataclass(frozen=True)
class Fault:
    """One injected failure.

    - ``rate_limit``: 429; ``retry_after`` seconds announced per ``retry_after_style``: ``seconds`` (header
      ``Retry-After: N``), ``http-date`` (header with an HTTP-date), ``body`` (no header; the JSON title says
      "... try again in N seconds"), ``none`` (no hint at all).
    - ``server_error``: ``status`` 5xx; ``html`` gives a load balancer's HTML page instead of JSON.
    - ``drop``: the connection is closed without an answer.
    - ``slow``: ``delay_ms`` added before the request is handled normally.

    ``after_apply`` (server_error, drop): the request is processed (a PATCH is applied) and only then does the
    answer fail, the case a client cannot tell from a failure before the write.
    """

    kind: FaultKind
    status: int = 0
    retry_after: float = 1.0
    retry_after_style: RetryAfterStyle = "seconds"
    html: bool = False
    after_apply: bool = False
    delay_ms: float = 0.0

    @classmethod
    def rate_limited(cls, retry_after: float = 1.0, style: RetryAfterStyle = "seconds") -> Fault:
        return cls("rate_limit", status=429, retry_after=retry_after, retry_after_style=style)

    @classmethod
    def server_error(cls, status: int = 500, *, html: bool = False, after_apply: bool = False) -> Fault:
        return cls("server_error", status=status, html=html, after_apply=after_apply)

    @classmethod
    def dropped(cls, *, after_apply: bool = False) -> Fault:
        return cls("drop", after_apply=after_apply)

    @classmethod
    def slow(cls, delay_ms: float) -> Fault:
        return cls("slow", delay_ms=delay_ms)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Fault:
        kind = data.get("kind")
        if kind not in ("rate_limit", "server_error", "drop", "slow"):
            raise ValueError("fault kind must be rate_limit, server_error, drop or slow")
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
        """Share of random 5xx/drops on PATCH that happen after the change was applied."""
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
            elif name == "slow_ms":
                lo, hi = (float(v) for v in value)
                self.slow_ms = (lo, hi)
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
        if route.kind != "api" or not (p429 or p5xx or pdrop or pslow):
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
        after_apply = route.method == "PATCH" and rng.random() < self.after_apply_probability
        if r < p429 + p5xx:
            status = self.server_error_statuses[int(rng.random() * len(self.server_error_statuses))]
            return Fault.server_error(status, html=status == 502 and self.html_502, after_apply=after_apply)
        if r < p429 + p5xx + pdrop:
            return Fault.dropped(after_apply=after_apply)
        if r < p429 + p5xx + pdrop + pslow:
            return Fault.slow(rng.uniform(*self.slow_ms))
        return None


# ------------------------------------------------------------------------------------------------- time


def now_us(clock: Callable[[], float]) -> int:
    return int(clock() * 1_000_000)


_FRACTION = re.compile(r"(\.\d{6})\d+")


def parse_when(text: str) -> int:
    """A date or date-time string (ISO 8601; naive means UTC; up to 7 fraction digits as .NET writes them)
    as microseconds since the epoch. Raises ValueError."""
    s = text.strip()
    if not s:
        raise ValueError("empty date")
    if s[-1] in "zZ":
        s = s[:-1] + "+00:00"
    s = _FRACTION.sub(r"\1", s)
    dt = datetime.fromisoformat(s)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    delta = dt - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def encode_continuation(entity: Entity, ts: int, record_id: int) -> str:
    raw = f"{_CONTINUATION_PREFIX}|{entity}|{ts}|{record_id}".encode()
    return urlsafe_b64encode(raw).decode().rstrip("=")


def decode_continuation(entity: Entity, token: str) -> tuple[int, int] | None:
    """The ``(modified µs, id)`` position a token encodes; None when ``token`` is not one of ours."""
    try:
        raw = urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        return None
    parts = raw.split("|")
    if len(parts) != 4 or parts[0] != _CONTINUATION_PREFIX:
        return None
    if parts[1] != entity:
        raise ApiError(400, VALIDATION_TITLE, {"from": [f"The continuation token belongs to the {parts[1]} feed."]})
    try:
        return int(parts[2]), int(parts[3])
    except ValueError:
        return None


# ------------------------------------------------------------------------------------------------- storage


class _Table:
    __slots__ = ("entity", "ext", "next_id", "order", "records", "ts")

    def __init__(self, entity: Entity, first_id: int) -> None:
        self.entity: Entity = entity
        self.records: dict[int, dict[str, Any]] = {}
        """Published records in API shape (``externalData: []``); never mutated, replaced on change."""
        self.ts: dict[int, int] = {}
        """modifiedOn of each record as µs since the epoch."""
        self.order: list[tuple[int, int]] = []
        """Sorted ``(modified µs, id)``: the export feed's order."""
        self.ext: dict[int, dict[str, dict[str, str]]] = {}
        """External data: record id -> application guid (lower case) -> key -> value."""
        self.next_id = first_id

    def insert(self, record: dict[str, Any], ts: int) -> None:
        rid = record["id"]
        self.records[rid] = record
        self.ts[rid] = ts
        self._place(ts, rid)

    def touch(self, rid: int, ts: int) -> None:
        old = self.ts[rid]
        i = bisect.bisect_left(self.order, (old, rid))
        if i < len(self.order) and self.order[i] == (old, rid):
            del self.order[i]
        self.ts[rid] = ts
        self._place(ts, rid)

    def _place(self, ts: int, rid: int) -> None:
        key = (ts, rid)
        if not self.order or self.order[-1] < key:
            self.order.append(key)  # the usual case: a new modification is the newest
        else:
            bisect.insort(self.order, key)


def _clone(record: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(record)
    out["address"] = dict(record["address"]) if record.get("address") is not None else None
    out["customFields"] = [dict(cf) for cf in record["customFields"]]
    out["tagTypeIds"] = list(record["tagTypeIds"])
    out["externalData"] = [dict(e) for e in record["externalData"]]
    return out


def _normalise_address(address: Mapping[str, Any]) -> dict[str, Any]:
    """What ServiceTitan stores: trimmed text, 2-letter states upper-cased, coordinates rounded to 6 places."""
    out: dict[str, Any] = {}
    for key in _ADDRESS_TEXT:
        value = address.get(key)
        out[key] = value.strip() if isinstance(value, str) else value
    state = out["state"]
    if isinstance(state, str) and len(state) == 2:
        out["state"] = state.upper()
    for key in ("latitude", "longitude"):
        value = address.get(key)
        out[key] = None if value is None else round(float(value), 6)
    return out


def _model_errors(body: Mapping[str, Any], errors: dict[str, list[str]]) -> None:
    """Checks ServiceTitan makes on the body itself (beyond the schema)."""
    name = body.get("name")
    if isinstance(name, str) and not name.strip():
        errors.setdefault("name", []).append("The Name field is required.")
    address = body.get("address")
    if isinstance(address, Mapping):
        for key in _ADDRESS_REQUIRED_TEXT:
            value = address.get(key)
            if not isinstance(value, str) or not value.strip():
                errors.setdefault(f"address.{key}", []).append(f"The {key.capitalize()} field is required.")
    ext = body.get("externalData")
    if isinstance(ext, Mapping):
        guid = ext.get("applicationGuid")
        if isinstance(guid, str) and not _GUID.match(guid):
            errors.setdefault("externalData.applicationGuid", []).append(f"The value '{guid}' is not valid.")


@lru_cache(maxsize=1024)
def _guid_key(guid: str) -> str:
    return str(uuid.UUID(guid))  # canonical lower-case form: GUIDs compare case-insensitively


# ------------------------------------------------------------------------------------------------- sandbox


class Sandbox:
    """One simulated ServiceTitan tenant (CRM v2 customers and locations) and its Python API.

    ``rate_limit_per_second``: enforced limit per tenant over a sliding 1-second window of admitted API calls
    (None or 0 disables it). ``latency_ms``: uniform random delay added to every API call. ``export_page_size``:
    records per export page. ``export_delay_seconds``: without ``includeRecentChanges=true`` an export only
    shows changes at least this old (ServiceTitan: about 15 minutes). ``bump_modified_on_noop``: a PATCH that
    changes nothing still advances ``modifiedOn`` (default True, see docs). ``clock``: epoch seconds, for
    ``modifiedOn``, token expiry and the export delay (tests may pass a fake one).
    """

    def __init__(
        self,
        tenant_id: int = 1,
        client_id: str = "sandbox-client",
        client_secret: str = "sandbox-secret",  # noqa: S107  (a public, fake default)
        app_key: str = "sandbox-app-key",
        token_ttl_seconds: int = 900,
        rate_limit_per_second: float | None = 60.0,
        latency_ms: tuple[float, float] = (0, 0),
        *,
        export_page_size: int = 500,
        export_delay_seconds: float = 0.0,
        bump_modified_on_noop: bool = True,
        request_log_limit: int = 100_000,
        faults: Faults | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.tenant_id = tenant_id
        self.client_id = client_id
        self.client_secret = client_secret
        self.app_key = app_key
        self.token_ttl_seconds = token_ttl_seconds
        self.rate_limit_per_second = rate_limit_per_second
        self.latency_ms = latency_ms
        self.export_page_size = export_page_size
        self.export_delay_seconds = export_delay_seconds
        self.bump_modified_on_noop = bump_modified_on_noop
        self.faults = faults if faults is not None else Faults()
        self.clock = clock
        self.tag_type_ids: set[int] = set(fake.TAG_TYPES)
        self.tax_zone_ids: set[int] = set(fake.TAX_ZONES)
        self.custom_field_types: dict[Entity, dict[int, str]] = {
            "customer": dict(fake.CUSTOMER_CUSTOM_FIELDS),
            "location": dict(fake.LOCATION_CUSTOM_FIELDS),
        }
        self._lock = threading.RLock()
        self._tables: dict[Entity, _Table] = {
            "customer": _Table("customer", fake.FIRST_CUSTOMER_ID),
            "location": _Table("location", fake.FIRST_LOCATION_ID),
        }
        self._last_us = 0
        self._tokens: dict[str, tuple[int, float]] = {}
        self._windows: dict[str, deque[float]] = {}
        self._latency_rng = random.Random()
        self._log: deque[RequestRecord] = deque(maxlen=request_log_limit)
        self._counters: dict[str, dict[int, int]] = {}

    # ------------------------------------------------------------------------------------------ clock

    def _tick(self) -> int:
        """A new modifiedOn: now, but strictly after every modifiedOn handed out before."""
        now = now_us(self.clock)
        if now <= self._last_us:
            now = self._last_us + 1
        self._last_us = now
        return now

    # ------------------------------------------------------------------------------------------ seeding

    def seed(self, customers: int, locations: int, seed: int = 0) -> None:
        """Replace all records with ``customers`` + ``locations`` deterministic fake ones (see ``seed.py``)."""
        gc_was_enabled = gc.isenabled()
        gc.disable()  # building the tables of hundreds of thousands of records: see seed.generate
        try:
            self._seed(fake.generate(customers, locations, seed))
        finally:
            if gc_was_enabled:
                gc.enable()

    def _seed(self, data: fake.SeedData) -> None:
        with self._lock:
            for entity, records, stamps, ext in (
                ("customer", data.customers, data.customer_modified_us, data.customer_external),
                ("location", data.locations, data.location_modified_us, data.location_external),
            ):
                e = cast(Entity, entity)
                first = fake.FIRST_CUSTOMER_ID if e == "customer" else fake.FIRST_LOCATION_ID
                table = _Table(e, first + len(records))
                table.records = {r["id"]: r for r in records}
                table.ts = {r["id"]: ts for r, ts in zip(records, stamps, strict=True)}
                table.order = sorted((ts, rid) for rid, ts in table.ts.items())
                table.ext = ext
                self._tables[e] = table
                if table.order:
                    self._last_us = max(self._last_us, table.order[-1][0])

    def add_customer(self, **fields: Any) -> dict[str, Any]:
        """Create a customer as ServiceTitan would (fake name and address unless given; no tags, no custom
        fields, active). ``fields`` use API names; ``externalData`` takes the PATCH form."""
        return self._create("customer", None, fields)

    def add_location(self, customer_id: int, **fields: Any) -> dict[str, Any]:
        """Create a location of ``customer_id`` (409 ApiError if unknown); name defaults to the customer's."""
        return self._create("location", customer_id, fields)

    def _create(self, entity: Entity, customer_id: int | None, fields: Mapping[str, Any]) -> dict[str, Any]:
        with self._lock:
            table = self._tables[entity]
            rid = table.next_id
            rng = random.Random(rid)
            ts = self._tick()
            if entity == "customer":
                commercial = fields.get("type") == "Commercial"
                base = fake.customer_record(rng, rid, ts, ts, commercial=commercial)
                base.update(active=True, customFields=[], tagTypeIds=[], balance=0.0, taxExempt=False,
                            doNotMail=False, doNotService=False, nationalAccount=False)
                base["address"] = fake.fake_address(rng, coordinates_probability=1.0)
            else:
                customers = self._tables["customer"].records
                if customer_id not in customers:
                    raise ApiError(409, "Customer not found.", {"customerId": [f"Customer {customer_id} not found."]})
                owner = customers[customer_id]
                base = fake.location_record(rng, rid, owner, ts, ts)
                base.update(active=True, customFields=[], tagTypeIds=[], taxExempt=False, name=owner["name"],
                            taxZoneId=None)
                base["address"] = fake.fake_address(rng, coordinates_probability=1.0)
            body = dict(fields)
            if isinstance(body.get("address"), Mapping):
                body["address"] = {**base["address"], **body["address"]}
            new, ext = self._prepare(entity, base, body, remote=True)
            table.next_id = rid + 1
            table.insert(new, ts)
            if ext is not None:
                table.ext[rid] = ext[1]
            return _clone(new)

    # ------------------------------------------------------------------------------------------ reading

    def get_customer(self, customer_id: int, application_guid: str | None = None) -> dict[str, Any]:
        """The full API representation; ``externalData`` for ``application_guid`` (empty without one)."""
        return self._get("customer", customer_id, application_guid)

    def get_location(self, location_id: int, application_guid: str | None = None) -> dict[str, Any]:
        return self._get("location", location_id, application_guid)

    def _get(self, entity: Entity, rid: int, guid: str | None) -> dict[str, Any]:
        with self._lock:
            table = self._tables[entity]
            record = table.records.get(rid)
            if record is None:
                raise RecordNotFound(entity, rid)
            out = _clone(record)
            if guid:
                out["externalData"] = self._ext_list(table, rid, guid)
            return out

    def customers(self) -> list[dict[str, Any]]:
        """Every customer (active or not), in id order, as deep copies."""
        with self._lock:
            return [_clone(r) for r in self._tables["customer"].records.values()]

    def locations(self) -> list[dict[str, Any]]:
        with self._lock:
            return [_clone(r) for r in self._tables["location"].records.values()]

    def external_data(self, entity: Entity, record_id: int) -> dict[str, dict[str, str]]:
        """All external data of a record: application guid (lower case) -> key -> value."""
        with self._lock:
            table = self._tables[entity]
            if record_id not in table.records:
                raise RecordNotFound(entity, record_id)
            return {g: dict(kv) for g, kv in table.ext.get(record_id, {}).items()}

    def count(self, entity: Entity) -> int:
        with self._lock:
            return len(self._tables[entity].records)

    # ------------------------------------------------------------------------------------------ remote edits

    def edit_customer(self, customer_id: int, **fields: Any) -> dict[str, Any]:
        """A change made inside ServiceTitan (office staff, another integration): applied like a PATCH, and
        ``modifiedOn`` advances. Takes API field names, a partial ``address`` (merged into the stored one),
        ``externalData`` in the PATCH form, and fields only ServiceTitan sets (``balance``, ``mergedToId``...).
        Raises RecordNotFound, or ApiError (400/409) for what ServiceTitan would refuse."""
        return self._edit("customer", customer_id, fields)

    def edit_location(self, location_id: int, **fields: Any) -> dict[str, Any]:
        return self._edit("location", location_id, fields)

    def _edit(self, entity: Entity, rid: int, fields: Mapping[str, Any]) -> dict[str, Any]:
        with self._lock:
            table = self._tables[entity]
            old = table.records.get(rid)
            if old is None:
                raise RecordNotFound(entity, rid)
            body = dict(fields)
            if isinstance(body.get("address"), Mapping) and old.get("address"):
                body["address"] = {**old["address"], **body["address"]}
            new, ext = self._prepare(entity, old, body, remote=True)
            self._publish(table, rid, new, ext, changed=True)
            return _clone(table.records[rid])

    # ------------------------------------------------------------------------------------------ API operations
    # Used by the ASGI app. They return shared, read-only structures (serialise, never mutate) and raise ApiError.

    def api_get(self, entity: Entity, rid: int) -> dict[str, Any]:
        with self._lock:
            record = self._tables[entity].records.get(rid)
        if record is None:
            raise RecordNotFound(entity, rid)
        return record

    def api_patch(self, entity: Entity, rid: int, body: Any) -> dict[str, Any]:
        """PATCH semantics: schema (400), model checks (400), record (404), references (400/409), then apply."""
        errors = validate_update(entity, body)
        if isinstance(body, Mapping):
            _model_errors(body, errors)
        if errors:
            raise ApiError(400, VALIDATION_TITLE, errors)
        with self._lock:
            table = self._tables[entity]
            old = table.records.get(rid)
            if old is None:
                raise RecordNotFound(entity, rid)
            new, ext = self._prepare(entity, old, body, remote=False)
            changed = new != old or (ext is not None and ext[1] != table.ext.get(rid, {}))
            self._publish(table, rid, new, ext, changed=changed)
            record = table.records[rid]
            if ext is None:
                return record
            return {**record, "externalData": self._ext_list(table, rid, ext[0])}

    def _prepare(
        self, entity: Entity, old: Mapping[str, Any], body: dict[str, Any], *, remote: bool
    ) -> tuple[dict[str, Any], tuple[str, dict[str, dict[str, str]]] | None]:
        """The new record and, when the body carries externalData, (guid, the record's new external data).
        Checks references. With ``remote``, also the loose validation of remote edits and creations."""
        if remote:
            self._check_remote_body(entity, body)
        errors: dict[str, list[str]] = {}
        tags = body.get("tagTypeIds")
        if tags is not None:
            unknown = sorted({t for t in tags if t not in self.tag_type_ids})
            if unknown:
                errors["tagTypeIds"] = [f"Tag type {t} does not exist." for t in unknown]
        types = self.custom_field_types[entity]
        for i, cf in enumerate(body.get("customFields") or []):
            if cf["typeId"] not in types:
                errors[f"customFields[{i}].typeId"] = [f"Custom field type {cf['typeId']} does not exist."]
        if errors:
            raise ApiError(400, VALIDATION_TITLE, errors)
        if entity == "location":
            customer_id = body.get("customerId")
            if "customerId" in body and customer_id not in self._tables["customer"].records:
                raise ApiError(409, "Customer not found.", {"customerId": [f"Customer {customer_id} not found."]})
            tax_zone_id = body.get("taxZoneId")
            if tax_zone_id is not None and tax_zone_id not in self.tax_zone_ids:
                raise ApiError(409, "Tax zone not found.", {"taxZoneId": [f"Tax zone {tax_zone_id} not found."]})

        new = dict(old)
        for key, value in body.items():
            if key == "externalData":
                continue
            if key == "address":
                new["address"] = _normalise_address(value)
            elif key == "name":
                new["name"] = value.strip()
            elif key == "customFields":
                by_type = {cf["typeId"]: cf.get("value") for cf in value}
                new["customFields"] = [{"typeId": t, "name": types[t], "value": by_type[t]} for t in sorted(by_type)]
            elif key == "tagTypeIds":
                new["tagTypeIds"] = sorted(set(value))
            elif key == "balance":
                new["balance"] = round(float(value), 2)
            else:
                new[key] = value

        ext_body = body.get("externalData")
        if ext_body is None:
            return new, None
        guid = _guid_key(ext_body["applicationGuid"])
        table = self._tables[entity]
        current = table.ext.get(old["id"], {})
        items = ext_body.get("externalData") or []
        if (ext_body.get("patchMode") or "Replace") == "Merge":
            data = dict(current.get(guid, {}))
            for item in items:
                if item.get("value") is None:
                    data.pop(item["key"], None)
                else:
                    data[item["key"]] = item["value"]
        else:
            data = {item["key"]: item["value"] for item in items if item.get("value") is not None}
        all_guids = {**current, guid: data}
        if not data:
            del all_guids[guid]
        return new, (guid, all_guids)

    def _check_remote_body(self, entity: Entity, body: dict[str, Any]) -> None:
        """Remote edits and creations: known field names, schema-valid values (address checked loosely, since
        ServiceTitan itself may store a null unit or coordinates), ServiceTitan's model checks."""
        allowed = update_fields(entity) | REMOTE_ONLY_FIELDS[entity]
        unknown = sorted(set(body) - allowed)
        if unknown:
            raise ApiError(400, VALIDATION_TITLE, {k: [f"The field {k} is not a known field."] for k in unknown})
        checked = {k: v for k, v in body.items() if k != "address" and k not in REMOTE_ONLY_FIELDS[entity]}
        errors = validate_update(entity, checked)
        for key in REMOTE_ONLY_FIELDS[entity]:
            value = body.get(key)
            ok = value is None or (isinstance(value, bool) if key == "taxExempt" else
                                   isinstance(value, int | float) and not isinstance(value, bool))
            if not ok:
                errors.setdefault(key, []).append(f"Invalid value for {key}.")
        address = body.get("address")
        if "address" in body and not isinstance(address, Mapping):
            errors.setdefault("address", []).append("The address must be an object.")
        elif isinstance(address, Mapping):
            extra = set(address) - {*_ADDRESS_TEXT, "latitude", "longitude"}
            for k in sorted(extra):
                errors.setdefault(f"address.{k}", []).append(f"The field {k} is not a known field.")
            for k in ("state", "country"):
                if not isinstance(address.get(k), str):
                    errors.setdefault(f"address.{k}", []).append(f"The {k.capitalize()} field is required.")
            if not isinstance(address.get("unit"), str | None):
                errors.setdefault("address.unit", []).append("The Unit field must be a string.")
            for k in ("latitude", "longitude"):
                value = address.get(k)
                if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
                    errors.setdefault(f"address.{k}", []).append(f"The {k.capitalize()} field must be a number.")
        _model_errors(body, errors)
        if errors:
            raise ApiError(400, VALIDATION_TITLE, errors)

    def _publish(
        self,
        table: _Table,
        rid: int,
        new: dict[str, Any],
        ext: tuple[str, dict[str, dict[str, str]]] | None,
        *,
        changed: bool,
    ) -> None:
        if ext is not None:
            if ext[1]:
                table.ext[rid] = ext[1]
            else:
                table.ext.pop(rid, None)
        if changed or self.bump_modified_on_noop:
            ts = self._tick()
            new["modifiedOn"] = iso_from_us(ts)
            table.touch(rid, ts)
        table.records[rid] = new

    @staticmethod
    def _ext_list(table: _Table, rid: int, guid: str) -> list[dict[str, str]]:
        try:
            key = _guid_key(guid)
        except ValueError:
            return []
        return [{"key": k, "value": v} for k, v in table.ext.get(rid, {}).get(key, {}).items()]

    # ------------------------------------------------------------------------------------------ lists, exports

    def api_list(self, entity: Entity, params: Mapping[str, str]) -> dict[str, Any]:
        """``GET /customers`` / ``GET /locations``: filter, sort, page. 400 ApiError for bad parameters."""
        errors: dict[str, list[str]] = {}
        page = _int_param(params, "page", 1, errors, minimum=1)
        page_size = min(_int_param(params, "pageSize", LIST_DEFAULT_PAGE_SIZE, errors, minimum=1),
                        LIST_MAX_PAGE_SIZE)
        include_total = _bool_param(params, "includeTotal", errors)
        active = (params.get("active") or "True").strip().lower()
        if active not in ("true", "false", "any"):
            errors["active"] = [f"The value '{params.get('active')}' is not valid. Values: True, Any, False."]
        sort_field, descending = "id", False
        sort = (params.get("sort") or "").strip()
        if sort:
            descending = sort.startswith("-")
            name = sort.lstrip("+-").strip().lower()
            if name not in ("id", "modifiedon", "createdon"):
                errors["sort"] = [f"Sorting by '{sort}' is not supported. Available fields: Id, ModifiedOn, CreatedOn."]
            sort_field = name
        ids: list[int] | None = None
        if params.get("ids"):
            try:
                ids = [int(p) for p in params["ids"].split(",") if p.strip()]
            except ValueError:
                errors["ids"] = ["The ids parameter must be a comma-separated list of integers."]
            if ids is not None and entity == "location" and len(ids) > LOCATION_IDS_MAX:
                errors["ids"] = [f"At most {LOCATION_IDS_MAX} ids are allowed."]
        bounds = {k: _when_param(params, k, errors)
                  for k in ("modifiedOnOrAfter", "modifiedBefore", "createdOnOrAfter", "createdBefore")}
        customer_id: int | None = None
        if entity == "location" and params.get("customerId"):
            customer_id = _int_param(params, "customerId", 0, errors)
        guid = params.get("externalDataApplicationGuid") or None
        ext_key = params.get("externalDataKey") or None
        ext_values = {v.strip() for v in (params.get("externalDataValues") or "").split(",") if v.strip()}
        if guid is not None and not _GUID.match(guid):
            errors["externalDataApplicationGuid"] = [f"The value '{guid}' is not valid."]
        if errors:
            raise ApiError(400, VALIDATION_TITLE, errors)

        with self._lock:
            table = self._tables[entity]
            records, ts_of = table.records, table.ts
            m_lo, m_hi = bounds["modifiedOnOrAfter"], bounds["modifiedBefore"]
            if ids is not None:
                rows = [records[i] for i in sorted(set(ids)) if i in records]
            elif m_lo is not None or m_hi is not None:
                lo = bisect.bisect_left(table.order, (m_lo, -1)) if m_lo is not None else 0
                hi = bisect.bisect_left(table.order, (m_hi, -1)) if m_hi is not None else len(table.order)
                rows = [records[rid] for _, rid in table.order[lo:hi]]
                if sort_field == "id":
                    rows.sort(key=lambda r: r["id"])
            else:
                rows = list(records.values())  # id order: ids only grow
            if m_lo is not None:
                rows = [r for r in rows if ts_of[r["id"]] >= m_lo]
            if m_hi is not None:
                rows = [r for r in rows if ts_of[r["id"]] < m_hi]
            if active != "any":
                want = active == "true"
                rows = [r for r in rows if r["active"] is want]
            c_lo, c_hi = bounds["createdOnOrAfter"], bounds["createdBefore"]
            if c_lo is not None or c_hi is not None:
                rows = [r for r in rows if _in_range(parse_when(r["createdOn"]), c_lo, c_hi)]
            if customer_id is not None:
                rows = [r for r in rows if r["customerId"] == customer_id]
            ext_key_guid = _guid_key(guid) if guid else None
            if ext_key_guid and ext_key:
                rows = [r for r in rows
                        if table.ext.get(r["id"], {}).get(ext_key_guid, {}).get(ext_key) in ext_values]
            if sort_field == "modifiedon":
                rows.sort(key=lambda r: (ts_of[r["id"]], r["id"]), reverse=descending)
            elif sort_field == "createdon":
                rows.sort(key=lambda r: (r["createdOn"], r["id"]), reverse=descending)
            elif descending:
                rows.reverse()
            total = len(rows)
            start = (page - 1) * page_size
            data = rows[start:start + page_size]
            if guid:
                data = [{**r, "externalData": self._ext_list(table, r["id"], guid)} for r in data]
        return {
            "page": page,
            "pageSize": page_size,
            "hasMore": start + page_size < total,
            "totalCount": total if include_total else None,
            "data": data,
        }

    def api_export(self, entity: Entity, params: Mapping[str, str]) -> dict[str, Any]:
        """``GET /export/customers`` / ``/export/locations``: every record (inactive too) in (modifiedOn, id)
        order from a position; a record changed after a token was issued comes again after that token."""
        errors: dict[str, list[str]] = {}
        include_recent = _bool_param(params, "includeRecentChanges", errors)
        raw_from = params.get("from")
        pos: tuple[int, int] = (-1, -1)
        if raw_from:
            decoded = decode_continuation(entity, raw_from)
            if decoded is not None:
                pos = decoded
            else:
                try:
                    pos = (parse_when(raw_from) - 1, _MAX_ID)  # everything modified on or after that time
                except ValueError:
                    errors["from"] = [f"The value '{raw_from}' is neither a continuation token nor a date."]
        if errors:
            raise ApiError(400, VALIDATION_TITLE, errors)
        size = max(1, int(self.export_page_size))
        with self._lock:
            table = self._tables[entity]
            order = table.order
            start = bisect.bisect_right(order, pos)
            if include_recent or self.export_delay_seconds <= 0:
                limit = len(order)
            else:
                cutoff = now_us(self.clock) - int(self.export_delay_seconds * 1_000_000)
                limit = bisect.bisect_right(order, (cutoff, _MAX_ID))
            end = max(start, min(start + size, limit))
            window = order[start:end]
            records = table.records
            data = [records[rid] for _, rid in window]
            last = window[-1] if window else pos
        return {
            "hasMore": end < limit,
            "continueFrom": encode_continuation(entity, *last),
            "data": data,
        }

    # ------------------------------------------------------------------------------------------ auth

    def issue_token(self, grant_type: str | None, client_id: str | None, client_secret: str | None) -> dict[str, Any]:
        """The client-credentials grant. Raises OAuthError (invalid_request, invalid_client,
        unsupported_grant_type)."""
        if not grant_type:
            raise OAuthError("invalid_request", "grant_type is missing")
        if not client_id or client_secret is None:
            raise OAuthError("invalid_client")
        if not (_same(client_id, self.client_id) and _same(client_secret, self.client_secret)):
            raise OAuthError("invalid_client")
        if grant_type != "client_credentials":
            raise OAuthError("unsupported_grant_type")
        token = secrets.token_urlsafe(32)
        now = self.clock()
        with self._lock:
            self._tokens = {t: v for t, v in self._tokens.items() if v[1] > now}
            self._tokens[token] = (self.tenant_id, now + self.token_ttl_seconds)
        return {
            "access_token": token,
            "expires_in": int(self.token_ttl_seconds),
            "token_type": "Bearer",
            "scope": OAUTH_SCOPE,
        }

    def authenticate(self, tenant: str | None, authorization: str | None, app_key: str | None) -> ApiError | None:
        """None when the call may proceed, else the 401 to answer. Tokens are bound to the sandbox's tenant:
        a call to any other tenant path is refused with 401."""
        if not app_key:
            return ApiError(401, TITLE_NO_APP_KEY)
        if not _same(app_key, self.app_key):
            return ApiError(401, TITLE_BAD_APP_KEY)
        if not authorization or authorization[:7].lower() != "bearer ":
            return ApiError(401, TITLE_NO_BEARER)
        with self._lock:
            entry = self._tokens.get(authorization[7:].strip())
        if entry is None or entry[1] <= self.clock():
            return ApiError(401, TITLE_BAD_BEARER)
        if tenant != str(entry[0]):
            return ApiError(401, TITLE_WRONG_TENANT)
        return None

    def expire_tokens(self) -> int:
        """Make every issued token invalid (the next API call answers 401); returns how many there were."""
        with self._lock:
            n = len(self._tokens)
            self._tokens.clear()
            return n

    # ------------------------------------------------------------------------------------------ traffic

    def admit(self, tenant: str) -> float | None:
        """The enforced rate limit: None when admitted, else seconds until a slot frees up."""
        limit = self.rate_limit_per_second
        if not limit:
            return None
        now = time.monotonic()
        with self._lock:
            window = self._windows.setdefault(tenant, deque())
            while window and window[0] <= now - 1.0:
                window.popleft()
            if len(window) >= limit:
                return max(0.001, window[0] + 1.0 - now)
            window.append(now)
            return None

    def latency_seconds(self) -> float:
        lo, hi = self.latency_ms
        if hi <= 0 and lo <= 0:
            return 0.0
        return self._latency_rng.uniform(lo, hi) / 1000.0

    def record_request(self, record: RequestRecord) -> None:
        with self._lock:
            self._log.append(record)
            by_status = self._counters.setdefault(record.endpoint, {})
            by_status[record.status] = by_status.get(record.status, 0) + 1

    @property
    def requests(self) -> list[RequestRecord]:
        """The request log, oldest first (bounded by ``request_log_limit``)."""
        with self._lock:
            return list(self._log)

    @property
    def counters(self) -> dict[str, dict[int, int]]:
        """``{endpoint: {status: count}}`` for API and token calls; status 0 = dropped connection."""
        with self._lock:
            return {ep: dict(by) for ep, by in self._counters.items()}

    def count_requests(self, endpoint: str | None = None, status: int | None = None) -> int:
        """How many requests (to ``endpoint``, answered ``status``) were received since the last reset."""
        with self._lock:
            return sum(
                n
                for ep, by in self._counters.items()
                if endpoint is None or ep == endpoint
                for st, n in by.items()
                if status is None or st == status
            )

    def reset_log(self) -> None:
        """Forget the request log and the counters (records, tokens and faults stay)."""
        with self._lock:
            self._log.clear()
            self._counters.clear()

    # ------------------------------------------------------------------------------------------ settings

    SETTINGS = (
        "rate_limit_per_second",
        "latency_ms",
        "export_page_size",
        "export_delay_seconds",
        "token_ttl_seconds",
        "bump_modified_on_noop",
    )

    def configure(self, **settings: Any) -> None:
        """Set any of :attr:`SETTINGS` (what ``POST /_sandbox/config`` calls)."""
        unknown = set(settings) - set(self.SETTINGS)
        if unknown:
            raise ValueError(f"unknown settings: {', '.join(sorted(unknown))}")
        for name, value in settings.items():
            if name == "latency_ms":
                lo, hi = (float(v) for v in value)
                if lo < 0 or hi < lo:
                    raise ValueError("latency_ms must be [lo, hi] with 0 <= lo <= hi")
                self.latency_ms = (lo, hi)
            elif name == "rate_limit_per_second":
                self.rate_limit_per_second = None if value is None else float(value)
            elif name in ("export_page_size", "token_ttl_seconds"):
                if int(value) < 1:
                    raise ValueError(f"{name} must be >= 1")
                setattr(self, name, int(value))
            elif name == "bump_modified_on_noop":
                self.bump_modified_on_noop = bool(value)
            else:
                self.export_delay_seconds = float(value)

    def settings(self) -> dict[str, Any]:
        return {
            "tenant_id": self.tenant_id,
            "rate_limit_per_second": self.rate_limit_per_second,
            "latency_ms": list(self.latency_ms),
            "export_page_size": self.export_page_size,
            "export_delay_seconds": self.export_delay_seconds,
            "token_ttl_seconds": self.token_ttl_seconds,
            "bump_modified_on_noop": self.bump_modified_on_noop,
            "customers": self.count("customer"),
            "locations": self.count("location"),
        }


# ------------------------------------------------------------------------------------------------- helpers


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))


def _in_range(value: int, lo: int | None, hi: int | None) -> bool:
    return (lo is None or value >= lo) and (hi is None or value < hi)


def _int_param(
    params: Mapping[str, str], name: str, default: int, errors: dict[str, list[str]], minimum: int | None = None
) -> int:
    raw = params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        errors[name] = [f"The value '{raw}' is not valid for {name}."]
        return default
    if minimum is not None and value < minimum:
        errors[name] = [f"{name} must be at least {minimum}."]
        return default
    return value


def _bool_param(params: Mapping[str, str], name: str, errors: dict[str, list[str]]) -> bool:
    raw = params.get(name)
    if raw is None or raw == "":
        return False
    low = raw.strip().lower()
    if low not in ("true", "false"):
        errors[name] = [f"The value '{raw}' is not valid for {name}."]
        return False
    return low == "true"


def _when_param(params: Mapping[str, str], name: str, errors: dict[str, list[str]]) -> int | None:
    raw = params.get(name)
    if raw is None or raw == "":
        return None
    try:
        return parse_when(raw)
    except ValueError:
        errors[name] = [f"The value '{raw}' is not a valid date-time."]
        return None


def retry_after_header_seconds(seconds: float) -> int:
    return max(0, math.ceil(seconds))
