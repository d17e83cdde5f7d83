"""Convergence (DESIGN.md invariants 1, 3 and 7) as a property over random interleavings of both sides' edits.

A few records (4 customers, 2 locations) are loaded by a first pull; then a random list of operations runs
through the daemon's own jobs against a fresh in-process sandbox:

- ``Local``: a local application's committed SQL UPDATE of a mirror column (``name``, ``do_not_mail``,
  ``city`` i.e. the address, ``tag_type_ids``, ``custom_fields``); some values carry blanks ServiceTitan trims;
- ``Remote``: an edit made inside ServiceTitan (``Sandbox.edit_customer`` / ``edit_location``) of the same kinds;
- ``Push``: detect + dispatch; ``Pull``: drain the export feeds (three-way merge); ``Detect``: detect alone (the
  daemon schedules detect and dispatch separately, so a pull can find a pending outbox row).

Once quiet (pull, detect, dispatch repeated until no outbox row is pending or in flight and the change log is
empty, then a final pull) the property is:

1. **Convergence**: the mirror row equals ServiceTitan's record field by field for every record (all writable
   fields except ``external_data``, and every read-only field: ``modified_on``, ``balance``, ...).
2. **No lost update** per (record, merge unit): the final value is the last local or the last remote write of
   that unit (the initial value if neither side wrote it). A write whose value is not the final one must have
   been legitimately overwritten:
   - it lost a conflict, recorded in ``conflicts`` (field = the unit: the column, or ``address``) after it;
   - or it reached the other side (a PATCH carried it / a pull or a PATCH response brought it into the mirror)
     and the other side wrote again later;
   - or it restored the last-synced value (three-way merge cannot tell that from "not changed": ABA);
   - or, for a remote write only, the acknowledged window: ServiceTitan's PATCH has no precondition, so a remote
     edit made after the last pull and before a push of the same unit is overwritten by that push without a
     conflict. In the model, a remote write of unit U whose next sync point for its record (a pull, the check
     before sending, or a PATCH of that record) is a PATCH carrying U is *superseded by the local write*. The check
     before sending (a list request of the records about to be PATCHed) is a sync point like a pull, and its
     conflicts are read after each push.
3. Conflict outcomes follow the policy: ``remote_wins`` -> remote, ``local_wins`` -> local, ``newest_wins`` ->
   local iff the record's latest unsent local edit is newer than its latest change in ServiceTitan (checked
   where no outbox row is pending: the pending case has its own regression test at the end). No outbox row ends
   ``dead``, and a further detect + dispatch once quiet sends nothing (no echo, no no-op).

Values are compared in ServiceTitan's stored form (names and cities trimmed).

Run for each conflict policy. The default run is the quick profile; ``-m slow`` runs more examples.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine

from sync.config import Config
from sync.core.fields import BY_COLUMN, FIELDS, Entity, equal, record_from_api
from sync.core.merge import POLICIES
from sync.daemon.service import Daemon
from sync.db import mirror as records
from sync.sandbox import Sandbox
from tests.conftest import make_config, reset_tables
from tests.pushkit import rows, sql, transport

CUSTOMERS, LOCATIONS, SEED = 4, 2, 0  # seed 0: every customer has coordinates (an address PATCH needs them)
RECORDS: tuple[tuple[Entity, int], ...] = (
    *(("customer", i) for i in range(CUSTOMERS)), *(("location", i) for i in range(LOCATIONS)))
UNITS: dict[Entity, tuple[str, ...]] = {
    "customer": ("name", "do_not_mail", "address", "tag_type_ids", "custom_fields"),
    "location": ("name", "address", "tag_type_ids", "custom_fields"),
}
CUSTOM_TYPES: dict[Entity, tuple[int, ...]] = {"customer": (201, 202, 203), "location": (301, 302, 303)}
COMPARED: dict[Entity, tuple[str, ...]] = {
    e: tuple(f.column for f in FIELDS[e] if f.kind != "external_data") for e in FIELDS}
"""Every column but external_data: the writable ones and the read-only ones (modified_on, balance, ...)."""

# ------------------------------------------------------------------------------------------------ operations


class Local(NamedTuple):
    rec: int
    """index into RECORDS"""
    unit: str
    value: Any
    """abstract value (see ``_values``): str, bool, tuple of tag ids, or tuple of (custom type index, value)"""


class Remote(NamedTuple):
    rec: int
    unit: str
    value: Any


class Push(NamedTuple):
    pass


class Pull(NamedTuple):
    pass


class Detect(NamedTuple):
    """Detect alone: the daemon runs detect and dispatch on their own schedules, so a pull (or more edits) can
    come between a detect and the dispatch that sends its pending row."""


Op = Local | Remote | Push | Pull | Detect

_NAMES = st.sampled_from(("Acme", "Birch", "Cedar", " Acme"))  # ServiceTitan trims: " Acme" is stored as "Acme"
_CITIES = st.sampled_from(("Austin", "Boise", "Camden", "Boise "))
_TAGS = st.frozensets(st.sampled_from((101, 102, 103)), max_size=3).map(lambda s: tuple(sorted(s)))
_CUSTOM = st.dictionaries(st.integers(0, 2), st.sampled_from(("Yes", "No")), max_size=2).map(
    lambda d: tuple(sorted(d.items())))


VALUES: dict[str, st.SearchStrategy[Any]] = {"name": _NAMES, "address": _CITIES, "tag_type_ids": _TAGS,
                                             "custom_fields": _CUSTOM, "do_not_mail": st.booleans()}


def _values(entity: Entity) -> st.SearchStrategy[tuple[str, Any]]:
    return st.one_of([st.tuples(st.just(u), VALUES[u]) for u in UNITS[entity]])


def _any_edit(kind: type[Local] | type[Remote]) -> st.SearchStrategy[Op]:
    return st.integers(0, len(RECORDS) - 1).flatmap(
        lambda i: _values(RECORDS[i][0]).map(lambda uv: kind(i, uv[0], uv[1])))


def _hot_edit(kind: type[Local] | type[Remote], hot: list[tuple[int, str]]) -> st.SearchStrategy[Op]:
    return st.sampled_from(hot).flatmap(lambda ru: VALUES[ru[1]].map(lambda v: kind(ru[0], ru[1], v)))


def _ops(hot: tuple[list[int], list[str]]) -> st.SearchStrategy[list[Op]]:
    """Most edits hit the "hot" units (1-3) of the "hot" records (1-2), so both sides often touch the same unit,
    or the same record, between two syncs (conflicts, agreements, the push window, remote edits a PATCH response
    brings back); the rest go anywhere. About 2 operations in 7 are a push, a pull or a detect alone."""
    recs, units = hot
    pairs = [(r, u) for r in recs for u in units if u in UNITS[RECORDS[r][0]]] or [(recs[0], "name")]
    kinds: dict[str, st.SearchStrategy[Op]] = {
        "hot local": _hot_edit(Local, pairs), "hot remote": _hot_edit(Remote, pairs),
        "any local": _any_edit(Local), "any remote": _any_edit(Remote),
        "push": st.just(Push()), "pull": st.just(Pull()), "detect": st.just(Detect())}
    weights = {"hot local": 5, "hot remote": 5, "any local": 1, "any remote": 1, "push": 2, "pull": 2, "detect": 1}
    op = st.sampled_from([k for k, n in weights.items() for _ in range(n)]).flatmap(kinds.__getitem__)
    return st.lists(op, min_size=5, max_size=24)


_HOT = st.tuples(st.lists(st.integers(0, len(RECORDS) - 1), min_size=1, max_size=2, unique=True),
                 st.lists(st.sampled_from(UNITS["customer"]), min_size=1, max_size=3, unique=True))
OPS = _HOT.flatmap(_ops)


def _custom(entity: Entity, value: tuple[tuple[int, str], ...]) -> dict[str, str]:
    return {str(CUSTOM_TYPES[entity][i]): v for i, v in value}


def _model_value(entity: Entity, unit: str, value: Any) -> Any:
    """An operation's abstract value as the model compares it (see ``_unit_value``): ServiceTitan's stored form."""
    if unit == "custom_fields":
        return tuple(sorted(_custom(entity, value).items()))
    if unit in ("name", "address"):
        return value.strip()
    return value


def _unit_value(record: dict[str, Any], unit: str) -> Any:
    """A merge unit's value in a canonical record, hashable. The address: only the city is ever edited."""
    if unit == "address":
        return record["city"]
    if unit == "tag_type_ids":
        return tuple(record[unit])
    if unit == "custom_fields":
        return tuple(sorted(record[unit].items()))
    return record[unit]


