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


def test_a_created_record_takes_servicetitans_form_of_what_was_sent() -> None:
    from sync.core.create import merge_created, sent_values

    local = customer(name="acme  ", external_data={"crm": "A-1"})
    body = build_customer_create(local, 7, [(11, location())], application_guid=GUID).body
    sent = sent_values("customer", body, local)
    remote = customer(name="acme", external_data={"crm": "A-1"}, balance=0.0, modified_on="2026-12-01T10:00:00Z")
    result = merge_created("customer", local, remote, sent, sync_active=True)
    assert result.mirror_updates["name"] == "acme" and result.conflicts == []
    assert result.mirror_updates["modified_on"] == remote["modified_on"]  # read-only values come from ServiceTitan
    assert result.new_shadow["name"] == "acme" and not result.push_needed


def test_an_edit_made_while_the_create_was_on_its_way_is_kept_and_pushed() -> None:
    from sync.core.create import merge_created, sent_values

    sent_row = customer(name="Acme")
    sent = sent_values("customer", build_customer_create(sent_row, 7, [(11, location())],
                                                         application_guid=GUID).body, sent_row)
    local = customer(name="Acme Renamed")  # edited after the body was built
    result = merge_created("customer", local, customer(name="Acme"), sent, sync_active=True)
    assert "name" not in result.mirror_updates and result.push_needed


def test_a_value_a_create_cannot_carry_is_pushed_after_it() -> None:
    from sync.core.create import merge_created, sent_values

    local = customer(active=False)
    sent = sent_values("customer", build_customer_create(local, 7, [(11, location())], application_guid=GUID).body,
                       local)
    assert "active" not in sent
    result = merge_created("customer", local, customer(active=True), sent, sync_active=True)
    assert "active" not in result.mirror_updates and result.new_shadow["active"] is True and result.push_needed


def test_a_record_found_after_a_lost_answer_compares_with_what_the_earlier_attempt_sent() -> None:
    from sync.core.create import sent_values

    body = build_customer_create(customer(name="Second"), 7, [(11, location())], application_guid=GUID).body
    # the first attempt sent "First" and its answer was lost; the row says "Second" now: an edit, kept
    assert sent_values("customer", body, customer(name="Second"), [{"name": "First"}])["name"] == "First"
    assert sent_values("customer", body, customer(name="First"), [{"name": "First"}])["name"] == "First"


def test_the_mirror_ids_a_create_names() -> None:
    from sync.core.create import mirror_id_of, new_location_ids

    body = build_customer_create(customer(), 7, [(11, location()), (12, location())], application_guid=GUID).body
    assert new_location_ids(body) == [11, 12]
    assert mirror_id_of({"externalData": [{"key": "crm", "value": "9"}, {"key": "mirrorId", "value": "7"}]}) == 7
    assert mirror_id_of({"externalData": [{"key": "mirrorId", "value": "x"}]}) is None
    assert mirror_id_of({}) is None


def test_a_propagated_delete_is_a_valid_deactivation() -> None:
    from sync.core.plan import PatchSettings, deactivation

    patch = deactivation(PatchSettings(application_guid=GUID), "location", 5)
    assert patch.valid and patch.body["active"] is False
    assert patch.body["externalData"]["externalData"] == [{"key": "mirrorId", "value": "5"}]
