"""The three-way merge (sync.merge): pure, so examples plus hypothesis properties over random base/local/remote."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from sync.core.fields import BY_COLUMN, FIELDS, Entity, equal
from sync.core.merge import Conflict, MergeResult, Policy, Unit, merge, resolve, units

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def customer(**over: Any) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "name": "Ada", "type": "Residential", "street": "1 Main St", "unit": None, "city": "Springfield",
        "state": "IL", "zip": "62701", "country": "USA", "latitude": 39.78, "longitude": -89.65,
        "active": True, "do_not_mail": False, "do_not_service": False, "tag_type_ids": [1, 2],
        "custom_fields": {"10": "gold"}, "external_data": {"mirrorId": "7"}, "balance": 0.0, "tax_exempt": False,
        "created_on": "2025-01-01T00:00:00+00:00", "created_by_id": 3, "modified_on": "2026-01-01T00:00:00+00:00",
        "merged_to_id": None,
    }
    rec.update(over)
    return rec


def location(**over: Any) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "customer_st_id": 100, "name": "Home", "street": "1 Main St", "unit": None, "city": "Springfield",
        "state": "IL", "zip": "62701", "country": "USA", "latitude": None, "longitude": None, "active": True,
        "tax_zone_id": None, "tag_type_ids": [], "custom_fields": {}, "external_data": {}, "zone_id": 4,
        "tax_exempt": False, "created_on": "2025-01-01T00:00:00+00:00", "created_by_id": 3,
        "modified_on": "2026-01-01T00:00:00+00:00", "merged_to_id": None,
    }
    rec.update(over)
    return rec


def run(base: dict[str, Any] | None, local: dict[str, Any] | None, remote: dict[str, Any],
        policy: Policy = "remote_wins", entity: Entity = "customer", *, local_at: datetime | None = None,
        remote_at: datetime | None = None, sync_active: bool = True,
        in_flight: dict[str, Any] | None = None, unconfirmed: tuple[dict[str, Any], ...] = ()) -> MergeResult:
    return merge(entity, base, local, remote, policy, remote_modified_on=remote_at or T0,
                 local_changed_at=local_at or T0, sync_active=sync_active, in_flight=in_flight,
                 unconfirmed=unconfirmed)


def later(rec: dict[str, Any], minutes: int = 5) -> str:
    return (datetime.fromisoformat(rec["modified_on"]) + timedelta(minutes=minutes)).isoformat()


# ------------------------------------------------------------------------------------------------ examples


def test_a_record_new_to_the_mirror_is_inserted_as_is() -> None:
    remote = customer()
    r = run(None, None, remote)
    assert r.inserted and r.mirror_updates == remote and r.new_shadow == remote
    assert not r.conflicts and not r.push_needed


def test_remote_equal_to_the_shadow_changes_nothing_even_with_local_edits() -> None:
    base = customer()
    r = run(base, customer(name="Local"), customer(tag_type_ids=[2, 1], latitude=39.7800000001))
    assert not r.changed and r.mirror_updates == {} and r.new_shadow == base and not r.conflicts
    assert r.push_needed  # the local edit is still to be pushed


def test_remote_only_change_goes_to_mirror_and_shadow() -> None:
    base = customer()
    remote = customer(name="Remote", modified_on=later(base))
    r = run(base, customer(), remote)
    assert r.mirror_updates == {"name": "Remote", "modified_on": remote["modified_on"]}
    assert r.new_shadow == {**base, "name": "Remote", "modified_on": remote["modified_on"]}
    assert not r.push_needed and not r.conflicts


def test_local_and_remote_edits_of_different_fields_both_survive() -> None:
    base = customer()
    local = customer(do_not_mail=True)
    remote = customer(name="Remote", modified_on=later(base))
    r = run(base, local, remote)
    assert r.mirror_updates == {"name": "Remote", "modified_on": remote["modified_on"]}
    assert r.new_shadow["do_not_mail"] is False  # still the base: the local edit stays in the diff
    assert r.push_needed and not r.conflicts


def test_both_sides_making_the_same_change_agree_without_conflict() -> None:
    base = customer()
    r = run(base, customer(name="Same"), customer(name="Same", modified_on=later(base)))
    assert r.mirror_updates == {"modified_on": later(base)}
    assert r.new_shadow["name"] == "Same" and not r.conflicts and not r.push_needed


def test_same_field_conflict_remote_wins() -> None:
    base = customer()
    r = run(base, customer(name="Local"), customer(name="Remote", modified_on=later(base)), "remote_wins")
    assert r.conflicts == [Conflict("name", "Ada", "Local", "Remote", "remote")]
    assert r.mirror_updates["name"] == "Remote" and r.new_shadow["name"] == "Remote" and not r.push_needed


def test_same_field_conflict_local_wins_keeps_mirror_and_needs_a_push() -> None:
    base = customer()
    r = run(base, customer(name="Local"), customer(name="Remote", modified_on=later(base)), "local_wins")
    assert r.conflicts == [Conflict("name", "Ada", "Local", "Remote", "local")]
    assert "name" not in r.mirror_updates
    # the shadow holds what ServiceTitan has now, so the repeat of this remote version is a no-op
    assert r.new_shadow["name"] == "Remote" and r.push_needed


def test_newest_wins_compares_modified_on_with_the_local_change_time() -> None:
    base = customer()
    local, remote = customer(name="Local"), customer(name="Remote", modified_on=later(base))
    newer = run(base, local, remote, "newest_wins", local_at=T0 + timedelta(seconds=1), remote_at=T0)
    older = run(base, local, remote, "newest_wins", local_at=T0 - timedelta(seconds=1), remote_at=T0)
    tie = run(base, local, remote, "newest_wins", local_at=T0, remote_at=T0)
    assert [c.outcome for c in newer.conflicts] == ["local"]
    assert [c.outcome for c in older.conflicts] == ["remote"]
    assert [c.outcome for c in tie.conflicts] == ["remote"]


def test_the_address_merges_as_one_value() -> None:
    base = customer()
    local = customer(street="2 Local Rd")
    remote = customer(city="Chicago", modified_on=later(base))
    won = run(base, local, remote, "remote_wins")
    assert [(c.field, c.outcome) for c in won.conflicts] == [("address", "remote")]
    c = won.conflicts[0]
    assert c.local["street"] == "2 Local Rd" and c.remote["city"] == "Chicago" and c.base["city"] == "Springfield"
    assert won.mirror_updates["street"] == "1 Main St" and won.mirror_updates["city"] == "Chicago"
    lost = run(base, local, remote, "local_wins")
    assert not {"street", "city"} & set(lost.mirror_updates)  # the local address stays whole
    assert lost.push_needed


def test_tags_and_custom_fields_compare_as_sets_and_merge_whole() -> None:
    base = customer(tag_type_ids=[1, 2], custom_fields={"10": "gold", "11": "x"})
    r = run(base, customer(tag_type_ids=[1, 2, 3], custom_fields={"10": "gold", "11": "x"}),
            customer(tag_type_ids=[1], custom_fields={"11": "x", "10": "gold"}, modified_on=later(base)))
    assert r.conflicts == [Conflict("tag_type_ids", [1, 2], [1, 2, 3], [1], "remote")]
    assert r.mirror_updates["tag_type_ids"] == [1] and "custom_fields" not in r.mirror_updates


def test_an_empty_remote_external_data_never_deletes_our_keys() -> None:
    base = customer(external_data={"mirrorId": "7"})
    r = run(base, customer(external_data={"mirrorId": "7", "note": "x"}),
            customer(external_data={}, name="Remote", modified_on=later(base)))
    assert "external_data" not in r.mirror_updates
    assert r.new_shadow["external_data"] == {"mirrorId": "7"}
    assert r.push_needed  # the local 'note' key is still a local change


def test_read_only_fields_always_take_the_remote_value() -> None:
    base = customer(balance=1.0)
    r = run(base, customer(balance=5.0), customer(balance=2.0, modified_on=later(base)), "local_wins")
    assert r.mirror_updates["balance"] == 2.0 and r.new_shadow["balance"] == 2.0 and not r.conflicts


def test_active_is_read_only_when_not_synced() -> None:
    base = customer(active=True)
    local, remote = customer(active=True, name="L"), customer(active=False, modified_on=later(base))
    off = run(base, customer(active=False, name="L"), customer(active=True, name="R", modified_on=later(base)),
              "local_wins", sync_active=False)
    assert [c.field for c in off.conflicts] == ["name"]
    assert off.mirror_updates["active"] is True and off.new_shadow["active"] is True
    on = run(base, local, remote, "local_wins", sync_active=True)
    assert on.mirror_updates["active"] is False


def test_an_older_remote_version_than_the_shadow_is_ignored() -> None:
    base = customer(name="Pushed", modified_on="2026-01-02T00:00:00+00:00")
    stale = customer(name="Before our patch", modified_on="2026-01-01T00:00:00+00:00")
    r = run(base, customer(name="Pushed"), stale)
    assert r.stale and not r.changed and not r.conflicts


def test_in_flight_fields_count_as_changed_locally() -> None:
    base = customer(name="Ada")
    # the mirror was edited back to the base while a PATCH carrying name="Sent" is in flight
    remote = customer(name="Other", modified_on=later(base))
    plain = run(base, customer(), remote, "local_wins")
    flying = run(base, customer(), remote, "local_wins", in_flight={"name": "Sent"})
    assert plain.mirror_updates["name"] == "Other" and not plain.conflicts
    assert [(c.field, c.outcome) for c in flying.conflicts] == [("name", "local")]
    assert "name" not in flying.mirror_updates and flying.push_needed
    addr = run(base, customer(), customer(city="X", modified_on=later(base)), "local_wins", in_flight={"zip": "1"})
    assert [c.field for c in addr.conflicts] == ["address"]


def test_any_body_of_ours_whose_answer_was_lost_is_an_agreement_while_a_newer_one_flies() -> None:
    base = customer(name="Ada")
    # two attempts' answers were lost ("First", "Second"); "Third" is in flight; the feed shows "First"
    for seen in ("First", "Second", "Third"):
        r = run(base, customer(name="Third"), customer(name=seen, modified_on=later(base)), "remote_wins",
                in_flight={"name": "Third"}, unconfirmed=({"name": "First"}, {"name": "Second"}))
        assert not r.conflicts and "name" not in r.mirror_updates, seen
    other = run(base, customer(name="Third"), customer(name="Office", modified_on=later(base)), "remote_wins",
                in_flight={"name": "Third"}, unconfirmed=({"name": "First"},))
    assert [(c.field, c.outcome) for c in other.conflicts] == [("name", "remote")]  # a real remote edit still is


def test_our_in_flight_patch_seen_in_the_feed_is_an_agreement() -> None:
    base = customer(name="Ada")
    # sent name="Sent"; the mirror was edited again to "Later" meanwhile; the feed already shows "Sent"
    r = run(base, customer(name="Later"), customer(name="Sent", modified_on=later(base)), "remote_wins",
            in_flight={"name": "Sent"})
    assert not r.conflicts and "name" not in r.mirror_updates
    assert r.new_shadow["name"] == "Sent" and r.push_needed  # "Later" still goes out


def test_without_a_base_every_difference_is_a_conflict() -> None:
    local = customer(name="Local", external_data={"k": "v"})
    r = run(None, local, customer(name="Remote"), "local_wins")
    assert [(c.field, c.base, c.outcome) for c in r.conflicts] == [("name", None, "local")]
    assert r.new_shadow["name"] == "Remote" and set(r.new_shadow) == set(local)
    assert r.push_needed


def test_location_customer_is_an_ordinary_field() -> None:
    base = location()
    r = run(base, location(), location(customer_st_id=200, modified_on=later(base)), entity="location")
    assert r.mirror_updates["customer_st_id"] == 200 and r.new_shadow["customer_st_id"] == 200


def test_resolve_without_timestamps() -> None:
    assert resolve("newest_wins", None, T0) == "local"
    assert resolve("newest_wins", T0, None) == "remote"


# ------------------------------------------------------------------------------------------------ properties

TEXTS = st.sampled_from([None, "a", "b", "c"])
VALUES: dict[str, st.SearchStrategy[Any]] = {
    "text": TEXTS,
    "float": st.sampled_from([None, 1.0, 2.5, -3.25]),
    "bool": st.booleans(),
    "int": st.sampled_from([None, 1, 2]),
    "timestamp": st.sampled_from(["2025-01-01T00:00:00+00:00", "2025-06-01T00:00:00+00:00"]),
    "id_list": st.lists(st.sampled_from([1, 2, 3]), max_size=3).map(lambda v: sorted(set(v))),
    "custom_fields": st.dictionaries(st.sampled_from(["1", "2"]), st.sampled_from(["x", "y"]), max_size=2),
    "external_data": st.dictionaries(st.sampled_from(["mirrorId", "k"]), st.sampled_from(["1", "2"]), max_size=2),
}


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[Entity, dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(entity, base, local, remote): local and remote are the base with random columns redrawn."""
    entity: Entity = draw(st.sampled_from(["customer", "location"]))
    base = {f.column: draw(VALUES[f.kind]) for f in FIELDS[entity]}
    base["modified_on"] = "2026-01-01T00:00:00+00:00"

    def edited(touch_modified: bool) -> dict[str, Any]:
        rec = dict(base)
        for f in FIELDS[entity]:
            if f.column != "modified_on" and draw(st.booleans()):
                rec[f.column] = draw(VALUES[f.kind])
        if touch_modified:
            rec["modified_on"] = "2026-01-02T00:00:00+00:00"
        return rec

    return entity, base, edited(False), edited(draw(st.booleans()))