def _ids(query: str) -> list[str]:
    """The ``ids`` of a list request's query string."""
    from urllib.parse import parse_qs

    return [i for v in parse_qs(query).get("ids", []) for i in v.split(",") if i.strip().isdigit()]


# ----------------------------------------------------------------------------------------------------- model


@dataclass
class Write:
    value: Any
    seq: int
    synced_once: bool = False
    """a sync point of its record (pull, or PATCH of the record) happened since"""
    settled: str | None = None
    """``aba`` (restored the base), ``seen`` (reached the other side), ``window`` (remote: superseded by a push)"""
    settled_seq: int = 0


@dataclass
class UnitModel:
    initial: Any
    base: Any
    """ServiceTitan's value at the record's last sync point (what the shadow should hold)"""
    local: Write | None = None
    remote: Write | None = None


@dataclass
class Model:
    units: dict[tuple[int, str], UnitModel] = field(default_factory=dict)
    conflicts: list[tuple[int, str, int, str]] = field(default_factory=list)
    """(record index, unit, seq, outcome)"""
    settled: set[str] = field(default_factory=set)
    """every kind of settling seen in this run (statistics)"""
    local_at: dict[int, int] = field(default_factory=dict)
    """record -> seq of its latest real local write (one the change log recorded) not yet sent by a PATCH"""
    remote_at: dict[int, int] = field(default_factory=dict)
    """record -> seq of ServiceTitan's latest change to it (a remote edit or one of our PATCHes): modifiedOn"""

    def newest_wins(self, rec: int) -> str:
        """Who must win a conflict on ``rec`` under newest_wins: the local side iff its latest unsent edit is
        newer than ServiceTitan's ``modifiedOn`` (ties, impossible here, go to remote); with no such edit the
        pull takes "now" (docs/pull.md), so local."""
        local = self.local_at.get(rec)
        return "local" if local is None or local > self.remote_at.get(rec, 0) else "remote"

    def sync(self, rec: int, st_record: dict[str, Any], seq: int, *, push_carried: set[str] | None) -> None:
        """A sync point of record ``rec``: a pull (``push_carried`` None) or a PATCH carrying those units."""
        for unit in UNITS[RECORDS[rec][0]]:
            m = self.units[rec, unit]
            now = _unit_value(st_record, unit)
            for side, w in (("local", m.local), ("remote", m.remote)):
                if w is None or w.settled is not None:
                    continue
                first, w.synced_once = not w.synced_once, True
                if first and w.value == m.base:
                    w.settled, w.settled_seq = "aba", seq
                elif side == "remote" and first and push_carried is not None and unit in push_carried:
                    w.settled, w.settled_seq = "window", seq
                elif w.value == now:
                    w.settled, w.settled_seq = "seen", seq
                if w.settled:
                    self.settled.add(f"{side} {w.settled}")
            m.base = now

    def conflict_after(self, rec: int, unit: str, seq: int) -> bool:
        return any(r == rec and u == unit and s > seq for r, u, s, _ in self.conflicts)


