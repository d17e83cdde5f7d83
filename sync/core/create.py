"""Create bodies: a mirror row inserted without ``st_id`` -> ``CreateCustomerRequest`` (with its new locations as
``locations[]``) or ``CreateLocationRequest``. Pure (issue 17; docs/contract.md, "Creating records").

Every value comes from the mirror row, never invented, in the same API form as a PATCH carries it
(``sync.core.request.request_body``): the address whole, lists whole, a null ``unit`` as "". Only the fields the
create schema accepts are sent (read-only ones and ``active`` are not; ServiceTitan creates records active).
``externalData`` is the create form (``ExternalDataCreateRequest``: our application guid, the mirror id under
``mirror_id_key`` and the row's own keys): it is what a re-send looks the record up by first, so that a create
whose answer was lost is never made twice. Bodies are validated against the spec; a problem is reported on the
mirror column to fix (a location's as ``location <mirror id>: <column>``), and such a body is never sent.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cache
from typing import Any, Literal

from sync.core import openapi
from sync.core.diff import Diff, strip_key
from sync.core.fields import BY_COLUMN, CUSTOMER_LINK, Entity, equal, record_from_api, writable_fields
from sync.core.merge import MergeResult, merge, units
from sync.core.request import Patch, request_body, with_schema_problems

CREATE_SCHEMAS = {
    "customer": "Crm.V2.Customers.CreateCustomerRequest",
    "location": "Crm.V2.Locations.CreateLocationRequest",
}
NEW_LOCATION_SCHEMA = "Crm.V2.Customers.NewLocation"
"""A location inside a customer's create (no ``customerId``: it is the customer being created)."""


@cache
def _accepted(schema: str) -> frozenset[str]:
    """The properties a create schema accepts."""
    return frozenset(openapi.spec()["components"]["schemas"][schema].get("properties", {}))


def _fields(entity: Entity, record: Mapping[str, Any], mirror_id: int, schema: str, problems: dict[str, list[str]],
            *, application_guid: str, mirror_id_key: str) -> dict[str, Any]:
    accepted = _accepted(schema)
    columns = [f.column for f in writable_fields(entity)
               if (f.address or record.get(f.column) is not None or f.kind == "external_data")
               and ((f.address and "address" in accepted) or f.api in accepted)]
    body = request_body(entity, record, {}, columns, problems, mirror_id=mirror_id,
                        application_guid=application_guid, mirror_id_key=mirror_id_key, creating=True)
    merge = body.pop("externalData")
    body["externalData"] = {"applicationGuid": application_guid,
                            "externalData": [e for e in merge["externalData"] if e["value"] is not None]}
    return {k: v for k, v in body.items() if k in accepted}


def build_customer_create(customer: Mapping[str, Any], mirror_id: int,
                          locations: Sequence[tuple[int, Mapping[str, Any]]], *, application_guid: str,
                          mirror_id_key: str = "mirrorId") -> Patch:
    """``POST /customers`` for a new customer row and the new location rows that reference it (``(mirror id,
    record)`` each): ServiceTitan creates no customer without a location."""
    problems: dict[str, list[str]] = {}
    body = _fields("customer", customer, mirror_id, CREATE_SCHEMAS["customer"], problems,
                   application_guid=application_guid, mirror_id_key=mirror_id_key)
    body["locations"] = []
    for loc_mid, loc in locations:
        loc_problems: dict[str, list[str]] = {}
        loc_body = _fields("location", loc, loc_mid, NEW_LOCATION_SCHEMA, loc_problems,
                           application_guid=application_guid, mirror_id_key=mirror_id_key)
        with_schema_problems("location", NEW_LOCATION_SCHEMA, loc_body, loc_problems)
        problems.update({f"location {loc_mid}: {col}": msgs for col, msgs in loc_problems.items()})
        body["locations"].append(loc_body)
    if not locations:
        problems["locations"] = ["ServiceTitan creates a customer only with a location: insert a location row "
                                 "for this customer"]
    schema_problems = with_schema_problems("customer", CREATE_SCHEMAS["customer"], body, {})
    problems.update({col: msgs for col, msgs in schema_problems.items()
                     if col != "locations" or not locations})  # a location's own problems are named above
    return Patch(body, problems)


