"""Operator tools over the outbox and conflicts tables; safe while the daemon runs (row locks, no leases taken)."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import Connection, text

from sync.core.fields import TABLES
from sync.errors import StsyncError


def _iso(v: Any) -> Any:
    return v.isoformat() if hasattr(v, "isoformat") else v


def list_rows(conn: Connection, *, state: str | None, entity: str | None, limit: int) -> list[dict[str, Any]]:
    rows = conn.execute(text("""
        SELECT id, entity, mirror_id, st_id, state, attempts, last_status, next_attempt_at, created_at, updated_at,
               coalesce(last_error->>'title', last_error->>'message') AS error,
               last_error->>'title' AS error_title, last_error->>'message' AS error_message
        FROM outbox WHERE (CAST(:s AS text) IS NULL OR state = :s) AND (CAST(:e AS text) IS NULL OR entity = :e)
        ORDER BY id DESC LIMIT :n"""), {"s": state, "e": entity, "n": limit}).mappings()
    return [{k: _iso(v) for k, v in r.items()} for r in rows]


def show(conn: Connection, outbox_id: int) -> dict[str, Any]:
    row = conn.execute(text("SELECT * FROM outbox WHERE id = :id"), {"id": outbox_id}).mappings().first()
    if row is None:
        raise StsyncError(f"no outbox row {outbox_id}: see `stsync outbox list`")
    out = {k: _iso(v) for k, v in row.items()}
    out["attempt_history"] = [
        {k: _iso(v) for k, v in a.items()}
        for a in conn.execute(text("""SELECT attempt, worker, started_at, finished_at, http_status, latency_ms, outcome,
                                             error, trace_id FROM outbox_attempts WHERE outbox_id = :id ORDER BY id"""),
                              {"id": outbox_id}).mappings()
    ]
    return out


def retry(conn: Connection, outbox_id: int | None = None, *, all_dead: bool = False) -> int:
    """Dead rows go back to pending with fresh attempts (the body is recomputed when sent)."""
    ids = [outbox_id] if outbox_id is not None else []
    if all_dead:
        ids = [i for (i,) in conn.execute(text("SELECT id FROM outbox WHERE state = 'dead' ORDER BY id FOR UPDATE"))]
    n = 0
    for oid in ids:
        row = conn.execute(text("SELECT entity, mirror_id, state FROM outbox WHERE id = :id FOR UPDATE"),
                           {"id": oid}).first()
        if row is None:
            raise StsyncError(f"no outbox row {oid}: see `stsync outbox list`")
        entity, mirror_id, state = row
        if state != "dead":
            raise StsyncError(f"outbox row {oid} is {state}, only dead rows can be retried")
        pending = conn.execute(text("SELECT id FROM outbox WHERE entity = :e AND mirror_id = :m AND state = 'pending'"),
                               {"e": entity, "m": mirror_id}).first()
        if pending is not None:
            # a newer pending row for the record already carries its latest state
            conn.execute(text("UPDATE outbox SET state = 'superseded', updated_at = now() WHERE id = :id"), {"id": oid})
        else:
            conn.execute(text("""UPDATE outbox SET state = 'pending', attempts = 0, next_attempt_at = now(),
                                 completed_at = NULL, updated_at = now() WHERE id = :id"""), {"id": oid})
        conn.execute(text(f"UPDATE {TABLES[entity]} SET sync_status = 'pending', sync_error = NULL WHERE id = :m"),
                     {"m": mirror_id})
        n += 1
    conn.execute(text("SELECT pg_notify(current_schema() || '_changes', 'retry')"))
    return n


def discard(conn: Connection, outbox_id: int) -> None:
    """Close a pending or dead row without sending it. The mirror keeps its values (see docs/operations.md)."""
    row = conn.execute(text("SELECT entity, mirror_id, state FROM outbox WHERE id = :id FOR UPDATE"),
                       {"id": outbox_id}).first()
    if row is None:
        raise StsyncError(f"no outbox row {outbox_id}: see `stsync outbox list`")
    entity, mirror_id, state = row
    if state not in ("pending", "dead"):
        raise StsyncError(f"outbox row {outbox_id} is {state}: only pending or dead rows can be discarded")
    conn.execute(text("""UPDATE outbox SET state = 'superseded', completed_at = now(), updated_at = now(),
                         last_error = coalesce(last_error, '{}'::jsonb) || '{"discarded": true}'::jsonb
                         WHERE id = :id"""), {"id": outbox_id})
    conn.execute(text(f"""UPDATE {TABLES[entity]} SET sync_status = 'discarded',
                          sync_error = CAST(:e AS jsonb) WHERE id = :m"""),
                 {"m": mirror_id, "e": json.dumps({"message": f"outbox row {outbox_id} discarded by an operator; "
                                                              "the mirror still differs from ServiceTitan"})})


def conflicts(conn: Connection, *, limit: int, entity: str | None = None) -> list[dict[str, Any]]:
    rows = conn.execute(text("""SELECT id, entity, mirror_id, st_id, field, base_value, local_value, remote_value,
                                       policy, outcome, detected_at FROM conflicts
                                WHERE CAST(:e AS text) IS NULL OR entity = :e ORDER BY id DESC LIMIT :n"""),
                        {"n": limit, "e": entity}).mappings()
    return [{k: _iso(v) for k, v in r.items()} for r in rows]
