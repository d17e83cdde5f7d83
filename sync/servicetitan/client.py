"""ServiceTitan CRM v2 over httpx (async, one connection pool).

Client-credentials token cached until shortly before expiry (one refresh at a time, once more on a 401),
``ST-App-Key`` on every call, timeouts, a shared rate limiter that a 429 slows down. Tokens and secrets are
never logged. Responses are returned as ``ApiResponse``; classifying them is the caller's job
(``sync.core.retry.classify``), except auth, which is handled here.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import math
import re
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import httpx

from sync.config import ServiceTitanConfig
from sync.errors import AuthError, ServiceTitanError
from sync.log import get_logger, register_secret
from sync.servicetitan.ratelimit import RateLimiter

log = get_logger("stsync.client")


def why_no_answer(exc: BaseException, url: str) -> str:
    """A transport failure in words an operator can act on (DNS, refused, TLS, reset), from the exception's chain
    (httpx wraps httpcore, which wraps the socket's own error); the class name only when nothing better is known."""
    parts = urlsplit(url)
    host = parts.hostname or url
    where = f"{host}:{parts.port or (443 if parts.scheme == 'https' else 80)}"
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, socket.gaierror):
            if seen.errno == socket.EAI_AGAIN:
                return f"DNS lookup of {host} failed for now (temporary failure in name resolution)"
            return f"DNS name not found: {host}"
        if isinstance(seen, ssl.SSLCertVerificationError):
            return f"TLS certificate of {host} not trusted ({seen.verify_message or seen.reason})"
        if isinstance(seen, ssl.SSLError):
            return f"TLS error with {where} ({seen.reason or str(seen).splitlines()[0]})"
        if isinstance(seen, ConnectionRefusedError):
            return f"connection refused by {where} (nothing listens there)"
        if isinstance(seen, ConnectionResetError):
            return f"connection reset by {where}"
        if isinstance(seen, OSError) and seen.strerror and seen.errno:
            return f"{seen.strerror.lower()} ({where})"
        seen = seen.__cause__ or seen.__context__
    if isinstance(exc, httpx.RemoteProtocolError):
        return f"{where} closed the connection without a whole answer"
    said = str(exc).strip().splitlines()
    return f"{type(exc).__name__}" + (f": {said[0][:200]}" if said else "")

TOKEN_REFRESH_MARGIN_S = 60.0
AUTH_OPERATION = "POST /connect/token"
RATE_HEADROOM = 0.995
"""The ceiling is 99.5% of requests_per_second; below it the limiter adapts to the 429s it gets (ServiceTitan
counts arrivals in a sliding one-second window and latency jitter bunches them: bench/, docs/benchmarks.md)."""
STORM_429S, STORM_WINDOW_S = 3, 1.0
"""This many 429s within this many seconds stop every sender (an isolated 429 only slows the rate a step:
bench/, a whole-second stop per 429 halved throughput) ..."""
SHARED_PAUSE_MAX_S = 0.25
"""... for the Retry-After but at most this long; the rejected requests themselves wait their full Retry-After,
and each 429 has lowered the rate a step (bench/: three 1-s stops cost 1% of a 20k drain)."""
TOKEN_RETRY_S = 5.0
"""After a failed token fetch, every sender waits this long (the outage is not any one record's fault)."""
IDS_PER_LIST = 50
"""The most ids one ``GET /customers`` / ``GET /locations`` takes (the spec says so for locations; the same for
customers, whose page size is 50 by default)."""
_ID_SEGMENT = re.compile(r"/\d+(?=/|$)")

RequestObserver = Callable[[str, int, float], None]
"""Told of every request that left this process: its operation (``PATCH /customers/{id}``), the HTTP status
(0: no answer) and the seconds it took (``sync.daemon.metrics.Metrics.record_request``)."""


def operation_of(method: str, path: str) -> str:
    """``PATCH /customers/{id}`` for ``PATCH /customers/123``: one label value per kind of call, never per record."""
    return f"{method} {_ID_SEGMENT.sub('/{id}', path)}"
_RETRY_IN_BODY = re.compile(r"try again in (\d+(?:\.\d+)?) second", re.IGNORECASE)


