"""Housekeeping: keep the outbox and its history small under months of traffic.

Deletes succeeded and superseded outbox rows (their attempts go with them) older than
``housekeeping.retain_days``, and change-log rows left for mirror rows that no longer exist. Dead rows,
conflicts and tombstones are kept: they need an operator.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, text

from sync.log import get_logger

log = get_logger("stsync.housekeeping")


def prune(engine: Engine, retain_days: float, *, batch: int = 5000) -> dict[str, Any]:
    deleted_outbox = 0
    with engine.begin() as conn:
        while True:
            n = conn.execute(text("""DELETE FROM outbox WHERE id IN (
                                         SELECT id FROM outbox WHERE state IN ('succeeded', 'superseded')
                                         AND completed_at < now() - CAST(:d AS double precision) * interval '1 day'
                                         LIMIT :b)"""),
                             {"d": retain_days, "b": batch}).rowcount
            deleted_outbox += n
            if n < batch:
                break
        orphans = conn.execute(text("""
            DELETE FROM change_log c WHERE c.op <> 'D' AND c.changed_at < now() - interval '1 hour' AND NOT EXISTS (
                SELECT 1 FROM customers m WHERE c.entity = 'customer' AND m.id = c.mirror_id
                UNION ALL SELECT 1 FROM locations m WHERE c.entity = 'location' AND m.id = c.mirror_id)""")).rowcount
    result = {"outbox_deleted": deleted_outbox, "change_log_orphans_deleted": orphans}
    log.info("housekeeping.pruned", retain_days=retain_days, **result)
    return result