def build_location_create(location: Mapping[str, Any], mirror_id: int, *, application_guid: str,
                          mirror_id_key: str = "mirrorId") -> Patch:
    """``POST /locations`` for a new location row of a customer that is in ServiceTitan (its ``customer_st_id``)."""
    problems: dict[str, list[str]] = {}
    body = _fields("location", location, mirror_id, CREATE_SCHEMAS["location"], problems,
                   application_guid=application_guid, mirror_id_key=mirror_id_key)
    if location.get(CUSTOMER_LINK) is None:
        problems.setdefault("customer_id", []).append(
            "the location's customer is not in ServiceTitan yet: it is created with that customer")
    return Patch(body, with_schema_problems("location", CREATE_SCHEMAS["location"], body, problems))


CreateKind = Literal["send", "wait", "rides"]
"""What a row without ``st_id`` becomes now: ``send`` its create (the body may fail the schema: then it is dead,
unsent), ``wait`` (a customer with no new location yet) or ``rides`` (a location of a customer being created:
it goes in that customer's POST)."""

NO_CUSTOMER = {"customer_id": ["a location is created for a customer: set customer_id to the mirror id of its "
                               "customers row"]}


def plan_create(entity: Entity, mirror_id: int, record: Mapping[str, Any], customer_id: int | None,
                locations: Sequence[tuple[int, Mapping[str, Any]]], *, application_guid: str,
                mirror_id_key: str = "mirrorId") -> tuple[CreateKind, Patch | None]:
    """The one decision detect, the dispatcher's claim and the dry run take for a row without ``st_id``
    (``customer_id``: a location's mirror customer id; ``locations``: a customer's new location rows)."""
    if entity == "customer":
        if not locations:
            return "wait", None
        return "send", build_customer_create(record, mirror_id, locations, application_guid=application_guid,
                                             mirror_id_key=mirror_id_key)
    if customer_id is None:
        return "send", Patch({}, {k: list(v) for k, v in NO_CUSTOMER.items()})
    if record.get(CUSTOMER_LINK) is None:
        return "rides", None
    return "send", build_location_create(record, mirror_id, application_guid=application_guid,
                                         mirror_id_key=mirror_id_key)


ANSWER_SCHEMAS = {
    "customer": "Crm.V2.Customers.CreatedCustomerResponse",
    "location": "Crm.V2.Locations.CreateLocationResponse",
}


def sent_record(entity: Entity, body: Mapping[str, Any], mirror_id_key: str = "mirrorId") -> dict[str, Any]:
    """The canonical values a create body carries ({column: value}, only the columns it carries; the address
    whole; ``external_data`` without our mirror-id key). Its keys are the columns a create sends; its values are
    the API's forms (a null ``unit`` is ""), so ``sent_values`` takes the mirror row's own."""
    api_body = dict(body)
    ext = body.get("externalData")
    api_body["externalData"] = ext.get("externalData") if isinstance(ext, Mapping) else []
    record = record_from_api(entity, api_body)
    out: dict[str, Any] = {}
    for f in BY_COLUMN[entity].values():
        if (f.address and "address" in body) or (not f.address and f.api in body):
            out[f.column] = record[f.column]
    if "external_data" in out:
        out["external_data"] = strip_key(out["external_data"], mirror_id_key)
    return out


def create_columns(entity: Entity) -> list[str]:
    """Every column a create can carry (``CreateCustomerRequest`` / ``CreateLocationRequest``), address included."""
    accepted = _accepted(CREATE_SCHEMAS[entity])
    return [f.column for f in writable_fields(entity)
            if (f.address and "address" in accepted) or f.api in accepted or f.kind == "external_data"]


def sent_values(entity: Entity, body: Mapping[str, Any] | Sequence[str], record: Mapping[str, Any],
                earlier: Sequence[Mapping[str, Any]] = (), mirror_id_key: str = "mirrorId") -> dict[str, Any]:
    """What a create carried ({column: the mirror row's value}, for the columns ``body`` carries, or the columns
    given): the values the record was created from, which its answer is compared with (``merge_created``).

    ``earlier``: the values of earlier attempts whose answers were lost, when the record was found made by one
    of them. A column whose mirror value is none of theirs was edited since, and is kept and PATCHed.
    """
    out: dict[str, Any] = {}
    columns = sent_record(entity, body, mirror_id_key) if isinstance(body, Mapping) else body
    for column in columns:
        value = record.get(column)
        if column == "external_data":
            value = strip_key(value, mirror_id_key)
        versions = [v for v in earlier if column in v]
        if versions and not any(_same(entity, column, value, v[column]) for v in versions):
            value = versions[-1][column]
        out[column] = value
    return out