@dataclass
class ApiResponse:
    status: int
    """HTTP status; 0 when no answer came (timeout, connection error)."""
    body: Any
    """Parsed JSON, or the raw text when the body is not JSON, or None."""
    latency_ms: float
    retry_after_s: float | None = None
    error: str | None = None
    """Transport error description when status is 0, or a parse problem."""
    headers: dict[str, str] = field(default_factory=dict)
    not_sent: bool = False
    """No request left this process (no token could be had): nothing can have been applied."""
    fenced: bool = False
    """``before_send`` said no: the caller no longer holds the right to send it; nothing was sent."""

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300 and isinstance(self.body, dict)

    @property
    def trace_id(self) -> str | None:
        return self.body.get("traceId") if isinstance(self.body, dict) else None


def parse_retry_after(headers: httpx.Headers, body: Any) -> float | None:
    """Seconds to wait after a 429: ``Retry-After`` header (seconds or HTTP-date), else seconds in the body."""
    value = headers.get("retry-after")
    if value:
        value = value.strip()
        try:
            seconds = float(value)
            return max(0.0, seconds) if math.isfinite(seconds) else None  # "inf", "nan": nonsense, absent
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(value)
            except (TypeError, ValueError):
                when = None
            if when is not None:
                if when.tzinfo is None:
                    when = when.replace(tzinfo=UTC)
                return max(0.0, (when - datetime.now(UTC)).total_seconds())
    text = ""
    if isinstance(body, dict):
        text = " ".join(str(body.get(k, "")) for k in ("title", "detail", "message"))
    elif isinstance(body, str):
        text = body
    m = _RETRY_IN_BODY.search(text)
    return float(m.group(1)) if m and math.isfinite(float(m.group(1))) else None


