"""The sandbox's create endpoints, ``POST /customers`` and ``POST /locations``, in-process through
httpx.ASGITransport (and once on a socket): answers, validation, the external-data lookup a re-sent create relies
on, the export feeds, and faults after the create was applied.

Every answer is checked against ServiceTitan's OpenAPI file by ``Api.call`` (``CreatedCustomerResponse`` /
``CreateLocationResponse`` for a 200, ``ApiErrorResponse`` otherwise), see tests/integration/test_sandbox.py.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from sync.core.openapi import validate
from sync.sandbox import ConnectionDropped, Fault, Faults, Sandbox, SandboxServer
from sync.sandbox.seed import TAG_TYPES
from tests.integration.test_sandbox import GUID, OTHER_GUID, ROOT, Api, customer_address, drain_export
from tests.integration.test_sandbox_faults import socket_client

CREATED_CUSTOMER = "Crm.V2.Customers.CreatedCustomerResponse"
CREATED_LOCATION = "Crm.V2.Locations.CreateLocationResponse"
KEY = "stsync_id"
TAG = min(TAG_TYPES)
UNKNOWN_TAG = max(TAG_TYPES) + 1000


@pytest.fixture
def sb() -> Sandbox:
    s = Sandbox(rate_limit_per_second=None)
    s.seed(customers=5, locations=6, seed=3)
    return s


@pytest.fixture
def api(sb: Sandbox) -> Api:
    return Api(sb)


def post(api: Api, collection: str, body: Any) -> httpx.Response:
    return api.call("POST", f"{ROOT}/{collection}", json=body, headers=api.headers())


def ext_create(value: str, guid: str = GUID) -> dict[str, Any]:
    return {"applicationGuid": guid, "externalData": [{"key": KEY, "value": value}]}


def new_location(name: str, value: str | None = None, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"name": name, "address": customer_address(street=f"{len(name)} {name} Rd"), **extra}
    if value is not None:
        body["externalData"] = ext_create(value)
    return body


def new_customer(value: str = "cust-1", **extra: Any) -> dict[str, Any]:
    return {
        "name": "  Jane Created  ",
        "type": "Residential",
        "address": customer_address(state="tx"),
        "locations": [new_location("Home", f"{value}-loc-a"), new_location("Cabin", f"{value}-loc-b")],
        "externalData": ext_create(value),
        **extra,
    }


def counts(sb: Sandbox) -> tuple[int, int]:
    return sb.count("customer"), sb.count("location")


# ------------------------------------------------------------------------------------------------- POST /customers


def test_a_customer_created_with_two_locations_answers_created_customer_response(api: Api, sb: Sandbox) -> None:
    before = counts(sb)
    body = new_customer(tagTypeIds=[TAG, TAG], doNotMail=None, contacts=[{"type": "Email", "value": "j@x.test"}])
    body["locations"][1]["contacts"] = [{"type": "Phone", "value": "512-555-0100", "memo": "cabin"}]
    created = api.ok(post(api, "customers", body))
    assert validate(CREATED_CUSTOMER, created) == {}  # also checked by Api.call
    assert counts(sb) == (before[0] + 1, before[1] + 2)
    assert created["name"] == "Jane Created" and created["address"]["state"] == "TX"  # normalised as stored
    assert created["active"] is True and created["doNotMail"] is False and created["tagTypeIds"] == [TAG]
    assert created["externalData"] == [{"key": KEY, "value": "cust-1"}]
    assert [(c["type"], c["value"], c["memo"]) for c in created["contacts"]] == [("Email", "j@x.test", None)]
    assert created["createdOn"] == created["modifiedOn"]

    cid = created["id"]
    assert api.ok(api.get(f"/customers/{cid}")) == sb.get_customer(cid)
    assert [loc["name"] for loc in created["locations"]] == ["Home", "Cabin"]
    for answered, value in zip(created["locations"], ("cust-1-loc-a", "cust-1-loc-b"), strict=True):
        assert validate(CREATED_LOCATION, answered) == {}
        assert answered["customerId"] == cid
        assert answered["externalData"] == [{"key": KEY, "value": value}]
        stored = api.ok(api.get(f"/locations/{answered['id']}"))
        assert stored["customerId"] == cid and stored["name"] == answered["name"]
        assert stored["address"] == answered["address"] and stored["externalData"] == []  # no guid on GET
    assert created["locations"][0]["contacts"] == []
    assert [c["memo"] for c in created["locations"][1]["contacts"]] == ["cabin"]
    assert sb.contacts("location", created["locations"][1]["id"]) == created["locations"][1]["contacts"]
    of_customer = api.ok(api.get("/locations", customerId=cid))["data"]
    assert sorted(loc["id"] for loc in of_customer) == sorted(loc["id"] for loc in created["locations"])
    posted = [r for r in sb.requests if r.endpoint == "POST /customers"]
    assert [(r.status, r.applied) for r in posted] == [(200, True)] and sb.counters["POST /customers"] == {200: 1}


def test_a_created_customer_answers_only_the_requests_application_guid(api: Api, sb: Sandbox) -> None:
    body = new_customer("mine")
    body["locations"] = [new_location("No data of its own")]
    created = api.ok(post(api, "customers", body))
    assert created["locations"][0]["externalData"] == []
    assert sb.external_data("customer", created["id"]) == {GUID: {KEY: "mine"}}
    assert api.ok(api.get("/customers", ids=str(created["id"]), externalDataApplicationGuid=OTHER_GUID)
                  )["data"][0]["externalData"] == []
    without = api.ok(post(api, "customers", {**new_customer(), "externalData": None}))
    assert without["externalData"] == [] and sb.external_data("customer", without["id"]) == {}


# ------------------------------------------------------------------------------------------------- POST /locations


def test_a_location_created_for_an_existing_customer(api: Api, sb: Sandbox) -> None:
    owner = sb.customers()[0]["id"]
    before = counts(sb)
    body = new_location("Warehouse", "loc-9", customerId=owner, tagTypeIds=[TAG],
                        contacts=[{"type": "MobilePhone", "value": "512-555-0199"}])
    created = api.ok(post(api, "locations", body))
    assert validate(CREATED_LOCATION, created) == {}
    assert counts(sb) == (before[0], before[1] + 1)
    assert created["customerId"] == owner and created["name"] == "Warehouse" and created["tagTypeIds"] == [TAG]
    assert created["externalData"] == [{"key": KEY, "value": "loc-9"}]
    assert [c["type"] for c in created["contacts"]] == ["MobilePhone"] and created["contacts"][0]["id"] > 0
    assert api.ok(api.get(f"/locations/{created['id']}")) == sb.get_location(created["id"])


def test_a_location_for_an_unknown_customer_is_409_and_stores_nothing(api: Api, sb: Sandbox) -> None:
    before = counts(sb)
    resp = post(api, "locations", new_location("Orphan", "x", customerId=9_999_999))
    assert resp.status_code == 409
    assert resp.json()["errors"] == {"customerId": ["Customer 9999999 not found."]}
    location_id = sb.customers()[0]["id"] + 10_000_000  # a location id is not a customer id
    assert post(api, "locations", new_location("Orphan", customerId=location_id)).status_code == 409
    assert counts(sb) == before and sb.requests[-1].applied is False


# ------------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize("field", ["name", "address", "locations"])
def test_a_customer_without_a_required_field_is_400_naming_it(api: Api, sb: Sandbox, field: str) -> None:
    before = counts(sb)
    body = new_customer()
    del body[field]
    resp = post(api, "customers", body)
    assert resp.status_code == 400
    assert resp.json()["errors"] == {field: [f"The {field} field is required."]}
    assert counts(sb) == before and sb.requests[-1].applied is False


@pytest.mark.parametrize(
    ("change", "errors"),
    [
        (lambda b: b["locations"][1].pop("address"), {"locations[1].address": ["The address field is required."]}),
        (lambda b: b["locations"][0].pop("name"), {"locations[0].name": ["The name field is required."]}),
        (lambda b: b["address"].pop("zip"), {"address.zip": ["The zip field is required."]}),
        (lambda b: b.update(locations=[]), {"locations": ["At least one location is required."]}),
        (lambda b: b.update(name="  "), {"name": ["The Name field is required."]}),
        (lambda b: b["locations"][1]["address"].update(city=" "), {"locations[1].address.city":
                                                                    ["The City field is required."]}),
        (lambda b: b.update(active=False), {"active": ["The field active is not a known field."]}),
        (lambda b: b["locations"][0].update(customerId=1), {"locations[0].customerId":
                                                            ["The field customerId is not a known field."]}),
        (lambda b: b["externalData"].update(applicationGuid="nope"), {"externalData.applicationGuid":
                                                                      ["The value 'nope' is not valid."]}),
        (lambda b: b.update(tagTypeIds=[UNKNOWN_TAG]), {"tagTypeIds": [f"Tag type {UNKNOWN_TAG} does not exist."]}),
        (lambda b: b["locations"][1].update(customFields=[{"typeId": 1, "value": "v"}]),
         {"locations[1].customFields[0].typeId": ["Custom field type 1 does not exist."]}),
    ],
)
def test_an_invalid_customer_body_is_400_naming_the_field_and_stores_nothing(
        api: Api, sb: Sandbox, change: Any, errors: dict[str, list[str]]) -> None:
    before = counts(sb)
    body = new_customer()
    change(body)
    resp = post(api, "customers", body)
    assert resp.status_code == 400, resp.text
    assert resp.json()["errors"] == errors
    assert counts(sb) == before


@pytest.mark.parametrize("field", ["name", "address", "customerId"])
def test_a_location_without_a_required_field_is_400_naming_it(api: Api, sb: Sandbox, field: str) -> None:
    before = counts(sb)
    body = new_location("Shop", customerId=sb.customers()[0]["id"])
    del body[field]
    resp = post(api, "locations", body)
    assert resp.status_code == 400 and resp.json()["errors"] == {field: [f"The {field} field is required."]}
    assert counts(sb) == before


def test_a_create_body_that_is_not_a_json_object_is_refused(api: Api, sb: Sandbox) -> None:
    before = counts(sb)
    assert post(api, "customers", ["name"]).status_code == 400
    assert api.call("POST", f"{ROOT}/customers", content=b"{", headers={
        **api.headers(), "content-type": "application/json"}).status_code == 400
    assert api.call("POST", f"{ROOT}/customers", content=b"name=x", headers={
        **api.headers(), "content-type": "text/plain"}).status_code == 415
    assert counts(sb) == before


# ------------------------------------------------------------------------------------------------- read side


def test_the_external_data_list_filters_find_the_created_customer_and_its_locations(api: Api, sb: Sandbox) -> None:
    created = api.ok(post(api, "customers", new_customer("lookup-7")))
    api.ok(post(api, "customers", new_customer("lookup-8")))  # another one, not asked for

    found = api.ok(api.get("/customers", externalDataApplicationGuid=GUID, externalDataKey=KEY,
                           externalDataValues="lookup-7,never-sent"))["data"]
    assert [c["id"] for c in found] == [created["id"]]
    assert found[0]["externalData"] == [{"key": KEY, "value": "lookup-7"}]
    loc = created["locations"][1]
    found_locs = api.ok(api.get("/locations", externalDataApplicationGuid=GUID.upper(), externalDataKey=KEY,
                                externalDataValues="lookup-7-loc-b"))["data"]
    assert [(x["id"], x["customerId"]) for x in found_locs] == [(loc["id"], created["id"])]
    assert api.ok(api.get("/customers", externalDataApplicationGuid=OTHER_GUID, externalDataKey=KEY,
                          externalDataValues="lookup-7"))["data"] == []  # scoped by application guid


def test_created_records_appear_in_the_export_feeds_as_the_newest(api: Api, sb: Sandbox) -> None:
    _, customers_token = drain_export(api, "customers")
    _, locations_token = drain_export(api, "locations")
    created = api.ok(post(api, "customers", new_customer()))
    extra = api.ok(post(api, "locations", new_location("Annex", customerId=created["id"])))

    customers, _ = drain_export(api, "customers", customers_token)
    assert [c["id"] for c in customers] == [created["id"]]
    assert customers[0] == sb.get_customer(created["id"])
    locations, _ = drain_export(api, "locations", locations_token)
    assert [x["id"] for x in locations] == [x["id"] for x in created["locations"]] + [extra["id"]]
    everything, _ = drain_export(api, "locations")
    assert [x["id"] for x in everything][-3:] == [x["id"] for x in locations]


# ------------------------------------------------------------------------------------------------- faults


def _one_created(api: Api, sb: Sandbox, value: str, before: tuple[int, int]) -> None:
    """Exactly one customer (and its two locations) exists for ``value``: what a re-send must find first."""
    assert counts(sb) == (before[0] + 1, before[1] + 2)
    found = api.ok(api.get("/customers", externalDataApplicationGuid=GUID, externalDataKey=KEY,
                           externalDataValues=value))["data"]
    assert len(found) == 1
    assert len(api.ok(api.get("/locations", customerId=found[0]["id"]))["data"]) == 2


@pytest.mark.parametrize("collection", ["customers", "locations"])
def test_a_server_error_before_apply_on_a_create_stores_nothing(api: Api, sb: Sandbox, collection: str) -> None:
    before = counts(sb)
    sb.faults.add(Fault.server_error(503), method="POST")
    body = new_customer() if collection == "customers" else new_location("X", customerId=sb.customers()[0]["id"])
    assert post(api, collection, body).status_code == 503
    assert counts(sb) == before and sb.requests[-1].applied is False


def test_a_503_after_apply_on_post_customers_leaves_exactly_one_record(api: Api, sb: Sandbox) -> None:
    before = counts(sb)
    sb.faults.add(Fault.server_error(503, after_apply=True), endpoint="POST /customers")
    resp = post(api, "customers", new_customer("after-503"))
    assert resp.status_code == 503 and resp.json()["status"] == 503
    _one_created(api, sb, "after-503", before)
    last = [r for r in sb.requests if r.endpoint == "POST /customers"][-1]
    assert last.applied is True and last.fault == "server_error" and last.status == 503


def test_a_dropped_connection_after_apply_on_post_customers_leaves_exactly_one_record(api: Api, sb: Sandbox) -> None:
    before = counts(sb)
    sb.faults.add(Fault.dropped(after_apply=True), method="POST", entity="customer")
    with pytest.raises(ConnectionDropped):
        post(api, "customers", new_customer("after-drop"))
    _one_created(api, sb, "after-drop", before)
    assert sb.counters["POST /customers"] == {0: 1}
    posted = [r for r in sb.requests if r.endpoint == "POST /customers"]
    assert [(r.status, r.applied, r.fault) for r in posted] == [(0, True, "drop")]


def test_a_dropped_connection_after_apply_on_post_locations_leaves_exactly_one_record(api: Api, sb: Sandbox) -> None:
    owner = sb.customers()[0]["id"]
    before = counts(sb)
    sb.faults.add(Fault.dropped(after_apply=True), endpoint="POST /locations")
    with pytest.raises(ConnectionDropped):
        post(api, "locations", new_location("Dropped", "loc-drop", customerId=owner))
    assert counts(sb) == (before[0], before[1] + 1)
    found = api.ok(api.get("/locations", externalDataApplicationGuid=GUID, externalDataKey=KEY,
                           externalDataValues="loc-drop"))["data"]
    assert [x["customerId"] for x in found] == [owner]


def test_random_after_apply_faults_hit_creates_too() -> None:
    sb = Sandbox(rate_limit_per_second=None, faults=Faults(
        seed=4, server_error_probability=1.0, after_apply_probability=1.0, endpoints=["POST /customers"]))
    api = Api(sb)
    resp = post(api, "customers", new_customer("random"))
    assert resp.status_code >= 500
    assert sb.count("customer") == 1 and sb.count("location") == 2
    assert sb.requests[-1].applied is True


def test_a_late_answer_on_a_create_is_applied_at_once(sb: Sandbox) -> None:
    sb.faults.add(Fault.late_answer(50), endpoint="POST /customers")
    api = Api(sb)
    created = api.ok(post(api, "customers", new_customer("late")))
    assert sb.get_customer(created["id"])["name"] == "Jane Created" and sb.requests[-1].fault == "late_answer"


def test_a_dropped_create_on_a_socket_is_a_connection_error_and_was_applied(sb: Sandbox) -> None:
    before = counts(sb)
    with SandboxServer(sb) as server, socket_client(server) as (client, headers):
        client.post("/_sandbox/faults", json={"rules": [
            {"fault": {"kind": "drop", "after_apply": True}, "endpoint": "POST /customers"}]})
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
            client.post(f"{ROOT}/customers", headers=headers, json=new_customer("socket"))
        found = client.get(f"{ROOT}/customers", headers=headers, params={
            "externalDataApplicationGuid": GUID, "externalDataKey": KEY, "externalDataValues": "socket"}).json()
        assert len(found["data"]) == 1
    assert counts(sb) == (before[0] + 1, before[1] + 2)


def test_stsyncs_own_create_bodies_are_accepted_by_the_sandbox(sb: Sandbox, api: Api) -> None:
    """The bodies sync.core.create builds from mirror rows (issue 17) create exactly what they say."""
    from sync.core.create import build_customer_create, build_location_create
    from tests.unit.test_merge import customer, location

    made = build_customer_create(customer(name="From The Mirror", tag_type_ids=[TAG], custom_fields={}), 7,
                                 [(11, location(name="Mirror Home"))], application_guid=GUID)
    assert made.valid, made.problems
    resp = post(api, "customers", made.body)
    assert resp.status_code == 200, resp.text
    created = resp.json()
    assert created["name"] == "From The Mirror" and [loc["name"] for loc in created["locations"]] == ["Mirror Home"]
    assert {"key": "mirrorId", "value": "7"} in [
        {"key": e["key"], "value": e["value"]} for e in created["externalData"]]
    loc = build_location_create(location(name="Second Site", customer_st_id=created["id"]), 12,
                                application_guid=GUID)
    assert loc.valid, loc.problems
    resp = post(api, "locations", loc.body)
    assert resp.status_code == 200 and resp.json()["customerId"] == created["id"], resp.text
