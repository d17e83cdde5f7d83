"""Local diff (sync.diff): which writable fields of a mirror row differ from the last-synced shadow."""

from __future__ import annotations

from typing import Any

import pytest

from sync.core.diff import local_diff
from sync.core.fields import Entity


def customer(**over: Any) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "name": "Ada Lovelace", "type": "Residential",
        "street": "12 Analytical Way", "unit": None, "city": "Springfield", "state": "IL", "zip": "62701",
        "country": "USA", "latitude": 39.7817, "longitude": -89.6501,
        "active": True, "do_not_mail": False, "do_not_service": False,
        "tag_type_ids": [1, 3], "custom_fields": {"10": "blue", "11": "large"},
        "external_data": {"mirrorId": "42", "crm": "A-1"},
        "balance": 12.5, "tax_exempt": False, "created_on": "2024-01-02T03:04:05+00:00", "created_by_id": 9,
        "modified_on": "2024-05-06T07:08:09+00:00", "merged_to_id": None,
    }
    rec.update(over)
    return rec


def location(**over: Any) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "customer_st_id": 5001, "name": "Main house",
        "street": "12 Analytical Way", "unit": "B", "city": "Springfield", "state": "IL", "zip": "62701",
        "country": "USA", "latitude": None, "longitude": None,
        "active": True, "tax_zone_id": 7, "tag_type_ids": [2], "custom_fields": {"20": "gate code 1234"},
        "external_data": {"mirrorId": "43"},
        "zone_id": 3, "tax_exempt": False, "created_on": "2024-01-02T03:04:05+00:00", "created_by_id": 9,
        "modified_on": "2024-05-06T07:08:09+00:00", "merged_to_id": None,
    }
    rec.update(over)
    return rec


RECORDS = {"customer": customer, "location": location}


@pytest.mark.parametrize("entity", ["customer", "location"])
def test_identical_records_have_an_empty_diff(entity: Entity) -> None:
    make = RECORDS[entity]
    assert local_diff(entity, make(), make()) == {}


def test_a_save_that_changes_nothing_has_an_empty_diff() -> None:
    # the same values in another order / another form: tags reordered and duplicated, maps reordered
    shadow = customer(tag_type_ids=[1, 3], custom_fields={"10": "blue", "11": "large"},
                      external_data={"mirrorId": "42", "crm": "A-1", "b": "2"})
    mirror = customer(tag_type_ids=[3, 1, 3], custom_fields={"11": "large", "10": "blue"},
                      external_data={"b": "2", "crm": "A-1", "mirrorId": "42"})
    assert local_diff("customer", mirror, shadow) == {}


def test_one_changed_field_is_the_whole_diff_with_base_and_local_value() -> None:
    assert local_diff("customer", customer(name="Ada King"), customer()) == {"name": ["Ada Lovelace", "Ada King"]}


def test_several_changed_fields_are_all_in_the_diff() -> None:
    mirror = customer(city="Shelbyville", do_not_mail=True, type="Commercial")
    assert local_diff("customer", mirror, customer()) == {
        "type": ["Residential", "Commercial"],
        "city": ["Springfield", "Shelbyville"],
        "do_not_mail": [False, True],
    }


@pytest.mark.parametrize("delta", [5e-7, -9e-7, 1e-9])
def test_coordinates_within_tolerance_are_equal(delta: float) -> None:
    shadow = customer()
    mirror = customer(latitude=shadow["latitude"] + delta, longitude=shadow["longitude"] - delta)
    assert local_diff("customer", mirror, shadow) == {}


def test_coordinates_beyond_tolerance_are_a_change() -> None:
    shadow = customer()
    mirror = customer(latitude=shadow["latitude"] + 2e-6)
    assert local_diff("customer", mirror, shadow) == {"latitude": [39.7817, 39.7817 + 2e-6]}


def test_coordinate_cleared_or_set_is_a_change() -> None:
    assert local_diff("customer", customer(longitude=None), customer()) == {"longitude": [-89.6501, None]}
    assert local_diff("location", location(latitude=41.5), location()) == {"latitude": [None, 41.5]}


def test_strings_compare_exactly() -> None:
    assert local_diff("customer", customer(city="springfield"), customer()) == {
        "city": ["Springfield", "springfield"]}
    assert local_diff("customer", customer(city="Springfield "), customer()) == {
        "city": ["Springfield", "Springfield "]}


def test_tag_type_ids_are_order_insensitive() -> None:
    assert local_diff("customer", customer(tag_type_ids=[3, 1]), customer(tag_type_ids=[1, 3])) == {}


def test_tag_type_ids_set_change_is_a_change() -> None:
    assert local_diff("customer", customer(tag_type_ids=[1]), customer(tag_type_ids=[1, 3])) == {
        "tag_type_ids": [[1, 3], [1]]}
    assert local_diff("location", location(tag_type_ids=[]), location(tag_type_ids=[2])) == {
        "tag_type_ids": [[2], []]}


