"""Helpers for push tests: a mirror linked to a sandbox tenant, and one-cycle runs through the real daemon."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from sqlalchemy import Engine, text

from sync.config import Config
from sync.core.fields import record_from_api
from sync.daemon.service import Daemon
from sync.db import engine as db
from sync.db import mirror as records
from sync.sandbox import Sandbox, create_app
from sync.stages.detect import detect_all
from sync.stages.dispatch import Dispatcher


def link_mirror(engine: Engine, sb: Sandbox) -> dict[int, int]:
    """Copy the sandbox's records into the mirror and the shadow, as a finished initial load would.

    Returns ServiceTitan customer id -> mirror id (locations: see ``location_ids``).
    """
    ids: dict[int, int] = {}
    with engine.begin() as conn:
        db.bypass_triggers(conn)
        # the pull's own insert (mirror rows and their shadows in one statement)
        records.insert_pulled(conn, "customer", [(c["id"], record_from_api("customer", c), None)
                                                 for c in sb.customers()])
        ids.update(records.mirror_ids_by_st_id(conn, "customer", [c["id"] for c in sb.customers()]))
        records.insert_pulled(conn, "location", [(loc["id"], record_from_api("location", loc),
                                                  ids.get(loc["customerId"])) for loc in sb.locations()])
    return ids


def mirror_id(engine: Engine, table: str, st_id: int) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text(f"SELECT id FROM {table} WHERE st_id = :s"), {"s": st_id}).scalar_one())


def sql(engine: Engine, statement: str, **params: Any) -> None:
    """A local application's write: a plain committed SQL statement."""
    with engine.begin() as conn:
        conn.execute(text(statement), params)


def rows(engine: Engine, statement: str, **params: Any) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(text(statement), params).all())


def transport(sb: Sandbox) -> httpx.AsyncBaseTransport:
    return httpx.ASGITransport(app=create_app(sb))


def run_cycle(engine: Engine, cfg: Config, sb: Sandbox) -> dict[str, Any]:
    """detect + dispatch once through the daemon's own jobs (no pull: these tests are about pushing)."""

    async def go() -> dict[str, Any]:
        d = Daemon(cfg, engine=engine, transport=transport(sb))
        try:
            return {"detect": await d.detect_job(), "dispatch": await d.dispatch_job()}
        finally:
            await d.close()

    return asyncio.run(go())


def pull_cycle(engine: Engine, cfg: Config, sb: Sandbox) -> dict[str, Any]:
    """One pull through the daemon's own job (the feeds from the stored cursor)."""

    async def go() -> dict[str, Any]:
        d = Daemon(cfg, engine=engine, transport=transport(sb))
        try:
            return await d.pull_job()
        finally:
            await d.close()

    return asyncio.run(go())


def drain(engine: Engine, cfg: Config, sb: Sandbox, *, rounds: int = 30) -> None:
    """Cycle until no outbox row is pending or in flight (retries made due at once)."""
    for _ in range(rounds):
        run_cycle(engine, cfg, sb)
        left = rows(engine, "SELECT count(*) FROM outbox WHERE state IN ('pending', 'in_flight')")[0][0]
        if not left and not rows(engine, "SELECT count(*) FROM change_log")[0][0]:
            return
        sql(engine, "UPDATE outbox SET next_attempt_at = now() WHERE state = 'pending'")
    raise AssertionError("outbox did not drain")


async def dispatch_with(engine: Engine, cfg: Config, sb: Sandbox, worker: str) -> dict[str, Any]:
    from sync.servicetitan.client import ServiceTitanClient

    async with ServiceTitanClient(cfg.servicetitan, transport=transport(sb)) as client:
        return await Dispatcher(engine, client, cfg, worker).run()


__all__ = ["detect_all", "dispatch_with", "drain", "link_mirror", "mirror_id", "pull_cycle", "rows", "run_cycle",
           "sql"]
