"""The one reconciler: three-way merge of a version of a record from ServiceTitan, base (shadow) x local (mirror)
x remote, into the new mirror values, the new shadow and the conflicts.

Pure: canonical records in (``sync.core.fields``), a ``MergeResult`` out; no I/O. Both places that learn a version
of a record call ``merge`` and store its result: the pull (``sync.stages.pull``, a feed record) and the dispatcher
(``sync.stages.dispatch``, a PATCH answer, with ``answer_to``). There is no second merge.

The record is split into *units* that merge independently:

- each plain writable column on its own;
- the address (every address column of the entity) as ONE unit, because a PATCH sends it whole;
- ``custom_fields`` and ``tag_type_ids`` each as one unit, compared as sets (``fields.equal``);
- read-only columns (and ``active`` when ``sync_active`` is off): ServiceTitan's value always wins;
- ``external_data``: ignored. Export rows and GET-by-id come back without our application guid, so an empty
  remote list says nothing about our keys; mirror and shadow keep what they have.

Per merge unit: changed only remotely -> mirror and shadow take the remote value; changed only locally -> left for
the push path (shadow stays base); changed on both sides to equal values -> agreed (shadow takes it); changed on
both sides differently -> a conflict, resolved by the policy. Whatever the outcome, the shadow takes the remote
value (that is what ServiceTitan holds now), so the same remote version seen again is a no-op and a local win
still shows in the mirror-vs-shadow diff, which the push path sends.

A version older than the shadow's (``modifiedOn``) never undoes it. A PATCH answer (``answer_to``: the values we
sent) differs from a feed record in three ways: a unit we sent is ours in the answer (ServiceTitan's stored form
of our value, never a conflict: the mirror takes it unless edited locally again meanwhile, which is then pushed);
``external_data`` is merged like any unit (the answer carries our application's keys); and a stale answer still
tells something: where the shadow (a later version) holds the claim's base value for a unit we sent, ServiceTitan
reverted our value after applying it, and the mirror takes the shadow's value if it was not edited again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache
from typing import Any, Literal, NamedTuple

from sync.core.fields import BY_COLUMN, FIELDS, Entity, address_columns, equal, parse_timestamp

Policy = Literal["remote_wins", "local_wins", "newest_wins"]
POLICIES: tuple[Policy, ...] = ("remote_wins", "local_wins", "newest_wins")
Winner = Literal["local", "remote"]
"""Which side a conflict went to."""
Mode = Literal["merge", "remote", "ignore"]


class Conflict(NamedTuple):
    """A unit changed on both sides to different values. Group values are a dict (address) or the set value."""

    field: str
    base: Any
    local: Any
    remote: Any
    outcome: Winner


@dataclass(frozen=True)
class MergeResult:
    mirror_updates: dict[str, Any]
    """Mirror columns to write (canonical values; locations may carry ``customer_st_id``)."""
    new_shadow: dict[str, Any]
    """The shadow after the merge (the whole record)."""
    conflicts: list[Conflict] = field(default_factory=list)
    push_needed: bool = False
    """The mirror still differs from the new shadow: local values must (still) go to ServiceTitan."""
    shadow_changed: bool = False
    stale: bool = False
    """The remote version is older than the shadow's (``modifiedOn``): ignored, nothing changes."""
    inserted: bool = False
    """The record was new to the mirror: ``mirror_updates`` is the whole remote record."""

    @property
    def changed(self) -> bool:
        """Anything to write (mirror or shadow)."""
        return bool(self.mirror_updates) or self.shadow_changed


@dataclass(frozen=True)
class Unit:
    name: str
    """Column name, or ``address`` for the address group (the name used in ``conflicts.field``)."""
    columns: tuple[str, ...]
    mode: Mode


_COMPARED: dict[Entity, tuple[str, ...]] = {
    e: tuple(f.column for f in FIELDS[e] if f.kind != "external_data") for e in FIELDS
}


@cache
def units(entity: Entity, sync_active: bool) -> tuple[Unit, ...]:
    """How the columns of ``entity`` merge (see the module docstring)."""
    out: list[Unit] = []
    addr = address_columns(entity)
    for f in FIELDS[entity]:
        if f.address:
            if f.column == addr[0]:
                out.append(Unit("address", addr, "merge"))
            continue
        if f.kind == "external_data":
            mode: Mode = "ignore"
        elif not f.writable or (f.column == "active" and not sync_active):
            mode = "remote"
        else:
            mode = "merge"
        out.append(Unit(f.column, (f.column,), mode))
    return tuple(out)


