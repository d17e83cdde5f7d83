"""Housekeeping: keep the outbox and its history small under months of traffic.

Deletes succeeded and superseded outbox rows (their attempts go with them) older than
``housekeeping.retain_days``, and change-log rows left for mirror rows that no longer exist. Dead rows,
conflicts and tombstones are kept: they need an operator.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine

from sync.db import changelog, outbox
from sync.log import get_logger

log = get_logger("stsync.housekeeping")


def prune(engine: Engine, retain_days: float, *, batch: int = 5000) -> dict[str, Any]:
    with engine.begin() as conn:
        deleted_outbox = outbox.prune_finished(conn, retain_days, batch=batch)
        orphans = changelog.prune_orphans(conn)
    result = {"outbox_deleted": deleted_outbox, "change_log_orphans_deleted": orphans}
    log.info("housekeeping.pruned", retain_days=retain_days, **result)
    return result
