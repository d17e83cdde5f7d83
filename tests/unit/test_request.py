"""Request building (sync.request): a local diff -> the minimal, validated PATCH body. Pure, no I/O."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from sync.core import openapi
from sync.core.diff import local_diff
from sync.core.fields import ADDRESS_PARTS, BY_COLUMN, Entity, equal, writable_fields
from sync.core.request import Patch, build_patch
from tests.unit.test_diff import customer, location

GUID = "5f2b8a7e-3c1d-4e6f-9a0b-1c2d3e4f5a6b"
MIRROR_ID = 42
MIRROR_ENTRY: dict[str, Any] = {"key": "mirrorId", "value": "42"}
RECORDS = {"customer": customer, "location": location}


def external(*entries: dict[str, Any]) -> dict[str, Any]:
    return {"patchMode": "Merge", "applicationGuid": GUID, "externalData": [MIRROR_ENTRY, *entries]}


def build(entity: Entity, shadow: dict[str, Any], *, mirror_id_key: str = "mirrorId", **changes: Any) -> Patch:
    mirror = {**shadow, **changes}
    diff = local_diff(entity, mirror, shadow, mirror_id_key=mirror_id_key)
    assert diff, "test setup: the change must produce a diff"
    return build_patch(entity, mirror, shadow, diff, mirror_id=MIRROR_ID, application_guid=GUID,
                       mirror_id_key=mirror_id_key)


def assert_valid(entity: Entity, patch: Patch) -> None:
    assert patch.problems == {}
    assert patch.valid
    assert openapi.validate(openapi.UPDATE_SCHEMAS[entity], patch.body) == {}


# ------------------------------------------------------------------------------------------ minimal bodies


@pytest.mark.parametrize("entity", ["customer", "location"])
def test_one_name_edit_sends_exactly_the_name_and_external_data(entity: Entity) -> None:
    patch = build(entity, RECORDS[entity](), name="Renamed")
    assert patch.body == {"name": "Renamed", "externalData": external()}
    assert_valid(entity, patch)


def test_read_only_changes_ride_along_never() -> None:
    patch = build("customer", customer(), name="Renamed", balance=1e6, modified_on="2031-01-01T00:00:00+00:00",
                  tax_exempt=True, merged_to_id=3)
    assert patch.body == {"name": "Renamed", "externalData": external()}


def test_flags_and_type_map_to_api_names() -> None:
    patch = build("customer", customer(), do_not_mail=True, do_not_service=True, type="Commercial", active=False)
    assert patch.body == {"type": "Commercial", "doNotMail": True, "doNotService": True, "active": False,
                          "externalData": external()}
    assert_valid("customer", patch)


def test_location_tax_zone_maps_to_tax_zone_id() -> None:
    patch = build("location", location(), tax_zone_id=8)
    assert patch.body == {"taxZoneId": 8, "externalData": external()}
    assert_valid("location", patch)


# ------------------------------------------------------------------------------------------------ address


def test_customer_city_edit_sends_all_eight_address_fields_with_null_unit_as_empty() -> None:
    patch = build("customer", customer(unit=None), city="Shelbyville")
    assert patch.body == {
        "address": {"street": "12 Analytical Way", "unit": "", "city": "Shelbyville", "state": "IL",
                    "zip": "62701", "country": "USA", "latitude": 39.7817, "longitude": -89.6501},
        "externalData": external(),
    }
    assert_valid("customer", patch)


def test_customer_coordinate_edit_sends_the_whole_address() -> None:
    patch = build("customer", customer(unit="4"), latitude=40.0)
    assert patch.body["address"] == {"street": "12 Analytical Way", "unit": "4", "city": "Springfield",
                                     "state": "IL", "zip": "62701", "country": "USA", "latitude": 40.0,
                                     "longitude": -89.6501}
    assert_valid("customer", patch)


def test_location_city_edit_sends_the_whole_address_with_null_coordinates() -> None:
    patch = build("location", location(latitude=None, longitude=None), city="Shelbyville")
    assert patch.body == {
        "address": {"street": "12 Analytical Way", "unit": "B", "city": "Shelbyville", "state": "IL",
                    "zip": "62701", "country": "USA", "latitude": None, "longitude": None},
        "externalData": external(),
    }
    assert_valid("location", patch)


def test_location_address_carries_coordinates_when_set() -> None:
    patch = build("location", location(latitude=41.0, longitude=-87.5, unit=None), zip="62702")
    assert patch.body["address"] == {"street": "12 Analytical Way", "unit": "", "city": "Springfield",
                                     "state": "IL", "zip": "62702", "country": "USA", "latitude": 41.0,
                                     "longitude": -87.5}
    assert_valid("location", patch)


def test_customer_address_change_with_null_coordinates_is_not_valid_and_invents_nothing() -> None:
    patch = build("customer", customer(latitude=None, longitude=None), city="Shelbyville")
    assert not patch.valid
    assert set(patch.problems) == {"latitude", "longitude"}
    assert "latitude" not in patch.body["address"]
    assert "longitude" not in patch.body["address"]
    # the body as built would be refused by ServiceTitan's schema: it must never be sent
    errors = openapi.validate(openapi.UPDATE_SCHEMAS["customer"], patch.body)
    assert set(errors) == {"address.latitude", "address.longitude"}
    line = patch.problem_line()
    assert line.startswith("latitude: ") and "; longitude: " in line


def test_clearing_one_customer_coordinate_is_a_problem_on_that_column() -> None:
    patch = build("customer", customer(), longitude=None)
    assert set(patch.problems) == {"longitude"}


def test_a_null_address_text_part_is_a_problem_on_that_column() -> None:
    patch = build("location", location(), street=None)
    assert not patch.valid
    assert set(patch.problems) == {"street"}


# ---------------------------------------------------------------------------------------- lists and maps


def test_custom_fields_go_as_the_full_list_sorted_by_numeric_type_id() -> None:
    shadow = customer(custom_fields={"10": "blue", "2": "x", "11": "large"})
    patch = build("customer", shadow, custom_fields={"11": "small", "10": "blue", "2": "x"})
    assert patch.body == {
        "customFields": [{"typeId": 2, "value": "x"}, {"typeId": 10, "value": "blue"},
                         {"typeId": 11, "value": "small"}],
        "externalData": external(),
    }
    assert_valid("customer", patch)


def test_removing_every_custom_field_sends_an_empty_list() -> None:
    patch = build("location", location(), custom_fields={})
    assert patch.body == {"customFields": [], "externalData": external()}
    assert_valid("location", patch)


@pytest.mark.parametrize(("bad", "fragment"), [
    ([{"typeId": 10, "value": "blue"}], "JSON object"),
    ({"ten": "blue"}, "'ten'"),
    ({"10": 5}, "must be a string"),
])
def test_malformed_custom_fields_are_a_problem_on_the_column(bad: Any, fragment: str) -> None:
    patch = build("customer", customer(), custom_fields=bad)
    assert not patch.valid
    assert set(patch.problems) == {"custom_fields"}
    assert fragment in " ".join(patch.problems["custom_fields"])


def test_tag_ids_go_as_the_full_sorted_deduplicated_list() -> None:
    patch = build("customer", customer(tag_type_ids=[1, 3]), tag_type_ids=[100, 4, 30, 4])
    assert patch.body == {"tagTypeIds": [4, 30, 100], "externalData": external()}
    assert_valid("customer", patch)


@pytest.mark.parametrize("entity", ["customer", "location"])
def test_an_emptied_tag_list_is_sent_as_an_empty_list(entity: Entity) -> None:
    patch = build(entity, RECORDS[entity](tag_type_ids=[1, 3]), tag_type_ids=[])
    assert patch.body == {"tagTypeIds": [], "externalData": external()}
    assert_valid(entity, patch)


def test_non_integer_tag_ids_are_a_problem_on_the_column() -> None:
    patch = build("customer", customer(), tag_type_ids=["vip"])
    assert set(patch.problems) == {"tag_type_ids"}


# ------------------------------------------------------------------------------------------ external data


def test_external_data_sends_changed_and_added_keys_and_removed_keys_as_null() -> None:
    shadow = customer(external_data={"mirrorId": "42", "crm": "A-1", "old": "x", "keep": "k"})
    patch = build("customer", shadow, external_data={"mirrorId": "42", "crm": "A-2", "new": "n", "keep": "k"})
    assert patch.body == {"externalData": external(
        {"key": "crm", "value": "A-2"}, {"key": "new", "value": "n"}, {"key": "old", "value": None})}
    assert_valid("customer", patch)


def test_a_key_set_to_null_locally_is_removed() -> None:
    shadow = customer(external_data={"mirrorId": "42", "crm": "A-1"})
    patch = build("customer", shadow, external_data={"mirrorId": "42", "crm": None})
    assert patch.body == {"externalData": external({"key": "crm", "value": None})}
    assert_valid("customer", patch)


def test_the_mirror_id_entry_is_this_rows_id_whatever_the_local_external_data_says() -> None:
    patch = build("customer", customer(), name="Renamed", external_data={"mirrorId": "999", "crm": "A-1"})
    assert patch.body == {"name": "Renamed", "externalData": external()}


def test_the_mirror_id_key_is_configurable() -> None:
    shadow = customer(external_data={"stsyncId": "42", "crm": "A-1"})
    patch = build("customer", shadow, mirror_id_key="stsyncId",
                  external_data={"stsyncId": "1", "crm": "A-2"})
    assert patch.body == {"externalData": {
        "patchMode": "Merge", "applicationGuid": GUID,
        "externalData": [{"key": "stsyncId", "value": "42"}, {"key": "crm", "value": "A-2"}]}}
    assert_valid("customer", patch)


def test_non_string_external_data_value_is_a_problem_on_the_column() -> None:
    patch = build("customer", customer(), external_data={"mirrorId": "42", "crm": "A-1", "n": 5})
    assert set(patch.problems) == {"external_data"}


# ------------------------------------------------------------------------------- location customer, enums


def test_location_customer_change_sends_servicetitans_customer_id() -> None:
    patch = build("location", location(), customer_st_id=6002)
    assert patch.body == {"customerId": 6002, "externalData": external()}
    assert_valid("location", patch)


def test_location_customer_unknown_to_servicetitan_is_a_problem_on_customer_id() -> None:
    patch = build("location", location(), customer_st_id=None)
    assert not patch.valid
    assert set(patch.problems) == {"customer_id"}
    assert "st_id" in patch.problems["customer_id"][0]


def test_type_outside_the_enum_is_a_problem_on_type() -> None:
    patch = build("customer", customer(), type="Industrial")
    assert not patch.valid
    assert set(patch.problems) == {"type"}
    assert "Industrial" in patch.problems["type"][0]


@pytest.mark.parametrize("entity", ["customer", "location"])
def test_a_null_name_is_a_problem_on_name(entity: Entity) -> None:
    patch = build(entity, RECORDS[entity](), name=None)
    assert not patch.valid
    assert set(patch.problems) == {"name"}


def test_problems_are_reported_per_column_together() -> None:
    patch = build("customer", customer(latitude=None), name=None, type="Industrial", city="X")
    assert set(patch.problems) == {"name", "type", "latitude"}


# ----------------------------------------------------------------------------------------- property test

_text = st.text(min_size=0, max_size=20)
_lat = st.floats(min_value=-90, max_value=90, allow_nan=False, allow_infinity=False)
_lon = st.floats(min_value=-180, max_value=180, allow_nan=False, allow_infinity=False)
_ids = st.lists(st.integers(min_value=1, max_value=2**62), max_size=5)
_custom = st.dictionaries(st.integers(min_value=1, max_value=10**9).map(str), _text, max_size=4)
_ext = st.dictionaries(_text.filter(lambda k: k != "mirrorId"), _text, max_size=4)


def _address(entity: Entity) -> dict[str, st.SearchStrategy[Any]]:
    coord_lat = _lat if entity == "customer" else st.none() | _lat
    coord_lon = _lon if entity == "customer" else st.none() | _lon
    return {"street": _text, "unit": st.none() | _text, "city": _text, "state": _text, "zip": _text,
            "country": _text, "latitude": coord_lat, "longitude": coord_lon}


def valid_record(entity: Entity) -> st.SearchStrategy[dict[str, Any]]:
    common: dict[str, st.SearchStrategy[Any]] = {
        "name": _text, **_address(entity), "active": st.booleans(), "tag_type_ids": _ids,
        "custom_fields": _custom, "external_data": _ext,
    }
    if entity == "customer":
        extra: dict[str, st.SearchStrategy[Any]] = {
            "type": st.sampled_from(["Residential", "Commercial"]), "do_not_mail": st.booleans(),
            "do_not_service": st.booleans(), "balance": st.floats(allow_nan=False)}
    else:
        extra = {"customer_st_id": st.integers(min_value=1, max_value=2**62),
                 "tax_zone_id": st.integers(min_value=1, max_value=2**62), "zone_id": st.integers(1, 99)}
    return st.fixed_dictionaries({**common, **extra})


WRITABLE = {e: [f.column for f in writable_fields(e)] for e in ("customer", "location")}


def check_random_patch(entity: Entity, shadow: dict[str, Any], other: dict[str, Any], columns: list[str]) -> None:
    mirror = {**shadow, **{c: other[c] for c in columns}}
    changed = {c for c in WRITABLE[entity] if not equal(BY_COLUMN[entity][c].kind, mirror[c], shadow[c])}
    diff = local_diff(entity, mirror, shadow)
    assert set(diff) == changed
    assume(diff)
    patch = build_patch(entity, mirror, shadow, diff, mirror_id=MIRROR_ID, application_guid=GUID)
    assert_valid(entity, patch)

    address_changed = any(c in changed for c in ADDRESS_PARTS)
    expected_keys = {BY_COLUMN[entity][c].api for c in changed if c not in ADDRESS_PARTS}
    expected_keys |= {"externalData"} | ({"address"} if address_changed else set())
    assert set(patch.body) == expected_keys

    if address_changed:
        expected_address = {p: mirror[p] for p in ADDRESS_PARTS}
        expected_address["unit"] = mirror["unit"] if mirror["unit"] is not None else ""
        assert patch.body["address"] == expected_address
    for c in changed - set(ADDRESS_PARTS) - {"external_data"}:
        f = BY_COLUMN[entity][c]
        sent = patch.body[f.api]
        if f.kind == "id_list":
            assert sent == sorted(set(mirror[c]))
        elif f.kind == "custom_fields":
            assert sent == sorted(({"typeId": int(k), "value": v} for k, v in mirror[c].items()),
                                  key=lambda i: i["typeId"])
        else:
            assert sent == mirror[c]

    entries = patch.body["externalData"]["externalData"]
    assert patch.body["externalData"]["patchMode"] == "Merge"
    assert patch.body["externalData"]["applicationGuid"] == GUID
    assert entries[0] == MIRROR_ENTRY
    local, base = mirror["external_data"], shadow["external_data"]
    expected_entries = [{"key": k, "value": local[k]} for k in sorted(local) if base.get(k) != local[k]]
    expected_entries += [{"key": k, "value": None} for k in sorted(base) if k not in local]
    assert entries[1:] == (expected_entries if "external_data" in changed else [])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_customer_changes_send_exactly_the_changed_api_fields_and_validate(data: st.DataObject) -> None:
    shadow = data.draw(valid_record("customer"))
    other = data.draw(valid_record("customer"))
    columns = data.draw(st.lists(st.sampled_from(WRITABLE["customer"]), min_size=1, unique=True))
    check_random_patch("customer", shadow, other, columns)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_location_changes_send_exactly_the_changed_api_fields_and_validate(data: st.DataObject) -> None:
    shadow = data.draw(valid_record("location"))
    other = data.draw(valid_record("location"))
    columns = data.draw(st.lists(st.sampled_from(WRITABLE["location"]), min_size=1, unique=True))
    check_random_patch("location", shadow, other, columns)
