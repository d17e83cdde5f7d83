"""The ServiceTitan sandbox (sync.sandbox), in-process through httpx.ASGITransport: auth, GET/PATCH semantics,
lists, export feeds, seeding, remote edits, admin endpoints.

Every response the tests receive from the sandbox is checked against ServiceTitan's OpenAPI file (the schema
documented for that operation and status; ApiErrorResponse for any other status), see ``Api.call``.
Faults, the rate limiter and the socket server: tests/test_sandbox_faults.py.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sync.core.openapi import RESPONSE_SCHEMAS, UPDATE_SCHEMAS, spec, validate
from sync.sandbox import ApiError, RecordNotFound, Sandbox, create_app
from sync.sandbox.model import Entity
from sync.sandbox.seed import FIRST_CUSTOMER_ID, FIRST_LOCATION_ID, OTHER_APP_GUID

BASE = "http://sandbox.test"
TENANT = 1
ROOT = f"/crm/v2/tenant/{TENANT}"
GUID = "5f2b8a7e-3c1d-4e6f-9a0b-1c2d3e4f5a6b"
OTHER_GUID = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"
CREDENTIALS = {"grant_type": "client_credentials", "client_id": "sandbox-client", "client_secret": "sandbox-secret"}
ISO_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$")


# ------------------------------------------------------------------------------------------------- helpers


class FakeClock:
    def __init__(self, t: float = 1_800_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def _operation_schema(method: str, path: str, status: int) -> str:
    """The schema ServiceTitan documents for this answer (ApiErrorResponse for undocumented statuses)."""
    paths = spec()["paths"]
    for template, ops in paths.items():
        pattern = "^/crm/v2" + re.sub(r"\{[^}]+\}", "[^/]+", template) + "/?$"
        by_id = bool(re.search(r"/\d+/?$", path))
        if re.match(pattern, path) and method.lower() in ops and ("{id}" in template) == by_id:
            documented = ops[method.lower()]["responses"].get(str(status))
            if documented and "content" in documented:
                ref: str = documented["content"]["application/json"]["schema"]["$ref"]
                return ref.rsplit("/", 1)[-1]
            break
    return "ApiErrorResponse"


def check_against_spec(method: str, path: str, resp: httpx.Response) -> None:
    """Token answers are OAuth2 shaped; every other answer conforms to the OpenAPI file (injected faults: an
    ApiErrorResponse, or a load balancer's HTML page)."""
    if path.startswith("/connect/token") and resp.status_code in (200, 400):
        body = resp.json()
        if resp.status_code == 200:
            assert set(body) == {"access_token", "expires_in", "token_type", "scope"}
        else:
            assert set(body) <= {"error", "error_description"}
        return
    if path.startswith("/_sandbox") or resp.headers.get("content-type", "").startswith("text/html"):
        return
    schema = _operation_schema(method, path, resp.status_code)
    body = resp.json()
    assert validate(schema, body) == {}, (schema, body)
    records = body.get("data", [body]) if resp.status_code == 200 else []
    for rec in records:
        assert ISO_UTC.match(rec["modifiedOn"]) and ISO_UTC.match(rec["createdOn"]), rec


class Api:
    """The sandbox's HTTP API in-process (a new ASGITransport client per call: tests stay synchronous)."""

    def __init__(self, sb: Sandbox) -> None:
        self.sb = sb
        self.app = create_app(sb)
        self._token: str | None = None

    def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        async def go() -> httpx.Response:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url=BASE) as client:
                return await client.request(method, path, **kwargs)

        resp = asyncio.run(go())
        check_against_spec(method, path, resp)
        return resp

    def token(self) -> str:
        if self._token is None:
            resp = self.call("POST", "/connect/token", data=CREDENTIALS)
            assert resp.status_code == 200, resp.text
            self._token = resp.json()["access_token"]
        return self._token

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token()}", "ST-App-Key": self.sb.app_key}

    def get(self, path: str, **params: Any) -> httpx.Response:
        return self.call("GET", ROOT + path, params=params, headers=self.headers())

    def patch(self, path: str, body: Any) -> httpx.Response:
        return self.call("PATCH", ROOT + path, json=body, headers=self.headers())

    def ok(self, resp: httpx.Response) -> dict[str, Any]:
        assert resp.status_code == 200, resp.text
        data: dict[str, Any] = resp.json()
        return data


def ext(*pairs: tuple[str, str | None], mode: str | None = "Merge", guid: str = GUID) -> dict[str, Any]:
    body: dict[str, Any] = {"applicationGuid": guid, "externalData": [{"key": k, "value": v} for k, v in pairs]}
    if mode is not None:
        body["patchMode"] = mode
    return body


def customer_address(**overrides: Any) -> dict[str, Any]:
    return {"street": "100 Main St", "unit": "", "city": "Austin", "state": "TX", "zip": "78701",
            "country": "USA", "latitude": 30.2672, "longitude": -97.7431, **overrides}


@pytest.fixture
def sb() -> Sandbox:
    s = Sandbox(rate_limit_per_second=None)
    s.seed(customers=10, locations=14, seed=5)
    return s


@pytest.fixture
def api(sb: Sandbox) -> Api:
    return Api(sb)


def active_customer(sb: Sandbox) -> dict[str, Any]:
    return next(c for c in sb.customers() if c["active"])


def active_location(sb: Sandbox) -> dict[str, Any]:
    return next(loc for loc in sb.locations() if loc["active"])


# ------------------------------------------------------------------------------------------------- auth


def test_token_for_client_credentials(api: Api) -> None:
    resp = api.call("POST", "/connect/token", data=CREDENTIALS)
    body = api.ok(resp)
    assert body["token_type"] == "Bearer" and body["expires_in"] == 900 and body["access_token"]


