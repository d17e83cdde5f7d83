"""Housekeeping (`sync.housekeeping.prune`, the daemon's housekeeping job) deletes only what it should."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from sqlalchemy import Engine, text

from sync.daemon.service import Daemon
from sync.db import engine as db
from sync.stages.housekeeping import prune
from tests.conftest import make_config
from tests.pushkit import rows

ORPHAN = 990001  # a mirror id no customer or location has


def add_outbox(engine: Engine, state: str, *, mirror_id: int, completed: str | None, created: str = "1 minute",
               attempts: int = 0, entity: str = "customer") -> int:
    """An outbox row with ``completed_at = now() - completed`` (an interval; None: NULL) and ``attempts``
    rows in outbox_attempts."""
    with engine.begin() as conn:
        oid = int(conn.execute(text("""
            INSERT INTO outbox (entity, mirror_id, st_id, state, payload, diff, created_at, completed_at)
            VALUES (:e, :m, :m + 10000000, :s, '{"name": "x"}', '{"name": ["a", "x"]}',
                    now() - CAST(:cr AS interval), now() - CAST(:co AS interval)) RETURNING id"""),
            {"e": entity, "m": mirror_id, "s": state, "cr": created, "co": completed}).scalar_one())
        for n in range(1, attempts + 1):
            conn.execute(text("""INSERT INTO outbox_attempts (outbox_id, attempt, worker, started_at, http_status,
                                     outcome) VALUES (:o, :n, 'w', now() - CAST(:co AS interval), 200, 'x')"""),
                         {"o": oid, "n": n, "co": completed or created})
    return oid


def add_change_log(engine: Engine, entity: str, mirror_id: int, op: str, age: str) -> int:
    with engine.begin() as conn:
        return int(conn.execute(text("""INSERT INTO change_log (entity, mirror_id, op, old_row, changed_at)
                                        VALUES (:e, :m, :op, CAST(:old AS jsonb),
                                                now() - CAST(:age AS interval)) RETURNING id"""),
                                {"e": entity, "m": mirror_id, "op": op, "age": age,
                                 "old": json.dumps({"id": mirror_id}) if op == "D" else None}).scalar_one())


def mirror_rows(engine: Engine) -> tuple[int, int]:
    """One customer and one of its locations, written without triggers (no change-log rows of their own)."""
    with engine.begin() as conn:
        db.bypass_triggers(conn)
        cid = int(conn.execute(text("INSERT INTO customers (st_id, name, type) VALUES (10000001, 'C', "
                                    "'Residential') RETURNING id")).scalar_one())
        lid = int(conn.execute(text("INSERT INTO locations (st_id, customer_id, name) VALUES (20000001, :c, 'L') "
                                    "RETURNING id"), {"c": cid}).scalar_one())
    return cid, lid


def outbox_ids(engine: Engine) -> set[int]:
    return {r[0] for r in rows(engine, "SELECT id FROM outbox")}


def attempts_of(engine: Engine) -> dict[int, int]:
    return dict(rows(engine, "SELECT outbox_id, count(*) FROM outbox_attempts GROUP BY outbox_id"))


def test_prune_deletes_only_old_finished_rows_and_orphaned_change_log(engine: Engine) -> None:
    cid, lid = mirror_rows(engine)
    old_ok = add_outbox(engine, "succeeded", mirror_id=1, completed="15 days", attempts=2)
    new_ok = add_outbox(engine, "succeeded", mirror_id=2, completed="13 days", attempts=1)
    old_sup = add_outbox(engine, "superseded", mirror_id=3, completed="30 days", attempts=1)
    new_sup = add_outbox(engine, "superseded", mirror_id=4, completed="1 hour")
    old_dead = add_outbox(engine, "dead", mirror_id=5, completed="100 days", created="100 days", attempts=3)
    old_pending = add_outbox(engine, "pending", mirror_id=6, completed=None, created="100 days")
    # a pending row carrying a stale completed_at (state decides, not the timestamp)
    odd_pending = add_outbox(engine, "pending", mirror_id=7, completed="100 days", created="100 days", attempts=1)
    old_in_flight = add_outbox(engine, "in_flight", mirror_id=8, completed=None, created="100 days", attempts=1)
    old_loc_ok = add_outbox(engine, "succeeded", mirror_id=1, completed="20 days", attempts=1, entity="location")
    with engine.begin() as conn:
        conn.execute(text("""INSERT INTO conflicts (entity, mirror_id, st_id, field, base_value, local_value,
                                 remote_value, policy, outcome, detected_at)
                             VALUES ('customer', :m, 10000001, 'name', '"a"', '"b"', '"c"', 'remote_wins', 'remote',
                                     now() - interval '400 days')"""), {"m": cid})
        conn.execute(text("""INSERT INTO tombstones (entity, mirror_id, st_id, old_row, deleted_at)
                             VALUES ('location', 424242, 20000099, '{}', now() - interval '400 days')"""))

    orphan_old = add_change_log(engine, "customer", ORPHAN, "U", "2 hours")
    orphan_old_insert = add_change_log(engine, "location", ORPHAN, "I", "3 days")
    orphan_wrong_entity = add_change_log(engine, "location", cid + lid + 100, "U", "2 hours")
    orphan_recent = add_change_log(engine, "customer", ORPHAN, "U", "10 minutes")
    old_delete = add_change_log(engine, "customer", ORPHAN, "D", "30 days")
    live_customer = add_change_log(engine, "customer", cid, "U", "30 days")
    live_location = add_change_log(engine, "location", lid, "U", "30 days")

    result = prune(engine, 14)

    assert result == {"outbox_deleted": 3, "change_log_orphans_deleted": 3}
    assert outbox_ids(engine) == {new_ok, new_sup, old_dead, old_pending, odd_pending, old_in_flight}
    assert old_ok not in outbox_ids(engine) and old_sup not in outbox_ids(engine)
    assert old_loc_ok not in outbox_ids(engine)
    # attempts went with their rows (cascade); the kept rows keep theirs
    assert attempts_of(engine) == {new_ok: 1, old_dead: 3, odd_pending: 1, old_in_flight: 1}
    assert rows(engine, "SELECT count(*) FROM outbox_attempts WHERE outbox_id IN (:a, :b, :c)",
                a=old_ok, b=old_sup, c=old_loc_ok) == [(0,)]
    assert dict(rows(engine, "SELECT state, count(*) FROM outbox GROUP BY state")) == {
        "succeeded": 1, "superseded": 1, "dead": 1, "pending": 2, "in_flight": 1}
    assert rows(engine, "SELECT count(*) FROM conflicts") == [(1,)]
    assert rows(engine, "SELECT count(*) FROM tombstones") == [(1,)]
    assert {r[0] for r in rows(engine, "SELECT id FROM change_log")} == {
        orphan_recent, old_delete, live_customer, live_location}
    assert {orphan_old, orphan_old_insert, orphan_wrong_entity}.isdisjoint(
        r[0] for r in rows(engine, "SELECT id FROM change_log"))
    assert rows(engine, "SELECT count(*) FROM customers") == [(1,)]
    assert rows(engine, "SELECT count(*) FROM locations") == [(1,)]

    # a second run finds nothing more
    assert prune(engine, 14) == {"outbox_deleted": 0, "change_log_orphans_deleted": 0}
    assert len(outbox_ids(engine)) == 6


def test_prune_works_through_many_batches(engine: Engine) -> None:
    old = [add_outbox(engine, "succeeded" if i % 2 else "superseded", mirror_id=i, completed="20 days",
                      attempts=1) for i in range(1, 8)]
    keep = add_outbox(engine, "succeeded", mirror_id=100, completed="1 day", attempts=1)
    assert prune(engine, 14, batch=3)["outbox_deleted"] == len(old)
    assert outbox_ids(engine) == {keep}
    assert attempts_of(engine) == {keep: 1}


def test_prune_with_a_short_retention_keeps_what_is_newer(engine: Engine) -> None:
    old = add_outbox(engine, "succeeded", mirror_id=1, completed="3 days")
    newer = add_outbox(engine, "succeeded", mirror_id=2, completed="1 day")
    assert prune(engine, 2)["outbox_deleted"] == 1
    assert outbox_ids(engine) == {newer}
    assert old not in outbox_ids(engine)


def test_prune_accepts_fractional_retain_days(engine: Engine) -> None:
    old = add_outbox(engine, "succeeded", mirror_id=1, completed="13 hours")
    newer = add_outbox(engine, "succeeded", mirror_id=2, completed="11 hours")
    assert prune(engine, 0.5)["outbox_deleted"] == 1
    assert outbox_ids(engine) == {newer}
    assert old not in outbox_ids(engine)


def run_housekeeping(engine: Engine, database_url: str, *, dry_run: bool = False) -> dict[str, Any]:
    cfg = make_config(database_url, housekeeping={"retain_days": 14})

    async def go() -> dict[str, Any]:
        d = Daemon(cfg, engine=engine, dry_run=dry_run)
        try:
            return await d.housekeeping_job()
        finally:
            await d.close()

    return asyncio.run(go())


def test_daemon_housekeeping_job_prunes(engine: Engine, database_url: str) -> None:
    old = add_outbox(engine, "succeeded", mirror_id=1, completed="15 days", attempts=1)
    newer = add_outbox(engine, "succeeded", mirror_id=2, completed="1 day")
    orphan = add_change_log(engine, "customer", ORPHAN, "U", "2 hours")
    assert run_housekeeping(engine, database_url) == {"outbox_deleted": 1, "change_log_orphans_deleted": 1}
    assert outbox_ids(engine) == {newer}
    assert old not in outbox_ids(engine)
    assert rows(engine, "SELECT count(*) FROM change_log WHERE id = :i", i=orphan) == [(0,)]


def test_daemon_housekeeping_job_does_nothing_in_dry_run(engine: Engine, database_url: str) -> None:
    old = add_outbox(engine, "succeeded", mirror_id=1, completed="15 days", attempts=1)
    add_change_log(engine, "customer", ORPHAN, "U", "2 hours")
    assert run_housekeeping(engine, database_url, dry_run=True) == {}
    assert outbox_ids(engine) == {old}
    assert rows(engine, "SELECT count(*) FROM change_log") == [(1,)]
