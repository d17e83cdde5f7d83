"""Dispatch: claim due outbox rows, send them at the rate limit, record every attempt and outcome.

Claims use ``FOR UPDATE SKIP LOCKED`` and a lease (renewed by a heartbeat while this worker lives), so several
processes can share one database; a crashed worker's rows are reclaimed once the lease expires. At most one
request per record is in flight (a unique index says so too). The body is recomputed from the current mirror
and shadow when a row is claimed, so a request never carries an older state than the mirror's.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, text
from sqlalchemy.exc import IntegrityError

from sync.config import Config
from sync.core import merge
from sync.core.diff import sent_values, strip_key
from sync.core.fields import (
    API_COLLECTIONS,
    FIELDS,
    TABLES,
    Entity,
    address_columns,
    equal,
    parse_timestamp,
    record_from_api,
)
from sync.core.request import _api_to_column
from sync.core.retry import Outcome, backoff_seconds, classify
from sync.daemon.observability import Metrics
from sync.db import engine as db
from sync.db import mirror as records
from sync.log import get_logger
from sync.servicetitan.client import ApiResponse, ServiceTitanClient
from sync.stages.detect import mark_dead_before_send, plan_record, sync_error

log = get_logger("stsync.dispatch")


_FOLDED_UNCONFIRMED = "(SELECT o.unconfirmed FROM outbox o WHERE o.id = :id)"
_CLAIMABLE = """o.state = 'pending'
                      AND NOT EXISTS (SELECT 1 FROM outbox f WHERE f.entity = o.entity
                                      AND f.mirror_id = o.mirror_id AND f.state = 'in_flight')"""
"""SQL over ``outbox o``: a pending row not queued behind a request in flight for its record."""


def _as_list(expr: str) -> str:
    """SQL: an outbox.unconfirmed value as a JSON array (rows from before it was a list hold one object)."""
    return (f"CASE jsonb_typeof({expr}) WHEN 'object' THEN jsonb_build_array({expr}) "
            f"ELSE coalesce({expr}, '[]'::jsonb) END")


def requeue(conn: Any, outbox_id: int, entity: str, mirror_id: int, *, delay_s: float, attempts: int,
            status: int | None, error: str | None, unconfirmed: str | None = None) -> None:
    """Send this row again later. If a newer pending row of the record is already queued behind it, that row
    carries the record's latest state (bodies are recomputed at claim time): this one is superseded and the
    newer one inherits its backoff, attempt count and unconfirmed bodies (at most one pending row per record)."""
    for _ in range(3):  # detect may queue a row between our check and our update: then fold into it
        try:
            with conn.begin_nested():
                _requeue_once(conn, outbox_id, entity, mirror_id, delay_s=delay_s, attempts=attempts,
                              status=status, error=error, unconfirmed=unconfirmed)
            return
        except IntegrityError:
            continue
    raise RuntimeError(f"outbox row {outbox_id}: could not requeue (pending row kept appearing)")


def _requeue_once(conn: Any, outbox_id: int, entity: str, mirror_id: int, *, delay_s: float, attempts: int,
                  status: int | None, error: str | None, unconfirmed: str | None) -> None:
    folded = conn.execute(text(f"""UPDATE outbox SET attempts = GREATEST(attempts, :a), updated_at = now(),
                                      local_changed_at = GREATEST(local_changed_at, (SELECT o.local_changed_at
                                                                  FROM outbox o WHERE o.id = :id)),
                                      next_attempt_at = GREATEST(next_attempt_at, now() + make_interval(secs => :d)),
                                      unconfirmed = {_as_list('unconfirmed')}
                                                    || {_as_list(_FOLDED_UNCONFIRMED)}
                                                    || coalesce(CAST(:u AS jsonb), '[]'::jsonb)
                                  WHERE entity = :e AND mirror_id = :m AND state = 'pending' AND id <> :id
                                  RETURNING id"""),
                          {"e": entity, "m": mirror_id, "id": outbox_id, "a": attempts, "d": delay_s,
                           "u": unconfirmed}).first()
    if folded is not None:
        conn.execute(text("""UPDATE outbox SET state = 'superseded', attempts = :a, last_status = :s,
                             last_error = coalesce(CAST(:err AS jsonb), last_error), completed_at = now(),
                             updated_at = now(), lease_owner = NULL, lease_expires_at = NULL WHERE id = :id"""),
                     {"id": outbox_id, "a": attempts, "s": status, "err": error})
        return
    conn.execute(text(f"""UPDATE outbox SET state = 'pending', attempts = :a, last_status = :s,
                         last_error = coalesce(CAST(:err AS jsonb), last_error), updated_at = now(),
                         next_attempt_at = now() + make_interval(secs => :d),
                         unconfirmed = CASE WHEN CAST(:u AS jsonb) IS NULL THEN unconfirmed
                                            ELSE {_as_list('unconfirmed')} || CAST(:u AS jsonb) END,
                         lease_owner = NULL, lease_expires_at = NULL WHERE id = :id"""),
                 {"id": outbox_id, "a": attempts, "s": status, "err": error, "d": delay_s, "u": unconfirmed})


def requeue_where(engine: Engine, condition: str, params: dict[str, Any]) -> int:
    """Put in-flight rows matching ``condition`` (their lease expired, or this worker stops) back to pending."""
    with engine.begin() as conn:
        held = conn.execute(text(f"""SELECT id, entity, mirror_id, attempts, diff FROM outbox
                                      WHERE state = 'in_flight' AND {condition} ORDER BY id FOR UPDATE SKIP LOCKED"""),
                            params).all()
        for oid, entity, mirror_id, attempts, diff in held:
            # the request may have gone out (a killed worker, a cancelled send): what it carried is possibly
            # applied by ServiceTitan, so the pull must take it for ours (the diff holds it since the claim)
            sent = sent_values(diff)
            requeue(conn, oid, entity, mirror_id, delay_s=0.0, attempts=attempts, status=None, error=None,
                    unconfirmed=json.dumps([sent], default=str) if sent else None)
    return len(held)


@dataclass
class Claim:
    outbox_id: int
    entity: Entity
    mirror_id: int
    st_id: int
    attempt: int
    """1-based number of this attempt (429s not counted)"""
    body: dict[str, Any]
    diff: dict[str, Any]
    sent: dict[str, Any]
    """the mirror record as sent"""


@dataclass
class DispatchStats:
    sent: int = 0
    succeeded: int = 0
    dead: int = 0
    retried: int = 0
    rate_limited: int = 0
    superseded: int = 0
    rejected: int = 0
    reclaimed: int = 0
    lease_lost: int = 0
    by_status: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Dispatcher:
    def __init__(self, engine: Engine, client: ServiceTitanClient, cfg: Config, worker: str, *,
                 rng: random.Random | None = None, metrics: Metrics | None = None) -> None:
        self.engine = engine
        self.client = client
        self.cfg = cfg
        self.worker = worker
        self.rng = rng or random.Random()
        self.stats = DispatchStats()
        self.live: set[int] = set()
        """Outbox ids this worker is sending right now (the only leases the heartbeat renews)."""
        self.metrics = metrics
        self.log = log.bind(worker=worker)

    # ----------------------------------------------------------------------------------- database

    def reclaim_expired(self) -> int:
        """Rows whose lease expired (their worker died) go back to pending, due now."""
        n = requeue_where(self.engine, "lease_expires_at < now()", {})
        if n:
            self.stats.reclaimed += n
            self.log.warning("outbox.leases_reclaimed", count=n)
        return int(n)

    def heartbeat(self) -> None:
        """Renew the leases of rows whose send is still alive (a row whose task died is left to expire)."""
        live = list(self.live)
        if not live:
            return
        with self.engine.begin() as conn:
            conn.execute(text("UPDATE outbox SET lease_expires_at = now() + make_interval(secs => :l) "
                              "WHERE state = 'in_flight' AND lease_owner = :w AND id = ANY(CAST(:ids AS bigint[]))"),
                         {"w": self.worker, "l": self.cfg.sync.lease_seconds, "ids": live})

    def next_due_in(self) -> float | None:
        """Seconds until the earliest claimable pending row is due (<= 0: due now); None when there is none
        (a row queued behind another worker's request in flight waits for that worker, not for time)."""
        with self.engine.connect() as conn:
            # ORDER BY ... LIMIT 1 walks outbox_due_idx (min() with the anti-join would read every pending row)
            due = conn.execute(text(f"""
                SELECT EXTRACT(EPOCH FROM o.next_attempt_at - now()) FROM outbox o WHERE {_CLAIMABLE}
                ORDER BY o.next_attempt_at LIMIT 1""")).scalar_one_or_none()
        return None if due is None else float(due)

    def release_all(self) -> int:
        """On shutdown: give back rows this worker holds but has not finished (they are resent later)."""
        return requeue_where(self.engine, "lease_owner = :w", {"w": self.worker})

    def claim(self, limit: int) -> list[Claim]:
        """Lease up to ``limit`` due rows and compute each body from the current mirror and shadow."""
        with self.engine.begin() as conn:
            rows = conn.execute(text(f"""
                WITH due AS (
                    SELECT o.id FROM outbox o
                    WHERE o.next_attempt_at <= now() AND {_CLAIMABLE}
                    ORDER BY o.next_attempt_at, o.id
                    LIMIT :n FOR UPDATE SKIP LOCKED)
                UPDATE outbox o SET state = 'in_flight', lease_owner = :w,
                       lease_expires_at = now() + make_interval(secs => :l), updated_at = now()
                FROM due WHERE o.id = due.id
                RETURNING o.id, o.entity, o.mirror_id, o.attempts"""),
                {"n": limit, "w": self.worker, "l": self.cfg.sync.lease_seconds}).all()
            if not rows:
                return []
            claims: list[Claim] = []
            by_entity: dict[str, list[tuple[int, int, int]]] = {}
            for oid, entity_name, mid, attempts in rows:
                by_entity.setdefault(entity_name, []).append((oid, mid, attempts))
            for name, items in by_entity.items():
                entity: Entity = "customer" if name == "customer" else "location"
                mirror = records.load_mirror(conn, entity, [m for _, m, _ in items])
                shadows = records.load_shadows(conn, entity, mirror)
                for oid, mid, attempts in items:
                    row, shadow = mirror.get(mid), shadows.get(mid)
                    diff, patch = (None, None) if row is None or shadow is None or row.st_id is None \
                        else plan_record(self.cfg, entity, row, shadow)
                    if row is None or patch is None:
                        conn.execute(text("UPDATE outbox SET state = 'superseded', completed_at = now(), "
                                          "lease_owner = NULL, lease_expires_at = NULL WHERE id = :id"), {"id": oid})
                        self.stats.superseded += 1
                        continue
                    if not patch.valid:
                        mark_dead_before_send(conn, entity, row, diff, patch, outbox_id=oid)
                        self.stats.rejected += 1
                        continue
                    conn.execute(text("UPDATE outbox SET payload = CAST(:p AS jsonb), diff = CAST(:d AS jsonb), "
                                      "st_id = :s WHERE id = :id"),
                                 {"id": oid, "p": json.dumps(patch.body), "d": json.dumps(diff), "s": row.st_id})
                    assert row.st_id is not None
                    claims.append(Claim(oid, entity, mid, row.st_id, attempts + 1, patch.body, diff or {},
                                        row.record))
            return claims

    def complete(self, c: Claim, resp: ApiResponse, started_at: float) -> Outcome:
        outcome = classify(resp.status, resp.body)
        retry_cfg = self.cfg.retry
        error_body: Any = resp.body if resp.status else {"message": resp.error}
        with self.engine.begin() as conn:
            conn.execute(text("""INSERT INTO outbox_attempts (outbox_id, attempt, worker, started_at, http_status,
                                     latency_ms, outcome, error, trace_id)
                                 VALUES (:o, :a, :w, to_timestamp(:t), :s, :l, :out, CAST(:e AS jsonb), :tr)"""),
                         {"o": c.outbox_id, "a": c.attempt, "w": self.worker, "t": started_at,
                          "s": resp.status or None, "l": resp.latency_ms, "out": outcome.value,
                          "e": None if outcome is Outcome.SUCCEEDED else json.dumps(error_body, default=str),
                          "tr": resp.trace_id})
            held = conn.execute(text("SELECT 1 FROM outbox WHERE id = :id AND state = 'in_flight' "
                                     "AND lease_owner = :w FOR UPDATE"), {"id": c.outbox_id, "w": self.worker}).first()
            if held is None:
                self.stats.lease_lost += 1
                self.log.warning("outbox.lease_lost", outbox_id=c.outbox_id, entity=c.entity, mirror_id=c.mirror_id)
                return outcome
            if outcome is Outcome.SUCCEEDED:
                self._apply_success(conn, c, resp.body)
                conn.execute(text("""UPDATE outbox SET state = 'succeeded', attempts = :a, last_status = :s,
                                     last_error = NULL, completed_at = now(), updated_at = now(),
                                     lease_owner = NULL, lease_expires_at = NULL WHERE id = :id"""),
                             {"id": c.outbox_id, "a": c.attempt, "s": resp.status})
            elif resp.not_sent:  # no token: nothing was sent, so no attempt is spent (like a 429)
                outcome = Outcome.RATE_LIMITED
                requeue(conn, c.outbox_id, c.entity, c.mirror_id, delay_s=resp.retry_after_s or 5.0,
                        attempts=c.attempt - 1, status=None, error=json.dumps(error_body, default=str))
            elif outcome is Outcome.RATE_LIMITED:
                wait = resp.retry_after_s if resp.retry_after_s is not None else 1.0
                requeue(conn, c.outbox_id, c.entity, c.mirror_id, delay_s=wait, attempts=c.attempt - 1,
                        status=429, error=None)
            elif outcome is Outcome.RETRY and c.attempt < retry_cfg.max_attempts:
                delay = backoff_seconds(c.attempt, retry_cfg.base_delay_seconds, retry_cfg.max_delay_seconds, self.rng)
                if resp.status == 0:  # ServiceTitan may still be processing it: hold the record (docs/push.md)
                    delay = max(delay, retry_cfg.in_doubt_seconds)
                # no answer, a 5xx or garbage: ServiceTitan may have applied it. Remember what was sent, so the
                # pull takes those values for our own echo, not for a remote edit (docs/push.md)
                in_doubt = resp.status == 0 or resp.status >= 500 or 200 <= resp.status < 300
                sent = {col: c.sent.get(col) for col in c.diff} if in_doubt else None
                requeue(conn, c.outbox_id, c.entity, c.mirror_id, delay_s=delay, attempts=c.attempt,
                        status=resp.status or None, error=json.dumps(error_body, default=str),
                        unconfirmed=json.dumps([sent], default=str) if sent else None)
            else:
                outcome = Outcome.DEAD
                self._mark_dead(conn, c, resp, error_body)
        return outcome

    def _mark_dead(self, conn: Any, c: Claim, resp: ApiResponse, error_body: Any) -> None:
        conn.execute(text("""UPDATE outbox SET state = 'dead', attempts = :a, last_status = :s,
                             last_error = CAST(:e AS jsonb), completed_at = now(), updated_at = now(),
                             lease_owner = NULL, lease_expires_at = NULL WHERE id = :id"""),
                     {"id": c.outbox_id, "a": c.attempt, "s": resp.status or None,
                      "e": json.dumps(error_body, default=str)})
        errors = error_body.get("errors") if isinstance(error_body, dict) else None
        columns = sorted({_api_to_column(c.entity, k[:1].lower() + k[1:]) for k in errors}) \
            if isinstance(errors, dict) else []
        if resp.status == 404:
            message = "record not found in ServiceTitan (deleted or merged there)"
        elif resp.status == 400:
            title = error_body.get("title") if isinstance(error_body, dict) else None
            message = f"ServiceTitan rejected the update: {title or 'validation failed'}"
        elif resp.status:
            message = f"ServiceTitan answered {resp.status} on every one of {c.attempt} attempts"
        else:
            message = f"no answer from ServiceTitan in {c.attempt} attempts: {resp.error}"
        conn.execute(text(f"UPDATE {TABLES[c.entity]} SET sync_status = 'error', sync_error = CAST(:err AS jsonb) "
                          "WHERE id = :m"),
                     {"m": c.mirror_id, "err": sync_error(message, status=resp.status or None, columns=columns,
                                                          errors=errors, outbox_id=c.outbox_id)})

    def _apply_success(self, conn: Any, c: Claim, body: dict[str, Any]) -> None:
        """shadow := response; the mirror takes what ServiceTitan stored where it normalised what we sent."""
        key = self.cfg.servicetitan.mirror_id_key
        remote = record_from_api(c.entity, body)
        remote["external_data"] = strip_key(remote["external_data"], key)
        current = records.load_mirror(conn, c.entity, [c.mirror_id], for_update=True).get(c.mirror_id)
        old_shadow = records.load_shadows(conn, c.entity, [c.mirror_id]).get(c.mirror_id, {})
        if current is None:
            records.write_shadow(conn, c.entity, c.mirror_id, c.st_id, remote)
            return
        updates: dict[str, Any] = {}
        conflict_fields: list[str] = []
        for f in FIELDS[c.entity]:
            col = f.column
            now_v, remote_v = current.record.get(col), remote.get(col)
            if equal(f.kind, now_v, remote_v):
                continue
            if not f.writable:
                updates[col] = remote_v
            elif col in c.diff:
                # we sent it: take ServiceTitan's stored form unless it was edited locally again meanwhile
                if equal(f.kind, now_v, c.sent.get(col)):
                    updates[col] = remote_v
            elif not equal(f.kind, remote_v, old_shadow.get(col)):
                # changed in ServiceTitan since our base and not sent by us: a remote edit the pull has not seen
                if equal(f.kind, now_v, old_shadow.get(col)):
                    updates[col] = remote_v
                else:
                    conflict_fields.append(col)
        if conflict_fields:
            self._resolve_conflicts(conn, c, current.record, old_shadow, remote, conflict_fields, updates)
        customer_mirror_id = None
        if "customer_st_id" in updates:
            customer_mirror_id = records.customer_mirror_ids(conn, [updates["customer_st_id"]]).get(
                updates["customer_st_id"])
        db.bypass_triggers(conn)
        records.update_mirror(conn, c.entity, c.mirror_id, updates, customer_mirror_id=customer_mirror_id,
                              extra_sql="sync_status = 'synced', sync_error = NULL, synced_at = now()")
        records.write_shadow(conn, c.entity, c.mirror_id, c.st_id, remote)
        merged = {**current.record, **updates}
        still_differs = any(not equal(f.kind, merged.get(f.column), remote.get(f.column))
                            for f in FIELDS[c.entity] if f.writable)
        if still_differs:
            # local edits made while the request was in flight (or kept over a remote edit): push them next
            records.log_recheck(conn, c.entity, [c.mirror_id])
            conn.execute(text(f"UPDATE {TABLES[c.entity]} SET sync_status = 'pending' WHERE id = :m"),
                         {"m": c.mirror_id})

    def _resolve_conflicts(self, conn: Any, c: Claim, local: dict[str, Any], base: dict[str, Any],
                           remote: dict[str, Any], columns: list[str], updates: dict[str, Any]) -> None:
        """Fields edited locally after the claim and in ServiceTitan since our base (seen in the response):
        resolved by ``sync.conflict_policy`` like the pull does, and recorded."""
        policy = self.cfg.sync.conflict_policy
        changed_at = conn.execute(text("SELECT max(changed_at) FROM change_log WHERE entity = :e AND mirror_id = :m"),
                                  {"e": c.entity, "m": c.mirror_id}).scalar()
        modified = remote.get("modified_on")
        outcome = merge.resolve(policy, parse_timestamp(modified) if modified else None,
                                changed_at or datetime.now(UTC))
        by_unit: dict[str, list[str]] = {}
        for col in columns:
            by_unit.setdefault(merge.unit_for_column(c.entity, col) or col, []).append(col)
        if "address" in by_unit:  # the address is one value: it is won or lost whole
            by_unit["address"] = list(address_columns(c.entity))
        for unit, cols in by_unit.items():
            if outcome == "remote":
                updates.update({col: remote.get(col) for col in cols})

            single = len(cols) == 1 and unit == cols[0]

            def pick(rec: dict[str, Any], cols: list[str] = cols, single: bool = single) -> Any:
                return rec.get(cols[0]) if single else {k: rec.get(k) for k in cols}

            conn.execute(text("""INSERT INTO conflicts (entity, mirror_id, st_id, field, base_value, local_value,
                                     remote_value, policy, outcome)
                                 VALUES (:e, :m, :s, :f, CAST(:b AS jsonb), CAST(:l AS jsonb), CAST(:r AS jsonb),
                                         :p, :o)"""),
                         {"e": c.entity, "m": c.mirror_id, "s": c.st_id, "f": unit, "b": json.dumps(pick(base)),
                          "l": json.dumps(pick(local)), "r": json.dumps(pick(remote)), "p": policy, "o": outcome})
            self.log.info("outbox.conflict", entity=c.entity, mirror_id=c.mirror_id, st_id=c.st_id, field=unit,
                          policy=policy, outcome=outcome)

    # ---------------------------------------------------------------------------------------- async

    async def _send(self, c: Claim) -> Outcome:
        self.live.add(c.outbox_id)
        try:
            return await self._send_live(c)
        finally:
            self.live.discard(c.outbox_id)

    async def _send_live(self, c: Claim) -> Outcome:
        started = time.time()
        resp = await self.client.patch(API_COLLECTIONS[c.entity], c.st_id, c.body)
        outcome = await asyncio.to_thread(self.complete, c, resp, started)
        self.stats.sent += 1
        key = str(resp.status)
        self.stats.by_status[key] = self.stats.by_status.get(key, 0) + 1
        if self.metrics is not None:
            m = self.metrics
            m.requests.labels(c.entity, key).inc()
            m.latency.observe(resp.latency_ms / 1000)
            if outcome is Outcome.RATE_LIMITED:
                m.rate_limited.inc()
            elif outcome is Outcome.RETRY:
                m.retries.inc()
            elif outcome is Outcome.DEAD:
                m.dead.inc()
        if outcome is Outcome.SUCCEEDED:
            self.stats.succeeded += 1
        elif outcome is Outcome.DEAD:
            self.stats.dead += 1
        elif outcome is Outcome.RATE_LIMITED:
            self.stats.rate_limited += 1
        else:
            self.stats.retried += 1
        fields = {"entity": c.entity, "mirror_id": c.mirror_id, "st_id": c.st_id, "outbox_id": c.outbox_id,
                  "attempt": c.attempt, "status": resp.status, "latency_ms": resp.latency_ms, "outcome": outcome.value}
        if outcome is Outcome.SUCCEEDED:
            self.log.info("outbox.sent", **fields)
        else:
            self.log.warning("outbox.send_failed", **fields, trace_id=resp.trace_id, error=resp.error,
                             body=resp.body if outcome is Outcome.DEAD else None)
        return outcome

    async def run(self, stop: asyncio.Event | None = None, *, grace_seconds: float = 10.0) -> dict[str, Any]:
        """Send everything due now (and whatever becomes due while busy); return when idle or stopped."""
        stop = stop or asyncio.Event()
        await asyncio.to_thread(self.reclaim_expired)
        inflight: set[asyncio.Task[Outcome]] = set()
        beat = asyncio.create_task(self._heartbeat_loop())
        next_reclaim = time.monotonic() + self.cfg.sync.lease_seconds / 2
        try:
            while not stop.is_set():
                if time.monotonic() >= next_reclaim:  # a busy worker also picks up a dead peer's rows
                    await asyncio.to_thread(self.reclaim_expired)
                    next_reclaim = time.monotonic() + self.cfg.sync.lease_seconds / 2
                free = self.cfg.servicetitan.max_concurrency - len(inflight)
                if free > 0:
                    for c in await asyncio.to_thread(self.claim, free):
                        inflight.add(asyncio.create_task(self._send(c)))
                if not inflight:
                    break
                stopper = asyncio.create_task(stop.wait())
                done, _ = await asyncio.wait({*inflight, stopper}, return_when=asyncio.FIRST_COMPLETED)
                stopper.cancel()
                inflight -= done
                for t in done:
                    if t is not stopper and t.exception() is not None:
                        self.log.error("outbox.send_crashed", error=repr(t.exception()))
            if inflight:
                _, inflight = await asyncio.wait(inflight, timeout=grace_seconds)
        finally:
            beat.cancel()
            unfinished = [t for t in inflight if not t.done()]
            for t in unfinished:
                t.cancel()
            if unfinished:
                # their answers will never be recorded: give the rows back now rather than at lease expiry
                released = self.release_all()
                self.log.warning("outbox.released_on_stop", count=released)
        return self.stats.as_dict()

    async def _heartbeat_loop(self) -> None:
        interval = max(1.0, self.cfg.sync.lease_seconds / 3)
        while True:
            await asyncio.sleep(interval)
            try:
                await asyncio.to_thread(self.heartbeat)
            except Exception as exc:  # keep beating through a database blip
                self.log.warning("outbox.heartbeat_failed", error=str(exc).splitlines()[0])