def _lost_ok(model: Model, rec: int, unit: str, lost: Write, other: Write | None) -> bool:
    """``lost`` (a last write whose value is not the final one) was legitimately overwritten."""
    if model.conflict_after(rec, unit, lost.seq) or lost.settled in ("aba", "window"):
        return True
    if lost.settled == "seen":
        return other is not None and other.seq > lost.settled_seq
    return False


# ------------------------------------------------------------------------------------------------------- run

_PATCH_UNITS = {"name": "name", "doNotMail": "do_not_mail", "address": "address", "tagTypeIds": "tag_type_ids",
                "customFields": "custom_fields"}


class Run:
    def __init__(self, engine: Engine, cfg: Config, sb: Sandbox, d: Daemon, *, strict_newest: bool) -> None:
        self.engine, self.cfg, self.sb, self.d = engine, cfg, sb, d
        self.strict_newest = strict_newest
        """check newest_wins outcomes also for records with a pending outbox row (see the regression test below)"""
        self.model = Model()
        self.seq = 0
        self.seen_requests = 0
        self.last_conflict_id = 0
        self.st_ids: list[int] = []
        self.mids: list[int] = []
        self.log: list[str] = []

    def st_record(self, rec: int) -> dict[str, Any]:
        entity, _ = RECORDS[rec]
        raw = (self.sb.get_customer if entity == "customer" else self.sb.get_location)(self.st_ids[rec])
        return record_from_api(entity, raw)

    async def start(self) -> None:
        customers = sorted(c["id"] for c in self.sb.customers())
        locations = sorted(loc["id"] for loc in self.sb.locations())
        self.st_ids = customers + locations
        await self.pull()  # the initial load, into an empty mirror
        by_st = {(e, s): m for e, s, m in rows(self.engine, """SELECT 'customer', st_id, id FROM customers
                                                              UNION ALL SELECT 'location', st_id, id FROM locations""")}
        self.mids = [by_st[RECORDS[i][0], s] for i, s in enumerate(self.st_ids)]
        for rec, (entity, _) in enumerate(RECORDS):
            st_rec = self.st_record(rec)
            for unit in UNITS[entity]:
                v = _unit_value(st_rec, unit)
                self.model.units[rec, unit] = UnitModel(initial=v, base=v)

    async def apply(self, op: Op) -> None:
        self.seq += 1
        self.log.append(f"{self.seq}: {op!r}")
        if isinstance(op, Local):
            self.local(op)
        elif isinstance(op, Remote):
            self.remote(op)
        elif isinstance(op, Push):
            await self.push()
        elif isinstance(op, Detect):
            result = await self.d.detect_job()
            assert not result.get("error"), f"detect job failed: {result}"
        else:
            await self.pull()

    def local(self, op: Local) -> None:
        entity, _ = RECORDS[op.rec]
        table = "customers" if entity == "customer" else "locations"
        column, value, cast = op.unit, op.value, ""
        if op.unit == "address":
            column = "city"
        elif op.unit == "tag_type_ids":
            value, cast = list(op.value), "bigint[]"
        elif op.unit == "custom_fields":
            value, cast = json.dumps(_custom(entity, op.value)), "jsonb"
        rhs = f"CAST(:v AS {cast})" if cast else ":v"
        logged = "SELECT count(*) FROM change_log WHERE entity = :e AND mirror_id = :m AND op = 'U'"
        before = rows(self.engine, logged, e=entity, m=self.mids[op.rec])[0][0]
        sql(self.engine, f"UPDATE {table} SET {column} = {rhs} WHERE id = :m", v=value, m=self.mids[op.rec])
        self.model.units[op.rec, op.unit].local = Write(_model_value(entity, op.unit, op.value), self.seq)
        if rows(self.engine, logged, e=entity, m=self.mids[op.rec])[0][0] > before:  # not a no-change UPDATE
            self.model.local_at[op.rec] = self.seq

    def remote(self, op: Remote) -> None:
        entity, _ = RECORDS[op.rec]
        api: dict[str, Any]
        if op.unit == "name":
            api = {"name": op.value}
        elif op.unit == "do_not_mail":
            api = {"doNotMail": op.value}
        elif op.unit == "address":
            api = {"address": {"city": op.value}}
        elif op.unit == "tag_type_ids":
            api = {"tagTypeIds": list(op.value)}
        else:
            api = {"customFields": [{"typeId": int(t), "value": v} for t, v in _custom(entity, op.value).items()]}
        (self.sb.edit_customer if entity == "customer" else self.sb.edit_location)(self.st_ids[op.rec], **api)
        self.model.units[op.rec, op.unit].remote = Write(_model_value(entity, op.unit, op.value), self.seq)
        self.model.remote_at[op.rec] = self.seq

    async def push(self) -> list[Any]:
        pending = self.pending()
        # nothing but our PATCHes changes ServiceTitan during a push: its records as the check before sending saw
        before = {rec: self.st_record(rec) for rec in range(len(RECORDS))} if self.mids else {}
        for name, job in (("detect", self.d.detect_job), ("dispatch", self.d.dispatch_job)):
            result = await job()
            assert not result.get("error"), f"{name} job failed: {result}"
        new = self.sb.requests[self.seen_requests:]
        self.seen_requests += len(new)
        checked = sorted({self.st_ids.index(int(i)) for r in new if r.method == "GET" and r.record_id is None
                          and r.endpoint in ("GET /customers", "GET /locations") and r.status == 200
                          for i in _ids(r.query) if int(i) in self.st_ids})
        for rec in checked:  # the check before sending merged these records as a pull would: a sync point
            self.log.append(f"   checked {RECORDS[rec]} before sending")
            self.model.sync(rec, before[rec], self.seq, push_carried=None)
        self.read_conflicts(pending)
        patches = [r for r in new if r.method == "PATCH"]
        for r in patches:
            assert 200 <= r.status < 300 and r.record_id is not None, f"PATCH {r.path} answered {r.status}: {r.body}"
            rec = self.st_ids.index(r.record_id)
            carried = {_PATCH_UNITS[k] for k in r.body if k in _PATCH_UNITS}
            self.log.append(f"   PATCH {RECORDS[rec]} carried {sorted(carried)}")
            self.model.sync(rec, self.st_record(rec), self.seq, push_carried=carried)
            self.model.remote_at[rec] = self.seq
            self.model.local_at.pop(rec, None)
        dead = rows(self.engine, "SELECT id, mirror_id, last_error FROM outbox WHERE state = 'dead'")
        assert not dead, f"outbox rows ended dead: {dead}"
        return patches

    def pending(self) -> set[tuple[str, int]]:
        return {(e, m) for e, m in rows(self.engine, "SELECT entity, mirror_id FROM outbox "
                                                     "WHERE state IN ('pending', 'in_flight')")}

    async def pull(self) -> None:
        pending = self.pending()
        result = await self.d.pull_job()
        assert not result.get("error"), f"pull job failed: {result}"
        if self.mids:
            for rec in range(len(RECORDS)):
                self.model.sync(rec, self.st_record(rec), self.seq, push_carried=None)
        self.read_conflicts(pending)

    def read_conflicts(self, pending: set[tuple[str, int]]) -> None:
        new = rows(self.engine, "SELECT id, entity, mirror_id, field, outcome FROM conflicts WHERE id > :i ORDER BY id",
                   i=self.last_conflict_id)
        for cid, entity, mid, fld, outcome in new:
            self.last_conflict_id = cid
            rec = next(i for i, (e, _) in enumerate(RECORDS) if e == entity and self.mids[i] == mid)
            self.model.conflicts.append((rec, fld, self.seq, outcome))
            self.log.append(f"   conflict {RECORDS[rec]} {fld} -> {outcome}")
            if self.cfg.sync.conflict_policy == "newest_wins" and (self.strict_newest or (entity, mid) not in pending):
                expected = self.model.newest_wins(rec)
                assert outcome == expected, f"newest_wins: {RECORDS[rec]} {fld} went {outcome}, expected " \
                    f"{expected}\n" + "\n".join(self.log)

    async def quiesce(self) -> None:
        for _ in range(10):
            self.seq += 1
            self.log.append(f"{self.seq}: (quiesce) Pull() + Push()")
            await self.pull()
            await self.push()
            busy = rows(self.engine, "SELECT count(*) FROM outbox WHERE state IN ('pending', 'in_flight')")[0][0]
            if not busy and not rows(self.engine, "SELECT count(*) FROM change_log")[0][0]:
                break
        else:
            raise AssertionError("did not quiesce: outbox or change log never drained\n" + "\n".join(self.log))
        self.seq += 1
        self.log.append(f"{self.seq}: (final) Pull()")
        await self.pull()

    def check(self, policy: str) -> None:
        trace = "\n".join(self.log)
        with self.engine.connect() as conn:
            mirror = {e: records.load_mirror(conn, e, [self.mids[i] for i, (x, _) in enumerate(RECORDS) if x == e])
                      for e in ("customer", "location")}
        for rec, (entity, _) in enumerate(RECORDS):
            remote = self.st_record(rec)
            local = mirror[entity][self.mids[rec]].record
            diffs = {c: (local.get(c), remote.get(c)) for c in COMPARED[entity]
                     if not equal(BY_COLUMN[entity][c].kind, local.get(c), remote.get(c))}
            assert not diffs, f"{RECORDS[rec]} mirror != ServiceTitan (mirror, ST): {diffs}\n{trace}"
            for unit in UNITS[entity]:
                m = self.model.units[rec, unit]
                final = _unit_value(remote, unit)
                allowed = {w.value for w in (m.local, m.remote) if w is not None} or {m.initial}
                where = f"{RECORDS[rec]} {unit}: final {final!r}, local {m.local}, remote {m.remote}"
                assert final in allowed, f"{where}: not the last write of either side\n{trace}"
                if m.local is not None and final != m.local.value:
                    assert _lost_ok(self.model, rec, unit, m.local, m.remote), \
                        f"{where}: local write lost without a recorded conflict\n{trace}"
                if m.remote is not None and final != m.remote.value:
                    assert _lost_ok(self.model, rec, unit, m.remote, m.local), \
                        f"{where}: remote write lost without a recorded conflict\n{trace}"
        outcomes = {o for *_, o in self.model.conflicts}
        expected = {"remote_wins": {"remote"}, "local_wins": {"local"}}.get(policy, {"local", "remote"})
        assert outcomes <= expected, f"conflict outcomes {outcomes} under {policy}\n{trace}"


