"""What is synced: the mirror columns of each entity, the API field each maps to, and how values compare.

Pure data and pure functions over plain dicts. A *record* here is a dict keyed by mirror column name holding
canonical values (the same form in the mirror, the shadow and a converted API response):

- text columns: ``str`` or ``None``; floats: ``float`` or ``None``; flags: ``bool``
- ``tag_type_ids``: sorted ``list[int]`` (a set: order is never significant)
- ``custom_fields``: ``dict[str, str]`` typeId -> value (a set of pairs)
- ``external_data``: ``dict[str, str]`` key -> value, this application's guid only
- locations carry ``customer_st_id`` (ServiceTitan's customerId); the database edge translates it to and from
  the mirror's ``customer_id``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

Entity = Literal["customer", "location"]
ENTITIES: tuple[Entity, ...] = ("customer", "location")


@dataclass(frozen=True)
class Names:
    """What one entity is called in each place (the one mapping; the sandbox, ServiceTitan's side, has its own)."""

    table: str
    """The mirror table."""
    collection: str
    """The API collection: ``/crm/v2/tenant/{tenant}/<collection>/{id}``."""
    feed: str
    """The export feed (``/export/<feed>``) and its ``feed_cursors.feed``."""


NAMES: dict[Entity, Names] = {
    "customer": Names(table="customers", collection="customers", feed="customers"),
    "location": Names(table="locations", collection="locations", feed="locations"),
}

CUSTOMER_LINK = "customer_st_id"
"""A location's customer in canonical records: ServiceTitan's customerId. The mirror stores the mirror's own
``customers.id`` in ``locations.customer_id`` instead; ``db_column`` names the column, the database layer
translates the value."""


def db_column(column: str) -> str:
    """The mirror column that stores a canonical record's ``column``."""
    return "customer_id" if column == CUSTOMER_LINK else column


NOT_NULL_BOOLS: dict[str, bool] = {"active": True, "do_not_mail": False, "do_not_service": False}
"""Mirror columns declared NOT NULL with these defaults: a missing remote value becomes the default everywhere
(mirror and shadow alike), so it never shows as a local diff."""

Kind = Literal["text", "float", "bool", "int", "timestamp", "id_list", "custom_fields", "external_data"]

FLOAT_TOLERANCE = 1e-6
"""Coordinates closer than this are equal (ServiceTitan may round what it stores)."""

ADDRESS_PARTS: tuple[str, ...] = ("street", "unit", "city", "state", "zip", "country", "latitude", "longitude")


@dataclass(frozen=True)
class Field:
    column: str
    """Mirror column, and key in a canonical record."""
    api: str
    """Property of the API record; for address parts the key inside ``address``."""
    kind: Kind
    address: bool = False
    writable: bool = True
    """False for read-only fields: pulled, never sent."""


def _address_fields() -> tuple[Field, ...]:
    return tuple(
        Field(p, p, "float" if p in ("latitude", "longitude") else "text", address=True) for p in ADDRESS_PARTS
    )


CUSTOMER_FIELDS: tuple[Field, ...] = (
    Field("name", "name", "text"),
    Field("type", "type", "text"),
    *_address_fields(),
    Field("active", "active", "bool"),
    Field("do_not_mail", "doNotMail", "bool"),
    Field("do_not_service", "doNotService", "bool"),
    Field("tag_type_ids", "tagTypeIds", "id_list"),
    Field("custom_fields", "customFields", "custom_fields"),
    Field("external_data", "externalData", "external_data"),
    Field("balance", "balance", "float", writable=False),
    Field("tax_exempt", "taxExempt", "bool", writable=False),
    Field("created_on", "createdOn", "timestamp", writable=False),
    Field("created_by_id", "createdById", "int", writable=False),
    Field("modified_on", "modifiedOn", "timestamp", writable=False),
    Field("merged_to_id", "mergedToId", "int", writable=False),
)

LOCATION_FIELDS: tuple[Field, ...] = (
    Field(CUSTOMER_LINK, "customerId", "int"),
    Field("name", "name", "text"),
    *_address_fields(),
    Field("active", "active", "bool"),
    Field("tax_zone_id", "taxZoneId", "int"),
    Field("tag_type_ids", "tagTypeIds", "id_list"),
    Field("custom_fields", "customFields", "custom_fields"),
    Field("external_data", "externalData", "external_data"),
    Field("zone_id", "zoneId", "int", writable=False),
    Field("tax_exempt", "taxExempt", "bool", writable=False),
    Field("created_on", "createdOn", "timestamp", writable=False),
    Field("created_by_id", "createdById", "int", writable=False),
    Field("modified_on", "modifiedOn", "timestamp", writable=False),
    Field("merged_to_id", "mergedToId", "int", writable=False),
)

FIELDS: dict[Entity, tuple[Field, ...]] = {"customer": CUSTOMER_FIELDS, "location": LOCATION_FIELDS}
BY_COLUMN: dict[Entity, dict[str, Field]] = {e: {f.column: f for f in fs} for e, fs in FIELDS.items()}


def writable_fields(entity: Entity, *, sync_active: bool = True) -> tuple[Field, ...]:
    """Fields a PATCH may carry. ``active`` only when the config switch ``sync.sync_active`` is on."""
    return tuple(f for f in FIELDS[entity] if f.writable and (sync_active or f.column != "active"))


def address_columns(entity: Entity) -> tuple[str, ...]:
    return tuple(f.column for f in FIELDS[entity] if f.address)


# ---------------------------------------------------------------------------------------------- canonical values


def canonical(kind: Kind, value: Any) -> Any:
    """Bring a value from the database or JSON into its canonical form (see module docstring)."""
    if value is None:
        if kind == "id_list":
            return []
        if kind in ("custom_fields", "external_data"):
            return {}
        return None
    if kind == "float":
        return float(value)
    if kind == "int":
        return int(value)
    if kind == "bool":
        return bool(value)
    if kind == "id_list":
        return sorted({int(v) for v in value})
    if kind in ("custom_fields", "external_data"):
        if isinstance(value, Mapping):
            bad = [k for k, v in value.items() if v is not None and not isinstance(v, str)]
            if bad:  # never send Python's repr of a number, list or object as the value
                raise TypeError(f"values must be strings (see key {bad[0]!r})")
            return {str(k): v for k, v in value.items()}
        raise TypeError(f"expected a JSON object, got {type(value).__name__}")
    if kind == "timestamp":
        return parse_timestamp(value).isoformat()
    if kind == "text" and not isinstance(value, str):
        return value.isoformat() if hasattr(value, "isoformat") else str(value)
    return value


_FRACTION = re.compile(r"(\.\d{6})\d+")


def parse_timestamp(value: Any) -> datetime:
    """An aware UTC datetime from a datetime or an ISO 8601 string (``Z``, 7-digit .NET fractions accepted)."""
    if isinstance(value, datetime):
        dt = value
    else:
        text = _FRACTION.sub(r"\1", str(value).strip()).replace("Z", "+00:00").replace("z", "+00:00")
        dt = datetime.fromisoformat(text)
    return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).astimezone(UTC)


