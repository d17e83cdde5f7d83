"""The ``tombstones`` table: local deletes, kept (never propagated) so the pull does not bring the rows back."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from sqlalchemy import Connection, bindparam, text
from sqlalchemy.dialects.postgresql import ARRAY, BIGINT

_IDS = bindparam("ids", type_=ARRAY(BIGINT))


def record(conn: Connection, entity: str, old_row: dict[str, Any]) -> None:
    """A deleted mirror row (``old_row``: the row as the trigger saw it)."""
    conn.execute(
        text("INSERT INTO tombstones (entity, mirror_id, st_id, old_row) VALUES (:e, :m, :s, CAST(:r AS jsonb))"),
        {"e": entity, "m": old_row["id"], "s": old_row.get("st_id"), "r": json.dumps(old_row)},
    )


def buried_st_ids(conn: Connection, entity: str, st_ids: Iterable[int]) -> set[int]:
    """Of these ServiceTitan ids, those deleted locally: tombstoned, or a delete detect has not drained yet."""
    return {s for (s,) in conn.execute(
        text("""SELECT st_id FROM tombstones WHERE entity = :e AND st_id = ANY(:ids)
                UNION SELECT CAST(old_row->>'st_id' AS bigint) FROM change_log
                WHERE entity = :e AND op = 'D' AND CAST(old_row->>'st_id' AS bigint) = ANY(:ids)""")
        .bindparams(_IDS),
        {"e": entity, "ids": list(st_ids)})}


def bury(conn: Connection, entity: str, mirror_id: int, st_id: int) -> bool:
    """A row deleted while its create was on its way: its tombstone gets the record's ``st_id``, so the pull never
    brings the record back as a row of its own. False if the row has no tombstone (it was never there)."""
    return conn.execute(text("""UPDATE tombstones SET st_id = :s WHERE id = (
                                    SELECT max(id) FROM tombstones WHERE entity = :e AND mirror_id = :m)
                                AND st_id IS NULL RETURNING 1"""),
                        {"e": entity, "m": mirror_id, "s": st_id}).first() is not None


def take_back(conn: Connection, entity: str, mirror_id: int) -> dict[str, Any] | None:
    """An operator undoes a held delete: the row's latest tombstone is removed; returns the row as deleted."""
    row = conn.execute(text("""DELETE FROM tombstones WHERE id = (SELECT max(id) FROM tombstones
                                                              WHERE entity = :e AND mirror_id = :m)
                               RETURNING old_row"""), {"e": entity, "m": mirror_id}).scalar_one_or_none()
    return dict(row) if isinstance(row, dict) else None


def truncations_unrestored(conn: Connection) -> dict[str, int]:
    """TRUNCATEs of mirror tables the pull has not restored yet: entity -> how many."""
    return {e: n for e, n in conn.execute(text("SELECT entity, count(*) FROM truncations WHERE restored_at IS NULL "
                                               "GROUP BY entity"))}


def latest_truncation(conn: Connection, entity: str) -> int | None:
    """The id of the latest TRUNCATE of this entity's table not restored yet (None: none)."""
    found = conn.execute(text("SELECT max(id) FROM truncations WHERE entity = :e AND restored_at IS NULL"),
                         {"e": entity}).scalar_one_or_none()
    return None if found is None else int(found)


def mark_truncations_restored(conn: Connection, entity: str, up_to: int) -> int:
    """The feed restarted from the beginning after these TRUNCATEs (ids up to ``up_to``; a later one restarts it
    again): ``restored_at`` is when the restore began."""
    return int(conn.execute(text("UPDATE truncations SET restored_at = now() WHERE entity = :e "
                                 "AND restored_at IS NULL AND id <= :u"), {"e": entity, "u": up_to}).rowcount)


def count(conn: Connection) -> int:
    return int(conn.execute(text("SELECT count(*) FROM tombstones")).scalar_one())
