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


def count(conn: Connection) -> int:
    return int(conn.execute(text("SELECT count(*) FROM tombstones")).scalar_one())
