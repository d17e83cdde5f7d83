"""`stsync status`: what an operator needs at a glance, read from the daemon's own tables."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection

from sync.core.fields import ENTITIES
from sync.db import changelog, conflicts, control, cursors, mirror, outbox, quarantine, tombstones
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
    pause = control.paused(conn)
    return {
        "paused": None if pause is None else {
            "since": pause["paused_at"].isoformat(), "by": pause["paused_by"], "reason": pause["reason"]},
        "outbox": counts,
        "oldest_pending_seconds": round(oldest, 3) if oldest is not None else None,
        "dead": counts["dead"],
        "change_log_backlog": changelog.backlog(conn),
        "local_only": {e: mirror.count_by_status(conn, e, "local_only") for e in ENTITIES},
        "to_create": {e: mirror.count_to_create(conn, e) for e in ENTITIES},
        "waiting_for_location": mirror.count_by_status(conn, "customer", "waiting_for_location"),
        "held": counts["held"],
        "truncations": tombstones.truncations_unrestored(conn),
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
    p = status["paused"]
    lines = [
        *([f"PAUSED:         nothing is sent since {p['since']} (by {p['by']}"
           + (f": {p['reason']}" if p["reason"] else "") + "); edits are still queued; `stsync resume` sends them"]
          if p else []),
        "outbox:        " + "  ".join(f"{k}={o[k]}" for k in OUTBOX_STATES),
        f"oldest pending: {status['oldest_pending_seconds']}s" if status["oldest_pending_seconds"] is not None
        else "oldest pending: -",
        f"dead rows:      {status['dead']}",
        f"change log:     {status['change_log_backlog']} unprocessed",
        "to create:      " + "  ".join(f"{k}={v}" for k, v in status["to_create"].items())
        + f"   (rows without st_id; {status['waiting_for_location']} customer(s) waiting for a location)",
        "local only:     " + "  ".join(f"{k}={v}" for k, v in status["local_only"].items())
        + "   (st_id set by hand, never pulled: nothing sent)",
        f"held deletes:   {status['held']}" + ("   (mass delete: `stsync outbox release --held` sends them, "
                                                 "`stsync outbox discard --held` puts the rows back)"
                                                 if status["held"] else ""),
        "sync errors:    " + "  ".join(f"{k}={v}" for k, v in status["rows_with_sync_error"].items()),
        "read-only edits: " + "  ".join(f"{k}={v}" for k, v in status["read_only_edits"].items())
        + "   (never sent; the next pull puts ServiceTitan's values back)",
        f"tombstones:     {status['tombstones']}   (local deletes; the pull never brings them back)",
        *([f"truncated:      {', '.join(f'{k}={v}' for k, v in status['truncations'].items())}   (TRUNCATE of a "
           "mirror table: never propagated; the next pull restores the rows)"] if status["truncations"] else []),
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
