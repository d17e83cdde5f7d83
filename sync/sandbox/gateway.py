"""The gateway: the sandbox's outermost ASGI layer, in front of every non-admin request.

Order of checks for an API call: app key and token (401), enforced rate limit (429), fault plan, latency, then
the endpoint; token calls skip the first two, and random faults hit API calls only. Every request but the
admin ones is counted and logged (:class:`~sync.sandbox.model.RequestRecord`) with its status, its fault and
whether a write (a PATCH, a create: ``POST /customers``, ``POST /locations``, ``POST .../contacts``, or a
contact's DELETE) was applied. Faults apply to the
create routes like to any other: with ``after_apply`` the record is created, then the answer is a 5xx or a
dropped connection.

A dropped connection closes the socket without a byte of answer under uvicorn; in-process
(``httpx.ASGITransport``) it raises :class:`ConnectionDropped`, an ``httpx.RemoteProtocolError``, so a client
sees the same exception type either way.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from email.utils import formatdate
from typing import Any
from urllib.parse import parse_qs

import httpx
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sync.sandbox.errors import problem
from sync.sandbox.faults import WRITE_METHODS, Fault, retry_after_header_seconds
from sync.sandbox.model import ENTITY_OF_COLLECTION, RequestRecord, Route
from sync.sandbox.responses import JSON_TYPE, dumps
from sync.sandbox.state import Sandbox

HTML_502 = (
    "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    "<center><h1>502 Bad Gateway</h1></center>\r\n</body>\r\n</html>\r\n"
)
SERVER_ERROR_TITLES = {
    500: "An unexpected error has occurred.",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}

_API_PATH = re.compile(r"^/crm/v2/tenant/([^/]*)(/.*)?$")
_RECORD_PATH = re.compile(r"^/(customers|locations)/(\d+)/?$")
_COLLECTION_PATH = re.compile(r"^/(customers|locations)/?$")
_EXPORT_PATH = re.compile(r"^/export/(customers|locations)/?$")
_CONTACTS_PATH = re.compile(r"^/(customers|locations)/(\d+)/contacts/?$")
_CONTACT_PATH = re.compile(r"^/(customers|locations)/(\d+)/contacts/(\d+)/?$")
_CONTACT_EXPORT_PATH = re.compile(r"^/export/(customers|locations)/contacts/?$")


class ConnectionDropped(httpx.RemoteProtocolError):
    """Raised in-process where a socket would have been closed without an answer."""


def classify(method: str, path: str) -> Route:
    """Which endpoint a request addresses (the counters' keys)."""
    if path.startswith("/_sandbox"):
        return Route("admin", method, f"{method} {path}")
    if path.rstrip("/") == "/connect/token":
        return Route("token", method, f"{method} /connect/token")
    m = _API_PATH.match(path)
    if m is None:
        return Route("other", method, f"{method} other")
    tenant, rest = m.group(1), m.group(2) or "/"
    if (r := _RECORD_PATH.match(rest)) is not None:
        coll = r.group(1)
        return Route("api", method, f"{method} /{coll}/{{id}}", ENTITY_OF_COLLECTION[coll], int(r.group(2)), tenant)
    if (r := _COLLECTION_PATH.match(rest)) is not None:
        coll = r.group(1)
        return Route("api", method, f"{method} /{coll}", ENTITY_OF_COLLECTION[coll], None, tenant)
    if (r := _EXPORT_PATH.match(rest)) is not None:
        coll = r.group(1)
        return Route("api", method, f"{method} /export/{coll}", ENTITY_OF_COLLECTION[coll], None, tenant)
    # a record's contacts: the entity and record id are the owner's
    if (r := _CONTACTS_PATH.match(rest)) is not None:
        coll = r.group(1)
        return Route("api", method, f"{method} /{coll}/{{id}}/contacts", ENTITY_OF_COLLECTION[coll],
                     int(r.group(2)), tenant)
    if (r := _CONTACT_PATH.match(rest)) is not None:
        coll = r.group(1)
        return Route("api", method, f"{method} /{coll}/{{id}}/contacts/{{contactId}}", ENTITY_OF_COLLECTION[coll],
                     int(r.group(2)), tenant)
    if (r := _CONTACT_EXPORT_PATH.match(rest)) is not None:
        coll = r.group(1)
        return Route("api", method, f"{method} /export/{coll}/contacts", ENTITY_OF_COLLECTION[coll], None, tenant)
    return Route("api", method, f"{method} other", None, None, tenant)


class _Outcome:
    __slots__ = ("applied", "fault", "status")

    def __init__(self) -> None:
        self.status = 0
        self.fault: str | None = None
        self.applied = False


class Gateway:
    """Outermost ASGI layer: auth, rate limit, faults, latency, counters and the request log."""

    def __init__(self, app: ASGIApp, sandbox: Sandbox) -> None:
        self.app = app
        self.sandbox = sandbox

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = classify(scope["method"], scope["path"])
        if route.kind == "admin":
            await self.app(scope, receive, send)
            return
        sandbox = self.sandbox
        arrived = sandbox.clock()
        started = time.perf_counter()
        body = await _read_body(receive)
        outcome = _Outcome()
        headers = Headers(scope=scope)
        try:
            await self._handle(route, scope, _replay(body, receive), send, headers, outcome)
        finally:
            sandbox.record_request(
                RequestRecord(
                    method=route.method,
                    path=scope["path"],
                    query=scope.get("query_string", b"").decode("latin-1"),
                    body=_loggable_body(route, body),
                    status=outcome.status,
                    time=arrived,
                    duration_ms=(time.perf_counter() - started) * 1000.0,
                    endpoint=route.endpoint,
                    entity=route.entity,
                    record_id=route.record_id,
                    fault=outcome.fault,
                    applied=outcome.applied,
                )
            )

    async def _handle(
        self, route: Route, scope: Scope, receive: Receive, send: Send, headers: Headers, outcome: _Outcome
    ) -> None:
        sandbox = self.sandbox
        if route.kind == "api":
            refused = sandbox.authenticate(route.tenant, headers.get("authorization"), headers.get("st-app-key"))
            if refused is not None:
                await _send_body(send, outcome, refused.status, dumps(refused.body()), JSON_TYPE,
                                 [(b"www-authenticate", b"Bearer")])
                return
            wait = sandbox.admit(route.tenant or "")
            if wait is not None:
                outcome.fault = "limiter"
                await _send_429(send, outcome, wait, "seconds")
                return
        fault = sandbox.faults.draw(route)
        delay = sandbox.latency_seconds() if route.kind == "api" else 0.0
        if fault is not None and fault.kind == "slow":
            outcome.fault = "slow"
            delay += fault.delay_ms / 1000.0
            fault = None
        if delay > 0:
            await asyncio.sleep(delay)
        if fault is None:
            await self.app(scope, receive, _capturing(send, route, outcome))
            return
        outcome.fault = fault.kind
        if fault.kind == "late_answer":
            held: list[Message] = []

            async def hold(message: Message) -> None:
                held.append(message)

            await self.app(scope, receive, _capturing(hold, route, outcome))  # applied now
            await asyncio.sleep(fault.delay_ms / 1000.0)
            for message in held:  # the answer as it was when applied, sent late
                await send(message)
            return
        if fault.kind == "rate_limit":
            await _send_429(send, outcome, fault.retry_after, fault.retry_after_style)
            return
        if fault.after_apply:
            await self.app(scope, receive, _swallowing(route, outcome))
        if fault.kind == "server_error":
            await _send_server_error(send, outcome, fault, scope)
        else:
            await _drop(send, outcome)


async def _read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.request":
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        else:  # http.disconnect
            break
    return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    delivered = False

    async def replay() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _applied(route: Route, status: int) -> bool:
    """Whether the endpoint's answer says a write was applied: a PATCH, a create (``POST /customers``,
    ``POST /locations``, ``POST .../contacts``) or a DELETE answered 2xx."""
    return route.kind == "api" and route.method in WRITE_METHODS and 200 <= status < 300


def _capturing(send: Send, route: Route, outcome: _Outcome) -> Send:
    async def capture(message: Message) -> None:
        if message["type"] == "http.response.start":
            outcome.status = message["status"]
            outcome.applied = _applied(route, message["status"])
        await send(message)

    return capture


def _swallowing(route: Route, outcome: _Outcome) -> Send:
    """Runs the endpoint for its effect only: its answer is replaced by the fault."""

    async def swallow(message: Message) -> None:
        if message["type"] == "http.response.start":
            outcome.applied = _applied(route, message["status"])

    return swallow


async def _send_body(
    send: Send, outcome: _Outcome, status: int, body: bytes, content_type: str,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    outcome.status = status
    headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers + (extra or [])})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _send_429(send: Send, outcome: _Outcome, wait: float, style: str) -> None:
    seconds = retry_after_header_seconds(wait)
    extra: list[tuple[bytes, bytes]] = []
    if style == "seconds":
        extra.append((b"retry-after", str(seconds).encode()))
    elif style == "http-date":
        extra.append((b"retry-after", formatdate(time.time() + seconds, usegmt=True).encode()))
    title = (f"Rate limit exceeded. Please try again in {seconds} seconds." if style == "body"
             else "Too Many Requests")
    await _send_body(send, outcome, 429, dumps(problem(429, title)), JSON_TYPE, extra)


