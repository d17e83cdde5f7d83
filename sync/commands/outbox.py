"""Operator tools over the outbox and conflicts tables; safe while the daemon runs (row locks, no leases taken)."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import Connection

from sync.db import attempts, mirror, outbox
from sync.db import conflicts as conflicts_table
from sync.db.engine import notify
from sync.errors import StsyncError


def _iso(v: Any) -> Any:
    return v.isoformat() if hasattr(v, "isoformat") else v


def list_rows(conn: Connection, *, state: str | None, entity: str | None, limit: int) -> list[dict[str, Any]]:
    return [{k: _iso(v) for k, v in r.items()} for r in outbox.list_rows(conn, state=state, entity=entity, limit=limit)]


def show(conn: Connection, outbox_id: int) -> dict[str, Any]:
    row = outbox.get(conn, outbox_id)
    if row is None:
        raise StsyncError(f"no outbox row {outbox_id}: see `stsync outbox list`")
    out = {k: _iso(v) for k, v in row.items()}
    out["attempt_history"] = [{k: _iso(v) for k, v in a.items()} for a in attempts.history(conn, outbox_id)]
    return out


def retry(conn: Connection, outbox_id: int | None = None, *, all_dead: bool = False) -> int:
    """Dead rows go back to pending with fresh attempts (the body is recomputed when sent)."""
    ids = [outbox_id] if outbox_id is not None else []
    if all_dead:
        ids = outbox.dead_ids_locked(conn)
    n = 0
    for oid in ids:
        row = outbox.lock_row(conn, oid)
        if row is None:
            raise StsyncError(f"no outbox row {oid}: see `stsync outbox list`")
        entity, mirror_id, state = row
        if state != "dead":
            raise StsyncError(f"outbox row {oid} is {state}, only dead rows can be retried")
        if outbox.has_pending(conn, entity, mirror_id):
            # a newer pending row for the record already carries its latest state
            outbox.mark_superseded(conn, oid)
        else:
            outbox.reset_to_pending(conn, oid)
        mirror.mark_retried(conn, "customer" if entity == "customer" else "location", mirror_id)
        n += 1
    notify(conn, "retry")
    return n


def discard(conn: Connection, outbox_id: int) -> None:
    """Close a pending or dead row without sending it. The mirror keeps its values (issue 15 changes this)."""
    row = outbox.lock_row(conn, outbox_id)
    if row is None:
        raise StsyncError(f"no outbox row {outbox_id}: see `stsync outbox list`")
    entity, mirror_id, state = row
    if state not in ("pending", "dead"):
        raise StsyncError(f"outbox row {outbox_id} is {state}: only pending or dead rows can be discarded")
    outbox.discard(conn, outbox_id)
    mirror.mark_discarded(conn, "customer" if entity == "customer" else "location", mirror_id,
                          json.dumps({"message": f"outbox row {outbox_id} discarded by an operator; "
                                                 "the mirror still differs from ServiceTitan"}))


def conflicts(conn: Connection, *, limit: int, entity: str | None = None) -> list[dict[str, Any]]:
    return [{k: _iso(v) for k, v in r.items()} for r in conflicts_table.recent(conn, limit=limit, entity=entity)]
