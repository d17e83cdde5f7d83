"""Creating records: :class:`RecordCreator`, the part of :class:`~sync.sandbox.state.Sandbox` behind
``POST /customers`` / ``POST /locations`` (``api_create``) and the Python/admin API's ``add_customer`` /
``add_location`` (remote creations: what office staff enter in ServiceTitan, fake values unless given).

``POST /customers`` (``CreateCustomerRequest``) creates the customer, every location of its ``locations``
(``NewLocation``, at least one) and the contacts of both, all or nothing; it answers ``CreatedCustomerResponse``:
the customer with ``locations`` (``CreateLocationResponse``, their contacts included) and ``contacts``.
``POST /locations`` (``CreateLocationRequest``) answers ``CreateLocationResponse``. Checks, in order and before
anything is stored: the schema (``validation.py``), ServiceTitan's model checks (blank name, blank street/city/
zip, a malformed application guid, no location) and unknown tag types / custom field types, all 400 naming every
field (``locations[1].address.zip``); then, for a location, an unknown customer (409).

``externalData`` (``ExternalDataCreateRequest``: ``{applicationGuid, externalData: [{key, value}]}``) is stored
under its guid, like a PATCH in Replace mode. An answer lists only the data of the guid given in the request
(a location without its own ``externalData`` answers for the customer's guid); GET by id, lists and exports
show none, as for any record. The contacts of a create body are stored in the contact store
(``contacts.py``: ids from :data:`FIRST_CONTACT_ID`, phone numbers normalised, served by the contact endpoints
and feeds like any other contact); the answer lists them as ``{id, type, value, memo}`` with the stored values.
A blank contact value is a 400 too (``contacts[0].value``, ``locations[1].contacts[0].value``).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from typing import Any

from sync.sandbox import seed as fake
from sync.sandbox.contacts import ContactStore, contact_model_errors, short_view
from sync.sandbox.errors import VALIDATION_TITLE, ApiError
from sync.sandbox.model import Entity
from sync.sandbox.seed import FIRST_CONTACT_ID
from sync.sandbox.store import Table, _model_errors, clone, ext_list
from sync.sandbox.validation import validate_create

__all__ = ["FIRST_CONTACT_ID", "RecordCreator"]
_NOT_STORED = frozenset({"locations", "contacts", "customerId", "coordinatesSource", "coordinatesVerificationStatus"})


def _customer_not_found(customer_id: Any) -> ApiError:
    return ApiError(409, "Customer not found.", {"customerId": [f"Customer {customer_id} not found."]})


def _create_model_errors(entity: Entity, body: Mapping[str, Any], errors: dict[str, list[str]]) -> None:
    """ServiceTitan's checks beyond the schema, for the record and (customer) each of its new locations; a field
    the schema already refused (a missing zip) is not named twice."""
    found: dict[str, list[str]] = {}
    _model_errors(body, found)
    _contacts_errors(body, "", found)
    locations = body.get("locations") if entity == "customer" else None
    if isinstance(locations, list) and not locations:
        found["locations"] = ["At least one location is required."]
    for i, location in enumerate(locations if isinstance(locations, list) else []):
        if isinstance(location, Mapping):
            of_location: dict[str, list[str]] = {}
            _model_errors(location, of_location)
            _contacts_errors(location, "", of_location)
            found.update({f"locations[{i}].{key}": messages for key, messages in of_location.items()})
    for key, messages in found.items():
        errors.setdefault(key, messages)


def _contacts_errors(body: Mapping[str, Any], prefix: str, errors: dict[str, list[str]]) -> None:
    contacts = body.get("contacts")
    for j, contact in enumerate(contacts if isinstance(contacts, list) else []):
        for key, messages in contact_model_errors(contact, f"{prefix}contacts[{j}].").items():
            errors.setdefault(key, messages)


class RecordCreator(ContactStore):
    """:class:`~sync.sandbox.contacts.ContactStore` plus record creation (with the contacts of a create body)."""

    def __init__(self, *, clock: Callable[[], float], bump_modified_on_noop: bool) -> None:
        super().__init__(clock=clock, bump_modified_on_noop=bump_modified_on_noop)

    # ------------------------------------------------------------------------------------------ remote creations

    def add_customer(self, **fields: Any) -> dict[str, Any]:
        """Create a customer as ServiceTitan would (fake name and address unless given; no tags, no custom
        fields, active). ``fields`` use API names; ``externalData`` takes the PATCH form."""
        return self._create("customer", None, fields)

    def add_location(self, customer_id: int, **fields: Any) -> dict[str, Any]:
        """Create a location of ``customer_id`` (409 ApiError if unknown); name defaults to the customer's."""
        return self._create("location", customer_id, fields)

    def _create(self, entity: Entity, customer_id: int | None, fields: Mapping[str, Any]) -> dict[str, Any]:
        with self._lock:
            table = self._tables[entity]
            customers = self._tables["customer"].records
            if entity == "location" and (customer_id is None or customer_id not in customers):
                raise _customer_not_found(customer_id)
            rid, ts = table.next_id, self._tick()
            rng = random.Random(rid)
            base = self._base(entity, rng, rid, ts, fields.get("type") == "Commercial", customer_id)
            if customer_id is not None:
                base["name"] = customers[customer_id]["name"]
            base["address"] = fake.fake_address(rng, coordinates_probability=1.0)
            body = dict(fields)
            if isinstance(body.get("address"), Mapping):
                body["address"] = {**base["address"], **body["address"]}
            new, ext = self._prepare(entity, base, body, remote=True)
            self._insert(table, new, ts, ext)
            return clone(new)

    def _base(
        self, entity: Entity, rng: random.Random, rid: int, ts: int, commercial: bool, customer_id: int | None
    ) -> dict[str, Any]:
        """A new record as ServiceTitan starts it: active, no tags, custom fields or external data; a fake
        creating user (and, for a location, a fake dispatch zone)."""
        if entity == "customer":
            base = fake.customer_record(rng, rid, ts, ts, commercial=commercial)
            base.update(active=True, customFields=[], tagTypeIds=[], balance=0.0, taxExempt=False,
                        doNotMail=False, doNotService=False, nationalAccount=False)
            return base
        assert customer_id is not None  # checked by the callers
        owner = self._tables["customer"].records[customer_id]
        base = fake.location_record(rng, rid, owner, ts, ts)
        base.update(active=True, customFields=[], tagTypeIds=[], taxExempt=False, taxZoneId=None)
        return base

    def _insert(
        self, table: Table, new: dict[str, Any], ts: int, ext: tuple[str, dict[str, dict[str, str]]] | None
    ) -> None:
        rid = new["id"]
        table.next_id = max(table.next_id, rid + 1)
        table.insert(new, ts)
        if ext is not None and ext[1]:
            table.ext[rid] = ext[1]

    # ------------------------------------------------------------------------------------------ API creations

    def api_create(self, entity: Entity, body: Any) -> dict[str, Any]:
        """``POST /customers`` / ``POST /locations``: validate (400), check the customer (409), then create.
        Returns the answer (``CreatedCustomerResponse`` / ``CreateLocationResponse``); raises ApiError."""
        errors = validate_create(entity, body)
        if isinstance(body, Mapping):
            _create_model_errors(entity, body, errors)
        if errors:
            raise ApiError(400, VALIDATION_TITLE, errors)
        with self._lock:
            errors = self.reference_errors(entity, body)
            for i, location in enumerate((body.get("locations") or []) if entity == "customer" else []):
                errors.update(self.reference_errors("location", location, f"locations[{i}]."))
            if errors:
                raise ApiError(400, VALIDATION_TITLE, errors)
            if entity == "location":
                if body["customerId"] not in self._tables["customer"].records:
                    raise _customer_not_found(body["customerId"])
                return self._api_new_location(body["customerId"], body, None)
            customer = self._api_new_record("customer", None, body)
            guid = (body.get("externalData") or {}).get("applicationGuid")
            return {
                **customer,
                "locations": [self._api_new_location(customer["id"], loc, guid) for loc in body["locations"]],
            }

    def _api_new_location(self, customer_id: int, body: Mapping[str, Any], guid: str | None) -> dict[str, Any]:
        return self._api_new_record("location", customer_id, body, guid)

    def _api_new_record(
        self, entity: Entity, customer_id: int | None, body: Mapping[str, Any], fallback_guid: str | None = None
    ) -> dict[str, Any]:
        """Store one record of a validated create body; its answer with ``externalData`` and ``contacts``.
        A null in the body means ServiceTitan's default (no tags, not tax exempt, ...)."""
        table = self._tables[entity]
        rid, ts = table.next_id, self._tick()
        base = self._base(entity, random.Random(rid), rid, ts, body.get("type") == "Commercial", customer_id)
        fields = {k: v for k, v in body.items() if v is not None and k not in _NOT_STORED}
        new, ext = self._prepare(entity, base, fields, remote=False)
        self._insert(table, new, ts, ext)
        contacts = [self._new_contact(entity, rid, c["type"], c["value"], c.get("memo"))
                    for c in body.get("contacts") or []]
        guid = (body.get("externalData") or {}).get("applicationGuid") or fallback_guid
        return {
            **new,
            "externalData": ext_list(table, rid, guid) if guid else [],
            "contacts": [short_view(c) for c in contacts],
        }
