"""A record ServiceTitan created for a mirror row (the create's answer, the record a lookup found, or a feed
record that carries our mirror id) is written into that row, or, if the row was deleted meanwhile, buried.
The dispatcher and the pull both store a created record through here (the statements belong to sync.db.mirror,
sync.db.shadow, sync.db.changelog, sync.db.tombstones and sync.db.outbox); the decision is
``sync.core.create.merge_created``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import Connection

from sync.core.create import merge_created
from sync.core.fields import CUSTOMER_LINK, Entity
from sync.core.plan import PatchSettings, deactivation
from sync.db import changelog, mirror, outbox, shadow, tombstones


def link(conn: Connection, entity: Entity, mirror_id: int, st_id: int, remote: Mapping[str, Any],
         sent: Mapping[str, Any], *, sync_active: bool) -> bool:
    """The row (locked by the caller, without ``st_id``) gets ``st_id``; the mirror takes ServiceTitan's form of
    what the create carried (``sent``) unless edited since; the shadow is ``remote`` (canonical); ``synced``, or
    pending again with a recheck when a local value must still be PATCHed. Returns whether one is needed."""
    mirror.link(conn, entity, mirror_id, st_id)
    row = mirror.load_mirror(conn, entity, [mirror_id]).get(mirror_id)  # a location's customer has its st_id now
    if row is None:
        return False
    result = merge_created(entity, row.record, remote, sent, sync_active=sync_active)
    updates = dict(result.mirror_updates)
    customer_mirror_id = None
    if CUSTOMER_LINK in updates:
        customer_mirror_id = mirror.customer_mirror_ids(conn, [updates[CUSTOMER_LINK]]).get(updates[CUSTOMER_LINK])
    mirror.update_mirror(conn, entity, mirror_id, updates, customer_mirror_id=customer_mirror_id,
                         status="resend" if result.push_needed else "synced")
    shadow.write_shadow(conn, entity, mirror_id, st_id, result.new_shadow)
    if result.push_needed:
        changelog.log_recheck(conn, entity, [mirror_id])
    return result.push_needed


def bury(conn: Connection, settings: PatchSettings, entity: Entity, mirror_id: int, st_id: int, *,
         propagate: bool) -> tuple[bool, bool]:
    """The row was deleted while its create was on its way, and the record exists: its tombstone gets the
    ``st_id`` (the pull never brings the record back) and, under ``sync.local_deletes: propagate``, the record
    is deactivated like any deleted row. Returns (tombstoned, deactivation queued)."""
    buried = tombstones.bury(conn, entity, mirror_id, st_id)
    if buried and propagate:
        outbox.queue_delete(conn, entity, mirror_id, st_id, deactivation(settings, entity, mirror_id).body)
    return buried, buried and propagate