async def _send_server_error(send: Send, outcome: _Outcome, fault: Fault, scope: Scope) -> None:
    status = fault.status or 500
    if fault.echo_headers:
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", [])}
        body = {**problem(status, SERVER_ERROR_TITLES.get(status, "Request failed")), "request": {"headers": headers}}
        await _send_body(send, outcome, status, dumps(body), JSON_TYPE)
        return
    if fault.html:
        await _send_body(send, outcome, status, HTML_502.replace("502 Bad Gateway", f"{status} {_reason(status)}")
                         .encode(), "text/html")
        return
    title = SERVER_ERROR_TITLES.get(status, "Server Error")
    await _send_body(send, outcome, status, dumps(problem(status, title)), JSON_TYPE)


def _reason(status: int) -> str:
    return {500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Temporarily Unavailable",
            504: "Gateway Time-out"}.get(status, "Server Error")


async def _drop(send: Send, outcome: _Outcome) -> None:
    """Close the connection without answering. Under uvicorn ``send`` is the connection cycle's bound method,
    which holds the asyncio transport; elsewhere (in-process) raise instead."""
    outcome.status = 0
    cycle = getattr(send, "__self__", None)
    transport = getattr(cycle, "transport", None)
    if transport is None or not hasattr(transport, "close"):
        raise ConnectionDropped("Server disconnected without sending a response.")
    transport.close()
    for _ in range(10):  # let uvicorn see connection_lost, so it does not try to answer 500 itself
        if getattr(cycle, "disconnected", True):
            break
        await asyncio.sleep(0)


def _loggable_body(route: Route, body: bytes) -> Any:
    if not body:
        return None
    if route.kind == "token":
        form = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
        return {k: v[-1] for k, v in form.items() if k in ("grant_type", "client_id", "scope")}  # never the secret
    try:
        return json.loads(body)
    except ValueError:
        return body[:2000].decode("utf-8", "replace")