async def _run_example(engine: Engine, cfg: Config, ops: list[Op], strict_newest: bool) -> Run:
    sb = Sandbox(tenant_id=1, rate_limit_per_second=None)
    sb.seed(customers=CUSTOMERS, locations=LOCATIONS, seed=SEED)
    d = Daemon(cfg, engine=engine, transport=transport(sb))
    try:
        run = Run(engine, cfg, sb, d, strict_newest=strict_newest)
        await run.start()
        for op in ops:
            await run.apply(op)
        await run.quiesce()
        run.check(cfg.sync.conflict_policy)
        extra = await run.push()  # quiet: nothing left to send, and the pulled state is not echoed back
        assert not extra, f"quiet, yet a push sent {[(r.path, r.body) for r in extra]}\n" + "\n".join(run.log)
        return run
    finally:
        await d.close()


def _check(engine: Engine, database_url: str, policy: str, ops: list[Op], *, strict_newest: bool = False) -> Run:
    reset_tables(engine)
    cfg = make_config(database_url, sync={"conflict_policy": policy},
                      retry={"base_delay_seconds": 0.01, "max_delay_seconds": 0.05})
    return asyncio.run(_run_example(engine, cfg, ops, strict_newest))


def _events(run: Run) -> None:
    """What the example exercised (``--hypothesis-show-statistics``)."""
    for kind in ("local aba", "local seen", "remote aba", "remote seen", "remote window"):
        event(f"{kind}: {kind in run.model.settled}")
    n = len(run.model.conflicts)
    event(f"conflicts recorded: {'2+' if n > 1 else n}")