@pytest.mark.parametrize(
    ("form", "error"),
    [
        ({**CREDENTIALS, "client_secret": "wrong"}, "invalid_client"),
        ({**CREDENTIALS, "client_id": "someone-else"}, "invalid_client"),
        ({**CREDENTIALS, "grant_type": "password"}, "unsupported_grant_type"),
        ({k: v for k, v in CREDENTIALS.items() if k != "grant_type"}, "invalid_request"),
    ],
)
def test_token_refusals_are_oauth2_errors(api: Api, form: dict[str, str], error: str) -> None:
    resp = api.call("POST", "/connect/token", data=form)
    assert resp.status_code == 400
    assert resp.json()["error"] == error


def test_token_accepts_http_basic_client_authentication(api: Api) -> None:
    resp = api.call("POST", "/connect/token", data={"grant_type": "client_credentials"},
                    auth=("sandbox-client", "sandbox-secret"))
    assert resp.status_code == 200


def test_api_call_without_app_key_is_401_with_servicetitans_title(api: Api, sb: Sandbox) -> None:
    cid = active_customer(sb)["id"]
    resp = api.call("GET", f"{ROOT}/customers/{cid}", headers={"Authorization": f"Bearer {api.token()}"})
    assert resp.status_code == 401
    assert resp.json()["title"] == "Application key not present, check ST-App-Key header value."


@pytest.mark.parametrize(
    "headers",
    [
        {"ST-App-Key": "sandbox-app-key"},  # no token
        {"ST-App-Key": "sandbox-app-key", "Authorization": "Bearer not-a-token"},
        {"ST-App-Key": "another-app", "Authorization": "Bearer {token}"},
        {"ST-App-Key": "sandbox-app-key", "Authorization": "Basic {token}"},
    ],
)
def test_api_call_without_valid_credentials_is_401(api: Api, sb: Sandbox, headers: dict[str, str]) -> None:
    cid = active_customer(sb)["id"]
    sent = {k: v.format(token=api.token()) for k, v in headers.items()}
    resp = api.call("GET", f"{ROOT}/customers/{cid}", headers=sent)
    assert resp.status_code == 401
    assert resp.json()["status"] == 401


def test_token_expires_after_its_ttl_and_can_be_revoked() -> None:
    clock = FakeClock()
    sb = Sandbox(rate_limit_per_second=None, clock=clock)
    sb.seed(2, 2)
    api = Api(sb)
    cid = sb.customers()[0]["id"]
    assert api.get(f"/customers/{cid}").status_code == 200
    clock.advance(899)
    assert api.get(f"/customers/{cid}").status_code == 200
    clock.advance(2)
    assert api.get(f"/customers/{cid}").status_code == 401
    api._token = None
    assert api.get(f"/customers/{cid}").status_code == 200
    assert sb.expire_tokens() == 1  # the expired token was already forgotten when the new one was issued
    assert api.get(f"/customers/{cid}").status_code == 401


def test_tokens_are_bound_to_the_tenant(api: Api, sb: Sandbox) -> None:
    cid = active_customer(sb)["id"]
    resp = api.call("GET", f"/crm/v2/tenant/{TENANT + 1}/customers/{cid}", headers=api.headers())
    assert resp.status_code == 401
    assert api.get(f"/customers/{cid}").status_code == 200


# ------------------------------------------------------------------------------------------------- get by id


def test_get_by_id_returns_the_full_record_with_no_external_data(api: Api, sb: Sandbox) -> None:
    c, loc = active_customer(sb), active_location(sb)
    api.ok(api.patch(f"/customers/{c['id']}", {"externalData": ext(("mirrorId", "1"))}))
    got = api.ok(api.get(f"/customers/{c['id']}"))
    assert got["externalData"] == []  # GET takes no application guid
    assert {k: v for k, v in got.items() if k != "modifiedOn"} == {k: v for k, v in c.items() if k != "modifiedOn"}
    assert api.ok(api.get(f"/locations/{loc['id']}")) == sb.get_location(loc["id"])


@pytest.mark.parametrize("collection", ["customers", "locations"])
def test_unknown_id_is_404_for_get_and_patch(api: Api, collection: str) -> None:
    for resp in (api.get(f"/{collection}/999"), api.patch(f"/{collection}/999", {"name": "x"})):
        assert resp.status_code == 404
        assert resp.json()["status"] == 404


def test_ids_of_customers_and_locations_never_overlap(sb: Sandbox) -> None:
    assert min(c["id"] for c in sb.customers()) == FIRST_CUSTOMER_ID
    assert min(loc["id"] for loc in sb.locations()) == FIRST_LOCATION_ID
    with pytest.raises(RecordNotFound):
        sb.get_location(FIRST_CUSTOMER_ID)


# ------------------------------------------------------------------------------------------------- patch


def test_patch_changes_only_the_sent_fields(api: Api, sb: Sandbox) -> None:
    before = active_customer(sb)
    after = api.ok(api.patch(f"/customers/{before['id']}", {"doNotMail": not before["doNotMail"]}))
    changed = {k for k in before if before[k] != after[k]}
    assert changed == {"doNotMail", "modifiedOn"}
    assert sb.get_customer(before["id"]) == after


def test_location_patch_changes_only_the_sent_fields(api: Api, sb: Sandbox) -> None:
    before = active_location(sb)
    after = api.ok(api.patch(f"/locations/{before['id']}", {"name": "Back Office"}))
    assert {k for k in before if before[k] != after[k]} == {"name", "modifiedOn"}


def test_modified_on_strictly_increases_even_when_the_clock_stands_still(sb: Sandbox) -> None:
    sb.clock = FakeClock()
    api = Api(sb)
    c = active_customer(sb)
    stamps = [api.ok(api.patch(f"/customers/{c['id']}", {"name": f"Name {i}"}))["modifiedOn"] for i in range(5)]
    stamps.append(sb.edit_customer(c["id"], name="Remote")["modifiedOn"])
    assert all(ISO_UTC.match(s) for s in stamps)
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)
    assert stamps[0] > c["modifiedOn"]


