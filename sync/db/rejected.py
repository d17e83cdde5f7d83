"""A change rejected before sending (its body fails ServiceTitan's schema): the outbox row ends dead at once and
the mirror row's ``sync_error`` names the columns to fix. Detect and dispatch both record it through here; the
statements themselves belong to sync.db.outbox and sync.db.mirror."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection

from sync.core.fields import Entity
from sync.core.plan import rejection, sync_error
from sync.core.request import Patch
from sync.db import mirror, outbox
from sync.log import get_logger

log = get_logger("stsync.outbox")


def record(conn: Connection, entity: Entity, row: mirror.MirrorRow, diff: Any, patch: Patch, *,
           outbox_id: int | None = None) -> int:
    """Returns the dead outbox row's id (a new row, or the claimed ``outbox_id``); a row without ``st_id`` was
    to be created."""
    message, error = rejection(patch)
    oid = outbox.reject(conn, entity, row.mirror_id, row.st_id, patch.body, diff, error, outbox_id=outbox_id,
                        operation="update" if row.st_id is not None else "create")
    mirror.mark_error(conn, entity, row.mirror_id,
                      sync_error(message, columns=sorted(patch.problems), outbox_id=oid))
    log.warning("outbox.rejected_before_send", entity=entity, mirror_id=row.mirror_id, st_id=row.st_id,
                outbox_id=oid, columns=sorted(patch.problems), problem=patch.problem_line())
    return oid