def test_custom_fields_compare_as_a_map() -> None:
    shadow = customer(custom_fields={"10": "blue", "11": "large"})
    assert local_diff("customer", customer(custom_fields={"11": "large", "10": "blue"}), shadow) == {}
    changed = customer(custom_fields={"10": "blue", "11": "small"})
    assert local_diff("customer", changed, shadow) == {
        "custom_fields": [{"10": "blue", "11": "large"}, {"10": "blue", "11": "small"}]}
    removed = customer(custom_fields={"10": "blue"})
    assert local_diff("customer", removed, shadow) == {
        "custom_fields": [{"10": "blue", "11": "large"}, {"10": "blue"}]}


def test_external_data_compares_as_a_map() -> None:
    shadow = customer(external_data={"mirrorId": "42", "a": "1", "b": "2"})
    assert local_diff("customer", customer(external_data={"b": "2", "a": "1", "mirrorId": "42"}), shadow) == {}
    changed = customer(external_data={"mirrorId": "42", "a": "1", "b": "3"})
    assert local_diff("customer", changed, shadow) == {
        "external_data": [{"a": "1", "b": "2"}, {"a": "1", "b": "3"}]}


def test_mirror_id_key_in_external_data_is_never_diffed() -> None:
    shadow = customer(external_data={"mirrorId": "42", "a": "1"})
    for local in ({"mirrorId": "999", "a": "1"}, {"a": "1"}, {"mirrorId": None, "a": "1"}):
        assert local_diff("customer", customer(external_data=local), shadow) == {}
    # and a shadow without it (ServiceTitan had not stored it yet) is no change either
    assert local_diff("customer", customer(external_data={"mirrorId": "42", "a": "1"}),
                      customer(external_data={"a": "1"})) == {}


def test_mirror_id_key_is_configurable() -> None:
    shadow = customer(external_data={"stsyncId": "42", "mirrorId": "x"})
    mirror = customer(external_data={"stsyncId": "7", "mirrorId": "x"})
    assert local_diff("customer", mirror, shadow, mirror_id_key="stsyncId") == {}
    # with the custom key configured, "mirrorId" is an ordinary key again
    mirror2 = customer(external_data={"stsyncId": "42", "mirrorId": "y"})
    assert local_diff("customer", mirror2, shadow, mirror_id_key="stsyncId") == {
        "external_data": [{"mirrorId": "x"}, {"mirrorId": "y"}]}


@pytest.mark.parametrize(("column", "value"), [
    ("balance", 999.99), ("tax_exempt", True), ("created_on", "2020-01-01T00:00:00+00:00"),
    ("created_by_id", 1234), ("modified_on", "2030-01-01T00:00:00+00:00"), ("merged_to_id", 77),
])
def test_read_only_customer_fields_are_never_in_the_diff(column: str, value: Any) -> None:
    assert local_diff("customer", customer(**{column: value}), customer()) == {}


@pytest.mark.parametrize(("column", "value"), [("zone_id", 99), ("tax_exempt", True), ("merged_to_id", 5)])
def test_read_only_location_fields_are_never_in_the_diff(column: str, value: Any) -> None:
    assert local_diff("location", location(**{column: value}), location()) == {}


def test_bookkeeping_columns_are_never_in_the_diff() -> None:
    mirror = customer(sync_status="error", sync_error={"x": 1}, synced_at="2024-01-01", id=5, st_id=9)
    assert local_diff("customer", mirror, customer()) == {}


@pytest.mark.parametrize("entity", ["customer", "location"])
def test_active_is_excluded_when_sync_active_is_off(entity: Entity) -> None:
    make = RECORDS[entity]
    assert local_diff(entity, make(active=False), make(active=True), sync_active=False) == {}
    assert local_diff(entity, make(active=False), make(active=True), sync_active=True) == {"active": [True, False]}


def test_location_customer_and_tax_zone_are_diffed() -> None:
    assert local_diff("location", location(customer_st_id=6002, tax_zone_id=8), location()) == {
        "customer_st_id": [5001, 6002], "tax_zone_id": [7, 8]}


@pytest.mark.parametrize(("column", "bad"), [
    ("custom_fields", [{"typeId": 10, "value": "blue"}]),
    ("custom_fields", "blue"),
    ("external_data", ["crm", "A-1"]),
    ("tag_type_ids", ["not-a-number"]),
    ("tag_type_ids", 5),
])
def test_a_malformed_local_value_is_a_change_not_a_crash(column: str, bad: Any) -> None:
    shadow = customer()
    diff = local_diff("customer", customer(**{column: bad}), shadow)
    expected_base = shadow[column]
    if column == "external_data":
        expected_base = {"crm": "A-1"}  # the mirror-id key is stripped from what is compared
    assert diff == {column: [expected_base, bad]}


def test_missing_columns_compare_as_null() -> None:
    mirror = customer()
    del mirror["unit"]
    assert local_diff("customer", mirror, customer(unit=None)) == {}
    assert local_diff("customer", mirror, customer(unit="4")) == {"unit": ["4", None]}
