"""Create bodies (sync.core.create, issue 17): what a new mirror row becomes, validated against the spec. Pure."""

from __future__ import annotations

from sync.core.create import build_customer_create, build_location_create
from sync.core.openapi import validate
from tests.unit.test_merge import customer, location

GUID = "5f2b8a7e-3c1d-4e6f-9a0b-1c2d3e4f5a6b"


def test_a_customer_goes_with_its_new_locations_in_one_valid_body() -> None:
    patch = build_customer_create(customer(external_data={"crm": "A-1"}), 7,
                                  [(11, location(name="Home")), (12, location(name="Shop", unit="2"))],
                                  application_guid=GUID)
    assert patch.valid, patch.problems
    assert validate("Crm.V2.Customers.CreateCustomerRequest", patch.body) == {}
    body = patch.body
    assert [loc["name"] for loc in body["locations"]] == ["Home", "Shop"]
    assert body["externalData"] == {"applicationGuid": GUID, "externalData": [{"key": "mirrorId", "value": "7"},
                                                                             {"key": "crm", "value": "A-1"}]}
    assert [loc["externalData"]["externalData"] for loc in body["locations"]] == [
        [{"key": "mirrorId", "value": "11"}], [{"key": "mirrorId", "value": "12"}]]
    assert "active" not in body and "balance" not in body and "customerId" not in body["locations"][0]
    assert body["locations"][0]["address"]["unit"] == ""  # a null unit goes as "", never invented otherwise


def test_a_customer_without_a_location_is_not_sent() -> None:
    patch = build_customer_create(customer(), 7, [], application_guid=GUID)
    assert not patch.valid and "insert a location row" in patch.problems["locations"][0]


def test_a_required_value_missing_on_the_mirror_row_names_its_column() -> None:
    patch = build_customer_create(customer(name=None), 7, [(11, location(city=None))], application_guid=GUID)
    assert "name" in patch.problems
    assert "location 11: city" in patch.problems


def test_a_location_of_a_customer_in_servicetitan_carries_its_customer_id() -> None:
    patch = build_location_create(location(customer_st_id=100), 12, application_guid=GUID)
    assert patch.valid, patch.problems
    assert patch.body["customerId"] == 100
    assert validate("Crm.V2.Locations.CreateLocationRequest", patch.body) == {}


def test_a_location_whose_customer_is_not_in_servicetitan_yet_is_not_sent_alone() -> None:
    patch = build_location_create(location(customer_st_id=None), 12, application_guid=GUID)
    assert not patch.valid and "created with that customer" in " ".join(patch.problems["customer_id"])