def test_a_patch_that_changes_nothing_answers_200_and_still_advances_modified_on(api: Api, sb: Sandbox) -> None:
    c = active_customer(sb)
    same = api.ok(api.patch(f"/customers/{c['id']}", {"name": c["name"]}))
    assert same["name"] == c["name"] and same["modifiedOn"] > c["modifiedOn"]
    empty = api.ok(api.patch(f"/customers/{c['id']}", {}))
    assert empty["modifiedOn"] > same["modifiedOn"]


def test_noop_patches_keep_modified_on_when_configured(api: Api, sb: Sandbox) -> None:
    sb.bump_modified_on_noop = False
    c = active_customer(sb)
    assert api.ok(api.patch(f"/customers/{c['id']}", {"name": c["name"]}))["modifiedOn"] == c["modifiedOn"]
    assert api.ok(api.patch(f"/customers/{c['id']}", {"name": "New"}))["modifiedOn"] > c["modifiedOn"]


def test_servicetitan_normalises_what_it_stores(api: Api, sb: Sandbox) -> None:
    c = active_customer(sb)
    sent = customer_address(street="  12 Oak Ave ", unit="", city=" Dallas", state="tx ", zip=" 75201 ",
                            latitude=32.77671234567, longitude=-96.79701234567)
    got = api.ok(api.patch(f"/customers/{c['id']}", {"name": "  Ada Lovelace  ", "address": sent}))
    assert got["name"] == "Ada Lovelace"
    assert got["address"] == {"street": "12 Oak Ave", "unit": "", "city": "Dallas", "state": "TX", "zip": "75201",
                              "country": "USA", "latitude": 32.776712, "longitude": -96.797012}
    assert sb.get_customer(c["id"])["address"] == got["address"]


def test_location_address_without_coordinates_stores_none(api: Api, sb: Sandbox) -> None:
    loc = active_location(sb)
    address = {k: v for k, v in customer_address(unit="Suite 4").items() if k not in ("latitude", "longitude")}
    got = api.ok(api.patch(f"/locations/{loc['id']}", {"address": address}))
    assert got["address"]["latitude"] is None and got["address"]["longitude"] is None
    assert got["address"]["unit"] == "Suite 4"


@pytest.mark.parametrize("collection", ["customers", "locations"])
def test_custom_fields_and_tags_replace_the_whole_list(api: Api, sb: Sandbox, collection: str) -> None:
    entity: Entity = "customer" if collection == "customers" else "location"
    rid = (active_customer(sb) if entity == "customer" else active_location(sb))["id"]
    types = sorted(sb.custom_field_types[entity])
    first = api.ok(api.patch(f"/{collection}/{rid}", {
        "tagTypeIds": [103, 101, 103],
        "customFields": [{"typeId": types[0], "value": "a"}, {"typeId": types[1], "value": "b"}],
    }))
    assert first["tagTypeIds"] == [101, 103]
    assert [(cf["typeId"], cf["value"]) for cf in first["customFields"]] == [(types[0], "a"), (types[1], "b")]
    assert all(cf["name"] == sb.custom_field_types[entity][cf["typeId"]] for cf in first["customFields"])
    second = api.ok(api.patch(f"/{collection}/{rid}", {"tagTypeIds": [102],
                                                       "customFields": [{"typeId": types[1], "value": "c"}]}))
    assert second["tagTypeIds"] == [102]
    assert [(cf["typeId"], cf["value"]) for cf in second["customFields"]] == [(types[1], "c")]
    assert api.ok(api.patch(f"/{collection}/{rid}", {"tagTypeIds": []}))["tagTypeIds"] == []


def test_location_can_move_to_another_customer_and_tax_zone(api: Api, sb: Sandbox) -> None:
    loc = active_location(sb)
    other = next(c for c in sb.customers() if c["id"] != loc["customerId"])
    zone = sorted(sb.tax_zone_ids)[-1]
    got = api.ok(api.patch(f"/locations/{loc['id']}", {"customerId": other["id"], "taxZoneId": zone}))
    assert (got["customerId"], got["taxZoneId"]) == (other["id"], zone)


# ------------------------------------------------------------------------------------------------- external data


def test_external_data_replace_is_the_default_and_drops_keys_not_sent(api: Api, sb: Sandbox) -> None:
    cid = active_customer(sb)["id"]
    api.ok(api.patch(f"/customers/{cid}", {"externalData": ext(("a", "1"), ("b", "2"), mode="Replace")}))
    got = api.ok(api.patch(f"/customers/{cid}", {"externalData": ext(("b", "3"), mode=None)}))
    assert got["externalData"] == [{"key": "b", "value": "3"}]
    got = api.ok(api.patch(f"/customers/{cid}", {"externalData": {**ext(("c", "4")), "patchMode": None}}))
    assert got["externalData"] == [{"key": "c", "value": "4"}]
    assert sb.external_data("customer", cid)[GUID] == {"c": "4"}


def test_external_data_merge_changes_only_sent_keys_and_null_deletes(api: Api, sb: Sandbox) -> None:
    lid = active_location(sb)["id"]
    api.ok(api.patch(f"/locations/{lid}", {"externalData": ext(("a", "1"), ("b", "2"))}))
    got = api.ok(api.patch(f"/locations/{lid}", {"externalData": ext(("b", "20"), ("c", "3"))}))
    assert got["externalData"] == [{"key": "a", "value": "1"}, {"key": "b", "value": "20"}, {"key": "c", "value": "3"}]
    got = api.ok(api.patch(f"/locations/{lid}", {"externalData": ext(("a", None), ("zz", None))}))
    assert got["externalData"] == [{"key": "b", "value": "20"}, {"key": "c", "value": "3"}]


