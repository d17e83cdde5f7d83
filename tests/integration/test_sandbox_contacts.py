"""The sandbox's contacts of customers and locations, in-process through httpx.ASGITransport: the per-record
endpoints (``GET|POST /customers/{id}/contacts``, ``PATCH|DELETE /customers/{id}/contacts/{contactId}``, the same
for locations), validation and 404s, phone normalisation, the contact export feeds, contacts created with their
record, seeding, the Python helpers, the admin routes and faults.

Every answer is checked against ServiceTitan's OpenAPI file (``ContactApi.call``): the schema the spec documents
for the operation and status (ApiErrorResponse otherwise); a DELETE's 200 has no content, as documented.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import httpx
import pytest

from sync.core.openapi import spec, validate
from sync.sandbox import ApiError, ContactNotFound, Fault, RecordNotFound, Sandbox
from sync.sandbox.seed import FIRST_CONTACT_ID
from tests.integration.test_sandbox import ISO_UTC, ROOT, Api, FakeClock, customer_address

COLLECTIONS = ("customers", "locations")
ENTITY = {"customers": "customer", "locations": "location"}
OWNER_KEY = {"customers": "customerId", "locations": "locationId"}
EXPORT_SCHEMA = {"customers": "Crm.V2.ExportCustomerContactResponse",
                 "locations": "Crm.V2.ExportLocationContactResponse"}
RECORD_KEYS = {"id", "type", "value", "memo", "phoneSettings", "modifiedOn", "createdOn", "preferences"}
PREFS = {"jobRemindersEnabled": True, "marketingUpdatesEnabled": False, "invoiceStatementNotification": True}


def _templates() -> list[tuple[re.Pattern[str], int, dict[str, Any]]]:
    out = []
    for template, ops in spec()["paths"].items():
        pattern = re.compile("^/crm/v2" + re.sub(r"\{[^}]+\}", "[^/]+", template) + "/?$")
        out.append((pattern, template.count("{"), ops))
    return out


_TEMPLATES = _templates()


def operation_schema(method: str, path: str, status: int) -> str | None:
    """The schema the spec documents for this answer (the most literal template matching the path): a name,
    None for a documented answer without content, ApiErrorResponse for an undocumented status."""
    matching = sorted(((n, ops) for pattern, n, ops in _TEMPLATES if pattern.match(path) and method.lower() in ops),
                      key=lambda t: t[0])
    assert matching, (method, path)
    documented = matching[0][1][method.lower()]["responses"].get(str(status))
    if documented is None:
        return "ApiErrorResponse"
    if "content" not in documented:
        return None
    ref: str = documented["content"]["application/json"]["schema"]["$ref"]
    return ref.rsplit("/", 1)[-1]


class ContactApi(Api):
    """``Api`` with every answer checked against the schema of its (contact) operation."""

    def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        if not path.startswith(ROOT):
            return super().call(method, path, **kwargs)

        async def go() -> httpx.Response:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://sb.test") as c:
                return await c.request(method, path, **kwargs)

        resp = asyncio.run(go())
        if resp.headers.get("content-type", "").startswith("text/html"):
            return resp
        schema = operation_schema(method, path.split("?")[0], resp.status_code)
        if schema is None:
            assert resp.content == b"", resp.content
            return resp
        body = resp.json()
        assert validate(schema, body) == {}, (schema, body)
        if resp.status_code == 200:
            for rec in body.get("data", [body]):
                assert ISO_UTC.match(rec["modifiedOn"]) and ISO_UTC.match(rec["createdOn"]), rec
        return resp

    def post(self, path: str, body: Any) -> httpx.Response:
        return self.call("POST", ROOT + path, json=body, headers=self.headers())

    def delete(self, path: str) -> httpx.Response:
        return self.call("DELETE", ROOT + path, headers=self.headers())


@pytest.fixture
def sb() -> Sandbox:
    s = Sandbox(rate_limit_per_second=None)
    s.seed(customers=6, locations=8, seed=3)
    return s


@pytest.fixture
def api(sb: Sandbox) -> ContactApi:
    return ContactApi(sb)


def owner(sb: Sandbox, coll: str, n: int = 0) -> int:
    records = sb.customers() if coll == "customers" else sb.locations()
    return int(records[n]["id"])


def drain(api: ContactApi, coll: str, start: str | None = None, **params: Any) -> tuple[list[dict[str, Any]], str]:
    out: list[dict[str, Any]] = []
    token = start
    while True:
        page = api.ok(api.get(f"/export/{coll}/contacts", **({"from": token} if token else {}), **params))
        out += page["data"]
        token = page["continueFrom"]
        if not page["hasMore"]:
            return out, token


def problem(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    body: dict[str, Any] = resp.json()
    assert body["status"] == status
    return body


# ------------------------------------------------------------------------------------------------- per record


@pytest.mark.parametrize("coll", COLLECTIONS)
def test_create_list_patch_delete_a_contact(api: ContactApi, sb: Sandbox, coll: str) -> None:
    rid = owner(sb, coll, 1)
    before = api.ok(api.get(f"/{coll}/{rid}/contacts"))["data"]
    created = api.ok(api.post(f"/{coll}/{rid}/contacts", {"type": "MobilePhone", "value": "(512) 555-0142",
                                                          "memo": " Cell "}))
    assert set(created) == RECORD_KEYS
    assert (created["type"], created["value"], created["memo"]) == ("MobilePhone", "5125550142", "Cell")
    assert created["phoneSettings"] == {"phoneNumber": "5125550142", "doNotText": False}
    assert created["preferences"] is None and created["createdOn"] == created["modifiedOn"]
    assert created["id"] >= FIRST_CONTACT_ID
    listed = api.ok(api.get(f"/{coll}/{rid}/contacts"))["data"]
    assert listed == [*before, created]  # id order, the new one last

    patched = api.ok(api.patch(f"/{coll}/{rid}/contacts/{created['id']}", {"memo": "Work", "preferences": PREFS}))
    assert patched["memo"] == "Work" and patched["preferences"] == PREFS
    assert (patched["type"], patched["value"], patched["createdOn"]) == ("MobilePhone", "5125550142",
                                                                           created["createdOn"])
    assert patched["modifiedOn"] > created["modifiedOn"]
    retyped = api.ok(api.patch(f"/{coll}/{rid}/contacts/{created['id']}", {"type": "Email",
                                                                           "value": " Jo@Example.test "}))
    assert (retyped["type"], retyped["value"], retyped["memo"]) == ("Email", "Jo@Example.test", "Work")
    assert retyped["phoneSettings"]["phoneNumber"] == "Jo@Example.test"

    deleted = api.delete(f"/{coll}/{rid}/contacts/{created['id']}")
    assert deleted.status_code == 200 and deleted.content == b""
    assert api.ok(api.get(f"/{coll}/{rid}/contacts"))["data"] == before
    gone = sb.get_contact(ENTITY[coll], created["id"])
    assert gone["active"] is False and gone["modifiedOn"] > retyped["modifiedOn"]
    assert gone[OWNER_KEY[coll]] == rid
    problem(api.delete(f"/{coll}/{rid}/contacts/{created['id']}"), 404)  # deleted: gone for the API
    problem(api.patch(f"/{coll}/{rid}/contacts/{created['id']}", {"memo": "x"}), 404)
    assert [r.endpoint for r in sb.requests if r.method != "GET"][-5:] == [
        f"PATCH /{coll}/{{id}}/contacts/{{contactId}}", f"PATCH /{coll}/{{id}}/contacts/{{contactId}}",
        f"DELETE /{coll}/{{id}}/contacts/{{contactId}}", f"DELETE /{coll}/{{id}}/contacts/{{contactId}}",
        f"PATCH /{coll}/{{id}}/contacts/{{contactId}}"]
    assert sb.counters[f"POST /{coll}/{{id}}/contacts"] == {200: 1}
    assert [r.applied for r in sb.requests if r.method == "DELETE"] == [True, False]


@pytest.mark.parametrize("coll", COLLECTIONS)
def test_the_list_pages_per_the_spec(api: ContactApi, sb: Sandbox, coll: str) -> None:
    rid = owner(sb, coll, 2)
    for n in range(5):
        sb.add_contact(ENTITY[coll], rid, "Email", f"p{n}@example.test")
    ids = [c["id"] for c in sb.contacts(ENTITY[coll], rid)]
    assert len(ids) >= 5
    first = api.ok(api.get(f"/{coll}/{rid}/contacts", pageSize=2, includeTotal="true"))
    assert (first["page"], first["pageSize"], first["hasMore"], first["totalCount"]) == (1, 2, True, len(ids))
    pages = [first["data"]]
    page = 1
    while pages[-1] and len(pages[-1]) == 2:
        page += 1
        pages.append(api.ok(api.get(f"/{coll}/{rid}/contacts", page=page, pageSize=2))["data"])
    assert [c["id"] for p in pages for c in p] == ids
    last = api.ok(api.get(f"/{coll}/{rid}/contacts", page=page, pageSize=2))
    assert last["hasMore"] is False and last["totalCount"] is None
    bad = problem(api.get(f"/{coll}/{rid}/contacts", page=0, pageSize="x", includeTotal="maybe"), 400)
    assert set(bad["errors"]) == {"page", "pageSize", "includeTotal"}


@pytest.mark.parametrize("coll", COLLECTIONS)
def test_unknown_records_and_contacts_are_404(api: ContactApi, sb: Sandbox, coll: str) -> None:
    rid, other = owner(sb, coll, 0), owner(sb, coll, 1)
    mine = sb.add_contact(ENTITY[coll], rid, "Phone", "5125550100")
    theirs = sb.add_contact(ENTITY[coll], other, "Phone", "5125550101")
    missing = 9_999_999 if coll == "customers" else 29_999_999
    assert "not found" in problem(api.get(f"/{coll}/{missing}/contacts"), 404)["title"]
    problem(api.post(f"/{coll}/{missing}/contacts", {"type": "Phone", "value": "1"}), 404)
    problem(api.patch(f"/{coll}/{missing}/contacts/{mine['id']}", {"memo": "x"}), 404)
    problem(api.delete(f"/{coll}/{missing}/contacts/{mine['id']}"), 404)
    assert problem(api.patch(f"/{coll}/{rid}/contacts/{theirs['id']}", {"memo": "x"}), 404)["data"] == {
        "id": theirs["id"]}  # a contact of another record
    problem(api.delete(f"/{coll}/{rid}/contacts/{theirs['id']}"), 404)
    problem(api.patch(f"/{coll}/{rid}/contacts/1", {"memo": "x"}), 404)
    other_kind = "locations" if coll == "customers" else "customers"
    foreign = sb.add_contact(ENTITY[other_kind], owner(sb, other_kind), "Phone", "5125550102")
    problem(api.delete(f"/{coll}/{rid}/contacts/{foreign['id']}"), 404)  # a contact of the other entity
    assert sb.get_contact(ENTITY[coll], theirs["id"])["active"] is True


@pytest.mark.parametrize("coll", COLLECTIONS)
@pytest.mark.parametrize(("body", "fields"), [
    ({"type": "Cell", "value": "5125550100"}, {"type"}),
    ({"value": "5125550100"}, {"type"}),
    ({"type": "Phone"}, {"value"}),
    ({"type": "Phone", "value": 5125550100}, {"value"}),
    ({"type": "Email", "value": "a@b.test", "memo": 3}, {"memo"}),
    ({"type": "Email", "value": "a@b.test", "active": False}, {"active"}),
    ({"type": "Email", "value": "   "}, {"value"}),
    ([], {"$"}),
])
def test_a_create_body_the_spec_or_servicetitan_refuses_is_a_400(
    api: ContactApi, sb: Sandbox, coll: str, body: Any, fields: set[str]
) -> None:
    before = sb.count_contacts()
    answer = problem(api.post(f"/{coll}/{owner(sb, coll)}/contacts", body), 400)
    assert set(answer["errors"]) == fields and answer["title"] == "One or more validation errors occurred."
    assert sb.count_contacts() == before
    problem(api.post(f"/{coll}/9/contacts", body), 400)  # the body is checked before the record


@pytest.mark.parametrize("coll", COLLECTIONS)
@pytest.mark.parametrize(("body", "fields"), [
    ({"type": "Mobile"}, {"type"}),
    ({"memo": None}, {"memo"}),  # the update schema's memo is not nullable
    ({"value": ""}, {"value"}),
    ({"preferences": {"jobRemindersEnabled": True}}, {"preferences.marketingUpdatesEnabled",
                                                      "preferences.invoiceStatementNotification"}),
    ({"phoneSettings": {"doNotText": True}}, {"phoneSettings"}),
])
def test_a_patch_body_the_spec_or_servicetitan_refuses_is_a_400(
    api: ContactApi, sb: Sandbox, coll: str, body: Any, fields: set[str]
) -> None:
    rid = owner(sb, coll)
    contact = sb.add_contact(ENTITY[coll], rid, "Phone", "5125550100")
    assert set(problem(api.patch(f"/{coll}/{rid}/contacts/{contact['id']}", body), 400)["errors"]) == fields
    assert sb.get_contact(ENTITY[coll], contact["id"]) == contact


def test_a_patch_changes_only_the_fields_given_and_a_noop_still_advances_modified_on(
    api: ContactApi, sb: Sandbox
) -> None:
    rid = owner(sb, "customers")
    contact = sb.add_contact("customer", rid, "Phone", "5125550100", "Home")
    same = api.ok(api.patch(f"/customers/{rid}/contacts/{contact['id']}", {}))
    assert {k: v for k, v in same.items() if k != "modifiedOn"} == {
        k: v for k, v in contact.items() if k in RECORD_KEYS and k != "modifiedOn"}
    assert same["modifiedOn"] > contact["modifiedOn"]
    sb.configure(bump_modified_on_noop=False)
    again = api.ok(api.patch(f"/customers/{rid}/contacts/{contact['id']}", {"memo": "Home"}))
    assert again["modifiedOn"] == same["modifiedOn"]
    changed = api.ok(api.patch(f"/customers/{rid}/contacts/{contact['id']}", {"type": "Fax"}))
    assert (changed["type"], changed["value"], changed["memo"]) == ("Fax", "5125550100", "Home")
    assert changed["modifiedOn"] > same["modifiedOn"]


def test_a_body_that_is_not_json_is_refused(api: ContactApi, sb: Sandbox) -> None:
    rid = owner(sb, "customers")
    url = f"{ROOT}/customers/{rid}/contacts"
    assert api.call("POST", url, content=b"{", headers={**api.headers(), "content-type": "application/json"}
                    ).status_code == 400
    assert api.call("POST", url, content=b"x", headers={**api.headers(), "content-type": "text/plain"}
                    ).status_code == 415


# ------------------------------------------------------------------------------------------------- normalisation


@pytest.mark.parametrize(("contact_type", "given", "stored"), [
    ("Phone", "(555) 123-4567", "5551234567"),
    ("MobilePhone", "555.123.4567", "5551234567"),
    ("Fax", " 555 123 4567 ", "5551234567"),
    ("Phone", "555-123-4567", "5551234567"),
    ("Phone", "5551234567", "5551234567"),
    ("Phone", "+1 (555) 123-4567", "+1 (555) 123-4567"),  # 11 digits: stored as given (trimmed)
    ("MobilePhone", "555-1234 ext 9", "555-1234 ext 9"),
    ("Email", "  jo.smith@example.com ", "jo.smith@example.com"),
    ("Email", "(555) 123-4567", "(555) 123-4567"),  # only phones are reduced to digits
])
def test_servicetitan_stores_phone_numbers_as_digits(
    api: ContactApi, sb: Sandbox, contact_type: str, given: str, stored: str
) -> None:
    for coll in COLLECTIONS:
        rid = owner(sb, coll)
        created = api.ok(api.post(f"/{coll}/{rid}/contacts", {"type": contact_type, "value": given}))
        assert created["value"] == stored and created["phoneSettings"]["phoneNumber"] == stored
        assert sb.get_contact(ENTITY[coll], created["id"])["value"] == stored
        patched = api.ok(api.patch(f"/{coll}/{rid}/contacts/{created['id']}", {"value": given}))
        assert patched["value"] == stored
        assert sb.add_contact(ENTITY[coll], rid, contact_type, given)["value"] == stored


# ------------------------------------------------------------------------------------------------- feeds


@pytest.mark.parametrize("coll", COLLECTIONS)
def test_the_export_feed_pages_in_modified_order_and_resumes_from_a_token(sb: Sandbox, coll: str) -> None:
    sb.export_page_size = 3
    api = ContactApi(sb)
    entity = ENTITY[coll]
    rows, token = drain(api, coll)
    assert len(rows) == sb.count_contacts(entity) > 3
    assert [(r["modifiedOn"], r["id"]) for r in rows] == sorted((r["modifiedOn"], r["id"]) for r in rows)
    assert all(validate(EXPORT_SCHEMA[coll], r) == {} and r["active"] is True for r in rows)
    assert {r[OWNER_KEY[coll]] for r in rows} <= {int(x["id"]) for x in (
        sb.customers() if coll == "customers" else sb.locations())}
    empty = api.ok(api.get(f"/export/{coll}/contacts", **{"from": token}))
    assert (empty["data"], empty["hasMore"], empty["continueFrom"]) == ([], False, token)

    first = api.ok(api.get(f"/export/{coll}/contacts"))
    assert first["hasMore"] is True and len(first["data"]) == 3
    seen = first["data"][0]
    rid = seen[OWNER_KEY[coll]]
    api.ok(api.patch(f"/{coll}/{rid}/contacts/{seen['id']}", {"memo": "changed after the token"}))
    rest, _ = drain(api, coll, first["continueFrom"])
    assert rest[-1]["id"] == seen["id"] and rest[-1]["memo"] == "changed after the token"
    assert len(rest) == len(rows) - 3 + 1

    created = api.ok(api.post(f"/{coll}/{rid}/contacts", {"type": "Phone", "value": "512.555.0199"}))
    assert api.delete(f"/{coll}/{rid}/contacts/{seen['id']}").status_code == 200
    news = api.ok(api.get(f"/export/{coll}/contacts", **{"from": token}))["data"]
    assert [(r["id"], r["active"]) for r in news] == [(created["id"], True), (seen["id"], False)]
    assert news[0]["value"] == "5125550199" and news[1][OWNER_KEY[coll]] == rid


def test_the_feed_from_a_date_and_tokens_of_other_feeds(api: ContactApi, sb: Sandbox) -> None:
    rows, _ = drain(api, "customers")
    pivot = rows[len(rows) // 2]["modifiedOn"]
    later, _ = drain(api, "customers", pivot)
    assert [r["id"] for r in later] == [r["id"] for r in rows if r["modifiedOn"] >= pivot]
    assert drain(api, "locations", "2100-01-01")[0] == []
    record_token = api.ok(api.get("/export/customers"))["continueFrom"]
    location_contacts_token = api.ok(api.get("/export/locations/contacts"))["continueFrom"]
    for start in (record_token, location_contacts_token, "not a token"):
        assert "from" in problem(api.get("/export/customers/contacts", **{"from": start}), 400)["errors"]
    contacts_token = api.ok(api.get("/export/customers/contacts"))["continueFrom"]
    assert "from" in problem(api.get("/export/customers", **{"from": contacts_token}), 400)["errors"]
    problem(api.get("/export/customers/contacts", includeRecentChanges="perhaps"), 400)


def test_without_recent_changes_the_feed_hides_changes_younger_than_the_delay() -> None:
    clock = FakeClock()
    sb = Sandbox(rate_limit_per_second=None, clock=clock, export_delay_seconds=60)
    sb.seed(4, 4, seed=3)
    api = ContactApi(sb)
    _, token = drain(api, "locations")
    lid = owner(sb, "locations")
    sb.add_contact("location", lid, "Email", "fresh@example.test")
    assert drain(api, "locations", token)[0] == []
    assert [r["value"] for r in drain(api, "locations", token, includeRecentChanges="true")[0]] == [
        "fresh@example.test"]
    clock.advance(61)
    assert [r["value"] for r in drain(api, "locations", token)[0]] == ["fresh@example.test"]


# ------------------------------------------------------------------------------------------------- creates


def test_contacts_created_with_their_record_are_the_same_contacts_everywhere(api: ContactApi, sb: Sandbox) -> None:
    _, customer_token = drain(api, "customers")
    _, location_token = drain(api, "locations")
    body = {
        "name": "Jane Created", "type": "Residential", "address": customer_address(),
        "contacts": [{"type": "Email", "value": " jane@example.test "}, {"type": "Phone", "value": "(512) 555-0100"}],
        "locations": [{"name": "Home", "address": customer_address(),
                       "contacts": [{"type": "MobilePhone", "value": "512.555.0101", "memo": "cabin"}]}],
    }
    created = api.ok(api.call("POST", f"{ROOT}/customers", json=body, headers=api.headers()))
    assert [(c["type"], c["value"]) for c in created["contacts"]] == [("Email", "jane@example.test"),
                                                                      ("Phone", "5125550100")]
    cid, lid = created["id"], created["locations"][0]["id"]
    assert sb.contacts("customer", cid) == created["contacts"]
    assert sb.contacts("location", lid) == created["locations"][0]["contacts"]
    listed = api.ok(api.get(f"/customers/{cid}/contacts"))["data"]
    assert [{k: c[k] for k in ("id", "type", "value", "memo")} for c in listed] == created["contacts"]
    fed = drain(api, "customers", customer_token)[0]
    assert [(r["id"], r["customerId"], r["active"]) for r in fed] == [(c["id"], cid, True) for c in created["contacts"]]
    fed_locations = drain(api, "locations", location_token)[0]
    assert [(r["id"], r["locationId"], r["value"], r["memo"]) for r in fed_locations] == [
        (created["locations"][0]["contacts"][0]["id"], lid, "5125550101", "cabin")]
    ids = [c["id"] for c in created["contacts"]] + [created["locations"][0]["contacts"][0]["id"]]
    assert ids == list(range(ids[0], ids[0] + 3))
    assert api.ok(api.patch(f"/customers/{cid}/contacts/{ids[0]}", {"memo": "main"}))["memo"] == "main"

    refused = dict(body, contacts=[{"type": "Email", "value": " "}])
    refused["locations"] = [dict(body["locations"][0], contacts=[{"type": "Phone", "value": ""}])]
    errors = problem(api.call("POST", f"{ROOT}/customers", json=refused, headers=api.headers()), 400)["errors"]
    assert set(errors) == {"contacts[0].value", "locations[0].contacts[0].value"}


# ------------------------------------------------------------------------------------------------- seeding


def test_seeding_gives_each_record_0_to_2_contacts_and_leaves_the_records_as_they_were() -> None:
    with_contacts, without, again, other = Sandbox(), Sandbox(), Sandbox(), Sandbox()
    with_contacts.seed(60, 80, seed=7)
    without.seed(60, 80, seed=7, contacts=False)
    again.seed(60, 80, seed=7)
    other.seed(60, 80, seed=8)
    assert with_contacts.customers() == without.customers() and with_contacts.locations() == without.locations()
    assert without.count_contacts() == 0 and all(without.contacts("customer", c["id"]) == []
                                                 for c in without.customers())
    api_with, api_without = ContactApi(with_contacts), ContactApi(without)
    assert (api_with.ok(api_with.get("/customers", pageSize=500, active="Any"))
            == api_without.ok(api_without.get("/customers", pageSize=500, active="Any")))
    assert drain(api_with, "customers")[0] == drain(ContactApi(again), "customers")[0]
    assert drain(api_with, "customers")[0] != drain(ContactApi(other), "customers")[0]

    for entity, records in (("customer", with_contacts.customers()), ("location", with_contacts.locations())):
        counts = [len(with_contacts.contacts(entity, r["id"])) for r in records]
        assert set(counts) == {0, 1, 2}, counts
        assert sum(counts) == with_contacts.count_contacts(entity)
    everything = [with_contacts.get_contact(e, c["id"]) for e, recs in (
        ("customer", with_contacts.customers()), ("location", with_contacts.locations())) for r in recs
        for c in with_contacts.contacts(e, r["id"])]
    assert sorted(c["id"] for c in everything) == list(range(FIRST_CONTACT_ID, FIRST_CONTACT_ID + len(everything)))
    assert {c["type"] for c in everything} >= {"Phone", "MobilePhone", "Email"}
    for c in everything:
        assert validate(EXPORT_SCHEMA["customers" if "customerId" in c else "locations"], c) == {}
        assert c["active"] and c["createdOn"] <= c["modifiedOn"] < "2025-06-02"
        if c["type"] == "Email":
            assert re.fullmatch(r"[a-z0-9.]+@[a-z0-9.]+", c["value"]), c
        else:
            assert re.fullmatch(r"\d{10}", c["value"]) and c["phoneSettings"]["phoneNumber"] == c["value"], c
    by_created = sorted(everything, key=lambda c: c["id"])
    assert [c["createdOn"] for c in by_created] == sorted(c["createdOn"] for c in everything)
    new = with_contacts.add_contact("customer", with_contacts.customers()[0]["id"], "Phone", "5125550100")
    assert new["id"] == FIRST_CONTACT_ID + len(everything) and new["modifiedOn"] > max(c["modifiedOn"]
                                                                                       for c in everything)


def test_the_documented_seed_count() -> None:
    sb = Sandbox(tenant_id=1)
    sb.seed(customers=6, locations=4, seed=3)
    assert sb.count_contacts() == 13
    sb.seed(customers=6, locations=4, seed=3, contacts=False)
    assert sb.count_contacts() == 0


def test_the_admin_seed_takes_the_contacts_option(api: ContactApi, sb: Sandbox) -> None:
    seeded = api.call("POST", "/_sandbox/seed", json={"customers": 6, "locations": 4, "seed": 3}).json()
    assert seeded == {"customers": 6, "locations": 4} and sb.count_contacts() == 13
    seeded = api.call("POST", "/_sandbox/seed", json={"customers": 6, "locations": 4, "seed": 3, "contacts": False})
    assert seeded.status_code == 200 and sb.count_contacts() == 0 and sb.count("customer") == 6
    assert api.call("POST", "/_sandbox/seed", json={"customers": 1, "contacts": "no"}).status_code == 400


# ------------------------------------------------------------------------------------------------- helpers


def test_remote_contact_changes_advance_modified_on_and_reach_the_feed(api: ContactApi, sb: Sandbox) -> None:
    lid = owner(sb, "locations", 3)
    _, token = drain(api, "locations")
    added = sb.add_contact("location", lid, "MobilePhone", "(512) 555-0150", "Cell", doNotText=True,
                           preferences=PREFS)
    assert added["value"] == "5125550150" and added["phoneSettings"] == {"phoneNumber": "5125550150",
                                                                         "doNotText": True}
    assert added["preferences"] == PREFS and added["locationId"] == lid and added["active"] is True
    edited = sb.edit_contact("location", added["id"], value="512 555 0151", memo=None, doNotText=False)
    assert (edited["value"], edited["memo"], edited["phoneSettings"]["doNotText"]) == ("5125550151", None, False)
    assert edited["modifiedOn"] > added["modifiedOn"]
    assert sb.contacts("location", lid)[-1] == {"id": added["id"], "type": "MobilePhone", "value": "5125550151",
                                                "memo": None}
    assert sb.contacts("location", lid, full=True)[-1] == edited
    removed = sb.remove_contact("location", added["id"])
    assert removed["active"] is False and removed["modifiedOn"] > edited["modifiedOn"]
    assert added["id"] not in [c["id"] for c in sb.contacts("location", lid)]
    assert sb.contacts("location", lid, include_inactive=True, full=True)[-1] == removed
    assert sb.get_contact("location", added["id"]) == removed
    assert drain(api, "locations", token)[0] == [removed]
    restored = sb.edit_contact("location", added["id"], active=True)
    assert restored["active"] is True and api.ok(api.get(f"/locations/{lid}/contacts"))["data"][-1]["id"] == added["id"]

    with pytest.raises(ContactNotFound):
        sb.get_contact("customer", added["id"])  # a location's contact
    with pytest.raises(ContactNotFound):
        sb.remove_contact("location", 1)
    with pytest.raises(RecordNotFound):
        sb.add_contact("location", 5, "Phone", "5125550100")
    with pytest.raises(RecordNotFound):
        sb.contacts("customer", 5)
    with pytest.raises(ApiError) as bad:
        sb.add_contact("location", lid, "Pager", "5125550100")
    assert bad.value.status == 400 and "type" in bad.value.errors
    with pytest.raises(ApiError) as unknown:
        sb.edit_contact("location", added["id"], nickname="x", preferences={"jobRemindersEnabled": True})
    assert set(unknown.value.errors) == {"nickname", "preferences"}
    sb.remove_contact("location", added["id"])
    with pytest.raises(ContactNotFound):
        sb.remove_contact("location", added["id"])  # already deleted


def test_the_admin_routes_for_contacts(api: ContactApi, sb: Sandbox) -> None:
    cid = owner(sb, "customers", 4)
    before = sb.count_contacts("customer")
    added = api.call("POST", f"/_sandbox/customers/{cid}/contacts", json={"type": "Phone", "value": "555.123.4567"})
    assert added.status_code == 201 and added.json()["value"] == "5551234567"
    contact_id = added.json()["id"]
    edited = api.call("PATCH", f"/_sandbox/customers/{cid}/contacts/{contact_id}", json={"memo": "Office"}).json()
    assert edited["memo"] == "Office" and sb.count_contacts("customer") == before + 1
    assert api.call("DELETE", f"/_sandbox/customers/{cid}/contacts/{contact_id}").json()["active"] is False
    listed = api.call("GET", f"/_sandbox/customers/{cid}/contacts").json()["contacts"]
    assert contact_id not in [c["id"] for c in listed]
    listed = api.call("GET", f"/_sandbox/customers/{cid}/contacts", params={"includeInactive": "true"}).json()
    assert listed["contacts"][-1]["id"] == contact_id
    other = owner(sb, "customers", 5)
    assert api.call("PATCH", f"/_sandbox/customers/{other}/contacts/{contact_id}", json={}).status_code == 404
    assert api.call("POST", f"/_sandbox/customers/{cid}/contacts", json={"type": "Phone"}).status_code == 400
    assert sb.requests == []  # admin calls are not logged


# ------------------------------------------------------------------------------------------------- faults


def test_faults_apply_to_the_contact_endpoints(api: ContactApi, sb: Sandbox) -> None:
    cid = owner(sb, "customers")
    contact = sb.add_contact("customer", cid, "Phone", "5125550100")
    sb.faults.add(Fault.server_error(503), endpoint="PATCH /customers/{id}/contacts/{contactId}", times=1)
    url = f"/customers/{cid}/contacts/{contact['id']}"
    assert api.patch(url, {"memo": "x"}).status_code == 503
    assert sb.get_contact("customer", contact["id"])["memo"] is None
    assert api.ok(api.patch(url, {"memo": "x"}))["memo"] == "x"
    assert sb.counters["PATCH /customers/{id}/contacts/{contactId}"] == {503: 1, 200: 1}

    sb.faults.add(Fault.server_error(500, after_apply=True), method="DELETE", times=1)
    assert api.delete(url).status_code == 500
    assert sb.get_contact("customer", contact["id"])["active"] is False  # applied, then the answer failed
    last = sb.requests[-1]
    assert (last.endpoint, last.entity, last.record_id, last.applied, last.fault) == (
        "DELETE /customers/{id}/contacts/{contactId}", "customer", cid, True, "server_error")

    sb.faults.add(Fault.rate_limited(2), entity="customer", record_id=cid, times=1)
    limited = api.get(f"/customers/{cid}/contacts")
    assert limited.status_code == 429 and limited.headers["retry-after"] == "2"
    sb.faults.add(Fault.dropped(), endpoint="GET /export/locations/contacts", times=1)
    with pytest.raises(httpx.RemoteProtocolError):
        api.get("/export/locations/contacts")
    assert api.get("/export/locations/contacts").status_code == 200
    assert sb.counters["GET /export/locations/contacts"] == {0: 1, 200: 1}
