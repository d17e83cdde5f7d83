"""Contacts of customers and locations: :class:`ContactStore`, the part of :class:`~sync.sandbox.state.Sandbox`
behind ``GET|POST /customers/{id}/contacts``, ``PATCH|DELETE /customers/{id}/contacts/{contactId}`` (the same
for ``/locations``), the contact export feeds (their tables, paged by ``feeds.py``) and the Python API's
``contacts`` / ``get_contact`` / ``add_contact`` / ``edit_contact`` / ``remove_contact``.

One store: the contacts seeded with the records, the ones ``POST /customers`` / ``POST /locations`` create with
their record (``creates.py``) and the ones created through the contact endpoints are the same rows, served by the
same endpoints and feeds. One :class:`~sync.sandbox.store.Table` per owner entity holds them in export shape
(``ExportCustomerContactResponse`` with ``customerId`` / ``ExportLocationContactResponse`` with ``locationId``,
and ``active``), never mutated once published; the per-record endpoints answer them without the owner id and
``active`` (``CustomerContactWithModifiedOnResponse`` / ``LocationContactResponse``), a create answer's
``contacts`` as ``{id, type, value, memo}``. Ids come from one sequence (from 30,000,001) for both kinds.

What ServiceTitan stores (:func:`normalise_value`): the value trimmed and, for ``Phone``, ``MobilePhone`` and
``Fax``, reduced to its digits when it has 10 digits once spaces, dashes, dots and parentheses are removed
(``"(555) 123-4567"`` -> ``"5551234567"``); ``phoneSettings.phoneNumber`` is the stored value (for every type:
the spec requires ``phoneSettings``), ``doNotText`` false unless a remote edit sets it; memos trimmed;
``preferences`` null until a PATCH sets them. Every change (create, PATCH, DELETE, remote edit) advances the
contact's ``modifiedOn`` (a PATCH that changes nothing too, unless ``bump_modified_on_noop`` is off), never its
record's. A DELETE keeps the contact as inactive: the feeds report it with ``active: false``, the record's list
no longer shows it, and any further PATCH or DELETE of it is a 404.

Errors, in order: the schema (400, ``validation.py``; an unknown ``type`` included), a blank value (400); an
unknown record (404 ``RecordNotFound``); an unknown contact, one of another record or a deleted one (404
``ContactNotFound``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from sync.sandbox import feeds
from sync.sandbox import seed as fake
from sync.sandbox.errors import VALIDATION_TITLE, ApiError, ContactNotFound, RecordNotFound
from sync.sandbox.model import ENTITIES, Entity
from sync.sandbox.seed import FIRST_CONTACT_ID, iso_from_us
from sync.sandbox.store import RecordStore, Table
from sync.sandbox.validation import validate_contact_create, validate_contact_update

CONTACT_TYPES: tuple[str, ...] = ("Phone", "Email", "Fax", "MobilePhone")
"""The spec's ``Crm.V2.ContactType``."""
PHONE_TYPES = frozenset({"Phone", "MobilePhone", "Fax"})
OWNER_KEYS: dict[Entity, str] = {"customer": "customerId", "location": "locationId"}
CONTACT_FEEDS: dict[Entity, str] = {"customer": "customer-contact", "location": "location-contact"}
"""The contact export feeds' names in their continuation tokens."""
RECORD_KEYS: tuple[str, ...] = (
    "id", "type", "value", "memo", "phoneSettings", "modifiedOn", "createdOn", "preferences",
)
"""A contact as the per-record endpoints answer it."""
SHORT_KEYS: tuple[str, ...] = ("id", "type", "value", "memo")
"""A contact as a create answer lists it (``CustomerContact`` / ``LocationContact``)."""
PREFERENCE_KEYS: tuple[str, ...] = ("jobRemindersEnabled", "marketingUpdatesEnabled", "invoiceStatementNotification")
REMOTE_FIELDS = frozenset({"type", "value", "memo", "preferences", "doNotText", "active"})
"""What a remote (ServiceTitan-side) contact edit may set: the API's fields plus ``doNotText`` and ``active``."""
_PHONE_PUNCTUATION = re.compile(r"[ \-.()]")


def normalise_value(contact_type: str, value: str) -> str:
    """The value as ServiceTitan stores it: trimmed; a phone, mobile or fax number with 10 digits once spaces,
    dashes, dots and parentheses are removed becomes those digits (anything else stays as given, trimmed)."""
    text = value.strip()
    if contact_type in PHONE_TYPES:
        digits = _PHONE_PUNCTUATION.sub("", text)
        if len(digits) == 10 and digits.isascii() and digits.isdigit():
            return digits
    return text