def test_external_data_is_scoped_by_application_guid(api: Api, sb: Sandbox) -> None:
    cid = active_customer(sb)["id"]
    api.ok(api.patch(f"/customers/{cid}", {"externalData": ext(("mirrorId", "7"), guid=OTHER_GUID)}))
    mine = api.ok(api.patch(f"/customers/{cid}", {"externalData": ext(("mirrorId", "1"), mode="Replace")}))
    assert mine["externalData"] == [{"key": "mirrorId", "value": "1"}]  # only the request's guid
    theirs = api.ok(api.patch(f"/customers/{cid}", {"externalData": ext(guid=OTHER_GUID.upper())}))
    assert theirs["externalData"] == [{"key": "mirrorId", "value": "7"}]  # Replace under OTHER_GUID untouched
    assert api.ok(api.patch(f"/customers/{cid}", {"name": "x"}))["externalData"] == []  # no guid in the request
    assert sb.external_data("customer", cid) == {GUID: {"mirrorId": "1"}, OTHER_GUID: {"mirrorId": "7"}}
    assert sb.get_customer(cid, GUID)["externalData"] == [{"key": "mirrorId", "value": "1"}]
    for resp in (api.get(f"/customers/{cid}"), api.get("/customers", ids=str(cid)), api.get("/export/customers")):
        body = resp.json()
        for rec in body.get("data", [body]):
            assert rec["externalData"] == []


def test_list_with_an_application_guid_shows_and_filters_that_guids_data(api: Api, sb: Sandbox) -> None:
    a, b = [c["id"] for c in sb.customers() if c["active"]][:2]
    api.ok(api.patch(f"/customers/{a}", {"externalData": ext(("mirrorId", "11"))}))
    api.ok(api.patch(f"/customers/{b}", {"externalData": ext(("mirrorId", "12"))}))
    page = api.ok(api.get("/customers", externalDataApplicationGuid=GUID, externalDataKey="mirrorId",
                          externalDataValues="12,99"))
    assert [(r["id"], r["externalData"]) for r in page["data"]] == [(b, [{"key": "mirrorId", "value": "12"}])]


def test_seeded_external_data_of_another_application_stays_invisible(sb: Sandbox) -> None:
    big = Sandbox(rate_limit_per_second=None)
    big.seed(200, 0, seed=1)
    owners = [c["id"] for c in big.customers() if OTHER_APP_GUID in big.external_data("customer", c["id"])]
    assert owners
    assert big.get_customer(owners[0], GUID)["externalData"] == []


# ------------------------------------------------------------------------------------------------- validation


SEED_PAGE_CUSTOMER_EXAMPLE: dict[str, Any] = {
    "name": "string", "type": {},
    "address": {"street": "string", "unit": "string", "city": "string", "state": "string", "zip": "string",
                "country": "string", "latitude": 0, "longitude": 0},
    "customFields": [{"typeId": 0, "value": "string"}],
    "externalData": {"patchMode": {}, "applicationGuid": "string",
                     "externalData": [{"key": "string", "value": "string"}]},
    "doNotMail": True, "doNotService": True, "active": True, "tagTypeIds": [0],
}
SEED_PAGE_LOCATION_EXAMPLE: dict[str, Any] = {
    "customerId": 0, "name": "string",
    "address": {"street": "string", "unit": "string", "city": "string", "state": "string", "zip": "string",
                "country": "string", "latitude": 0, "longitude": 0},
    "active": True, "taxZoneId": 0, "customFields": [{"typeId": 0, "value": "string"}], "tagTypeIds": [0],
    "externalData": {"patchMode": {}, "applicationGuid": "string",
                     "externalData": [{"key": "string", "value": "string"}]},
}


def _fill_placeholders(example: dict[str, Any]) -> dict[str, Any]:
    body = {**example, "externalData": {**example["externalData"], "patchMode": "Merge"}}
    if "type" in body:
        body["type"] = "Residential"
    return body


@pytest.mark.parametrize(("entity", "example"), [("customer", SEED_PAGE_CUSTOMER_EXAMPLE),
                                                 ("location", SEED_PAGE_LOCATION_EXAMPLE)])
def test_seed_page_examples_are_accepted_once_enum_placeholders_are_real_values(
        api: Api, sb: Sandbox, entity: Entity, example: dict[str, Any]) -> None:
    """The seed pages' example bodies (copied verbatim from crm-v2-customers-update.txt and
    crm-v2-locations-update.txt) carry ``"type": {}`` and ``"patchMode": {}``: documentation placeholders that the
    spec's enums cannot accept. Decision: the examples count as valid once each placeholder is replaced by a
    real enum value ("Residential", "Merge"); everything else is taken as written. Sent to the sandbox with ids
    and the guid swapped for real ones, they are applied (200)."""
    schema = UPDATE_SCHEMAS[entity]
    assert set(validate(schema, example)) == ({"type", "externalData.patchMode"} if entity == "customer"
                                              else {"externalData.patchMode"})
    body = _fill_placeholders(example)
    assert validate(schema, body) == {}
    body["externalData"]["applicationGuid"] = GUID
    types = sorted(sb.custom_field_types[entity])
    body.update(customFields=[{"typeId": types[0], "value": "string"}], tagTypeIds=[101])
    if entity == "customer":
        got = api.ok(api.patch(f"/customers/{active_customer(sb)['id']}", body))
    else:
        body.update(customerId=active_customer(sb)["id"], taxZoneId=sorted(sb.tax_zone_ids)[0])
        got = api.ok(api.patch(f"/locations/{active_location(sb)['id']}", body))
    assert got["name"] == "string" and got["externalData"] == [{"key": "string", "value": "string"}]


