"""Record storage of the sandbox's tenant: one :class:`Table` per entity and :class:`RecordStore`, the part of
:class:`~sync.sandbox.state.Sandbox` that seeds, reads, edits and PATCHes records (creating them is
``creates.py``'s :class:`~sync.sandbox.creates.RecordCreator`, built on this).

A ``Table`` holds records in ServiceTitan's response shape keyed by id, plus an ordering index
``[(modified µs, id), ...]`` kept sorted for the export feeds (``feeds.py``). Stored record dicts are never
mutated once published (copy on write), so the app may serialise them outside the lock; the Python API
returns deep copies. Every method takes the tenant's one lock (``_lock``, re-entrant) around what it reads or
changes.
"""

from __future__ import annotations

import bisect
import gc
import re
import threading
import uuid
from collections.abc import Callable, Mapping
from functools import lru_cache
from typing import Any, cast

from sync.sandbox import seed as fake
from sync.sandbox.errors import VALIDATION_TITLE, ApiError, RecordNotFound
from sync.sandbox.model import Entity
from sync.sandbox.seed import iso_from_us
from sync.sandbox.validation import update_fields, validate_update

# Fields ServiceTitan itself changes (accounting, merges, dispatch zones): remote edits may set them, PATCH may not.
REMOTE_ONLY_FIELDS: dict[Entity, frozenset[str]] = {
    "customer": frozenset({"balance", "mergedToId", "createdById"}),
    "location": frozenset({"zoneId", "mergedToId", "taxExempt", "createdById"}),
}
_ADDRESS_TEXT = ("street", "unit", "city", "state", "zip", "country")
_ADDRESS_REQUIRED_TEXT = ("street", "city", "zip")
GUID_PATTERN = re.compile(r"^\{?[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}\}?$")


def now_us(clock: Callable[[], float]) -> int:
    """The clock's time as whole microseconds since the epoch (``modifiedOn``'s resolution)."""
    return int(clock() * 1_000_000)


class Table:
    """One entity's records, their ``modifiedOn`` stamps, the export order and their external data."""

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


def clone(record: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of a stored record (what the Python API hands out)."""
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
        if isinstance(guid, str) and not GUID_PATTERN.match(guid):
            errors.setdefault("externalData.applicationGuid", []).append(f"The value '{guid}' is not valid.")


@lru_cache(maxsize=1024)
def guid_key(guid: str) -> str:
    return str(uuid.UUID(guid))  # canonical lower-case form: GUIDs compare case-insensitively


def ext_list(table: Table, rid: int, guid: str) -> list[dict[str, str]]:
    """A record's external data under ``guid`` as the API lists it (nothing for a malformed guid)."""
    try:
        key = guid_key(guid)
    except ValueError:
        return []
    return [{"key": k, "value": v} for k, v in table.ext.get(rid, {}).get(key, {}).items()]


# ------------------------------------------------------------------------------------------------- store


class RecordStore:
    """Records, reference data (tag types, tax zones, custom field types) and the ``modifiedOn`` clock.

    ``clock``: epoch seconds, for ``modifiedOn`` (may be replaced after construction, e.g. by a test's fake
    clock). ``bump_modified_on_noop``: a PATCH that changes nothing still advances ``modifiedOn``.
    """

    def __init__(self, *, clock: Callable[[], float], bump_modified_on_noop: bool) -> None:
        self.clock = clock
        self.bump_modified_on_noop = bump_modified_on_noop
        self.tag_type_ids: set[int] = set(fake.TAG_TYPES)
        self.tax_zone_ids: set[int] = set(fake.TAX_ZONES)
        self.custom_field_types: dict[Entity, dict[int, str]] = {
            "customer": dict(fake.CUSTOMER_CUSTOM_FIELDS),
            "location": dict(fake.LOCATION_CUSTOM_FIELDS),
        }
        self._lock = threading.RLock()
        self._tables: dict[Entity, Table] = {
            "customer": Table("customer", fake.FIRST_CUSTOMER_ID),
            "location": Table("location", fake.FIRST_LOCATION_ID),
        }
        self._last_us = 0

    # ------------------------------------------------------------------------------------------ clock

    def _tick(self) -> int:
        """A new modifiedOn: now, but strictly after every modifiedOn handed out before."""
        now = now_us(self.clock)
        if now <= self._last_us:
            now = self._last_us + 1
        self._last_us = now
        return now

    # ------------------------------------------------------------------------------------------ seeding

    def seed(self, customers: int, locations: int, seed: int = 0, *, contacts: bool = True) -> None:
        """Replace all records with ``customers`` + ``locations`` deterministic fake ones (see ``seed.py``) and,
        with ``contacts``, 0 to 2 contacts for each (drawn apart: the records are the same either way)."""
        gc_was_enabled = gc.isenabled()
        gc.disable()  # building the tables of hundreds of thousands of records: see seed.generate
        try:
            self._seed(fake.generate(customers, locations, seed, contacts=contacts))
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
                table = Table(e, first + len(records))
                table.records = {r["id"]: r for r in records}
                table.ts = {r["id"]: ts for r, ts in zip(records, stamps, strict=True)}
                table.order = sorted((ts, rid) for rid, ts in table.ts.items())
                table.ext = ext
                self._tables[e] = table
                if table.order:
                    self._last_us = max(self._last_us, table.order[-1][0])

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
            out = clone(record)
            if guid:
                out["externalData"] = ext_list(table, rid, guid)
            return out

    def customers(self) -> list[dict[str, Any]]:
        """Every customer (active or not), in id order, as deep copies."""
        with self._lock:
            return [clone(r) for r in self._tables["customer"].records.values()]

    def locations(self) -> list[dict[str, Any]]:
        with self._lock:
            return [clone(r) for r in self._tables["location"].records.values()]

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
            return clone(table.records[rid])

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
            return {**record, "externalData": ext_list(table, rid, ext[0])}

    def reference_errors(self, entity: Entity, body: Mapping[str, Any], prefix: str = "") -> dict[str, list[str]]:
        """Unknown tag types and custom field types a (schema-valid) body names, keyed ``prefix + field path``."""
        errors: dict[str, list[str]] = {}
        tags = body.get("tagTypeIds")
        if tags is not None:
            unknown = sorted({t for t in tags if t not in self.tag_type_ids})
            if unknown:
                errors[f"{prefix}tagTypeIds"] = [f"Tag type {t} does not exist." for t in unknown]
        types = self.custom_field_types[entity]
        for i, cf in enumerate(body.get("customFields") or []):
            if cf["typeId"] not in types:
                errors[f"{prefix}customFields[{i}].typeId"] = [f"Custom field type {cf['typeId']} does not exist."]
        return errors

    def _prepare(
        self, entity: Entity, old: Mapping[str, Any], body: dict[str, Any], *, remote: bool
    ) -> tuple[dict[str, Any], tuple[str, dict[str, dict[str, str]]] | None]:
        """The new record and, when the body carries externalData, (guid, the record's new external data).
        Checks references. With ``remote``, also the loose validation of remote edits and creations."""
        if remote:
            self._check_remote_body(entity, body)
        errors = self.reference_errors(entity, body)
        if errors:
            raise ApiError(400, VALIDATION_TITLE, errors)
        types = self.custom_field_types[entity]
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
        guid = guid_key(ext_body["applicationGuid"])
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
        table: Table,
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
