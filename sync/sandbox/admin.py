"""The ``/_sandbox/...`` admin endpoints (listed in ``app.py``'s docstring): seeding, remote edits (of records and
of their contacts), the request
log and counters, the fault plan, settings and token expiry. Not rate limited, never counted or logged; no auth
unless the sandbox has an ``admin_token``, which every call must then carry in ``X-Sandbox-Admin-Token``.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route as StarletteRoute

from sync.sandbox.errors import ApiError, ContactNotFound, problem
from sync.sandbox.faults import Fault
from sync.sandbox.model import COLLECTIONS, Entity
from sync.sandbox.responses import Endpoint, error_response, json_response
from sync.sandbox.state import Sandbox


def admin_routes(sandbox: Sandbox) -> list[StarletteRoute]:
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
            want = sandbox.admin_token
            if want is not None and not hmac.compare_digest(
                    request.headers.get("x-sandbox-admin-token", "").encode(), want.encode()):
                return json_response(problem(401, "The sandbox's admin routes need X-Sandbox-Admin-Token."), 401)
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
        contacts = body.get("contacts", True)
        if not isinstance(contacts, bool):
            raise ValueError("contacts must be true or false")
        sandbox.seed(int(body.get("customers", 0)), int(body.get("locations", 0)), int(body.get("seed", 0)),
                     contacts=contacts)
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

    def remote_contacts(entity: Entity) -> Endpoint:
        async def contacts(request: Request) -> Response:
            rid: int = request.path_params["id"]
            if request.method == "GET":
                inactive = request.query_params.get("includeInactive", "").lower() == "true"
                return json_response({"contacts": sandbox.contacts(entity, rid, include_inactive=inactive,
                                                                   full=True)})
            body = await read_json(request)
            if not isinstance(body, dict):
                raise ValueError("expected a JSON object")
            contact_type, value = body.pop("type", None), body.pop("value", None)
            if not isinstance(contact_type, str) or not isinstance(value, str):
                raise ValueError("type and value (strings) are required")
            return json_response(sandbox.add_contact(entity, rid, contact_type, value, **body), 201)

        return guarded(contacts)

    def remote_contact(entity: Entity) -> Endpoint:
        async def contact(request: Request) -> Response:
            rid: int = request.path_params["id"]
            contact_id: int = request.path_params["contactId"]
            if contact_id not in {c["id"] for c in sandbox.contacts(entity, rid, include_inactive=True)}:
                raise ContactNotFound(entity, contact_id)
            if request.method == "DELETE":
                return json_response(sandbox.remove_contact(entity, contact_id))
            body = await read_json(request)
            if not isinstance(body, dict):
                raise ValueError("expected a JSON object")
            return json_response(sandbox.edit_contact(entity, contact_id, **body))

        return guarded(contact)

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
        routes.append(StarletteRoute(f"/_sandbox/{coll}/{{id:int}}/contacts", remote_contacts(e),
                                     methods=["GET", "POST"]))
        routes.append(StarletteRoute(f"/_sandbox/{coll}/{{id:int}}/contacts/{{contactId:int}}", remote_contact(e),
                                     methods=["PATCH", "DELETE"]))
    return routes