def test_seed_page_response_examples_match_the_response_schemas() -> None:
    """The 200 examples of the seed pages, placeholders replaced as above, conform to the response schemas
    (the customer schema also requires ``nationalAccount``, which the seed page's example omits)."""
    address = SEED_PAGE_CUSTOMER_EXAMPLE["address"]
    common = {"id": 0, "active": True, "name": "string", "address": address,
              "customFields": [{"typeId": 0, "name": "string", "value": "string"}], "taxExempt": True,
              "tagTypeIds": [0], "createdOn": "string", "createdById": 0, "modifiedOn": "string", "mergedToId": 0,
              "externalData": [{"key": "string", "value": "string"}]}
    customer = {**common, "type": "Residential", "balance": 0, "doNotMail": True, "doNotService": True,
                "nationalAccount": False}
    location = {**common, "customerId": 0, "zoneId": 0, "taxZoneId": 0}
    assert validate(RESPONSE_SCHEMAS["customer"], customer) == {}
    assert validate(RESPONSE_SCHEMAS["location"], location) == {}


@pytest.mark.parametrize(
    ("collection", "body", "field"),
    [
        ("customers", {"address": {k: v for k, v in customer_address().items() if k != "latitude"}},
         "address.latitude"),
        ("customers", {"name": "x", "nickname": "y"}, "nickname"),
        ("customers", {"type": "Industrial"}, "type"),
        ("customers", {"doNotMail": "yes"}, "doNotMail"),
        ("customers", {"tagTypeIds": ["101"]}, "tagTypeIds[0]"),
        ("customers", {"externalData": {**ext(("k", "v")), "patchMode": "Upsert"}}, "externalData.patchMode"),
        ("customers", {"externalData": ext(("k", "v"), guid="not-a-guid")}, "externalData.applicationGuid"),
        ("customers", {"customFields": [{"typeId": 201}]}, "customFields[0].value"),
        ("locations", {"address": {"street": "1 Main", "city": "Austin", "state": "TX", "zip": "78701",
                                   "country": "USA"}}, "address.unit"),
        ("locations", {"customerId": "12"}, "customerId"),
        ("locations", {"balance": 3}, "balance"),
    ],
)
def test_what_the_schema_rejects_is_a_400_naming_the_field(
        api: Api, sb: Sandbox, collection: str, body: dict[str, Any], field: str) -> None:
    rid = (active_customer(sb) if collection == "customers" else active_location(sb))["id"]
    before = sb.get_customer(rid) if collection == "customers" else sb.get_location(rid)
    resp = api.patch(f"/{collection}/{rid}", body)
    assert resp.status_code == 400
    problem = resp.json()
    assert field in problem["errors"], problem
    assert problem["title"] == "One or more validation errors occurred." and problem["traceId"]
    after = sb.get_customer(rid) if collection == "customers" else sb.get_location(rid)
    assert after == before  # nothing applied


@pytest.mark.parametrize(
    ("collection", "body", "field"),
    [
        ("customers", {"name": ""}, "name"),
        ("locations", {"name": "   "}, "name"),
        ("customers", {"address": customer_address(street=" ")}, "address.street"),
        ("customers", {"address": customer_address(city="")}, "address.city"),
        ("customers", {"address": customer_address(zip="")}, "address.zip"),
        ("customers", {"tagTypeIds": [101, 999]}, "tagTypeIds"),
        ("locations", {"tagTypeIds": [5]}, "tagTypeIds"),
        ("locations", {"customFields": [{"typeId": 201, "value": "customer-only type"}]}, "customFields[0].typeId"),
    ],
)
def test_servicetitans_own_validation_is_a_400_too(
        api: Api, sb: Sandbox, collection: str, body: dict[str, Any], field: str) -> None:
    rid = (active_customer(sb) if collection == "customers" else active_location(sb))["id"]
    resp = api.patch(f"/{collection}/{rid}", body)
    assert resp.status_code == 400
    assert field in resp.json()["errors"]


@pytest.mark.parametrize(("body", "field"), [({"customerId": 123}, "customerId"), ({"taxZoneId": 777}, "taxZoneId")])
def test_location_patch_naming_an_unknown_customer_or_tax_zone_is_409(
        api: Api, sb: Sandbox, body: dict[str, Any], field: str) -> None:
    loc = active_location(sb)
    resp = api.patch(f"/locations/{loc['id']}", body)
    assert resp.status_code == 409
    assert field in resp.json()["errors"]
    assert sb.get_location(loc["id"]) == loc


def test_body_that_is_not_json_is_refused(api: Api, sb: Sandbox) -> None:
    cid = active_customer(sb)["id"]
    path = f"{ROOT}/customers/{cid}"
    garbage = api.call("PATCH", path, content=b"{name:", headers={**api.headers(), "Content-Type": "application/json"})
    assert garbage.status_code == 400
    wrong_type = api.call("PATCH", path, content=b"name=x", headers={**api.headers(), "Content-Type": "text/plain"})
    assert wrong_type.status_code == 415
    assert api.patch(f"/customers/{cid}", ["name"]).status_code == 400


def test_unknown_paths_and_methods_answer_problem_json(api: Api, sb: Sandbox) -> None:
    cid = active_customer(sb)["id"]
    assert api.call("GET", f"{ROOT}/jobs", headers=api.headers()).status_code == 404
    assert api.call("DELETE", f"{ROOT}/customers/{cid}", headers=api.headers()).status_code == 405


# ------------------------------------------------------------------------------------------------- lists