def same(entity: Entity, unit: Unit, a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(equal(BY_COLUMN[entity][c].kind, a.get(c), b.get(c)) for c in unit.columns)


POLICY = st.sampled_from(["remote_wins", "local_wins", "newest_wins"])


@settings(max_examples=400, deadline=None)
@given(scenarios(), POLICY, st.booleans(), st.booleans())
def test_merge_follows_the_per_unit_rules(scn: Any, policy: Policy, local_newer: bool, sync_active: bool) -> None:
    entity, base, local, remote = scn
    local_at = T0 + timedelta(hours=1 if local_newer else -1)
    r = run(base, local, remote, policy, entity, local_at=local_at, remote_at=T0, sync_active=sync_active)
    if all(same(entity, u, remote, base) for u in units(entity, sync_active) if u.mode != "ignore"):
        assert not r.changed  # an echo: no writes at all (checked separately below)
        return
    final = {**local, **r.mirror_updates}
    won = resolve(policy, T0, local_at)
    expected_conflicts = []
    push = False
    for u in units(entity, sync_active):
        if u.mode == "ignore":
            assert not set(u.columns) & set(r.mirror_updates)
            assert same(entity, u, r.new_shadow, base)
            push = push or not same(entity, u, local, base)
            continue
        if u.mode == "remote":
            assert same(entity, u, final, remote) and same(entity, u, r.new_shadow, remote)
            continue
        lc, rc = not same(entity, u, local, base), not same(entity, u, remote, base)
        conflict = lc and rc and not same(entity, u, local, remote)
        if conflict:
            expected_conflicts.append(u.name)
        takes_remote = rc and (not lc or (conflict and won == "remote"))
        assert same(entity, u, final, remote if takes_remote else local), u.name
        assert same(entity, u, r.new_shadow, remote if rc else base), u.name
        push = push or (lc and not same(entity, u, local, remote) and not (rc and won == "remote"))
    assert [c.field for c in r.conflicts] == expected_conflicts
    assert all(c.outcome == won for c in r.conflicts)
    assert r.push_needed == push
    assert set(r.new_shadow) == set(base)


@settings(max_examples=300, deadline=None)
@given(scenarios(), POLICY, st.booleans())
def test_merging_the_same_remote_version_again_is_a_no_op(scn: Any, policy: Policy, sync_active: bool) -> None:
    entity, base, local, remote = scn
    first = run(base, local, remote, policy, entity, sync_active=sync_active)
    again = run(first.new_shadow, {**local, **first.mirror_updates}, remote, policy, entity, sync_active=sync_active)
    assert not again.changed and not again.conflicts
    assert again.push_needed == first.push_needed


@settings(max_examples=200, deadline=None)
@given(scenarios(), POLICY)
def test_remote_equal_to_base_is_always_a_no_op(scn: Any, policy: Policy) -> None:
    entity, base, local, _ = scn
    r = run(base, local, dict(base), policy, entity)
    assert not r.changed and not r.conflicts and r.new_shadow == base


@settings(max_examples=200, deadline=None)
@given(scenarios(), POLICY)
def test_after_pushing_what_is_left_both_sides_are_equal(scn: Any, policy: Policy) -> None:
    """Merge, then a successful push of the remaining local diff: mirror == ServiceTitan == shadow."""
    entity, base, local, remote = scn
    r = run(base, local, remote, policy, entity)
    mirror = {**local, **r.mirror_updates}
    servicetitan = dict(remote)
    for u in units(entity, True):
        if u.mode == "merge" and not same(entity, u, mirror, r.new_shadow):
            for c in u.columns:
                servicetitan[c] = mirror[c]
    for u in units(entity, True):
        if u.mode != "ignore":
            assert same(entity, u, mirror, servicetitan), u.name
