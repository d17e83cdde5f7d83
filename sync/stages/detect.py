"""Detect: drain the trigger-fed change log into the outbox, one transaction per batch.

The change-log rows are deleted in the transaction that writes the outbox rows, so no committed change is
missed and none is processed twice. A record with a pending (unsent) outbox row gets that row updated
(coalescing); one with a request in flight gets a new pending row queued behind it.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import Connection, Engine

from sync.config import Config
from sync.core.create import create_diff, plan_create
from sync.core.diff import unconfirmed_versions
from sync.core.fields import ENTITIES, NAMES, Entity
from sync.core.plan import (
    LOCAL_ONLY_ERROR,
    WAITING_FOR_LOCATION,
    deactivation,
    plan_record,
    read_only_edits,
    read_only_error,
    sync_error,
)
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
    creates: int = 0
    """of enqueued: records to create in ServiceTitan (a customer with its new locations counts once)"""
    waiting: int = 0
    """new customers waiting for a location"""
    deleted: int = 0
    deletes_queued: int = 0
    """of deleted: propagated (``sync.local_deletes: propagate``), queued or held"""
    held: int = 0
    """deletes held by the mass-delete guard (``sync.max_deletes_per_cycle``)"""
    read_only: int = 0
    """records with local edits of read-only columns (flagged, never sent)"""
    duration_ms: float = 0.0

    def add(self, other: DetectResult) -> None:
        for k, v in asdict(other).items():
            setattr(self, k, getattr(self, k) + v)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DeleteGuard:
    """The mass-delete guard over one detect cycle (``detect_all``): the deletes it queued, how many the change
    log held when the cycle began (so that a mass delete spread over several batches is held from its first
    batch on, never partly sent), and whether they are held (more than ``sync.max_deletes_per_cycle``)."""

    queued: list[tuple[str, int]] = field(default_factory=list)
    expected: int = 0
    held: bool = False


def _detect_deletes(conn: Connection, cfg: Config, entity: Entity, deletes: list[dict[str, Any]],
                    result: DetectResult, guard: DeleteGuard) -> None:
    """Deleted rows: a tombstone each (the pull never brings the record back); under ``propagate``, a delete
    row for each that has a ServiceTitan record (``PATCH active=false``), queued behind any request in flight."""
    for old in deletes:
        tombstones.record(conn, entity, old)
    deleted_ids = [old["id"] for old in deletes]
    if not deleted_ids:
        return
    result.superseded += outbox.supersede_pending(conn, entity, deleted_ids)
    result.deleted += len(deleted_ids)
    if cfg.sync.local_deletes == "keep":
        for old in deletes:
            log.warning("detect.local_delete_not_propagated", entity=entity, mirror_id=old["id"],
                        st_id=old.get("st_id"), hint="sync.local_deletes is keep: a tombstone, nothing sent")
        return
    settings = cfg.patch_settings()
    upserts = []
    for old in deletes:
        st_id = old.get("st_id")
        if st_id is None:
            continue  # never created in ServiceTitan: nothing to deactivate
        patch = deactivation(settings, entity, old["id"])
        upserts.append({"m": old["id"], "s": st_id, "p": patch.body, "d": {}, "t": None, "o": "delete"})
    if upserts:
        outbox.upsert_pending(conn, entity, upserts)
        guard.queued += [(entity, u["m"]) for u in upserts]
        result.deletes_queued += len(upserts)


def _apply_guard(conn: Connection, cfg: Config, guard: DeleteGuard, result: DetectResult) -> None:
    limit = cfg.sync.max_deletes_per_cycle
    if max(len(guard.queued), guard.expected) <= limit or not guard.queued:
        return
    n = outbox.hold_deletes(conn, guard.queued)
    result.held += n
    if not guard.held:
        log.warning("detect.mass_delete_held", deletes=max(len(guard.queued), guard.expected), limit=limit,
                    hint="none is sent: `stsync outbox release --held` sends them, `stsync outbox discard --held` "
                         "puts the rows back")
    guard.held = True


def _detect_entity(conn: Connection, cfg: Config, entity: Entity, ids: set[int], deletes: list[dict[str, Any]],
                   result: DetectResult, edited_at: dict[tuple[str, int], Any] | None = None,
                   guard: DeleteGuard | None = None) -> None:
    _detect_deletes(conn, cfg, entity, deletes, result, guard if guard is not None else DeleteGuard())
    if not ids:
        return
    settings = cfg.patch_settings()
    rows = mirror.load_mirror(conn, entity, ids)
    shadows = shadow.load_shadows(conn, entity, rows)
    possibly_applied = outbox.unconfirmed_for(conn, entity, list(rows))
    upserts: list[dict[str, Any]] = []
    clean: list[int] = []
    local_only: list[int] = []
    new = [mid for mid, row in rows.items() if row.st_id is None]
    if new:
        upserts += _plan_creates(conn, cfg, entity, {m: rows[m] for m in new}, result, edited_at or {})
    for mid, row in rows.items():
        base = shadows.get(mid)
        if row.st_id is None:
            continue
        if base is None:
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


def _plan_creates(conn: Connection, cfg: Config, entity: Entity, rows: dict[int, mirror.MirrorRow],
                  result: DetectResult, edited_at: dict[tuple[str, int], Any]) -> list[dict[str, Any]]:
    """Rows inserted without ``st_id``: a customer's create (with its new locations), a location's own create
    (its customer is in ServiceTitan), or nothing yet (a customer with no location waits; a location of a new
    customer goes in that customer's create). Bodies failing the schema end dead here, never sent."""
    settings = cfg.patch_settings()
    out: list[dict[str, Any]] = []
    waiting: list[int] = []
    riding: list[int] = []  # locations that go out inside their customer's create

    def queue(mid: int, body: dict[str, Any], times: list[Any],
              locations: list[tuple[int, dict[str, Any]]] | None = None) -> None:
        at = max((t for t in times if t is not None), default=None)
        diff = create_diff(entity, body, rows[mid].record, dict(locations or []), settings.mirror_id_key)
        out.append({"m": mid, "s": None, "p": body, "d": diff, "t": at.isoformat() if at is not None else None,
                    "o": "create"})
        result.creates += 1

    new_locations = mirror.new_locations_of(conn, rows) if entity == "customer" else {}
    for mid, row in rows.items():
        locs = new_locations.get(mid, [])
        kind, patch = plan_create(entity, mid, row.record, row.customer_id, locs,
                                  application_guid=settings.application_guid, mirror_id_key=settings.mirror_id_key)
        if kind == "wait":
            waiting.append(mid)
            continue
        if kind == "rides" or patch is None:
            riding.append(mid)  # its customer is new too: detect_batch queued that customer's create
            continue
        if not patch.valid:
            oid = rejected.record(conn, entity, row, {}, patch)
            for lmid, _ in locs:
                mirror.mark_error(conn, "location", lmid, sync_error(
                    f"not created: its customer's create (outbox row {oid}) fails ServiceTitan's schema",
                    columns=sorted(patch.problems), outbox_id=oid))
            result.dead += 1
            continue
        times = [edited_at.get((entity, mid)), *(edited_at.get(("location", m)) for m, _ in locs)]
        queue(mid, patch.body, times, locs)
        riding += [m for m, _ in locs]
    if waiting:
        result.superseded += outbox.supersede_pending(conn, entity, waiting)
        n = mirror.mark_waiting(conn, waiting, WAITING_FOR_LOCATION)
        if n:
            log.info("detect.waiting_for_location", count=n, mirror_ids=waiting[:20])
        result.waiting += len(waiting)
    if riding:
        mirror.mark_pending(conn, "location", riding)
    return out


def detect_batch(engine: Engine, cfg: Config, *, limit: int | None = None,
                 guard: DeleteGuard | None = None) -> DetectResult:
    """Drain up to ``limit`` change-log rows into the outbox (one transaction). ``guard``: the cycle's
    mass-delete guard (``detect_all``); alone, the batch is the cycle."""
    guard = guard if guard is not None else DeleteGuard()
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
        # a new location of a new customer goes out in that customer's create: look at the customer again
        ids["customer"] |= mirror.new_customers_of(conn, ids["location"])
        for entity in ENTITIES:
            _detect_entity(conn, cfg, entity, ids[entity] - {d["id"] for d in deletes[entity]},
                           deletes[entity], result, edited_at, guard)
        _apply_guard(conn, cfg, guard, result)
    result.duration_ms = round((time.perf_counter() - started) * 1000, 2)
    log.info("detect.batch", **result.as_dict())
    return result


def detect_all(engine: Engine, cfg: Config) -> DetectResult:
    """Drain the whole change log, batch after batch."""
    total = DetectResult()
    guard = DeleteGuard()
    if cfg.sync.local_deletes == "propagate":
        with engine.connect() as conn:
            guard.expected = changelog.pending_deletes(conn)
    while True:
        r = detect_batch(engine, cfg, guard=guard)
        total.add(r)
        if r.rows < cfg.sync.batch_size:
            return total


def preview_in(conn: Connection, cfg: Config) -> list[dict[str, Any]]:
    """Dry run: the requests that would be sent now (pending outbox rows and undrained changes: PATCHes and the
    creates of rows without ``st_id``), on the caller's connection (after its read-only pull, in the same
    transaction, which the caller rolls back). Deletes are not predicted (``stsync outbox list --state held``
    shows those the guard holds)."""
    out: list[dict[str, Any]] = []
    settings = cfg.patch_settings()
    wanted = {e: changelog.ids_undrained(conn, e) | outbox.ids_pending(conn, e) for e in ENTITIES}
    wanted["customer"] |= mirror.new_customers_of(conn, wanted["location"])
    for entity in ENTITIES:
        ids = wanted[entity]
        rows = mirror.load_mirror(conn, entity, ids)
        shadows = shadow.load_shadows(conn, entity, rows)
        possibly_applied = outbox.unconfirmed_for(conn, entity, list(rows))
        new = {m: r for m, r in rows.items() if r.st_id is None}
        new_locations = mirror.new_locations_of(conn, new) if entity == "customer" and new else {}
        for mid in sorted(rows):
            row, base = rows[mid], shadows.get(mid)
            if row.st_id is None:
                kind, create = plan_create(entity, mid, row.record, row.customer_id, new_locations.get(mid, []),
                                           application_guid=settings.application_guid,
                                           mirror_id_key=settings.mirror_id_key)
                # (a customer alone waits, a new customer's location rides in its POST, one without a customer
                # is dead unsent)
                if kind == "send" and create is not None and create.body:
                    out.append({"entity": entity, "mirror_id": mid, "st_id": None, "method": "POST",
                                "path": f"/{NAMES[entity].collection}", "body": create.body,
                                "valid": create.valid, "problems": create.problems})
                continue
            if base is None:
                continue
            unconfirmed = [v for stored in possibly_applied.get(mid, ()) for v in unconfirmed_versions(stored)]
            _, patch = plan_record(settings, entity, mid, row.record, base, unconfirmed)
            if patch is not None:
                out.append({"entity": entity, "mirror_id": mid, "st_id": row.st_id, "method": "PATCH",
                            "path": f"/{NAMES[entity].collection}/{row.st_id}", "body": patch.body,
                            "valid": patch.valid, "problems": patch.problems})
    return out