def test_list_is_active_only_by_default_and_pages_from_1(api: Api) -> None:
    sb = Sandbox(rate_limit_per_second=None)
    sb.seed(120, 0, seed=2)
    api = Api(sb)
    every = sb.customers()
    active = [c for c in every if c["active"]]
    assert len(active) < len(every)
    first = api.ok(api.get("/customers"))
    assert (first["page"], first["pageSize"], first["hasMore"], first["totalCount"]) == (1, 50, True, None)
    assert [c["id"] for c in first["data"]] == [c["id"] for c in active[:50]]
    third = api.ok(api.get("/customers", page=3, includeTotal="true"))
    assert third["hasMore"] is False and third["totalCount"] == len(active)
    assert [c["id"] for c in third["data"]] == [c["id"] for c in active[100:]]
    assert len(api.ok(api.get("/customers", active="Any", pageSize=5000))["data"]) == len(every)
    inactive = api.ok(api.get("/customers", active="False", pageSize=5000))["data"]
    assert inactive and all(not c["active"] for c in inactive)
    assert api.ok(api.get("/customers", pageSize=100000))["pageSize"] == 5000


def test_list_by_ids_and_the_50_id_limit_for_locations(api: Api, sb: Sandbox) -> None:
    ids = [c["id"] for c in sb.customers() if c["active"]][:3]
    got = api.ok(api.get("/customers", ids=",".join(str(i) for i in reversed(ids))))
    assert [c["id"] for c in got["data"]] == ids
    too_many = ",".join(str(FIRST_LOCATION_ID + i) for i in range(51))
    resp = api.get("/locations", ids=too_many)
    assert resp.status_code == 400 and "ids" in resp.json()["errors"]


def test_list_filters_by_modified_on_and_sorts(api: Api, sb: Sandbox) -> None:
    ids = [c["id"] for c in sb.customers() if c["active"]]
    edited = [sb.edit_customer(i, doNotMail=True) for i in (ids[2], ids[0])]
    since = edited[0]["modifiedOn"]
    got = api.ok(api.get("/customers", modifiedOnOrAfter=since))
    assert [c["id"] for c in got["data"]] == [ids[0], ids[2]]  # default order: id
    got = api.ok(api.get("/customers", modifiedOnOrAfter=since, sort="+ModifiedOn"))
    assert [c["id"] for c in got["data"]] == [ids[2], ids[0]]
    got = api.ok(api.get("/customers", modifiedBefore=since, sort="-Id"))
    assert ids[2] not in [c["id"] for c in got["data"]]
    assert [c["id"] for c in got["data"]] == sorted((c["id"] for c in got["data"]), reverse=True)
    locs = api.ok(api.get("/locations", customerId=sb.locations()[0]["customerId"], active="Any"))["data"]
    assert locs and {loc["customerId"] for loc in locs} == {sb.locations()[0]["customerId"]}


@pytest.mark.parametrize("params", [{"active": "Maybe"}, {"sort": "-Name"}, {"page": "0"}, {"pageSize": "x"},
                                   {"modifiedOnOrAfter": "yesterday"}, {"ids": "1,two"}])
def test_list_with_bad_parameters_is_400(api: Api, params: dict[str, str]) -> None:
    resp = api.get("/customers", **params)
    assert resp.status_code == 400
    assert set(resp.json()["errors"]) == set(params)


# ------------------------------------------------------------------------------------------------- exports


def drain_export(api: Api, collection: str, start: str | None = None, **params: Any) -> tuple[list[dict[str, Any]], str]:
    out: list[dict[str, Any]] = []
    token = start
    while True:
        page = api.ok(api.get(f"/export/{collection}", **({"from": token} if token else {}), **params))
        out += page["data"]
        token = page["continueFrom"]
        if not page["hasMore"]:
            return out, token


def test_export_from_the_beginning_has_every_record_in_modified_order(sb: Sandbox) -> None:
    sb.export_page_size = 4
    api = Api(sb)
    rows, _ = drain_export(api, "locations")
    assert sorted(r["id"] for r in rows) == sorted(loc["id"] for loc in sb.locations())
    assert [(r["modifiedOn"], r["id"]) for r in rows] == sorted((r["modifiedOn"], r["id"]) for r in rows)
    sb.edit_customer(sb.customers()[0]["id"], active=False)
    customers, _ = drain_export(api, "customers")
    assert len(customers) == len(sb.customers())  # inactive ones too
    assert not customers[-1]["active"]


def test_export_token_resumes_and_a_record_changed_after_it_comes_again(sb: Sandbox) -> None:
    sb.export_page_size = 3
    api = Api(sb)
    first = api.ok(api.get("/export/customers"))
    seen = first["data"]
    sb.edit_customer(seen[0]["id"], name="Changed after the token")
    rest, token = drain_export(api, "customers", first["continueFrom"])
    assert [r["id"] for r in rest][-1] == seen[0]["id"] and rest[-1]["name"] == "Changed after the token"
    assert len(rest) == len(sb.customers()) - len(seen) + 1
    empty = api.ok(api.get("/export/customers", **{"from": token}))
    assert (empty["data"], empty["hasMore"], empty["continueFrom"]) == ([], False, token)
    edited = sb.edit_customer(seen[1]["id"], doNotService=True)
    again = api.ok(api.get("/export/customers", **{"from": token}))
    assert [r["id"] for r in again["data"]] == [edited["id"]]