def _memo(memo: Any) -> str | None:
    return memo.strip() if isinstance(memo, str) else None


def record_view(contact: Mapping[str, Any]) -> dict[str, Any]:
    """A stored contact as the per-record endpoints answer it (no owner id, no ``active``)."""
    return {key: contact[key] for key in RECORD_KEYS}


def short_view(contact: Mapping[str, Any]) -> dict[str, Any]:
    return {key: contact[key] for key in SHORT_KEYS}


def copy_contact(contact: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of a stored contact (what the Python API hands out)."""
    out = dict(contact)
    out["phoneSettings"] = dict(contact["phoneSettings"])
    out["preferences"] = None if contact["preferences"] is None else dict(contact["preferences"])
    return out


def _value_errors(body: Any, prefix: str, errors: dict[str, list[str]]) -> None:
    """ServiceTitan's check beyond the schema: a contact's value may not be blank."""
    if isinstance(body, Mapping):
        value = body.get("value")
        if isinstance(value, str) and not value.strip():
            errors.setdefault(f"{prefix}value", ["The Value field is required."])


def contact_model_errors(body: Any, prefix: str = "") -> dict[str, list[str]]:
    errors: dict[str, list[str]] = {}
    _value_errors(body, prefix, errors)
    return errors


class ContactStore(RecordStore):
    """:class:`~sync.sandbox.store.RecordStore` plus the contacts of its records (see the module docstring)."""

    def __init__(self, *, clock: Callable[[], float], bump_modified_on_noop: bool) -> None:
        super().__init__(clock=clock, bump_modified_on_noop=bump_modified_on_noop)
        self._contact_tables: dict[Entity, Table] = {e: Table(e, FIRST_CONTACT_ID) for e in ENTITIES}
        self._contacts_of: dict[tuple[Entity, int], list[int]] = {}
        """(owner entity, record id) -> its contacts' ids (active or not), in id order."""
        self._next_contact_id = FIRST_CONTACT_ID

    def _seed(self, data: fake.SeedData) -> None:
        with self._lock:
            super()._seed(data)
            tables = {e: Table(e, FIRST_CONTACT_ID) for e in ENTITIES}
            of: dict[tuple[Entity, int], list[int]] = {}
            next_id = FIRST_CONTACT_ID
            for contact in data.contacts:  # in id order
                entity: Entity = "customer" if contact.entity == "customer" else "location"
                table = tables[entity]
                cid = contact.record["id"]
                table.records[cid] = contact.record
                table.ts[cid] = contact.modified_us
                of.setdefault((entity, contact.owner_id), []).append(cid)
                next_id = max(next_id, cid + 1)
            for table in tables.values():
                table.order = sorted((ts, cid) for cid, ts in table.ts.items())
                table.next_id = next_id
                if table.order:
                    self._last_us = max(self._last_us, table.order[-1][0])
            self._contact_tables = tables
            self._contacts_of = of
            self._next_contact_id = next_id

    # ------------------------------------------------------------------------------------------ Python API

    def contacts(
        self, entity: Entity, record_id: int, *, include_inactive: bool = False, full: bool = False
    ) -> list[dict[str, Any]]:
        """A record's contacts in id order, as copies: active ones (what ``GET .../contacts`` lists) unless
        ``include_inactive``; ``{id, type, value, memo}`` (a create answer's shape) unless ``full``, then the
        export shape (owner id, ``active``, ``modifiedOn``, ``phoneSettings``...). RecordNotFound if unknown."""
        with self._lock:
            rows = self._owned(entity, record_id, include_inactive)
            return [copy_contact(c) if full else short_view(c) for c in rows]

    def get_contact(self, entity: Entity, contact_id: int) -> dict[str, Any]:
        """One contact of a ``entity`` record in export shape (deleted ones too, ``active: false``), a copy.
        Raises ContactNotFound."""
        with self._lock:
            contact = self._contact_tables[entity].records.get(contact_id)
            if contact is None:
                raise ContactNotFound(entity, contact_id)
            return copy_contact(contact)

    def count_contacts(self, entity: Entity | None = None, *, include_inactive: bool = True) -> int:
        """How many contacts (of ``entity``'s records, or of both) the sandbox holds."""
        with self._lock:
            tables = [self._contact_tables[entity]] if entity else list(self._contact_tables.values())
            return sum(len(t.records) if include_inactive else sum(1 for c in t.records.values() if c["active"])
                       for t in tables)

    def add_contact(
        self, entity: Entity, record_id: int, type: str, value: str, memo: str | None = None, **fields: Any
    ) -> dict[str, Any]:
        """A contact added inside ServiceTitan (office staff): stored as ServiceTitan stores it (phones
        normalised), ``modifiedOn`` now. ``fields``: ``preferences`` ({jobRemindersEnabled,
        marketingUpdatesEnabled, invoiceStatementNotification}), ``doNotText``. Returns the export shape.
        Raises RecordNotFound, or ApiError (400) for an unknown type, a blank value or an unknown field."""
        body = {"type": type, "value": value, "memo": memo, **fields}
        self._check_remote_contact(body, creating=True)
        with self._lock:
            self._owner(entity, record_id)
            created = self._new_contact(entity, record_id, type, value, memo,
                                        preferences=fields.get("preferences"),
                                        do_not_text=bool(fields.get("doNotText", False)))
            return copy_contact(created)

    def edit_contact(self, entity: Entity, contact_id: int, **fields: Any) -> dict[str, Any]:
        """A change made inside ServiceTitan: ``type``, ``value``, ``memo``, ``preferences`` (or None),
        ``doNotText``, ``active`` (a deleted contact may be edited and re-activated here). ``modifiedOn``
        advances. Returns the export shape; raises ContactNotFound, or ApiError (400)."""
        self._check_remote_contact(fields, creating=False)
        with self._lock:
            table = self._contact_tables[entity]
            old = table.records.get(contact_id)
            if old is None:
                raise ContactNotFound(entity, contact_id)
            new = _apply(old, fields)
            self._publish_contact(table, new)
            return copy_contact(new)

    def remove_contact(self, entity: Entity, contact_id: int) -> dict[str, Any]:
        """A contact deleted inside ServiceTitan: kept as inactive, ``modifiedOn`` advances (the feed reports
        it with ``active: false``). Returns the export shape; ContactNotFound if unknown or already deleted."""
        with self._lock:
            table = self._contact_tables[entity]
            old = table.records.get(contact_id)
            if old is None or not old["active"]:
                raise ContactNotFound(entity, contact_id)
            new = {**old, "active": False}
            self._publish_contact(table, new)
            return copy_contact(new)

    # ------------------------------------------------------------------------------------------ API operations
    # They return shared, read-only structures (serialise, never mutate) and raise ApiError.

    def api_contacts(self, entity: Entity, record_id: int, params: Mapping[str, str]) -> dict[str, Any]:
        """``GET /customers/{id}/contacts``: the record's active contacts in id order, paged (page, pageSize,
        includeTotal). 400 for a bad parameter, 404 for an unknown record."""
        page, page_size, include_total = feeds.page_query(params)
        with self._lock:
            rows = [record_view(c) for c in self._owned(entity, record_id, False)]
        return feeds.paginate(rows, page, page_size, include_total)

    def api_create_contact(self, entity: Entity, record_id: int, body: Any) -> dict[str, Any]:
        """``POST /customers/{id}/contacts``: schema and value (400), record (404), then store."""
        errors = validate_contact_create(entity, body)
        _value_errors(body, "", errors)
        if errors:
            raise ApiError(400, VALIDATION_TITLE, errors)
        with self._lock:
            self._owner(entity, record_id)
            created = self._new_contact(entity, record_id, body["type"], body["value"], body.get("memo"))
            return record_view(created)

    def api_patch_contact(self, entity: Entity, record_id: int, contact_id: int, body: Any) -> dict[str, Any]:
        """``PATCH /customers/{id}/contacts/{contactId}``: only the fields given change. Schema and value (400),
        record (404), contact (404)."""
        errors = validate_contact_update(entity, body)
        _value_errors(body, "", errors)
        if errors:
            raise ApiError(400, VALIDATION_TITLE, errors)
        with self._lock:
            table = self._contact_tables[entity]
            old = self._api_contact(entity, record_id, contact_id)
            new = _apply(old, body)
            changed = {**new, "modifiedOn": None} != {**old, "modifiedOn": None}
            if changed or self.bump_modified_on_noop:
                self._publish_contact(table, new)
            return record_view(table.records[contact_id])

    def api_delete_contact(self, entity: Entity, record_id: int, contact_id: int) -> None:
        """``DELETE /customers/{id}/contacts/{contactId}``: record (404), contact (404), then kept as inactive."""
        with self._lock:
            old = self._api_contact(entity, record_id, contact_id)
            self._publish_contact(self._contact_tables[entity], {**old, "active": False})

    def contact_table(self, entity: Entity) -> Table:
        """The contacts of ``entity``'s records, for the export feed (the caller holds the lock)."""
        return self._contact_tables[entity]

    # ------------------------------------------------------------------------------------------ internals

    def _owner(self, entity: Entity, record_id: int) -> None:
        if record_id not in self._tables[entity].records:
            raise RecordNotFound(entity, record_id)

    def _owned(self, entity: Entity, record_id: int, include_inactive: bool) -> list[dict[str, Any]]:
        self._owner(entity, record_id)
        records = self._contact_tables[entity].records
        rows = [records[cid] for cid in self._contacts_of.get((entity, record_id), ())]
        return rows if include_inactive else [c for c in rows if c["active"]]

    def _api_contact(self, entity: Entity, record_id: int, contact_id: int) -> dict[str, Any]:
        self._owner(entity, record_id)
        contact = self._contact_tables[entity].records.get(contact_id)
        if contact is None or contact[OWNER_KEYS[entity]] != record_id or not contact["active"]:
            raise ContactNotFound(entity, contact_id)
        return contact

    def _new_contact(
        self, entity: Entity, record_id: int, contact_type: str, value: str, memo: str | None, *,
        preferences: Mapping[str, Any] | None = None, do_not_text: bool = False,
    ) -> dict[str, Any]:
        """Store a new contact of a (known) record; the caller holds the lock and has validated the fields."""
        cid = self._next_contact_id
        self._next_contact_id += 1
        ts = self._tick()
        contact = fake.contact_record(
            cid, contact_type, normalise_value(contact_type, value), _memo(memo), ts, ts, OWNER_KEYS[entity],
            record_id, do_not_text=do_not_text, preferences=_preferences(preferences),
        )
        table = self._contact_tables[entity]
        table.insert(contact, ts)
        table.next_id = self._next_contact_id
        self._contacts_of.setdefault((entity, record_id), []).append(cid)
        return contact

    def _publish_contact(self, table: Table, new: dict[str, Any]) -> None:
        ts = self._tick()
        new["modifiedOn"] = iso_from_us(ts)
        table.touch(new["id"], ts)
        table.records[new["id"]] = new

    @staticmethod
    def _check_remote_contact(body: Mapping[str, Any], *, creating: bool) -> None:
        errors: dict[str, list[str]] = {}
        for key in sorted(set(body) - REMOTE_FIELDS):
            errors[key] = [f"The field {key} is not a known field."]
        if "type" in body and body["type"] not in CONTACT_TYPES:
            errors["type"] = [f"{body['type']!r} is not one of {list(CONTACT_TYPES)!r}"]
        if "value" in body and not isinstance(body["value"], str):
            errors["value"] = ["The Value field must be a string."]
        if body.get("memo") is not None and not isinstance(body["memo"], str):
            errors["memo"] = ["The Memo field must be a string."]
        for key in ("doNotText", "active"):
            if key in body and not isinstance(body[key], bool):
                errors[key] = [f"The {key} field must be a boolean."]
        preferences = body.get("preferences")
        if preferences is not None and (not isinstance(preferences, Mapping) or set(preferences) != set(
                PREFERENCE_KEYS) or not all(isinstance(v, bool) for v in preferences.values())):
            errors["preferences"] = [f"preferences must be null or an object of booleans {', '.join(PREFERENCE_KEYS)}."]
        _value_errors(body, "", errors)
        if errors:
            raise ApiError(400, VALIDATION_TITLE, errors)


def _preferences(preferences: Mapping[str, Any] | None) -> dict[str, bool] | None:
    return None if preferences is None else {key: bool(preferences[key]) for key in PREFERENCE_KEYS}


def _apply(old: Mapping[str, Any], fields: Mapping[str, Any]) -> dict[str, Any]:
    """The contact after a (validated) PATCH body or remote edit: only the fields given change; the value is
    normalised for the (new) type, ``phoneSettings.phoneNumber`` follows it."""
    new = dict(old)
    contact_type = fields.get("type", old["type"])
    new["type"] = contact_type
    new["value"] = normalise_value(contact_type, fields["value"] if "value" in fields else old["value"])
    if "memo" in fields:
        new["memo"] = _memo(fields["memo"])
    if "preferences" in fields:
        new["preferences"] = _preferences(fields["preferences"])
    do_not_text = fields["doNotText"] if "doNotText" in fields else old["phoneSettings"]["doNotText"]
    new["phoneSettings"] = {"phoneNumber": new["value"], "doNotText": bool(do_not_text)}
    if "active" in fields:
        new["active"] = bool(fields["active"])
    return new
