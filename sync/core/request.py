"""Request building: a local diff -> the minimal ``UpdateCustomerRequest`` / ``UpdateLocationRequest``. Pure.

Rules (docs/contract.md, "Request rules"): only changed fields; the address whole when any part changed; customFields
and tagTypeIds as full lists; ``externalData`` in Merge mode with our guid, the mirror id under
``mirror_id_key``, changed keys, and removed keys as ``value: null``; the location's customer as ServiceTitan's
``customerId``; read-only fields never. Every body is validated against ServiceTitan's OpenAPI file; a body
that fails is never sent, and the problem is reported on the mirror column(s) to fix.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sync.core import openapi
from sync.core.diff import Diff, strip_key
from sync.core.fields import BY_COLUMN, CUSTOMER_LINK, Entity, address_columns, db_column

# API property (first path segment of a validation error) -> mirror column(s) to fix
_ADDRESS_API = "address"


@dataclass
class Patch:
    body: dict[str, Any]
    problems: dict[str, list[str]] = field(default_factory=dict)
    """{mirror column: [messages]}: non-empty means the body must not be sent."""
    reason: str = "schema"
    """Why it must not be sent: ``schema`` (the body fails ServiceTitan's schema) or ``merged`` (the record was
    merged into another in ServiceTitan)."""

    @property
    def valid(self) -> bool:
        return not self.problems

    def problem_line(self) -> str:
        """One line naming the columns to fix."""
        return "; ".join(f"{col}: {' '.join(msgs)}" for col, msgs in sorted(self.problems.items()))


def api_to_column(entity: Entity, path: str) -> str:
    """The mirror column a field path of a request body or a ServiceTitan error names (``address.zip`` -> ``zip``)."""
    head = path.split(".", 1)[0].split("[", 1)[0]
    if head == _ADDRESS_API:
        part = path.split(".", 2)[1].split("[", 1)[0] if "." in path else ""
        return part if part in address_columns(entity) else "address"
    for f in BY_COLUMN[entity].values():
        if f.api == head and not f.address:
            return db_column(f.column)
    return head


def build_patch(entity: Entity, mirror: Mapping[str, Any], shadow: Mapping[str, Any], diff: Diff, *,
                mirror_id: int, application_guid: str, mirror_id_key: str = "mirrorId") -> Patch:
    """The PATCH body for ``diff`` (from ``sync.core.diff.local_diff``), validated. ``diff`` must not be empty."""
    problems: dict[str, list[str]] = {}
    body = request_body(entity, mirror, shadow, diff, problems, mirror_id=mirror_id,
                        application_guid=application_guid, mirror_id_key=mirror_id_key)
    return Patch(body, with_schema_problems(entity, openapi.UPDATE_SCHEMAS[entity], body, problems))


def with_schema_problems(entity: Entity, schema: str, body: Any,
                         problems: dict[str, list[str]]) -> dict[str, list[str]]:
    """``problems`` plus what the spec's ``schema`` finds in ``body``, on the mirror columns to fix (a column
    already explained in our own words keeps only those)."""
    for path, messages in openapi.validate(schema, body).items():
        col = api_to_column(entity, path)
        if col in problems:
            continue
        problems.setdefault(col, []).extend(messages)
    return problems


def request_body(entity: Entity, mirror: Mapping[str, Any], shadow: Mapping[str, Any], columns: Iterable[str],
                 problems: dict[str, list[str]], *, mirror_id: int, application_guid: str,
                 mirror_id_key: str = "mirrorId", creating: bool = False) -> dict[str, Any]:
    """The API form of ``columns`` of the mirror row (the address whole if any part is among them, lists whole,
    ``externalData`` in Merge mode against ``shadow``), not yet validated; what cannot be sent goes to
    ``problems`` ({mirror column: [messages]}). PATCH bodies (``build_patch``) and create bodies
    (``sync.core.create``, ``creating``: a create's address takes no null coordinates, and needs none) are both
    made here."""
    cols = list(dict.fromkeys(columns))  # in the caller's order: a stable body
    diff = set(cols)
    body: dict[str, Any] = {}
    by_col = BY_COLUMN[entity]
    addr_cols = address_columns(entity)

    if any(c in diff for c in addr_cols):
        address: dict[str, Any] = {}
        for c in addr_cols:
            v = mirror.get(c)
            if c == "unit" and v is None:
                v = ""
            if c in ("latitude", "longitude") and v is None and creating:
                continue
            if c in ("latitude", "longitude") and v is None and entity == "customer":
                problems.setdefault(c, []).append(
                    "ServiceTitan requires latitude and longitude with a customer address change; "
                    "set both on the mirror row")
                continue
            address[by_col[c].api] = v
        body["address"] = address

    for col in cols:
        f = by_col[col]
        if f.address:
            continue
        value = mirror.get(col)
        if f.kind == "id_list":
            try:
                body[f.api] = sorted({int(v) for v in (value or [])})
            except (TypeError, ValueError):
                problems.setdefault(col, []).append("must be an array of integer tag type ids")
        elif f.kind == "custom_fields":
            if not isinstance(value, Mapping):
                problems.setdefault(col, []).append('must be a JSON object {"<typeId>": "<value>"}')
                continue
            items = []
            for k, v in value.items():
                if not str(k).lstrip("-").isdigit():
                    problems.setdefault(col, []).append(f"key {k!r} is not an integer custom field type id")
                elif not isinstance(v, str):
                    problems.setdefault(col, []).append(f"value of {k} must be a string")
                else:
                    items.append({"typeId": int(k), "value": v})
            body[f.api] = sorted(items, key=lambda i: i["typeId"])
        elif f.kind == "external_data":
            continue  # below: always sent
        elif col == CUSTOMER_LINK:
            if value is None:
                problems.setdefault(db_column(col), []).append(
                    "the location's customer is not in ServiceTitan (its customers.st_id is empty)")
            body[f.api] = value
        else:
            body[f.api] = value

    entries: list[dict[str, str | None]] = [{"key": mirror_id_key, "value": str(mirror_id)}]
    if "external_data" in diff:
        local = strip_key(mirror.get("external_data"), mirror_id_key)
        base = strip_key(shadow.get("external_data"), mirror_id_key) or {}
        if not isinstance(local, Mapping):
            problems.setdefault("external_data", []).append('must be a JSON object {"<key>": "<value>"}')
        else:
            for k in sorted(local):
                v = local[k]
                if v is not None and not isinstance(v, str):
                    problems.setdefault("external_data", []).append(f"value of {k!r} must be a string")
                elif base.get(k) != v:
                    entries.append({"key": str(k), "value": v})
            entries.extend({"key": str(k), "value": None} for k in sorted(base) if k not in local)
    body["externalData"] = {"patchMode": "Merge", "applicationGuid": application_guid, "externalData": entries}
    return body
