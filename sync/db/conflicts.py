"""The ``conflicts`` table: one row per field (or merge unit) changed on both sides, with the policy's outcome."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, text

from sync.core.merge import Conflict


def record(conn: Connection, rows: Sequence[dict[str, Any]]) -> None:
    """Insert conflicts. Each row: ``e`` entity, ``m`` mirror id, ``s`` st_id, ``f`` field or unit, ``b``/``l``/``r``
    base, local and remote values as JSON text, ``p`` policy, ``o`` outcome (``local`` | ``remote``)."""
    if rows:
        conn.execute(
            text("""INSERT INTO conflicts (entity, mirror_id, st_id, field, base_value, local_value, remote_value,
                                           policy, outcome)
                    VALUES (:e, :m, :s, :f, CAST(:b AS jsonb), CAST(:l AS jsonb), CAST(:r AS jsonb), :p, :o)"""),
            list(rows),
        )


def record_merged(conn: Connection, entity: str, mirror_id: int, st_id: int, policy: str,
                  found: Sequence[Conflict]) -> None:
    """Insert the conflicts the reconciler (``core.merge``) found in one record."""
    record(conn, [{"e": entity, "m": mirror_id, "s": st_id, "f": c.field, "b": json.dumps(c.base, default=str),
                   "l": json.dumps(c.local, default=str), "r": json.dumps(c.remote, default=str), "p": policy,
                   "o": c.outcome} for c in found])


def recent(conn: Connection, *, limit: int, entity: str | None = None) -> list[dict[str, Any]]:
    return [dict(r) for r in conn.execute(
        text("""SELECT id, entity, mirror_id, st_id, field, base_value, local_value, remote_value,
                       policy, outcome, detected_at FROM conflicts
                WHERE CAST(:e AS text) IS NULL OR entity = :e ORDER BY id DESC LIMIT :n"""),
        {"n": limit, "e": entity}).mappings()]


def get(conn: Connection, conflict_id: int) -> dict[str, Any] | None:
    row = conn.execute(text("""SELECT id, entity, mirror_id, st_id, field, base_value, local_value, remote_value,
                                      policy, outcome, detected_at FROM conflicts WHERE id = :i"""),
                       {"i": conflict_id}).mappings().first()
    return dict(row) if row is not None else None


def of_record(conn: Connection, entity: str, mirror_id: int) -> list[dict[str, Any]]:
    """Every conflict recorded for one mirror row, oldest first (conflicts_record_idx)."""
    return [dict(r) for r in conn.execute(
        text("""SELECT id, field, outcome, detected_at FROM conflicts WHERE entity = :e AND mirror_id = :m
                ORDER BY id"""), {"e": entity, "m": mirror_id}).mappings()]


def since(conn: Connection, after_id: int) -> list[tuple[Any, ...]]:
    """Conflicts with an id above ``after_id``: ``(id, entity, st_id, field, local, remote, outcome)``."""
    return [tuple(r) for r in conn.execute(
        text("SELECT id, entity, st_id, field, local_value, remote_value, outcome "
             "FROM conflicts WHERE id > :i ORDER BY id"), {"i": after_id})]


def count(conn: Connection) -> int:
    return int(conn.execute(text("SELECT count(*) FROM conflicts")).scalar_one())
