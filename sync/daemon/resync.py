"""`stsync resync`: pull records again into the three-way merge, one by one (by id) or all (the feeds from the
start). Safe at any time, also while the daemon runs: the merge is the pull's own (``sync.stages.pull``), so an
unchanged record changes nothing, a remote change is taken as the pull would take it, and a local edit not yet
sent stays and is sent (or is a recorded conflict under the policy)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from sync.config import Config
from sync.core.fields import NAMES, Entity
from sync.db import cursors
from sync.db.engine import check_current, connect, make_engine, notify
from sync.errors import ServiceTitanError, StsyncError
from sync.servicetitan.client import IDS_PER_LIST, ServiceTitanClient
from sync.stages.pull import apply_fetched

FEEDS = ("customers", "locations")


def resync_records(cfg: Config, entity: Entity, st_ids: Sequence[int], *, transport: Any = None) -> dict[str, Any]:
    """Fetch these records by id and merge them; ``{"records", "applied", "conflicts", "not_found"}``."""
    engine = make_engine(cfg.database_url(), cfg.db_schema, pool_size=1)
    try:
        check_current(engine, cfg.db_schema)
        return asyncio.run(_resync(engine, cfg, entity, sorted(set(st_ids)), transport))
    finally:
        engine.dispose()


async def _resync(engine: Any, cfg: Config, entity: Entity, st_ids: list[int], transport: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"records": 0, "applied": 0, "conflicts": 0, "not_found": []}
    collection = NAMES[entity].collection
    async with ServiceTitanClient(cfg.servicetitan, transport=transport) as client:
        for at in range(0, len(st_ids), IDS_PER_LIST):
            chunk = st_ids[at:at + IDS_PER_LIST]
            resp = await client.list_with_external_data(collection, chunk, cfg.servicetitan.application_guid)
            data = resp.body.get("data") if resp.ok and isinstance(resp.body, dict) else None
            if not isinstance(data, list):
                said = resp.error or f"answered {resp.status}"
                raise ServiceTitanError(f"GET /{collection}?ids=... {said}: nothing was merged from this batch "
                                        f"({len(chunk)} ids); run it again", status=resp.status)
            found = {int(r["id"]) for r in data if isinstance(r, dict) and isinstance(r.get("id"), int)}
            out["not_found"] += [i for i in chunk if i not in found]
            stats = await apply_fetched(engine, client, cfg, entity, data)
            out["records"] += stats.records
            out["applied"] += stats.applied + stats.inserted
            out["conflicts"] += stats.conflicts
    return out


def resync_all(cfg: Config) -> list[str]:
    """Every feed starts again from the beginning at the next pull (woken at once by NOTIFY ``resync``)."""
    engine = make_engine(cfg.database_url(), cfg.db_schema, pool_size=1)
    try:
        check_current(engine, cfg.db_schema)
        with connect(engine) as conn, conn.begin():
            for feed in FEEDS:
                cursors.read(conn, feed)  # the row exists
                cursors.restart(conn, feed)
            notify(conn, "resync")
        return list(FEEDS)
    finally:
        engine.dispose()


def check_ids(entity: str | None, st_ids: Sequence[int], everything: bool) -> None:
    if everything and (entity or st_ids):
        raise StsyncError("give either --all or an entity and ids, not both")
    if not everything and (entity is None or not st_ids):
        raise StsyncError("say what to resync: `stsync resync customer ID...`, `stsync resync location ID...` "
                          "or `stsync resync --all`")
