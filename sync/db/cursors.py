"""The ``feed_cursors`` table: per export feed, the ``continueFrom`` token of the last page applied.

A page's records and its token are committed in one transaction (the pull owns it), so a crash resumes at the
first page not yet committed. ``lock`` is how a second replica's pull notices that the feed moved meanwhile.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, text


def read(conn: Connection, feed: str) -> tuple[str | None, bool]:
    """``(continue_from, initial_load_done)``, creating the feed's row on first use."""
    conn.execute(text("INSERT INTO feed_cursors (feed) VALUES (:f) ON CONFLICT (feed) DO NOTHING"), {"f": feed})
    row = conn.execute(text("SELECT continue_from, initial_load_done FROM feed_cursors WHERE feed = :f"),
                       {"f": feed}).one()
    return row[0], bool(row[1])


def lock(conn: Connection, feed: str) -> str | None:
    """Lock the feed's row for this transaction; returns its token now."""
    token: str | None = conn.execute(text("SELECT continue_from FROM feed_cursors WHERE feed = :f FOR UPDATE"),
                                     {"f": feed}).scalar_one()
    return token


def store(conn: Connection, feed: str, *, continue_from: str | None, drained: bool, records: int) -> None:
    """After a page: its token (None keeps the stored one), whether the feed is drained, records seen."""
    conn.execute(
        text("""UPDATE feed_cursors SET continue_from = coalesce(:tok, continue_from),
                       initial_load_done = initial_load_done OR :drained, records_seen = records_seen + :n,
                       last_pull_at = now(), updated_at = now()
                WHERE feed = :f"""),
        {"f": feed, "tok": continue_from, "drained": drained, "n": records},
    )


def restart(conn: Connection, feed: str) -> None:
    """The feed is read again from the beginning (a mirror table was emptied by TRUNCATE)."""
    conn.execute(text("UPDATE feed_cursors SET continue_from = NULL, initial_load_done = false, updated_at = now() "
                      "WHERE feed = :f"), {"f": feed})


def all_cursors(conn: Connection) -> list[dict[str, Any]]:
    """Every feed's row, with the seconds since its last pull and since its token moved."""
    return [dict(r) for r in conn.execute(text(
        """SELECT feed, continue_from, initial_load_done, records_seen, last_pull_at,
                  extract(epoch FROM now() - last_pull_at) AS pull_age_s,
                  extract(epoch FROM now() - updated_at) AS moved_age_s
           FROM feed_cursors ORDER BY feed""")).mappings()]