class ServiceTitanClient:
    """One per process. Use as ``async with ServiceTitanClient(cfg) as st: ...``."""

    def __init__(self, cfg: ServiceTitanConfig, *, transport: httpx.AsyncBaseTransport | None = None,
                 limiter: RateLimiter | None = None) -> None:
        self.cfg = cfg
        self.limiter = limiter or RateLimiter(cfg.requests_per_second * RATE_HEADROOM, max_pause=SHARED_PAUSE_MAX_S,
                                              storm=STORM_429S, storm_window=STORM_WINDOW_S)
        limits = httpx.Limits(max_connections=cfg.max_concurrency, max_keepalive_connections=cfg.max_concurrency)
        self._http = httpx.AsyncClient(
            transport=transport, timeout=httpx.Timeout(cfg.timeout_seconds, connect=10.0), limits=limits,
            verify=True,
        )
        self._token: str | None = None
        self._token_expires = 0.0
        self._token_lock = asyncio.Lock()
        self.base = f"{cfg.api_root}/crm/v2/tenant/{cfg.tenant_id}"
        self.observe: RequestObserver | None = None
        """Set by the daemon: counts every call (token, export, GET, PATCH, POST) by operation and status."""

    def _observed(self, operation: str, status: int, started: float) -> None:
        if self.observe is not None:
            self.observe(operation, status, time.perf_counter() - started)

    async def __aenter__(self) -> ServiceTitanClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # ---------------------------------------------------------------------------------------- auth

    async def token(self, *, rejected: str | None = None) -> str:
        """A valid access token; fetched once and shared, refreshed shortly before expiry.

        ``rejected`` is a token ServiceTitan just answered 401 to: it is replaced once, however many
        requests were rejected with it.
        """
        async with self._token_lock:
            if self._token and self._token != rejected and time.monotonic() < self._token_expires:
                return self._token
            self._token = await self._fetch_token()
            return self._token

    async def _fetch_token(self) -> str:
        form = {
            "grant_type": "client_credentials",
            "client_id": self.cfg.client_id,
            "client_secret": self.cfg.client_secret.get_secret_value(),
        }
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.cfg.timeout_seconds):  # the whole answer, as for every API call
                resp = await self._http.post(self.cfg.token_url, data=form)
        except TimeoutError:
            self._observed(AUTH_OPERATION, 0, started)
            raise ServiceTitanError(f"token endpoint {self.cfg.token_url} gave no whole answer within "
                                    f"{self.cfg.timeout_seconds:g} s") from None
        except httpx.HTTPError as exc:
            self._observed(AUTH_OPERATION, 0, started)
            raise ServiceTitanError(f"token endpoint {self.cfg.token_url} unreachable: "
                                    f"{why_no_answer(exc, self.cfg.token_url)}") from None
        self._observed(AUTH_OPERATION, resp.status_code, started)
        if resp.status_code in (400, 401, 403):
            detail = ""
            with contextlib.suppress(ValueError, AttributeError):
                detail = str(resp.json().get("error", ""))
            raise AuthError(
                f"ServiceTitan refused the client credentials ({resp.status_code} {detail}): check "
                "servicetitan.client_id / client_secret / tenant_id / environment",
                status=resp.status_code,
            )
        try:
            data = resp.json()
            token = str(data["access_token"])
            register_secret(token)  # masked wherever it might be echoed back (an error body, a traceback)
            ttl = float(data.get("expires_in", 900))
            ttl = min(max(ttl, 1.0), 86_400.0) if math.isfinite(ttl) else 900.0  # nonsense: a sane lifetime
        except (ValueError, KeyError, TypeError):
            raise ServiceTitanError(f"token endpoint answered {resp.status_code} without an access_token",
                                    status=resp.status_code) from None
        self._token_expires = time.monotonic() + max(ttl - TOKEN_REFRESH_MARGIN_S, ttl / 2)
        log.info("auth.token_fetched", expires_in_s=ttl)
        return token

    # ---------------------------------------------------------------------------------------- calls

    async def request(self, method: str, path: str, *, json_body: Any = None,
                      params: dict[str, Any] | None = None,
                      before_send: Callable[[], Awaitable[bool]] | None = None) -> ApiResponse:
        """One API call (after a rate-limit slot). Transport failures come back as status 0, never raise.

        A 401 refreshes the token once and resends; a 429 pauses the shared limiter for Retry-After.
        ``before_send`` runs after the slot, immediately before the request goes out (each time it goes out);
        False sends nothing and answers ``fenced``.
        """
        token: str | None = None
        for auth_try in range(2):
            try:
                token = await self.token(rejected=token)
            except AuthError:
                raise
            except ServiceTitanError as exc:  # token endpoint unreachable or garbled: transient, and global
                self.limiter.pause(TOKEN_RETRY_S, capped=False)  # not a 429: the cap is about 429s
                return ApiResponse(0, None, 0.0, error=str(exc), retry_after_s=TOKEN_RETRY_S, not_sent=True)
            await self.limiter.acquire()
            if before_send is not None and not await before_send():
                return ApiResponse(0, None, 0.0, error="not sent: the claim is no longer held", not_sent=True,
                                   fenced=True)
            started = time.perf_counter()
            operation = operation_of(method, path)
            too_large = False
            try:
                # timeout_seconds bounds the whole answer, not each read (a trickled answer never hangs us)
                async with asyncio.timeout(self.cfg.timeout_seconds), self._http.stream(
                        method, self.base + path, json=json_body, params=params,
                        headers={"Authorization": f"Bearer {token}",
                                 "ST-App-Key": self.cfg.app_key.get_secret_value()}) as resp:
                    content, too_large = await _read_bounded(resp, self.cfg.max_answer_bytes)
            except TimeoutError:
                self._observed(operation, 0, started)
                return ApiResponse(0, None, _ms(started),
                                   error=f"timeout (no whole answer within {self.cfg.timeout_seconds:g} s)")
            except httpx.TimeoutException as exc:
                self._observed(operation, 0, started)
                return ApiResponse(0, None, _ms(started), error=f"timeout ({type(exc).__name__})")
            except httpx.HTTPError as exc:
                self._observed(operation, 0, started)
                return ApiResponse(0, None, _ms(started),
                                   error=f"connection error: {why_no_answer(exc, self.base + path)}")
            self._observed(operation, resp.status_code, started)
            latency = _ms(started)
            if too_large:
                log.warning("servicetitan.answer_too_large", path=path, status=resp.status_code,
                            limit_bytes=self.cfg.max_answer_bytes)
                return ApiResponse(resp.status_code, None, latency,
                                   error=f"answer larger than {self.cfg.max_answer_bytes} bytes: not read")
            body = _parse_body(content, resp.charset_encoding)
            if resp.status_code == 401 and auth_try == 0:
                log.info("auth.token_rejected", path=path)
                continue
            if resp.status_code == 401:
                title = body.get("title") if isinstance(body, dict) else None
                raise AuthError(f"authentication failed: ServiceTitan answered 401 to {method} {path} even with a "
                                f"fresh token ({str(title or 'no reason given').splitlines()[0][:200]}): check "
                                "servicetitan.app_key and servicetitan.tenant_id", status=401, body=body)
            retry_after = None
            if resp.status_code == 429:
                retry_after = parse_retry_after(resp.headers, body)
                cap = self.cfg.max_retry_after_seconds
                if retry_after is not None and retry_after > cap:
                    log.warning("servicetitan.retry_after_capped", path=path, retry_after_s=retry_after, capped_s=cap)
                    retry_after = cap
                self.limiter.rate_limited(retry_after if retry_after is not None else 1.0)
            return ApiResponse(resp.status_code, body, latency, retry_after_s=retry_after,
                               headers={k.lower(): v for k, v in resp.headers.items() if k.lower() == "retry-after"})
        raise AssertionError("unreachable")

    async def patch(self, collection: str, st_id: int, body: dict[str, Any], *,
                    before_send: Callable[[], Awaitable[bool]] | None = None) -> ApiResponse:
        return await self.request("PATCH", f"/{collection}/{st_id}", json_body=body, before_send=before_send)

    async def post(self, collection: str, body: dict[str, Any], *,
                   before_send: Callable[[], Awaitable[bool]] | None = None) -> ApiResponse:
        """``POST /{collection}``: create a record (a customer with its ``locations``, or a location)."""
        return await self.request("POST", f"/{collection}", json_body=body, before_send=before_send)

    async def find_by_external_data(self, collection: str, application_guid: str, key: str,
                                    values: Sequence[str]) -> ApiResponse:
        """``GET /{collection}`` of the records whose external data under our application guid has ``key`` set
        to one of ``values`` (at most ``IDS_PER_LIST``), inactive ones included; the answer lists our
        ``externalData``. How a create whose answer was lost is found instead of being made twice."""
        if not 0 < len(values) <= IDS_PER_LIST:
            raise ValueError(f"find_by_external_data takes 1 to {IDS_PER_LIST} values, not {len(values)}")
        return await self.request("GET", f"/{collection}", params={
            "externalDataApplicationGuid": application_guid, "externalDataKey": key,
            "externalDataValues": ",".join(values), "pageSize": IDS_PER_LIST, "active": "Any"})

    async def list_with_external_data(self, collection: str, st_ids: Sequence[int],
                                      application_guid: str) -> ApiResponse:
        """``GET /{collection}?ids=...`` asked with our application guid, so that each record lists our
        ``externalData`` (the feeds never do): which new records carry a mirror id of ours."""
        if not 0 < len(st_ids) <= IDS_PER_LIST:
            raise ValueError(f"list_with_external_data takes 1 to {IDS_PER_LIST} ids, not {len(st_ids)}")
        return await self.request("GET", f"/{collection}", params={
            "ids": ",".join(str(i) for i in st_ids), "pageSize": len(st_ids), "active": "Any",
            "externalDataApplicationGuid": application_guid})

    async def get(self, collection: str, st_id: int) -> ApiResponse:
        return await self.request("GET", f"/{collection}/{st_id}")

    async def list_by_ids(self, collection: str, st_ids: Sequence[int]) -> ApiResponse:
        """``GET /{collection}?ids=...`` (at most ``IDS_PER_LIST`` ids), inactive records included."""
        if not 0 < len(st_ids) <= IDS_PER_LIST:
            raise ValueError(f"list_by_ids takes 1 to {IDS_PER_LIST} ids, not {len(st_ids)}")
        return await self.request("GET", f"/{collection}", params={
            "ids": ",".join(str(i) for i in st_ids), "pageSize": len(st_ids), "active": "Any"})

    async def export(self, collection: str, continue_from: str | None, *,
                     include_recent_changes: bool) -> ApiResponse:
        params: dict[str, Any] = {}
        if continue_from:
            params["from"] = continue_from
        if include_recent_changes:
            params["includeRecentChanges"] = "true"
        return await self.request("GET", f"/export/{collection}", params=params)


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000.0, 2)


async def _read_bounded(resp: httpx.Response, limit: int) -> tuple[bytes, bool]:
    """The answer's bytes, reading no more than ``limit`` of them: (content, whether it was larger)."""
    declared = resp.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return b"", True
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.aiter_bytes():
        size += len(chunk)
        if size > limit:
            return b"", True
        chunks.append(chunk)
    return b"".join(chunks), False


def _parse_body(content: bytes, encoding: str | None = None) -> Any:
    """JSON, or the text (first 2,000 characters) when it is not JSON, nested too deeply, or not text at all."""
    if not content:
        return None
    try:
        return json.loads(content)
    except (ValueError, RecursionError):  # RecursionError: e.g. 100k nested "[", which json cannot parse
        return content.decode(encoding or "utf-8", errors="replace")[:2000]
