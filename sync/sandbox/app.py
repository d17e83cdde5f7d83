"""The sandbox as an ASGI app (Starlette): ServiceTitan's token endpoint and CRM v2 customers/locations and their
contacts.

API (paths as on ServiceTitan; the API and the token endpoint share one host):

- ``POST /connect/token`` form ``grant_type=client_credentials&client_id=..&client_secret=..`` (HTTP Basic
  client authentication also accepted) -> ``{access_token, expires_in, token_type: "Bearer", scope}``;
  400 ``{"error": "invalid_client" | "unsupported_grant_type" | "invalid_request"}``.
- ``GET|PATCH /crm/v2/tenant/{tenant}/customers/{id}``, ``.../locations/{id}``
- ``POST /crm/v2/tenant/{tenant}/customers`` (``CreateCustomerRequest``: name, address and ``locations[]``
  required, each location with name and address; contacts, tags, custom fields, externalData...): creates the
  customer, its locations and contacts -> 200 ``CreatedCustomerResponse`` (with ``locations`` and ``contacts``)
- ``POST /crm/v2/tenant/{tenant}/locations`` (``CreateLocationRequest``: name, address, customerId required)
  -> 200 ``CreateLocationResponse``; 409 for an unknown customer. Both creates: 400 naming every field the
  schema or ServiceTitan refuses, nothing stored; ``externalData`` answered for the request's guid only
  (``creates.py``)
- ``GET /crm/v2/tenant/{tenant}/customers``, ``.../locations`` (page, pageSize, includeTotal, ids,
  modifiedOnOrAfter, modifiedBefore, createdOnOrAfter, createdBefore, active, sort, customerId (locations),
  externalDataApplicationGuid / externalDataKey / externalDataValues)
- ``GET /crm/v2/tenant/{tenant}/export/customers``, ``.../export/locations`` (from, includeRecentChanges)
- ``GET|POST /crm/v2/tenant/{tenant}/customers/{id}/contacts``, ``.../locations/{id}/contacts``: a record's
  active contacts (page, pageSize, includeTotal) / a new one (``CreateCustomerContactRequest`` /
  ``LocationContactCreateRequest``) -> 200 ``CustomerContactWithModifiedOnResponse`` / ``LocationContactResponse``
- ``PATCH|DELETE /crm/v2/tenant/{tenant}/customers/{id}/contacts/{contactId}``, ``.../locations/{id}/contacts/
  {contactId}``: change the fields given (``UpdateCustomerContactRequest`` / ``LocationContactUpdateRequest``) ->
  200 as above; delete -> 200 without content (kept as inactive). 404 for an unknown record or contact
  (``contacts.py``: phone numbers normalised, errors)
- ``GET /crm/v2/tenant/{tenant}/export/customers/contacts``, ``.../export/locations/contacts`` (from,
  includeRecentChanges): ``ExportCustomerContactResponse`` / ``ExportLocationContactResponse``, deleted ones with
  ``active: false``

Every ``/crm/v2/...`` call needs ``ST-App-Key`` and ``Authorization: Bearer <token>``; a token only works for
the sandbox's own tenant (any other tenant in the path: 401). Errors are RFC 7807 ``ApiErrorResponse`` JSON.

Admin endpoints for tests and demos (not rate limited, not counted or logged). No auth by default; with an
``admin_token`` set on the :class:`Sandbox` (``stsync sandbox --admin-token``) every ``/_sandbox/*`` call must
carry it in the header ``X-Sandbox-Admin-Token`` (401 ApiErrorResponse otherwise):

- ``GET  /_sandbox/health`` -> ``{"status": "ok", "tenantId": ..}``
- ``POST /_sandbox/seed`` ``{"customers": n, "locations": m, "seed": s, "contacts": true}``: replace all records
  with fake ones (with 0 to 2 contacts each unless ``"contacts": false``)
- ``POST /_sandbox/customers`` ``{..API fields..}``; ``POST /_sandbox/locations`` ``{"customerId": .., ..}``: a
  record created inside ServiceTitan (fake values for what is not given; ``externalData`` in the PATCH form) -> 201
- ``GET  /_sandbox/customers/{id}`` / ``/_sandbox/locations/{id}`` (``?applicationGuid=``): full record
- ``PATCH /_sandbox/customers/{id}`` / ``/_sandbox/locations/{id}``: a remote edit made in ServiceTitan
  (partial ``address`` allowed; also ``balance``, ``mergedToId``, ``zoneId``...); modifiedOn advances
- ``GET|POST /_sandbox/customers/{id}/contacts`` (``?includeInactive=true``) -> ``{"contacts": [...]}`` /
  ``{"type": .., "value": .., "memo": .., "preferences": .., "doNotText": ..}`` -> 201; ``PATCH|DELETE
  /_sandbox/customers/{id}/contacts/{contactId}``: contacts added, edited, deleted in ServiceTitan (the same for
  locations); answers in export shape
- ``GET  /_sandbox/counters`` -> ``{endpoint: {status: count}}`` (status "0" = dropped connection)
- ``GET  /_sandbox/requests`` (``?limit=N``: the last N) -> ``{"requests": [...]}``; ``DELETE`` clears log
  and counters
- ``GET|POST /_sandbox/faults``: read / change the fault plan: any ``Faults.SETTINGS`` key, plus
  ``"clear": true`` (applied first) and ``"rules": [{"fault": {"kind": .., ..}, "times": 1, "skip": 0,
  "endpoint": .., "method": .., "entity": .., "record_id": ..}]``
- ``GET|POST /_sandbox/config``: rate_limit_per_second, latency_ms, export_page_size, export_delay_seconds,
  token_ttl_seconds, bump_modified_on_noop
- ``POST /_sandbox/tokens/expire``: invalidate every issued token

Order of checks for an API call, the request log and dropped connections: see ``gateway.py`` (the outermost
ASGI layer, :class:`~sync.sandbox.gateway.Gateway`); the admin endpoints are in ``admin.py``. A dropped
connection raises :class:`ConnectionDropped` in-process (``httpx.ASGITransport``), an
``httpx.RemoteProtocolError``, as a client would see a closed socket under uvicorn.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route as StarletteRoute
from starlette.types import ASGIApp

from sync.sandbox.admin import admin_routes
from sync.sandbox.errors import VALIDATION_TITLE, ApiError, OAuthError, problem
from sync.sandbox.gateway import ConnectionDropped, Gateway
from sync.sandbox.model import COLLECTIONS, Entity
from sync.sandbox.responses import Endpoint, error_response, json_response
from sync.sandbox.state import Sandbox

__all__ = ["ConnectionDropped", "SandboxApp", "create_app"]

# ------------------------------------------------------------------------------------------------- endpoints


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


async def _json_body(request: Request) -> Any:
    """The JSON body of a PATCH or POST: 415 without a JSON content type, 400 when empty or not JSON."""
    content_type = request.headers.get("content-type", "").lower()
    if "json" not in content_type:
        raise ApiError(415, "Unsupported Media Type")
    raw = await request.body()
    if not raw.strip():
        raise ApiError(400, VALIDATION_TITLE, {"": ["A non-empty request body is required."]})
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise ApiError(400, VALIDATION_TITLE, {"$": [f"The JSON value could not be converted: {exc}"]}) from None


def _record_endpoint(sandbox: Sandbox, entity: Entity) -> Endpoint:
    async def record(request: Request) -> Response:
        rid: int = request.path_params["id"]
        try:
            if request.method in ("GET", "HEAD"):
                return json_response(sandbox.api_get(entity, rid))
            return json_response(sandbox.api_patch(entity, rid, await _json_body(request)))
        except ApiError as exc:
            return error_response(exc)

    return record


def _create_endpoint(sandbox: Sandbox, entity: Entity) -> Endpoint:
    async def create(request: Request) -> Response:
        try:
            return json_response(sandbox.api_create(entity, await _json_body(request)))
        except ApiError as exc:
            return error_response(exc)

    return create


def _list_endpoint(sandbox: Sandbox, entity: Entity) -> Endpoint:
    async def listing(request: Request) -> Response:
        try:
            return json_response(sandbox.api_list(entity, request.query_params))
        except ApiError as exc:
            return error_response(exc)

    return listing


def _contacts_endpoint(sandbox: Sandbox, entity: Entity) -> Endpoint:
    async def contacts(request: Request) -> Response:
        rid: int = request.path_params["id"]
        try:
            if request.method in ("GET", "HEAD"):
                return json_response(sandbox.api_contacts(entity, rid, request.query_params))
            return json_response(sandbox.api_create_contact(entity, rid, await _json_body(request)))
        except ApiError as exc:
            return error_response(exc)

    return contacts


def _contact_endpoint(sandbox: Sandbox, entity: Entity) -> Endpoint:
    async def contact(request: Request) -> Response:
        rid: int = request.path_params["id"]
        contact_id: int = request.path_params["contactId"]
        try:
            if request.method == "DELETE":
                sandbox.api_delete_contact(entity, rid, contact_id)
                return Response(status_code=200)  # the spec documents a 200 without content
            return json_response(sandbox.api_patch_contact(entity, rid, contact_id, await _json_body(request)))
        except ApiError as exc:
            return error_response(exc)

    return contact


def _contact_export_endpoint(sandbox: Sandbox, entity: Entity) -> Endpoint:
    async def export(request: Request) -> Response:
        try:
            return json_response(sandbox.api_contact_export(entity, request.query_params))
        except ApiError as exc:
            return error_response(exc)

    return export


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


# ------------------------------------------------------------------------------------------------- app


class SandboxApp(Starlette):
    """Starlette with the gateway outside Starlette's own error middleware (so a dropped connection is not
    turned into a 500 first)."""

    def __init__(self, sandbox: Sandbox, routes: list[StarletteRoute]) -> None:
        super().__init__(routes=routes, exception_handlers={HTTPException: _http_exception})
        self.sandbox = sandbox

    def build_middleware_stack(self) -> ASGIApp:
        return Gateway(super().build_middleware_stack(), self.sandbox)


def create_app(sandbox: Sandbox) -> Starlette:
    """The ASGI app serving ``sandbox``. Usable in-process (``httpx.ASGITransport``) or under uvicorn."""
    routes: list[StarletteRoute] = [StarletteRoute("/connect/token", _token_endpoint(sandbox), methods=["POST"])]
    base = "/crm/v2/tenant/{tenant}"
    for entity, coll in COLLECTIONS.items():
        routes += [
            StarletteRoute(f"{base}/{coll}/{{id:int}}", _record_endpoint(sandbox, entity), methods=["GET", "PATCH"]),
            StarletteRoute(f"{base}/{coll}", _list_endpoint(sandbox, entity), methods=["GET"]),
            StarletteRoute(f"{base}/{coll}", _create_endpoint(sandbox, entity), methods=["POST"]),
            StarletteRoute(f"{base}/export/{coll}", _export_endpoint(sandbox, entity), methods=["GET"]),
            StarletteRoute(f"{base}/{coll}/{{id:int}}/contacts", _contacts_endpoint(sandbox, entity),
                           methods=["GET", "POST"]),
            StarletteRoute(f"{base}/{coll}/{{id:int}}/contacts/{{contactId:int}}", _contact_endpoint(sandbox, entity),
                           methods=["PATCH", "DELETE"]),
            StarletteRoute(f"{base}/export/{coll}/contacts", _contact_export_endpoint(sandbox, entity),
                           methods=["GET"]),
        ]
    routes += admin_routes(sandbox)  # unknown paths and methods: 404 / 405 as ApiErrorResponse (_http_exception)
    return SandboxApp(sandbox, routes)