def test_export_from_a_date_starts_at_that_modified_on(api: Api, sb: Sandbox) -> None:
    rows, _ = drain_export(api, "customers")
    pivot = rows[len(rows) // 2]["modifiedOn"]
    later, _ = drain_export(api, "customers", pivot)
    assert [r["id"] for r in later] == [r["id"] for r in rows if r["modifiedOn"] >= pivot]
    assert drain_export(api, "customers", "2100-01-01")[0] == []
    all_again, _ = drain_export(api, "customers", "2000-01-01")
    assert len(all_again) == len(rows)


def test_export_without_recent_changes_hides_changes_younger_than_the_delay() -> None:
    clock = FakeClock()
    sb = Sandbox(rate_limit_per_second=None, clock=clock, export_delay_seconds=60)
    sb.seed(5, 0, seed=3)
    api = Api(sb)
    _, token = drain_export(api, "customers")
    cid = sb.customers()[0]["id"]
    sb.edit_customer(cid, name="Fresh")
    assert drain_export(api, "customers", token)[0] == []
    assert [r["name"] for r in drain_export(api, "customers", token, includeRecentChanges="true")[0]] == ["Fresh"]
    clock.advance(59)
    assert drain_export(api, "customers", token)[0] == []
    clock.advance(2)
    assert [r["name"] for r in drain_export(api, "customers", token)[0]] == ["Fresh"]


@pytest.mark.parametrize("start", ["not a token", "c3R4MXxsb2NhdGlvbnwxfDI"])  # the latter: a locations token
def test_export_with_a_bad_from_is_400(api: Api, start: str) -> None:
    resp = api.get("/export/customers", **{"from": start})
    assert resp.status_code == 400 and "from" in resp.json()["errors"]


# ------------------------------------------------------------------------------------------------- seed, edits


def test_seed_is_deterministic_and_looks_like_a_real_tenant() -> None:
    a, b, c = Sandbox(), Sandbox(), Sandbox()
    a.seed(300, 400, seed=11)
    b.seed(300, 400, seed=11)
    c.seed(300, 400, seed=12)
    assert a.customers() == b.customers() and a.locations() == b.locations()
    assert a.customers() != c.customers()
    customers, locations = a.customers(), a.locations()
    for rec in customers:
        assert validate(RESPONSE_SCHEMAS["customer"], rec) == {}
    for rec in locations:
        assert validate(RESPONSE_SCHEMAS["location"], rec) == {}
    addresses = [r["address"] for r in customers + locations]
    with_coords = [x for x in addresses if x["latitude"] is not None]
    assert 0.9 * len(addresses) < len(with_coords) < len(addresses)
    assert all(24 < x["latitude"] < 49 and -125 < x["longitude"] < -66 for x in with_coords)
    assert all(re.fullmatch(r"[A-Z]{2}", x["state"]) and re.fullmatch(r"\d{5}(-\d{4})?", x["zip"]) for x in addresses)
    assert 0 < sum(not r["active"] for r in customers) < 0.15 * len(customers)
    assert any(r["tagTypeIds"] for r in customers) and any(r["customFields"] for r in locations)
    assert {r["type"] for r in customers} == {"Residential", "Commercial"}
    assert {loc["customerId"] for loc in locations} <= {r["id"] for r in customers}
    assert all(r["createdOn"] <= r["modifiedOn"] for r in customers + locations)


def test_remote_edits_apply_like_servicetitan_and_advance_modified_on(sb: Sandbox) -> None:
    c = active_customer(sb)
    edited = sb.edit_customer(c["id"], address={"street": " 9 Elm St ", "state": "ok"}, balance=12.5)
    assert edited["address"]["street"] == "9 Elm St" and edited["address"]["state"] == "OK"
    assert edited["address"]["city"] == c["address"]["city"]  # partial address: the rest is kept
    assert edited["balance"] == 12.5 and edited["modifiedOn"] > c["modifiedOn"]
    with pytest.raises(ApiError) as bad:
        sb.edit_customer(c["id"], tagTypeIds=[4242])
    assert bad.value.status == 400
    with pytest.raises(ApiError) as unknown_field:
        sb.edit_customer(c["id"], nickname="x")
    assert "nickname" in unknown_field.value.errors
    with pytest.raises(RecordNotFound):
        sb.edit_location(1, name="x")
    loc = active_location(sb)
    with pytest.raises(ApiError) as conflict:
        sb.edit_location(loc["id"], customerId=5)
    assert conflict.value.status == 409


def test_created_records_are_complete_and_newest_in_the_feed(api: Api, sb: Sandbox) -> None:
    cust = sb.add_customer(name=" Newco ", type="Commercial", tagTypeIds=[101],
                           externalData=ext(("mirrorId", "77")))
    loc = sb.add_location(cust["id"], address={"street": "5 Pine Rd", "unit": None})
    assert cust["name"] == "Newco" and cust["active"] and cust["createdOn"] == cust["modifiedOn"]
    assert loc["name"] == "Newco" and loc["customerId"] == cust["id"] and loc["address"]["street"] == "5 Pine Rd"
    assert validate(RESPONSE_SCHEMAS["customer"], cust) == {}
    assert validate(RESPONSE_SCHEMAS["location"], loc) == {}
    assert sb.external_data("customer", cust["id"]) == {GUID: {"mirrorId": "77"}}
    rows, _ = drain_export(api, "locations")
    assert rows[-1]["id"] == loc["id"]
    with pytest.raises(ApiError) as missing:
        sb.add_location(123)
    assert missing.value.status == 409


def test_admin_endpoints(api: Api, sb: Sandbox) -> None:
    assert api.call("GET", "/_sandbox/health").json() == {"status": "ok", "tenantId": TENANT}
    assert api.call("POST", "/_sandbox/seed", json={"customers": 3, "locations": 4, "seed": 9}).json() == {
        "customers": 3, "locations": 4}
    cid = sb.customers()[0]["id"]
    created = api.call("POST", "/_sandbox/customers", json={"name": "Via Admin"})
    assert created.status_code == 201 and created.json()["name"] == "Via Admin"
    loc = api.call("POST", "/_sandbox/locations", json={"customerId": cid, "name": "Shed"}).json()
    assert loc["customerId"] == cid and loc["name"] == "Shed"
    edited = api.call("PATCH", f"/_sandbox/customers/{cid}", json={"name": "Edited In ServiceTitan"})
    assert edited.status_code == 200 and sb.get_customer(cid)["name"] == "Edited In ServiceTitan"
    assert api.call("PATCH", f"/_sandbox/locations/{loc['id']}", json={"taxZoneId": 4242}).status_code == 409
    assert api.call("PATCH", "/_sandbox/customers/5", json={"name": "x"}).status_code == 404
    assert api.call("GET", f"/_sandbox/locations/{loc['id']}").json()["name"] == "Shed"

    api.ok(api.get(f"/customers/{cid}"))
    assert api.call("GET", "/_sandbox/counters").json()["GET /customers/{id}"] == {"200": 1}
    log = api.call("GET", "/_sandbox/requests", params={"limit": 1}).json()["requests"]
    assert [(r["method"], r["record_id"], r["status"]) for r in log] == [("GET", cid, 200)]
    assert api.call("DELETE", "/_sandbox/requests").status_code == 204
    assert sb.requests == [] and sb.counters == {}

    faults = api.call("POST", "/_sandbox/faults", json={
        "seed": 4, "server_error_probability": 0.5,
        "rules": [{"fault": {"kind": "rate_limit", "retry_after": 3}, "times": 2, "record_id": cid}]}).json()
    assert faults["seed"] == 4 and faults["server_error_probability"] == 0.5 and faults["rules"][0]["times"] == 2
    cleared = api.call("POST", "/_sandbox/faults", json={"clear": True}).json()
    assert cleared["rules"] == [] and cleared["server_error_probability"] == 0
    assert api.call("POST", "/_sandbox/faults", json={"bogus": 1}).status_code == 400

    config = api.call("POST", "/_sandbox/config", json={"export_page_size": 2, "latency_ms": [0, 1]}).json()
    assert config["export_page_size"] == 2 and sb.latency_ms == (0, 1)
    api.ok(api.get(f"/customers/{cid}"))
    assert api.call("POST", "/_sandbox/tokens/expire").json() == {"expired": 1}
    assert api.get(f"/customers/{cid}").status_code == 401


def test_request_log_records_what_was_received_without_secrets(api: Api, sb: Sandbox) -> None:
    cid = active_customer(sb)["id"]
    api.patch(f"/customers/{cid}", {"name": "Logged"})
    token_call, patch_call = sb.requests
    assert token_call.endpoint == "POST /connect/token" and "client_secret" not in token_call.body
    assert "sandbox-secret" not in repr(sb.requests) and api.token() not in repr(sb.requests)
    assert (patch_call.method, patch_call.path, patch_call.body) == ("PATCH", f"{ROOT}/customers/{cid}",
                                                                     {"name": "Logged"})
    assert (patch_call.status, patch_call.record_id, patch_call.entity, patch_call.applied) == (200, cid, "customer",
                                                                                              True)
    assert sb.counters == {"POST /connect/token": {200: 1}, "PATCH /customers/{id}": {200: 1}}
    assert sb.count_requests(status=200) == 2
    sb.reset_log()
    assert sb.requests == [] and sb.count_requests() == 0


# ------------------------------------------------------------------------------------------------- fuzz

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 2**40) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
_text = st.text(max_size=12)
_address = st.fixed_dictionaries(
    {k: _text for k in ("street", "unit", "city", "state", "zip", "country")},
    optional={"latitude": st.floats(-90, 90) | st.none(), "longitude": st.floats(-180, 180) | st.none(),
              "extra": _json},
)
_external = st.fixed_dictionaries(
    {"applicationGuid": st.sampled_from([GUID, OTHER_GUID.upper(), "nope"]),
     "externalData": st.lists(st.fixed_dictionaries({"key": st.sampled_from(["a", "b", ""])},
                                                    optional={"value": st.none() | _text}), max_size=3)},
    optional={"patchMode": st.sampled_from(["Replace", "Merge", None, "Other"])},
)
_ids = st.lists(st.sampled_from([101, 102, 110, 0, 999]), max_size=3)
_fields = st.lists(st.fixed_dictionaries({"typeId": st.sampled_from([201, 202, 301, 302, 7])},
                                         optional={"value": _text}), max_size=3)
