"""The ``outbox_attempts`` table: one row per HTTP attempt of an outbox row (its history for operators)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, text


def record(conn: Connection, *, outbox_id: int, attempt: int, worker: str, started_at: float,
           http_status: int | None, latency_ms: float | None, outcome: str, error: str | None,
           trace_id: str | None) -> None:
    """One attempt: ``started_at`` is a Unix time, ``error`` JSON text (None for a success)."""
    conn.execute(text("""INSERT INTO outbox_attempts (outbox_id, attempt, worker, started_at, http_status,
                             latency_ms, outcome, error, trace_id)
                         VALUES (:o, :a, :w, to_timestamp(:t), :s, :l, :out, CAST(:e AS jsonb), :tr)"""),
                 {"o": outbox_id, "a": attempt, "w": worker, "t": started_at, "s": http_status, "l": latency_ms,
                  "out": outcome, "e": error, "tr": trace_id})


def history(conn: Connection, outbox_id: int) -> list[dict[str, Any]]:
    return [dict(a) for a in conn.execute(
        text("""SELECT attempt, worker, started_at, finished_at, http_status, latency_ms, outcome, error, trace_id
                FROM outbox_attempts WHERE outbox_id = :id ORDER BY id"""), {"id": outbox_id}).mappings()]
