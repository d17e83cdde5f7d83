"""The ``quarantine`` table: feed records that could not be stored, with their raw JSON (text) and the reason."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import Connection, text


def put(conn: Connection, entity: str, rows: Sequence[dict[str, Any]]) -> None:
    """Quarantine records: each ``{"key", "st_id", "raw", "reason"}``; a record seen again updates its row."""
    if rows:
        conn.execute(text("""
            INSERT INTO quarantine (entity, record_key, st_id, raw, reason)
            VALUES (:e, :key, :st_id, :raw, :reason)
            ON CONFLICT (entity, record_key) DO UPDATE
            SET raw = EXCLUDED.raw, reason = EXCLUDED.reason, last_seen = now(),
                times_seen = quarantine.times_seen + 1"""), [{"e": entity, **r} for r in rows])


def release(conn: Connection, entity: str, st_ids: Iterable[int]) -> int:
    """Records applied at last: out of quarantine. Returns how many rows left it."""
    ids = sorted(set(st_ids))
    if not ids:
        return 0
    return conn.execute(text("DELETE FROM quarantine WHERE entity = :e AND st_id = ANY(:ids)"),
                        {"e": entity, "ids": ids}).rowcount


def refetchable(conn: Connection, entity: str, limit: int) -> list[int]:
    """Quarantined records that have an id ServiceTitan can be asked for, least recently seen first."""
    return [int(r[0]) for r in conn.execute(text(
        "SELECT st_id FROM quarantine WHERE entity = :e AND st_id IS NOT NULL ORDER BY last_seen LIMIT :n"),
        {"e": entity, "n": limit})]


def touch(conn: Connection, entity: str, st_ids: Iterable[int]) -> None:
    """Asked for again (the pull's fetch by id): to the back of the refetch order."""
    conn.execute(text("UPDATE quarantine SET last_seen = now() WHERE entity = :e AND st_id = ANY(:ids)"),
                 {"e": entity, "ids": sorted(set(st_ids))})


def count(conn: Connection) -> dict[str, int]:
    return {str(e): int(n) for e, n in conn.execute(text("SELECT entity, count(*) FROM quarantine GROUP BY entity"))}


def recent(conn: Connection, limit: int) -> list[dict[str, Any]]:
    return [dict(r) for r in conn.execute(text(
        "SELECT entity, record_key, st_id, reason, first_seen, last_seen, times_seen FROM quarantine "
        "ORDER BY last_seen DESC LIMIT :n"), {"n": limit}).mappings()]
