"""Operator tools over the outbox and conflicts tables; safe while the daemon runs (row locks, no leases taken)."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.exc import IntegrityError

from sync.core.diff import sent_values
from sync.core.fields import BY_COLUMN, CUSTOMER_LINK, Entity, db_column, equal
from sync.db import attempts, changelog, mirror, outbox, shadow, tombstones
from sync.db import conflicts as conflicts_table
from sync.db.engine import bypass_triggers, notify
from sync.errors import StsyncError
from sync.log import get_logger

log = get_logger("stsync.outbox")


class _NotRestored(Exception):
    """A held delete's row could not be put back (no tombstone, or a row with its id or st_id exists)."""


def _iso(v: Any) -> Any:
    return v.isoformat() if hasattr(v, "isoformat") else v


def list_rows(conn: Connection, *, state: str | None, entity: str | None, limit: int) -> list[dict[str, Any]]:
    """Newest first; ``fields``: the field errors in one line (ServiceTitan's ``errors``, or the schema's
    problems of a body never sent), e.g. ``address.zip: The Zip field is required.``."""
    out = []
    for r in outbox.list_rows(conn, state=state, entity=entity, limit=limit):
        row = {k: _iso(v) for k, v in r.items() if k != "field_errors"}
        errors = r.get("field_errors")
        row["fields"] = "; ".join(f"{k}: {' '.join(map(str, v)) if isinstance(v, list) else v}"
                                  for k, v in sorted(errors.items())) if isinstance(errors, dict) else None
        out.append(row)
    return out


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
            try:
                with conn.begin_nested():  # detect may queue a pending row of the record meanwhile (safe while
                    outbox.reset_to_pending(conn, oid)  # the daemon runs): that row then carries it
            except IntegrityError:
                outbox.mark_superseded(conn, oid)
        mirror.mark_retried(conn, "customer" if entity == "customer" else "location", mirror_id)
        n += 1
    notify(conn, "retry")
    return n


def discard(conn: Connection, outbox_id: int) -> list[str]:
    """Close a pending or dead row without sending it: the row ends ``discarded`` and the fields it carried go
    back to their last-synced values (the shadow), so the change never rides along with a later edit. A field
    edited again since (the mirror no longer holds the discarded value) keeps that newer edit. Returns the
    columns put back."""
    row = outbox.lock_row(conn, outbox_id)
    if row is None:
        raise StsyncError(f"no outbox row {outbox_id}: see `stsync outbox list`")
    name, mirror_id, state = row
    if state == "held":
        raise StsyncError(f"outbox row {outbox_id} is held (a mass delete): `stsync outbox discard --held` drops "
                          "the held rows and puts the deleted rows back")
    if state not in ("pending", "dead"):
        raise StsyncError(f"outbox row {outbox_id} is {state}: only pending or dead rows can be discarded")
    entity: Entity = "customer" if name == "customer" else "location"
    diff = (outbox.get(conn, outbox_id) or {}).get("diff") or {}
    current = mirror.load_mirror(conn, entity, [mirror_id], for_update=True).get(mirror_id)
    base = shadow.load_shadows(conn, entity, [mirror_id]).get(mirror_id)
    restored: dict[str, Any] = {}
    if current is not None and base is not None:
        for column, value in sent_values(diff).items():
            f = BY_COLUMN[entity].get(column)
            if f is not None and equal(f.kind, current.record.get(column), value):
                restored[column] = base.get(column)
    customer_mid = None
    if CUSTOMER_LINK in restored and restored[CUSTOMER_LINK] is not None:
        customer_mid = mirror.customer_mirror_ids(conn, [restored[CUSTOMER_LINK]]).get(restored[CUSTOMER_LINK])
    bypass_triggers(conn)  # putting the last-synced values back is not a local edit
    mirror.update_mirror(conn, entity, mirror_id, restored, customer_mirror_id=customer_mid)
    outbox.discard(conn, outbox_id)
    columns = sorted(db_column(c) for c in restored)
    if outbox.newer_exists(conn, outbox_id, entity, mirror_id):
        # an old row (e.g. dead) behind a later change of the record: the record's status is that later change's
        log.info("outbox.discarded", outbox_id=outbox_id, entity=entity, mirror_id=mirror_id, restored=columns,
                 status_kept=True)
        return columns
    mirror.mark_discarded(conn, entity, mirror_id, json.dumps({
        "message": f"outbox row {outbox_id} discarded by an operator; its fields went back to the last-synced "
                   f"values: {', '.join(columns) or 'none (edited again since)'}",
        "columns": columns, "outbox_id": outbox_id}))
    log.info("outbox.discarded", outbox_id=outbox_id, entity=entity, mirror_id=mirror_id, restored=columns)
    return columns


def release_held(conn: Connection) -> int:
    """Send every held row (the mass-delete guard's): pending, due now."""
    held = outbox.held_ids_locked(conn)
    for _, entity, mirror_id in held:
        # the row is deleted: a change of it still queued (e.g. an update requeued after a lost answer) is moot,
        # and only one row per record may wait pending
        outbox.supersede_pending(conn, entity, [mirror_id])
    n = outbox.release_held(conn, [oid for oid, _, _ in held])
    log.info("outbox.held_released", count=n)
    notify(conn, "release")
    return n


def discard_held(conn: Connection) -> int:
    """Drop every held row: nothing is sent, and each deleted row comes back into the mirror as it was when
    deleted (its tombstone removed), so the mirror and ServiceTitan agree again. Returns the rows closed."""
    held = outbox.held_ids_locked(conn)
    bypass_triggers(conn)  # putting a row back is not a local insert
    # customers first: a location's row refers to its customer's
    for oid, name, mirror_id in sorted(held, key=lambda h: (h[1] != "customer", h[0])):
        entity: Entity = "customer" if name == "customer" else "location"
        restored = False
        try:
            with conn.begin_nested():  # one row the database refuses (its customer is gone) never blocks the rest
                old = tombstones.take_back(conn, entity, mirror_id)
                restored = old is not None and mirror.restore(conn, entity, old)
                if not restored:
                    raise _NotRestored
        except (_NotRestored, IntegrityError):
            log.warning("outbox.held_row_not_restored", outbox_id=oid, entity=entity, mirror_id=mirror_id)
        if restored:  # unsent edits it carried when deleted still differ from the shadow: detect sends them
            changelog.log_recheck(conn, entity, [mirror_id])
        outbox.discard(conn, oid)
    log.info("outbox.held_discarded", count=len(held))
    return len(held)


def conflict(conn: Connection, conflict_id: int) -> dict[str, Any]:
    """One conflict in full (the three values and the policy's choice), with the record's other conflicts."""
    row = conflicts_table.get(conn, conflict_id)
    if row is None:
        raise StsyncError(f"no conflict {conflict_id}: see `stsync conflicts list`")
    out = {k: _iso(v) for k, v in row.items()}
    out["kept"] = out["local_value"] if row["outcome"] == "local" else out["remote_value"]
    out["record_conflicts"] = [{k: _iso(v) for k, v in r.items()}
                               for r in conflicts_table.of_record(conn, row["entity"], row["mirror_id"])]
    return out


def conflicts(conn: Connection, *, limit: int, entity: str | None = None) -> list[dict[str, Any]]:
    return [{k: _iso(v) for k, v in r.items()} for r in conflicts_table.recent(conn, limit=limit, entity=entity)]
