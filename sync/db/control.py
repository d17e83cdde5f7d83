"""The control row (migration 0011): whether sending is paused, since when, by whom and why."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, text

PAUSED = "EXISTS (SELECT 1 FROM control WHERE paused_at IS NOT NULL)"
"""SQL that is true while sending is paused (the claim's guard: ``sync/db/outbox.py`` ``claim_due``)."""


def pause(conn: Connection, by: str, reason: str | None) -> dict[str, Any]:
    """Pause sending (idempotent: a second pause keeps the first one's time, takes the newer reason)."""
    row = conn.execute(text("""UPDATE control SET paused_at = coalesce(paused_at, now()), paused_by = :b,
                                                  reason = coalesce(:r, reason)
                               RETURNING paused_at, paused_by, reason"""), {"b": by, "r": reason}).mappings().one()
    return dict(row)


def resume(conn: Connection) -> dict[str, Any] | None:
    """Resume sending; returns what the pause was (None: it was not paused)."""
    row = conn.execute(text("""UPDATE control c SET paused_at = NULL, paused_by = NULL, reason = NULL
                               FROM (SELECT paused_at, paused_by, reason FROM control FOR UPDATE) before
                               WHERE before.paused_at IS NOT NULL
                               RETURNING before.paused_at, before.paused_by, before.reason""")).mappings().first()
    return dict(row) if row is not None else None


def paused(conn: Connection) -> dict[str, Any] | None:
    """``{paused_at, paused_by, reason, paused_s}`` while paused, else None."""
    row = conn.execute(text("""SELECT paused_at, paused_by, reason,
                                      extract(epoch FROM now() - paused_at)::float AS paused_s
                               FROM control WHERE paused_at IS NOT NULL""")).mappings().first()
    return dict(row) if row is not None else None
