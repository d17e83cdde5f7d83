"""The sandbox's tenant (:class:`Sandbox`): records (``store.py``; creating them, ``creates.py``; their
contacts, ``contacts.py``), read feeds (``feeds.py``), tokens, the enforced rate limit, the fault plan
(``faults.py``), counters, the request log and settings, behind one lock.

Everything here is synchronous and thread-safe: the ASGI app (``sync.sandbox.app``) calls it from uvicorn's
event loop thread while tests call the Python API from theirs. Nothing here awaits while holding the lock.
"""

from __future__ import annotations

import hmac
import random
import secrets
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from sync.sandbox import feeds
from sync.sandbox.contacts import CONTACT_FEEDS
from sync.sandbox.creates import RecordCreator
from sync.sandbox.errors import (
    TITLE_BAD_APP_KEY,
    TITLE_BAD_BEARER,
    TITLE_NO_APP_KEY,
    TITLE_NO_BEARER,
    TITLE_WRONG_TENANT,
    ApiError,
    OAuthError,
)
from sync.sandbox.faults import Faults
from sync.sandbox.model import Entity, RequestRecord
from sync.sandbox.store import now_us

OAUTH_SCOPE = "tn.crm.customers:r tn.crm.customers:w tn.crm.locations:r tn.crm.locations:w"


class Sandbox(RecordCreator):
    """One simulated ServiceTitan tenant (CRM v2 customers, locations and their contacts) and its Python API.

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
        admin_token: str | None = None,
    ) -> None:
        super().__init__(clock=clock, bump_modified_on_noop=bump_modified_on_noop)
        self.tenant_id = tenant_id
        self.client_id = client_id
        self.client_secret = client_secret
        self.app_key = app_key
        self.token_ttl_seconds = token_ttl_seconds
        self.rate_limit_per_second = rate_limit_per_second
        self.latency_ms = latency_ms
        self.export_page_size = export_page_size
        self.export_delay_seconds = export_delay_seconds
        self.faults = faults if faults is not None else Faults()
        self.admin_token = admin_token
        """Set: every ``/_sandbox/*`` admin call must carry it in ``X-Sandbox-Admin-Token`` (401 otherwise)."""
        self._tokens: dict[str, tuple[int, float]] = {}
        self._windows: dict[str, deque[float]] = {}
        self._latency_rng = random.Random()
        self._log: deque[RequestRecord] = deque(maxlen=request_log_limit)
        self._counters: dict[str, dict[int, int]] = {}

    # ------------------------------------------------------------------------------------------ lists, exports

    def api_list(self, entity: Entity, params: Mapping[str, str]) -> dict[str, Any]:
        """``GET /customers`` / ``GET /locations``: filter, sort, page. 400 ApiError for bad parameters."""
        query = feeds.list_query(entity, params)
        with self._lock:
            return feeds.list_page(self._tables[entity], query)

    def api_export(self, entity: Entity, params: Mapping[str, str]) -> dict[str, Any]:
        """``GET /export/customers`` / ``/export/locations``: every record (inactive too) in (modifiedOn, id)
        order from a position; a record changed after a token was issued comes again after that token."""
        return self._export(entity, entity, params, contacts=False)

    def api_contact_export(self, entity: Entity, params: Mapping[str, str]) -> dict[str, Any]:
        """``GET /export/customers/contacts`` / ``/export/locations/contacts``: every contact of ``entity``'s
        records (deleted ones too, ``active: false``) with the same ``from`` / ``includeRecentChanges`` /
        continuation-token / ``hasMore`` semantics, page size and export delay as the record feeds."""
        return self._export(entity, CONTACT_FEEDS[entity], params, contacts=True)

    def _export(self, entity: Entity, feed: str, params: Mapping[str, str], *, contacts: bool) -> dict[str, Any]:
        pos, include_recent = feeds.export_start(feed, params)
        size = max(1, int(self.export_page_size))
        with self._lock:
            cutoff: int | None = None
            if not (include_recent or self.export_delay_seconds <= 0):
                cutoff = now_us(self.clock) - int(self.export_delay_seconds * 1_000_000)
            table = self.contact_table(entity) if contacts else self._tables[entity]
            return feeds.export_page(table, feed, pos, size, cutoff)

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



def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))