def unit_for_column(entity: Entity, column: str) -> str | None:
    """The unit name a mirror column belongs to (``customer_id`` and ``address`` accepted); None if unknown."""
    if column == "address" or column in address_columns(entity):
        return "address"
    if entity == "location" and column == "customer_id":
        return "customer_st_id"
    return column if column in BY_COLUMN[entity] else None


def _get(record: Mapping[str, Any] | None, unit: Unit) -> Any:
    """The unit's value in ``record``: the column value, or {column: value} for a group."""
    if record is None:
        return None
    if len(unit.columns) == 1 and unit.name == unit.columns[0]:
        return record.get(unit.columns[0])
    return {c: record.get(c) for c in unit.columns}


def _sent(base: Mapping[str, Any], sending: Mapping[str, Any]) -> dict[str, Any]:
    """What an in-flight PATCH carries: the base with the diff's values (an address goes whole)."""
    out = dict(base)
    out.update(sending)
    return out


def _eq(entity: Entity, unit: Unit, a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    by = BY_COLUMN[entity]
    return all(equal(by[c].kind, a.get(c), b.get(c)) for c in unit.columns)


def _differs(entity: Entity, all_units: Sequence[Unit], local: Mapping[str, Any], base: Mapping[str, Any]) -> bool:
    """The mirror still differs from the shadow on a unit stsync pushes: local values must (still) be sent."""
    return any(not _eq(entity, u, local, base) for u in all_units if u.mode != "remote")


def resolve(policy: Policy, remote_modified_on: datetime | None, local_changed_at: datetime | None) -> Winner:
    """Who wins a conflict. ``newest_wins``: the local change wins only if strictly newer (ties -> remote)."""
    if policy == "remote_wins":
        return "remote"
    if policy == "local_wins":
        return "local"
    if local_changed_at is None:
        return "remote"
    if remote_modified_on is None:
        return "local"
    return "local" if local_changed_at > remote_modified_on else "remote"


def answer_units(entity: Entity, sync_active: bool) -> tuple[Unit, ...]:
    """The units of a PATCH answer: ``external_data`` merges like any unit (the answer carries our keys)."""
    return tuple(Unit(u.name, u.columns, "merge") if u.mode == "ignore" else u for u in units(entity, sync_active))


_EXTERNAL: dict[Entity, Unit] = {e: Unit("external_data", ("external_data",), "merge") for e in FIELDS}


def _reverted_after_apply(entity: Entity, all_units: Sequence[Unit], shadow: Mapping[str, Any],
                          local: Mapping[str, Any], sent: Mapping[str, Any],
                          claimed_base: Mapping[str, Any]) -> dict[str, Any]:
    """A stale answer: the shadow is a later version. A unit we sent whose later version holds the claim's base
    value again was reverted in ServiceTitan after our PATCH applied; the mirror takes it (if not edited since)."""
    out: dict[str, Any] = {}
    ours = _sent(claimed_base, sent)
    for unit in all_units:
        if unit.mode != "merge" or not any(unit_for_column(entity, c) == unit.name for c in sent):
            continue
        if (_eq(entity, unit, shadow, claimed_base) and not _eq(entity, unit, shadow, ours)
                and _eq(entity, unit, local, ours)):
            by = BY_COLUMN[entity]
            out.update({c: shadow.get(c) for c in unit.columns if not equal(by[c].kind, shadow.get(c), local.get(c))})
    return out


def is_stale(base: Mapping[str, Any] | None, remote: Mapping[str, Any]) -> bool:
    """The remote version is older than the one the shadow was taken from (a repeat from includeRecentChanges)."""
    if base is None or not base.get("modified_on") or not remote.get("modified_on"):
        return False
    try:
        return parse_timestamp(remote["modified_on"]) < parse_timestamp(base["modified_on"])
    except (TypeError, ValueError):
        return False


def is_echo(entity: Entity, base: Mapping[str, Any], remote: Mapping[str, Any], *, sync_active: bool) -> bool:
    """The remote record equals the shadow on every field the pull reads (all but ``external_data``)."""
    if all(remote.get(c) == base.get(c) for c in _COMPARED[entity]):
        return True  # exact (the common case: a repeat, or our own PATCH seen again)
    return all(_eq(entity, u, remote, base) for u in units(entity, sync_active) if u.mode != "ignore")


def merge(entity: Entity, base: Mapping[str, Any] | None, local: Mapping[str, Any] | None,
          remote: Mapping[str, Any], policy: Policy, *, remote_modified_on: datetime | None,
          local_changed_at: datetime | None, sync_active: bool,
          in_flight: Mapping[str, Any] | None = None,
          unconfirmed: Sequence[Mapping[str, Any]] = (),
          answer_to: Mapping[str, Any] | None = None,
          claimed_base: Mapping[str, Any] | None = None) -> MergeResult:
    """Merge one remote record into the mirror row ``local`` against the shadow ``base``.

    ``local`` None: the record is new to the mirror; it is inserted as is (mirror and shadow := remote).
    ``base`` None with a mirror row: no common ancestor, every unit that differs is a conflict.
    ``in_flight``: {column: value} an in-flight PATCH is sending. Those units count as changed locally even where
    the mirror equals the base, and a remote value equal to the one being sent (our own PATCH seen in the feed
    before its answer was processed) is an agreement, not a conflict.
    ``unconfirmed``: what earlier attempts sent whose answers were lost ({column: value} each): ServiceTitan may
    have applied any of them, so a remote value equal to one of them is ours too.
    ``answer_to``: ``remote`` is ServiceTitan's answer to our PATCH that sent these {column: value}
    (``claimed_base``: the shadow that PATCH was planned against); see the module docstring.
    """
    if local is None:
        rec = dict(remote)
        return MergeResult(mirror_updates=rec, new_shadow=dict(rec), shadow_changed=True, inserted=True)
    answer = answer_to is not None
    all_units = answer_units(entity, sync_active) if answer else units(entity, sync_active)
    if is_stale(base, remote):
        reverted = {} if answer_to is None or base is None or claimed_base is None else \
            _reverted_after_apply(entity, all_units, base, local, answer_to, claimed_base)
        kept = {**local, **reverted}
        return MergeResult(mirror_updates=reverted, new_shadow=dict(base or {}), stale=True,
                           push_needed=base is not None and _differs(entity, all_units, kept, base))
    if base is not None and is_echo(entity, base, remote, sync_active=sync_active) and (
            not answer or _eq(entity, _EXTERNAL[entity], remote, base)):
        # an echo (our own PATCH, a repeat from includeRecentChanges): nothing to write at all
        return MergeResult(mirror_updates={}, new_shadow=dict(base),
                           push_needed=_differs(entity, all_units, local, base))

    # every body of ours ServiceTitan may have applied (or is applying): a remote value equal to one is ours
    versions = [dict(v) for v in (*unconfirmed, in_flight or {}, answer_to or {}) if v]
    forced = {u for u in (unit_for_column(entity, c) for v in versions for c in v) if u is not None}
    answered = {u for u in (unit_for_column(entity, c) for c in answer_to or {}) if u is not None}
    new_shadow: dict[str, Any] = dict(base) if base is not None else {}
    final: dict[str, Any] = dict(local)
    updates: dict[str, Any] = {}
    conflicts: list[Conflict] = []
    shadow_changed = base is None
    empty: Mapping[str, Any] = {}
    b = base if base is not None else empty

    def take_remote(unit: Unit, *, shadow: bool, mirror: bool) -> None:
        nonlocal shadow_changed
        by = BY_COLUMN[entity]
        for c in unit.columns:
            if shadow and (base is None or not equal(by[c].kind, remote.get(c), b.get(c))):
                new_shadow[c] = remote.get(c)
                shadow_changed = True
            if mirror and not equal(by[c].kind, remote.get(c), local.get(c)):
                updates[c] = final[c] = remote.get(c)

    for unit in all_units:
        if unit.mode == "ignore":
            if base is None:
                for c in unit.columns:
                    new_shadow[c] = remote.get(c)
            continue
        if unit.mode == "remote":
            take_remote(unit, shadow=True, mirror=True)
            continue
        if unit.name in answered:
            # our own value as ServiceTitan stored it: the mirror takes that form, unless edited again meanwhile
            assert answer_to is not None
            take_remote(unit, shadow=True, mirror=_eq(entity, unit, local, _sent(b, answer_to)))
            continue
        remote_changed = base is None or not _eq(entity, unit, remote, b)
        if not remote_changed:
            continue  # changed locally or not at all: the push path's business
        local_changed = base is None or unit.name in forced or not _eq(entity, unit, local, b)
        if not local_changed:
            take_remote(unit, shadow=True, mirror=True)
        elif _eq(entity, unit, local, remote) or (unit.name in forced and any(
                _eq(entity, unit, _sent(b, v), remote) for v in versions)):
            take_remote(unit, shadow=True, mirror=False)  # both sides made the same change
        else:
            outcome = resolve(policy, remote_modified_on, local_changed_at)
            conflicts.append(Conflict(unit.name, _get(base, unit), _get(local, unit), _get(remote, unit), outcome))
            take_remote(unit, shadow=True, mirror=outcome == "remote")

    push_needed = _differs(entity, all_units, final, new_shadow)
    return MergeResult(mirror_updates=updates, new_shadow=new_shadow, conflicts=conflicts,
                       push_needed=push_needed, shadow_changed=shadow_changed)
