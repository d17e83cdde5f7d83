"""Create bodies: a mirror row inserted without ``st_id`` -> ``CreateCustomerRequest`` (with its new locations as
``locations[]``) or ``CreateLocationRequest``. Pure (issue 17; DESIGN.md, "Creating records").

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
from typing import Any

from sync.core import openapi
from sync.core.fields import CUSTOMER_LINK, Entity, writable_fields
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
                        application_guid=application_guid, mirror_id_key=mirror_id_key)
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