def equal(kind: Kind, a: Any, b: Any) -> bool:
    """Field equality: floats within FLOAT_TOLERANCE, lists and maps as sets, strings exactly."""
    if a == b and type(a) is type(b):  # the common case, without canonicalising
        return True
    if kind == "float":
        if a is None or b is None:
            return a is None and b is None
        return math.isclose(float(a), float(b), rel_tol=0.0, abs_tol=FLOAT_TOLERANCE)
    return bool(canonical(kind, a) == canonical(kind, b))


def record_from_api(entity: Entity, api: Mapping[str, Any]) -> dict[str, Any]:
    """A ServiceTitan customer/location (response, export row) as a canonical record.

    ``external_data`` is taken as given: callers that received it without our application guid (export feeds)
    must not treat an empty list as "keys deleted" (see ``sync.core.merge``).
    """
    out: dict[str, Any] = {}
    address = api.get("address") or {}
    for f in FIELDS[entity]:
        raw: Any
        if f.address:
            raw = address.get(f.api)
        elif f.kind == "custom_fields":
            raw = {str(cf["typeId"]): cf.get("value") for cf in api.get(f.api) or [] if cf.get("value") is not None}
        elif f.kind == "external_data":
            raw = {str(e["key"]): e.get("value") for e in api.get(f.api) or []}
        else:
            raw = api.get(f.api)
        out[f.column] = canonical(f.kind, raw)
    if entity == "customer" and isinstance(out.get("type"), dict):  # never seen, but the spec's example has {}
        out["type"] = None
    return out
