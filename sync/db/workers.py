"""Replica registry: each daemon heartbeats a row; the live count divides the shared request budget.

ServiceTitan's limit is per application per tenant, not per process, so N replicas each run at
``requests_per_second / N``. A replica that stops deletes its row; a killed one drops out of the count when
its heartbeat is older than ``STALE_AFTER_S``.
"""

from __future__ import annotations

from sqlalchemy import Engine, text

HEARTBEAT_EVERY_S = 2.0
STALE_AFTER_S = 10.0


def heartbeat(engine: Engine, worker: str) -> int:
    """Record that ``worker`` is alive; returns how many workers are alive (at least 1)."""
    with engine.begin() as conn:
        conn.execute(text("""INSERT INTO workers (id) VALUES (:w)
                             ON CONFLICT (id) DO UPDATE SET heartbeat_at = now()"""), {"w": worker})
        conn.execute(text("DELETE FROM workers WHERE heartbeat_at < now() - make_interval(secs => :s * 6)"),
                     {"s": STALE_AFTER_S})
        live = conn.execute(text("SELECT count(*) FROM workers WHERE heartbeat_at > now() - make_interval(secs => :s)"),
                            {"s": STALE_AFTER_S}).scalar_one()
    return max(1, int(live))


def leave(engine: Engine, worker: str) -> None:
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM workers WHERE id = :w"), {"w": worker})
