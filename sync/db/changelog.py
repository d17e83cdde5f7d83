"""The ``change_log`` table: filled by the mirror tables' triggers, drained by detect.

Rows are deleted in the transaction that writes their outbox rows, so no committed change is missed and none is
processed twice. ``op`` is ``I``/``U``/``D`` for an application's write and ``R`` for stsync's own recheck.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, bindparam, text
from sqlalchemy.dialects.postgresql import ARRAY, BIGINT

from sync.db.engine import notify

_IDS = bindparam("ids", type_=ARRAY(BIGINT))


def drain(conn: Connection, limit: int) -> list[tuple[str, int, str, Any, datetime]]:
    """Delete and return up to ``limit`` rows, oldest first: ``(entity, mirror id, op, old row, changed_at)``."""
    rows = conn.execute(
        text("""DELETE FROM change_log WHERE id IN (
                    SELECT id FROM change_log ORDER BY id LIMIT :n FOR UPDATE SKIP LOCKED)
                RETURNING entity, mirror_id, op, old_row, changed_at"""),
        {"n": limit},
    ).all()
    return [(r[0], r[1], r[2], r[3], r[4]) for r in rows]


def log_recheck(conn: Connection, entity: str, mirror_ids: Iterable[int]) -> None:
    """Ask detect to re-diff these records (used where stsync's own writes leave mirror != shadow)."""
    ids = list(mirror_ids)
    if ids:
        conn.execute(
            text("INSERT INTO change_log (entity, mirror_id, op) SELECT :e, unnest(CAST(:ids AS bigint[])), 'R'"),
            {"e": entity, "ids": ids},
        )
        # stsync's own writes bypass the NOTIFY trigger: wake detect explicitly (delivered at commit)
        notify(conn, "recheck")


def local_change_times(conn: Connection, entity: str, mirror_ids: Iterable[int]) -> dict[int, datetime]:
    """The newest undrained local edit (insert or update) of each record."""
    rows = conn.execute(
        text("""SELECT mirror_id, max(changed_at) FROM change_log
                WHERE entity = :e AND mirror_id = ANY(:ids) AND op IN ('I', 'U')
                GROUP BY mirror_id""").bindparams(_IDS),
        {"e": entity, "ids": list(mirror_ids)})
    return {mid: at for mid, at in rows}


def latest_change_at(conn: Connection, entity: str, mirror_id: int) -> datetime | None:
    at: datetime | None = conn.execute(
        text("SELECT max(changed_at) FROM change_log WHERE entity = :e AND mirror_id = :m"),
        {"e": entity, "m": mirror_id}).scalar()
    return at


def has_local_write(conn: Connection, entity: str, mirror_id: int) -> bool:
    """An undrained local write of this record (not one of stsync's own recheck markers)."""
    return conn.execute(text("SELECT EXISTS (SELECT 1 FROM change_log WHERE entity = :e AND mirror_id = :m "
                             "AND op <> 'R')"), {"e": entity, "m": mirror_id}).scalar_one() is True


def ids_undrained(conn: Connection, entity: str) -> set[int]:
    """Records with an undrained insert or update (the dry run's preview)."""
    return {m for (m,) in conn.execute(
        text("SELECT mirror_id FROM change_log WHERE entity = :e AND op <> 'D'"), {"e": entity})}


def pending_deletes(conn: Connection) -> int:
    """Deletes not drained yet of rows that have a ServiceTitan record (what the mass-delete guard counts)."""
    return int(conn.execute(text("SELECT count(*) FROM change_log WHERE op = 'D' AND old_row->>'st_id' IS NOT NULL"))
               .scalar_one())


def backlog(conn: Connection) -> int:
    return int(conn.execute(text("SELECT count(*) FROM change_log")).scalar_one())


def push_lag_seconds(conn: Connection) -> float | None:
    """Age of the oldest unprocessed local change: an undrained change-log row or a pending/in-flight outbox row."""
    lag = conn.execute(text("""SELECT extract(epoch FROM now() - least(
            (SELECT min(changed_at) FROM change_log),
            (SELECT min(created_at) FROM outbox WHERE state IN ('pending', 'in_flight'))))""")).scalar()
    return None if lag is None else float(lag)


def prune_orphans(conn: Connection) -> int:
    """Delete change-log rows older than an hour whose mirror row no longer exists."""
    return int(conn.execute(text("""
        DELETE FROM change_log c WHERE c.op <> 'D' AND c.changed_at < now() - interval '1 hour' AND NOT EXISTS (
            SELECT 1 FROM customers m WHERE c.entity = 'customer' AND m.id = c.mirror_id
            UNION ALL SELECT 1 FROM locations m WHERE c.entity = 'location' AND m.id = c.mirror_id)""")).rowcount)