def _same(entity: Entity, column: str, a: Any, b: Any) -> bool:
    try:
        return equal(BY_COLUMN[entity][column].kind, a, b)
    except (TypeError, ValueError, AttributeError):
        return False


def sent_diff(sent: Mapping[str, Any]) -> Diff:
    """A create's ``outbox.diff``: every column it carries, as ``[None, value]`` (nothing was there before)."""
    return {c: [None, v] for c, v in sent.items()}


def create_diff(entity: Entity, body: Mapping[str, Any], record: Mapping[str, Any],
                locations: Mapping[int, Mapping[str, Any]] | None = None,
                mirror_id_key: str = "mirrorId") -> dict[str, Any]:
    """A create's ``outbox.diff``: ``sent_diff`` of the record, and for a customer's create ``locations``:
    {mirror id (text): what it carried of that location} (``sync.core.diff.sent_values`` passes it through), so
    that a create whose answer was lost knows what each new location was created from, and which rows it
    carried (a location's own create looks the record up first when a create that carried it may have been
    applied)."""
    out: dict[str, Any] = dict(sent_diff(sent_values(entity, body, record, mirror_id_key=mirror_id_key)))
    if entity == "customer":
        bodies = dict(zip(new_location_ids(body, mirror_id_key), body.get("locations") or [], strict=False))
        out["locations"] = {str(m): sent_values("location", b, (locations or {}).get(m, {}),
                                                mirror_id_key=mirror_id_key) for m, b in bodies.items()}
    return out


def mirror_id_of(api_record: Mapping[str, Any], mirror_id_key: str = "mirrorId") -> int | None:
    """The mirror id our ``externalData`` entry names on a ServiceTitan record (an answer or a list row asked
    with our application guid), or None."""
    entries = api_record.get("externalData")
    for entry in entries if isinstance(entries, list) else []:
        if isinstance(entry, Mapping) and entry.get("key") == mirror_id_key:
            value = entry.get("value")
            if isinstance(value, str) and value.isdigit():
                return int(value)
    return None


def new_location_ids(body: Mapping[str, Any], mirror_id_key: str = "mirrorId") -> list[int]:
    """The mirror ids of the new locations a ``POST /customers`` body carries (each names its own)."""
    out = []
    for loc in body.get("locations") or []:
        mid = mirror_id_of({"externalData": (loc.get("externalData") or {}).get("externalData")}, mirror_id_key)
        if mid is not None:
            out.append(mid)
    return out


def merge_created(entity: Entity, local: Mapping[str, Any], remote: Mapping[str, Any], sent: Mapping[str, Any],
                  *, sync_active: bool) -> MergeResult:
    """A created record (the create's answer, or the record found by our external data) into its mirror row.

    The one reconciler (``sync.core.merge``) with the create as the answer: ``sent`` (``sent_record``) are our
    values; the base is ServiceTitan's record with them, so that every unit the create carried is ours in
    ServiceTitan's stored form (the mirror takes it unless edited since the create was built, which is then
    PATCHed), and every other unit (``active``, read-only ones) is left as the mirror has it, with the shadow
    taking ServiceTitan's value: a local value ServiceTitan did not take on create (``active = false``) goes
    as a PATCH next. No conflict can arise: nothing else was known of the record.
    """
    # read-only units take ServiceTitan's value in mirror and shadow; the base holds the mirror's, so that the
    # answer is never mistaken for an echo of a base that equals it
    read_only = {c: local.get(c) for u in units(entity, sync_active) if u.mode == "remote" for c in u.columns}
    base = {**remote, **read_only, **sent}
    return merge(entity, base, local, remote, "remote_wins", remote_modified_on=None, local_changed_at=None,
                 sync_active=sync_active, answer_to=sent)