_HEALTH = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]


@pytest.mark.parametrize("policy", POLICIES)
@settings(max_examples=25, deadline=None, suppress_health_check=_HEALTH)
@given(ops=OPS)
def test_mirror_and_servicetitan_converge_without_lost_updates(engine: Engine, database_url: str, policy: str,
                                                                ops: list[Op]) -> None:
    _events(_check(engine, database_url, policy, ops))


@pytest.mark.slow
@pytest.mark.parametrize("policy", POLICIES)
@settings(max_examples=200, deadline=None, suppress_health_check=_HEALTH)
@given(ops=OPS)
def test_mirror_and_servicetitan_converge_without_lost_updates_slow(engine: Engine, database_url: str, policy: str,
                                                                     ops: list[Op]) -> None:
    _events(_check(engine, database_url, policy, ops))


def test_newest_wins_judges_the_local_edit_time_not_the_detect_time(engine: Engine, database_url: str) -> None:
    """Local edit (t1), remote edit of the same field (t2 > t1), detect (t3), pull: the remote edit is the newer
    one and must win; the pull takes t3 as the local time and keeps the older local value instead, then pushes it
    over the newer remote edit."""
    run = _check(engine, database_url, "newest_wins",
                 [Local(0, "name", "Acme"), Remote(0, "name", "Birch"), Detect(), Pull()], strict_newest=True)
    assert run.model.conflicts == [(0, "name", 4, "remote")]
