"""Detect: drain the trigger-fed change log into the outbox, one transaction per batch.

The change-log rows are deleted in the transaction that writes the outbox rows, so no committed change is
missed and none is processed twice. A record with a pending (unsent) outbox row gets that row updated
(coalescing); one with a request in flight gets a new pending row queued behind it.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import Connection, Engine

from sync.config import Config
from sync.core.diff import unconfirmed_versions
from sync.core.fields import ENTITIES, NAMES, Entity
from sync.core.plan import LOCAL_ONLY_ERROR, plan_record, read_only_edits, read_only_error
from sync.db import changelog, mirror, outbox, rejected, shadow, tombstones
from sync.db.engine import bypass_triggers
from sync.log import get_logger

log = get_logger("stsync.detect")


@dataclass
class DetectResult:
    rows: int = 0
    """change-log rows drained"""
    records: int = 0
    enqueued: int = 0
    coalesced: int = 0
    """of enqueued: folded into an existing pending row"""
    superseded: int = 0
    """pending rows dropped because the record no longer differs from the shadow"""
    dead: int = 0
    """rejected before sending (the body would fail ServiceTitan's schema)"""
    local_only: int = 0
    deleted: int = 0
    read_only: int = 0
    """records with local edits of read-only columns (flagged, never sent)"""
    duration_ms: float = 0.0

    def add(self, other: DetectResult) -> None:
        for k, v in asdict(other).items():
            setattr(self, k, getattr(self, k) + v)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _detect_entity(conn: Connection, cfg: Config, entity: Entity, ids: set[int], deletes: list[dict[str, Any]],
                   result: DetectResult, edited_at: dict[tuple[str, int], Any] | None = None) -> None:
    for old in deletes:
        tombstones.record(conn, entity, old)
        log.warning("detect.local_delete_not_propagated", entity=entity, mirror_id=old["id"], st_id=old.get("st_id"))
    deleted_ids = [old["id"] for old in deletes]
    if deleted_ids:
        result.superseded += outbox.supersede_pending(conn, entity, deleted_ids)
        result.deleted += len(deleted_ids)
    if not ids:
        return
    settings = cfg.patch_settings()
    rows = mirror.load_mirror(conn, entity, ids)
    shadows = shadow.load_shadows(conn, entity, rows)
    possibly_applied = outbox.unconfirmed_for(conn, entity, list(rows))
    upserts: list[dict[str, Any]] = []
    clean: list[int] = []
    local_only: list[int] = []
    for mid, row in rows.items():
        base = shadows.get(mid)
        if row.st_id is None or base is None:
            local_only.append(mid)
            continue
        unconfirmed = [v for stored in possibly_applied.get(mid, ()) for v in unconfirmed_versions(stored)]
        diff, patch = plan_record(settings, entity, mid, row.record, base, unconfirmed)
        read_only = read_only_edits(entity, row.record, base)
        if read_only:  # never sent, never silently kept: flagged and counted; the next pull puts them back
            mirror.flag_read_only(conn, entity, mid, read_only_error(read_only))
            result.read_only += 1
            log.warning("detect.read_only_edited", entity=entity, mirror_id=mid, st_id=row.st_id, columns=read_only)
        if patch is None:
            clean.append(mid)
        elif not patch.valid:
            clean.append(mid)  # a pending row's older state must not go out either
            rejected.record(conn, entity, row, diff, patch)
            result.dead += 1
        else:
            at = (edited_at or {}).get((entity, mid))
            upserts.append({"m": mid, "s": row.st_id, "p": patch.body, "d": diff,
                            "t": at.isoformat() if at is not None else None})
    result.records += len(rows)
    if clean:
        result.superseded += outbox.supersede_pending(conn, entity, clean)
        mirror.mark_synced_if_pending(conn, entity, clean)
    if upserts:
        result.coalesced += outbox.upsert_pending(conn, entity, upserts)
        mirror.mark_pending(conn, entity, [u["m"] for u in upserts])
        result.enqueued += len(upserts)
    if local_only:
        n = mirror.mark_local_only(conn, entity, local_only, LOCAL_ONLY_ERROR)
        if n:
            log.warning("detect.local_only", entity=entity, count=n, mirror_ids=local_only[:20])
        result.local_only += len(local_only)


def detect_batch(engine: Engine, cfg: Config, *, limit: int | None = None) -> DetectResult:
    """Drain up to ``limit`` change-log rows into the outbox (one transaction)."""
    started = time.perf_counter()
    result = DetectResult()
    with engine.begin() as conn:
        # detect's own mirror writes are bookkeeping (sync_status, sync_error): the change-log trigger would
        # build to_jsonb(NEW) and to_jsonb(OLD) per row only to ignore them
        bypass_triggers(conn)
        drained = changelog.drain(conn, limit or cfg.sync.batch_size)
        if not drained:
            return result
        result.rows = len(drained)
        ids: dict[str, set[int]] = defaultdict(set)
        deletes: dict[str, list[dict[str, Any]]] = defaultdict(list)
        edited_at: dict[tuple[str, int], Any] = {}
        for entity, mid, op, old_row, changed_at in drained:
            if op == "D":
                deletes[entity].append(dict(old_row))
            else:
                ids[entity].add(mid)
                if op != "R":  # a recheck is stsync's own doing, not an edit
                    key = (entity, mid)
                    edited_at[key] = max(edited_at.get(key, changed_at), changed_at)
        for entity in ENTITIES:
            _detect_entity(conn, cfg, entity, ids[entity] - {d["id"] for d in deletes[entity]},
                           deletes[entity], result, edited_at)
    result.duration_ms = round((time.perf_counter() - started) * 1000, 2)
    log.info("detect.batch", **result.as_dict())
    return result


def detect_all(engine: Engine, cfg: Config) -> DetectResult:
    """Drain the whole change log, batch after batch."""
    total = DetectResult()
    while True:
        r = detect_batch(engine, cfg)
        total.add(r)
        if r.rows < cfg.sync.batch_size:
            return total


def preview_in(conn: Connection, cfg: Config) -> list[dict[str, Any]]:
    """Dry run: the requests that would be sent now (pending outbox rows and undrained changes), on the caller's
    connection (after its read-only pull, in the same transaction, which the caller rolls back)."""
    out: list[dict[str, Any]] = []
    settings = cfg.patch_settings()
    for entity in ENTITIES:
        ids = changelog.ids_undrained(conn, entity) | outbox.ids_pending(conn, entity)
        rows = mirror.load_mirror(conn, entity, ids)
        shadows = shadow.load_shadows(conn, entity, rows)
        possibly_applied = outbox.unconfirmed_for(conn, entity, list(rows))
        for mid in sorted(rows):
            row, base = rows[mid], shadows.get(mid)
            if row.st_id is None or base is None:
                continue
            unconfirmed = [v for stored in possibly_applied.get(mid, ()) for v in unconfirmed_versions(stored)]
            _, patch = plan_record(settings, entity, mid, row.record, base, unconfirmed)
            if patch is not None:
                out.append({"entity": entity, "mirror_id": mid, "st_id": row.st_id, "method": "PATCH",
                            "path": f"/{NAMES[entity].collection}/{row.st_id}", "body": patch.body,
                            "valid": patch.valid, "problems": patch.problems})
    return out
