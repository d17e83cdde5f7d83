"""The sandbox as an ASGI app (Starlette): ServiceTitan's token endpoint and CRM v2 customers/locations.

API (paths as on ServiceTitan; the API and the token endpoint share one host):

- ``POST /connect/token`` form ``grant_type=client_credentials&client_id=..&client_secret=..`` (HTTP Basic
  client authentication also accepted) -> ``{access_token, expires_in, token_type: "Bearer", scope}``;
  400 ``{"error": "invalid_client" | "unsupported_grant_type" | "invalid_request"}``.
- ``GET|PATCH /crm/v2/tenant/{tenant}/customers/{id}``, ``.../locations/{id}``
- ``GET /crm/v2/tenant/{tenant}/customers``, ``.../locations`` (page, pageSize, includeTotal, ids,
  modifiedOnOrAfter, modifiedBefore, createdOnOrAfter, createdBefore, active, sort, customerId (locations),
  externalDataApplicationGuid / externalDataKey / externalDataValues)
- ``GET /crm/v2/tenant/{tenant}/export/customers``, ``.../export/locations`` (from, includeRecentChanges)

Every ``/crm/v2/...`` call needs ``ST-App-Key`` and ``Authorization: Bearer <token>``; a token only works for
the sandbox's own tenant (any other tenant in the path: 401). Errors are RFC 7807 ``ApiErrorResponse`` JSON.

Admin endpoints (no auth, not rate limited, not counted or logged) for tests and demos:

- ``GET  /_sandbox/health`` -> ``{"status": "ok", "tenantId": ..}``
- ``POST /_sandbox/seed`` ``{"customers": n, "locations": m, "seed": s}``: replace all records with fake ones
- ``POST /_sandbox/customers`` ``{..API fields..}``; ``POST /_sandbox/locations`` ``{"customerId": .., ..}``: create
- ``GET  /_sandbox/customers/{id}`` / ``/_sandbox/locations/{id}`` (``?applicationGuid=``): full record
- ``PATCH /_sandbox/customers/{id}`` / ``/_sandbox/locations/{id}``: a remote edit made in ServiceTitan
  (partial ``address`` allowed; also ``balance``, ``mergedToId``, ``zoneId``...); modifiedOn advances
- ``GET  /_sandbox/counters`` -> ``{endpoint: {status: count}}`` (status "0" = dropped connection)
- ``GET  /_sandbox/requests`` (``?limit=N``: the last N) -> ``{"requests": [...]}``; ``DELETE`` clears log
  and counters
- ``GET|POST /_sandbox/faults``: read / change the fault plan: any ``Faults.SETTINGS`` key, plus
  ``"clear": true`` (applied first) and ``"rules": [{"fault": {"kind": .., ..}, "times": 1, "skip": 0,
  "endpoint": .., "method": .., "entity": .., "record_id": ..}]``
- ``GET|POST /_sandbox/config``: rate_limit_per_second, latency_ms, export_page_size, export_delay_seconds,
  token_ttl_seconds, bump_modified_on_noop
- ``POST /_sandbox/tokens/expire``: invalidate every issued token

Order of checks for an API call (the "gateway", outermost ASGI layer): app key and token (401), enforced
rate limit (429), fault plan, latency, then the endpoint. A dropped connection closes the socket without
a byte of answer under uvicorn; in-process (``httpx.ASGITransport``) it raises :class:`ConnectionDropped`,
an ``httpx.RemoteProtocolError``, so a client sees the same exception type either way.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
import time
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from typing import Any
from urllib.parse import parse_qs

import httpx
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route as StarletteRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sync.sandbox.errors import VALIDATION_TITLE, ApiError, OAuthError, problem
from sync.sandbox.faults import Fault, retry_after_header_seconds
from sync.sandbox.model import COLLECTIONS, ENTITY_OF_COLLECTION, Entity, RequestRecord, Route
from sync.sandbox.state import Sandbox

JSON_TYPE = "application/json"
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
    return Route("api", method, f"{method} other", None, None, tenant)


def dumps(obj: Any) -> bytes:
    # ASCII with \u escapes, as .NET's System.Text.Json writes by default (and faster to encode here)
    return json.dumps(obj, separators=(",", ":"), allow_nan=False, check_circular=False).encode("ascii")


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(dumps(obj), status_code=status, media_type=JSON_TYPE, headers=headers)


def error_response(exc: ApiError) -> Response:
    return json_response(exc.body(), exc.status)


# ------------------------------------------------------------------------------------------------- gateway


class _Outcome:
    __slots__ = ("applied", "fault", "status")

    def __init__(self) -> None:
        self.status = 0
        self.fault: str | None = None
        self.applied = False


class _Gateway:
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
        if fault.kind == "rate_limit":
            await _send_429(send, outcome, fault.retry_after, fault.retry_after_style)
            return
        if fault.after_apply:
            await self.app(scope, receive, _swallowing(route, outcome))
        if fault.kind == "server_error":
            await _send_server_error(send, outcome, fault)
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


def _capturing(send: Send, route: Route, outcome: _Outcome) -> Send:
    async def capture(message: Message) -> None:
        if message["type"] == "http.response.start":
            outcome.status = message["status"]
            outcome.applied = route.method == "PATCH" and 200 <= message["status"] < 300
        await send(message)

    return capture


def _swallowing(route: Route, outcome: _Outcome) -> Send:
    """Runs the endpoint for its effect only: its answer is replaced by the fault."""

    async def swallow(message: Message) -> None:
        if message["type"] == "http.response.start":
            outcome.applied = route.method == "PATCH" and 200 <= message["status"] < 300

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


async def _send_server_error(send: Send, outcome: _Outcome, fault: Fault) -> None:
    status = fault.status or 500
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


# ------------------------------------------------------------------------------------------------- endpoints

Endpoint = Callable[[Request], Awaitable[Response]]


def _token_endpoint(sandbox: Sandbox) -> Endpoint:
    async def token(request: Request) -> Response:
        content_type = request.headers.get("content-type", "").lower()
        if not content_type.startswith("application/x-www-form-urlencoded"):
            return json_response({"error": "invalid_request",
                                  "error_description": "expected application/x-www-form-urlencoded"}, 400)
        form = parse_qs((await request.body()).decode("utf-8", "replace"), keep_blank_values=True)

        def first(name: str) -> str | None:
            values = form.get(name)
            return values[0] if values else None

        client_id, client_secret = first("client_id"), first("client_secret")
        basic = request.headers.get("authorization", "")
        if client_id is None and basic[:6].lower() == "basic ":
            try:
                client_id, _, client_secret = base64.b64decode(basic[6:].strip()).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                client_id = client_secret = None
        try:
            payload = sandbox.issue_token(first("grant_type"), client_id, client_secret)
        except OAuthError as exc:
            return json_response(exc.body(), 400, {"cache-control": "no-store"})
        return json_response(payload, 200, {"cache-control": "no-store", "pragma": "no-cache"})

    return token


def _record_endpoint(sandbox: Sandbox, entity: Entity) -> Endpoint:
    async def record(request: Request) -> Response:
        rid: int = request.path_params["id"]
        try:
            if request.method in ("GET", "HEAD"):
                return json_response(sandbox.api_get(entity, rid))
            content_type = request.headers.get("content-type", "").lower()
            if "json" not in content_type:
                raise ApiError(415, "Unsupported Media Type")
            raw = await request.body()
            if not raw.strip():
                raise ApiError(400, VALIDATION_TITLE, {"": ["A non-empty request body is required."]})
            try:
                body = json.loads(raw)
            except ValueError as exc:
                raise ApiError(400, VALIDATION_TITLE, {"$": [f"The JSON value could not be converted: {exc}"]}) \
                    from None
            return json_response(sandbox.api_patch(entity, rid, body))
        except ApiError as exc:
            return error_response(exc)

    return record


def _list_endpoint(sandbox: Sandbox, entity: Entity) -> Endpoint:
    async def listing(request: Request) -> Response:
        try:
            return json_response(sandbox.api_list(entity, request.query_params))
        except ApiError as exc:
            return error_response(exc)

    return listing


def _export_endpoint(sandbox: Sandbox, entity: Entity) -> Endpoint:
    async def export(request: Request) -> Response:
        try:
            return json_response(sandbox.api_export(entity, request.query_params))
        except ApiError as exc:
            return error_response(exc)

    return export


async def _http_exception(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    headers = exc.headers if isinstance(exc, HTTPException) else None
    title = exc.detail if isinstance(exc, HTTPException) else "Server Error"
    return json_response(problem(status, title), status, dict(headers) if headers else None)


# ------------------------------------------------------------------------------------------------- admin


def _admin_routes(sandbox: Sandbox) -> list[StarletteRoute]:
    async def read_json(request: Request) -> Any:
        raw = await request.body()
        if not raw.strip():
            return {}
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise ApiError(400, "Invalid JSON body.", {"$": [str(exc)]}) from None

    def guarded(fn: Callable[[Request], Awaitable[Response]]) -> Endpoint:
        async def endpoint(request: Request) -> Response:
            try:
                return await fn(request)
            except ApiError as exc:
                return error_response(exc)
            except (ValueError, TypeError, KeyError) as exc:
                return json_response(problem(400, str(exc) or type(exc).__name__), 400)

        return endpoint

    async def health(request: Request) -> Response:
        return json_response({"status": "ok", "tenantId": sandbox.tenant_id})

    async def seed(request: Request) -> Response:
        body = await read_json(request)
        sandbox.seed(int(body.get("customers", 0)), int(body.get("locations", 0)), int(body.get("seed", 0)))
        return json_response({"customers": sandbox.count("customer"), "locations": sandbox.count("location")})

    def creator(entity: Entity) -> Endpoint:
        async def create(request: Request) -> Response:
            body = await read_json(request)
            if not isinstance(body, dict):
                raise ValueError("expected a JSON object")
            if entity == "customer":
                return json_response(sandbox.add_customer(**body), 201)
            customer_id = body.pop("customerId", None)
            if not isinstance(customer_id, int):
                raise ValueError("customerId (integer) is required")
            return json_response(sandbox.add_location(customer_id, **body), 201)

        return guarded(create)

    def remote(entity: Entity) -> Endpoint:
        async def record(request: Request) -> Response:
            rid: int = request.path_params["id"]
            if request.method == "GET":
                guid = request.query_params.get("applicationGuid")
                getter = sandbox.get_customer if entity == "customer" else sandbox.get_location
                return json_response(getter(rid, guid))
            body = await read_json(request)
            if not isinstance(body, dict):
                raise ValueError("expected a JSON object")
            editor = sandbox.edit_customer if entity == "customer" else sandbox.edit_location
            return json_response(editor(rid, **body))

        return guarded(record)

    async def counters(request: Request) -> Response:
        return json_response({ep: {str(st): n for st, n in by.items()} for ep, by in sandbox.counters.items()})

    async def requests_log(request: Request) -> Response:
        if request.method == "DELETE":
            sandbox.reset_log()
            return Response(status_code=204)
        entries = sandbox.requests
        limit = request.query_params.get("limit")
        if limit:
            entries = entries[-int(limit):]
        return json_response({"requests": [e.to_dict() for e in entries]})

    async def faults(request: Request) -> Response:
        if request.method == "POST":
            body = await read_json(request)
            if not isinstance(body, dict):
                raise ValueError("expected a JSON object")
            if body.pop("clear", False):
                sandbox.faults.clear()
            rules = body.pop("rules", None) or []
            sandbox.faults.configure(**body)
            for rule in rules:
                entity = rule.get("entity")
                if entity not in (None, "customer", "location"):
                    raise ValueError("rule entity must be customer or location")
                record_id = rule.get("record_id")
                sandbox.faults.add(
                    Fault.from_dict(rule["fault"]),
                    times=rule.get("times", 1),
                    skip=int(rule.get("skip", 0)),
                    endpoint=rule.get("endpoint"),
                    method=rule.get("method"),
                    entity=entity,
                    record_id=None if record_id is None else int(record_id),
                )
        return json_response(sandbox.faults.to_dict())

    async def config(request: Request) -> Response:
        if request.method == "POST":
            body = await read_json(request)
            if not isinstance(body, dict):
                raise ValueError("expected a JSON object")
            sandbox.configure(**body)
        return json_response(sandbox.settings())

    async def expire(request: Request) -> Response:
        return json_response({"expired": sandbox.expire_tokens()})

    routes = [
        StarletteRoute("/_sandbox/health", guarded(health), methods=["GET"]),
        StarletteRoute("/_sandbox/seed", guarded(seed), methods=["POST"]),
        StarletteRoute("/_sandbox/counters", guarded(counters), methods=["GET"]),
        StarletteRoute("/_sandbox/requests", guarded(requests_log), methods=["GET", "DELETE"]),
        StarletteRoute("/_sandbox/faults", guarded(faults), methods=["GET", "POST"]),
        StarletteRoute("/_sandbox/config", guarded(config), methods=["GET", "POST"]),
        StarletteRoute("/_sandbox/tokens/expire", guarded(expire), methods=["POST"]),
    ]
    for entity in ("customer", "location"):
        e: Entity = "customer" if entity == "customer" else "location"
        coll = COLLECTIONS[e]
        routes.append(StarletteRoute(f"/_sandbox/{coll}", creator(e), methods=["POST"]))
        routes.append(StarletteRoute(f"/_sandbox/{coll}/{{id:int}}", remote(e), methods=["GET", "PATCH"]))
    return routes


# ------------------------------------------------------------------------------------------------- app


class SandboxApp(Starlette):
    """Starlette with the gateway outside Starlette's own error middleware (so a dropped connection is not
    turned into a 500 first)."""

    def __init__(self, sandbox: Sandbox, routes: list[StarletteRoute]) -> None:
        super().__init__(routes=routes, exception_handlers={HTTPException: _http_exception})
        self.sandbox = sandbox

    def build_middleware_stack(self) -> ASGIApp:
        return _Gateway(super().build_middleware_stack(), self.sandbox)


def create_app(sandbox: Sandbox) -> Starlette:
    """The ASGI app serving ``sandbox``. Usable in-process (``httpx.ASGITransport``) or under uvicorn."""
    routes: list[StarletteRoute] = [StarletteRoute("/connect/token", _token_endpoint(sandbox), methods=["POST"])]
    base = "/crm/v2/tenant/{tenant}"
    for entity, coll in COLLECTIONS.items():
        routes += [
            StarletteRoute(f"{base}/{coll}/{{id:int}}", _record_endpoint(sandbox, entity), methods=["GET", "PATCH"]),
            StarletteRoute(f"{base}/{coll}", _list_endpoint(sandbox, entity), methods=["GET"]),
            StarletteRoute(f"{base}/export/{coll}", _export_endpoint(sandbox, entity), methods=["GET"]),
        ]
    routes += _admin_routes(sandbox)  # unknown paths and methods: 404 / 405 as ApiErrorResponse (_http_exception)
    return SandboxApp(sandbox, routes)
