"""The one reconciler (``sync.core.merge.merge``) given a PATCH answer (``answer_to``): pure examples of what the
dispatcher stores after a 2xx. The pull's side of the same function is in test_merge.py."""

from __future__ import annotations

from typing import Any

from sync.core.merge import MergeResult, Policy, merge
from tests.unit.test_merge import T0, customer, later


def answer(base: dict[str, Any], local: dict[str, Any], remote: dict[str, Any], sent: dict[str, Any],
           policy: Policy = "remote_wins", *, claimed: dict[str, Any] | None = None) -> MergeResult:
    return merge("customer", base, local, remote, policy, remote_modified_on=T0, local_changed_at=None,
                 sync_active=True, answer_to=sent, claimed_base=claimed if claimed is not None else base)


def test_our_value_in_servicetitans_stored_form_is_taken_without_a_conflict() -> None:
    base = customer(name="Ada")
    local = customer(name="ada lovelace ")
    r = answer(base, local, customer(name="Ada Lovelace", modified_on=later(base)), {"name": "ada lovelace "})
    assert r.mirror_updates["name"] == "Ada Lovelace" and r.new_shadow["name"] == "Ada Lovelace"
    assert not r.conflicts and not r.push_needed


def test_a_value_edited_again_while_in_flight_is_kept_and_pushed_next() -> None:
    base = customer(name="Ada")
    r = answer(base, customer(name="Third"), customer(name="Second", modified_on=later(base)), {"name": "Second"})
    assert "name" not in r.mirror_updates and r.new_shadow["name"] == "Second"
    assert r.push_needed and not r.conflicts


def test_a_remote_edit_the_pull_has_not_seen_is_taken_where_the_mirror_is_unchanged() -> None:
    base = customer(name="Ada")
    remote = customer(name="B", do_not_mail=True, modified_on=later(base))
    r = answer(base, customer(name="B"), remote, {"name": "B"})
    assert r.mirror_updates["do_not_mail"] is True and r.new_shadow["do_not_mail"] is True
    assert not r.conflicts and not r.push_needed


def test_a_remote_edit_of_a_field_edited_locally_after_the_claim_is_a_conflict_by_policy() -> None:
    base = customer(name="Ada")
    local = customer(name="B", do_not_service=True)
    remote = customer(name="B", do_not_service=False, do_not_mail=True, modified_on=later(base))
    base_dns = customer(name="Ada", do_not_service=None)
    for policy, outcome in (("remote_wins", "remote"), ("local_wins", "local")):
        r = answer(base_dns, local, remote, {"name": "B"}, policy)  # type: ignore[arg-type]
        assert [(c.field, c.outcome) for c in r.conflicts] == [("do_not_service", outcome)]
        assert ("do_not_service" in r.mirror_updates) == (outcome == "remote")
        assert r.push_needed == (outcome == "local")


def test_an_answer_older_than_the_shadow_changes_nothing() -> None:
    claimed = customer(name="Ada")
    shadow = customer(name="B", do_not_mail=True, modified_on=later(claimed, 10))  # a pull saw ours, then more
    r = answer(shadow, customer(name="B", do_not_mail=True), customer(name="B", modified_on=later(claimed, 5)),
               {"name": "B"}, claimed=claimed)
    assert r.stale and r.mirror_updates == {} and r.new_shadow == shadow and not r.push_needed


def test_a_late_answer_lets_a_later_remote_revert_of_our_value_stand() -> None:
    claimed = customer(name="Ada")
    # ours applied (the answer's version), then ServiceTitan's user set the name back; a pull saw that version
    # and, with our PATCH still in flight, could not tell a revert from "not applied yet"
    shadow = customer(name="Ada", modified_on=later(claimed, 10))
    r = answer(shadow, customer(name="B"), customer(name="B", modified_on=later(claimed, 5)), {"name": "B"},
               claimed=claimed)
    assert r.stale and r.mirror_updates == {"name": "Ada"} and not r.push_needed


def test_a_late_answer_keeps_a_pulled_conflict_that_local_won() -> None:
    claimed = customer(name="Ada")
    shadow = customer(name="Remote", modified_on=later(claimed, 10))  # the pull recorded a conflict, local won
    r = answer(shadow, customer(name="B"), customer(name="B", modified_on=later(claimed, 5)), {"name": "B"},
               claimed=claimed)
    assert r.stale and r.mirror_updates == {} and r.push_needed  # B is sent again: what the conflict says


def test_the_address_is_ours_whole_and_a_pulled_winner_over_it_is_sent_again() -> None:
    base = customer(city="Springfield", state="IL")
    sent = {c: v for c, v in customer(city="Shelbyville", state="IL").items()
            if c in ("street", "unit", "city", "state", "zip", "country", "latitude", "longitude")}
    # a pull (remote wins) put ServiceTitan's state in the mirror; then our PATCH (whole address) landed
    pulled = customer(city="Springfield", state="MO", modified_on=later(base, 2))
    r = answer(pulled, pulled, customer(city="Shelbyville", state="IL", modified_on=later(base, 5)), sent,
               claimed=base)
    assert not r.conflicts and set(r.mirror_updates) == {"modified_on"}  # the mirror keeps the winner
    assert r.new_shadow["state"] == "IL" and r.push_needed  # the winner goes to ServiceTitan again
