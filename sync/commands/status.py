"""`stsync status`: what an operator needs at a glance, read from the daemon's own tables."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, text

OUTBOX_STATES = ("pending", "in_flight", "succeeded", "dead", "superseded")


def collect(conn: Connection) -> dict[str, Any]:
    """Counts per outbox state, backlog ages, local-only rows, tombstones, feed cursors, conflicts."""
    counts = dict.fromkeys(OUTBOX_STATES, 0)
    for state, n in conn.execute(text("SELECT state, count(*) FROM outbox GROUP BY state")):
        counts[state] = n
    oldest = conn.execute(
        text("SELECT extract(epoch FROM now() - min(created_at)) FROM outbox WHERE state = 'pending'")
    ).scalar()
    change_log = conn.execute(text("SELECT count(*) FROM change_log")).scalar_one()
    local_only = {
        entity: conn.execute(text(f"SELECT count(*) FROM {table} WHERE st_id IS NULL")).scalar_one()
        for entity, table in (("customer", "customers"), ("location", "locations"))
    }
    errors = {
        entity: conn.execute(text(f"SELECT count(*) FROM {table} WHERE sync_error IS NOT NULL")).scalar_one()
        for entity, table in (("customer", "customers"), ("location", "locations"))
    }
    tombstones = conn.execute(text("SELECT count(*) FROM tombstones")).scalar_one()
    conflicts = conn.execute(text("SELECT count(*) FROM conflicts")).scalar_one()
    cursors = {
        feed: {
            "continue_from": cont,
            "initial_load_done": done,
            "records_seen": seen,
            "last_pull_at": last.isoformat() if last else None,
        }
        for feed, cont, done, seen, last in conn.execute(
            text("SELECT feed, continue_from, initial_load_done, records_seen, last_pull_at FROM feed_cursors")
        )
    }
    last_pull = max((c["last_pull_at"] for c in cursors.values() if c["last_pull_at"]), default=None)
    return {
        "outbox": counts,
        "oldest_pending_seconds": round(float(oldest), 3) if oldest is not None else None,
        "dead": counts["dead"],
        "change_log_backlog": change_log,
        "local_only": local_only,
        "rows_with_sync_error": errors,
        "tombstones": tombstones,
        "conflicts": conflicts,
        "last_pull_at": last_pull,
        "cursors": cursors,
    }


def render(status: dict[str, Any]) -> str:
    """Plain text for humans."""
    o = status["outbox"]
    lines = [
        "outbox:        " + "  ".join(f"{k}={o[k]}" for k in OUTBOX_STATES),
        f"oldest pending: {status['oldest_pending_seconds']}s" if status["oldest_pending_seconds"] is not None
        else "oldest pending: -",
        f"dead rows:      {status['dead']}",
        f"change log:     {status['change_log_backlog']} unprocessed",
        "local only:     " + "  ".join(f"{k}={v}" for k, v in status["local_only"].items())
        + "   (rows without st_id: not created in ServiceTitan)",
        "sync errors:    " + "  ".join(f"{k}={v}" for k, v in status["rows_with_sync_error"].items()),
        f"tombstones:     {status['tombstones']}   (local deletes, not propagated)",
        f"conflicts:      {status['conflicts']}",
        f"last pull:      {status['last_pull_at'] or 'never'}",
    ]
    for feed, c in sorted(status["cursors"].items()):
        token = c["continue_from"] or "-"
        lines.append(
            f"cursor {feed}: {token}  (initial load {'done' if c['initial_load_done'] else 'in progress'}, "
            f"{c['records_seen']} records seen, last pull {c['last_pull_at'] or 'never'})"
        )
    return "\n".join(lines)
