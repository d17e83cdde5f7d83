"""`stsync status`: what an operator needs at a glance, read from the daemon's own tables."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection

from sync.core.fields import ENTITIES
from sync.db import changelog, conflicts, cursors, mirror, outbox, quarantine, tombstones
from sync.db.outbox import STATES as OUTBOX_STATES


def collect(conn: Connection) -> dict[str, Any]:
    """Counts per outbox state, backlog ages, local-only rows, tombstones, feed cursors, conflicts."""
    counts = outbox.count_by_state(conn)
    oldest = outbox.oldest_pending_seconds(conn)
    feeds = {
        c["feed"]: {
            "continue_from": c["continue_from"],
            "initial_load_done": c["initial_load_done"],
            "records_seen": c["records_seen"],
            "last_pull_at": c["last_pull_at"].isoformat() if c["last_pull_at"] else None,
        }
        for c in cursors.all_cursors(conn)
    }
    last_pull = max((c["last_pull_at"] for c in feeds.values() if c["last_pull_at"]), default=None)
    held = quarantine.count(conn)
    return {
        "outbox": counts,
        "oldest_pending_seconds": round(oldest, 3) if oldest is not None else None,
        "dead": counts["dead"],
        "change_log_backlog": changelog.backlog(conn),
        "local_only": {e: mirror.count_local_only(conn, e) for e in ENTITIES},
        "rows_with_sync_error": {e: mirror.count_with_error(conn, e) for e in ENTITIES},
        "read_only_edits": {e: mirror.count_read_only_flagged(conn, e) for e in ENTITIES},
        "tombstones": tombstones.count(conn),
        "quarantined": {e: held.get(e, 0) for e in ENTITIES},
        "conflicts": conflicts.count(conn),
        "last_pull_at": last_pull,
        "cursors": feeds,
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
        "read-only edits: " + "  ".join(f"{k}={v}" for k, v in status["read_only_edits"].items())
        + "   (never sent; the next pull puts ServiceTitan's values back)",
        f"tombstones:     {status['tombstones']}   (local deletes, not propagated)",
        "quarantined:    " + "  ".join(f"{k}={v}" for k, v in status["quarantined"].items())
        + "   (feed records that could not be stored: table quarantine)",
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