_BODIES = {
    "customer": st.fixed_dictionaries({}, optional={
        "name": _text | _json, "type": st.sampled_from(["Residential", "Commercial", "Other"]),
        "address": _address | _json, "customFields": _fields, "externalData": _external | _json,
        "doNotMail": st.booleans() | _json, "active": st.booleans(), "tagTypeIds": _ids,
        "creditLimit": st.floats(0, 1e6) | _json, "unknownField": _json}),
    "location": st.fixed_dictionaries({}, optional={
        "name": _text, "customerId": st.sampled_from([FIRST_CUSTOMER_ID, FIRST_CUSTOMER_ID + 1, 5]) | _json,
        "address": _address | _json, "taxZoneId": st.sampled_from([1, 11, 77]) | _json, "customFields": _fields,
        "externalData": _external, "tagTypeIds": _ids | _json, "active": st.booleans()}),
}


@pytest.mark.parametrize("entity", ["customer", "location"])
def test_any_patch_body_is_applied_or_refused_with_400_or_409_never_a_crash(entity: Entity) -> None:
    sb = Sandbox(rate_limit_per_second=None)
    sb.seed(2, 2, seed=1)
    rid = FIRST_CUSTOMER_ID if entity == "customer" else FIRST_LOCATION_ID

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(body=_BODIES[entity])
    def patch(body: dict[str, Any]) -> None:
        try:
            got = sb.api_patch(entity, rid, body)
        except ApiError as exc:
            assert exc.status in (400, 409) and exc.errors
            assert validate("ApiErrorResponse", exc.body()) == {}
            return
        assert validate(RESPONSE_SCHEMAS[entity], got) == {}
        assert validate(UPDATE_SCHEMAS[entity], body) == {}

    patch()
