"""Dispatch: claim due outbox rows, send them at the rate limit, record every attempt and outcome.

Claims use ``FOR UPDATE SKIP LOCKED`` and a lease (renewed by a heartbeat while this worker lives), so several
processes can share one database; a crashed worker's rows are reclaimed once the lease expires. At most one
request per record is in flight (a unique index says so too). The body is recomputed from the current mirror
and shadow when a row is claimed, so a request never carries an older state than the mirror's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine

from sync.config import Config
from sync.core import merge, openapi
from sync.core.create import (
    create_diff,
    mirror_id_of,
    new_location_ids,
    plan_create,
    sent_values,
)
from sync.core.diff import sent_values as diff_sent_values
from sync.core.diff import strip_key, unconfirmed_versions
from sync.core.fields import (
    CUSTOMER_LINK,
    NAMES,
    Entity,
    address_columns,
    parse_timestamp,
    record_from_api,
)
from sync.core.plan import WAITING_FOR_LOCATION, dead_answer, not_a_record, plan_record
from sync.core.presend import changed_since
from sync.core.retry import Outcome, backoff_seconds, classify
from sync.db import attempts, changelog, conflicts, created, mirror, outbox, rejected, shadow
from sync.db.engine import bypass_triggers
from sync.errors import AuthError
from sync.log import get_logger, redact
from sync.servicetitan.client import IDS_PER_LIST, ApiResponse, ServiceTitanClient

log = get_logger("stsync.dispatch")

SendObserver = Callable[[str, ApiResponse, Outcome], None]
"""Called after every answer with (entity, answer, outcome): how the daemon counts requests in its metrics."""
Refresher = Callable[[Entity, list[dict[str, Any]]], Awaitable[Any]]
"""Merges records ServiceTitan changed since their shadow (API dicts) into the mirror and shadow: the pull's
reconciler (``sync.stages.pull.apply_fetched``), wired by the daemon."""

CHECK_BATCH = IDS_PER_LIST
"""Rows claimed and checked with one list request: at full rate one check per 50 PATCHes (2% of the budget)."""
CHECK_REFILL_AT = 16
"""The next batch is claimed and checked when this few checked rows are left to send: enough to keep sending
at 60/s while the check's list request is answered (~0.25 s)."""
CHECK_MAX_AGE_S = 1.5
"""A checked row not sent within this long is checked again before it is sent (a 429 pause, a slow limiter)."""


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
    token: int = 0
    """the claim's fencing token (outbox.claim_token)"""
    base: dict[str, Any] = field(default_factory=dict)
    """the shadow the body was planned against"""
    operation: str = "update"
    """``update`` (a PATCH of record ``st_id``) or ``create`` (a POST; ``st_id`` is 0 until it is answered)"""
    earlier: list[dict[str, Any]] = field(default_factory=list)
    """what earlier attempts sent whose answers were lost (possibly applied): a create looks the record up first"""
    locations: dict[int, dict[str, Any]] = field(default_factory=dict)
    """a customer's create: its new location rows as sent (mirror id -> record)"""
    found: bool = False
    """a create's answer is the record an earlier attempt made, found by our external data"""
    lookup: bool = False
    """a create that may have reached ServiceTitan before (this row's attempts, an earlier create row of the
    record, or a customer's create that carried this location): looked up by our external data first"""


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
    fenced: int = 0
    """claims found lost just before sending: nothing sent"""
    checks: int = 0
    """list requests made to check claimed records before sending them"""
    created: int = 0
    """records created in ServiceTitan (a customer with its locations counts once)"""
    linked: int = 0
    """creates found already made (an earlier attempt applied, its answer lost) and linked instead of re-sent"""
    checks_failed: int = 0
    changed_remotely: int = 0
    """claimed records found changed in ServiceTitan since their shadow: merged first, their bodies recomputed"""
    conflicts: int = 0
    """field conflicts recorded while storing answers"""
    check_age_max_s: float = 0.0
    """the longest time from a check to the send of a record it checked"""
    by_status: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _not_created(entity: Entity, body: Any) -> str | None:
    """Why a 2xx answer to a create is not the created record, or None when it is."""
    if not isinstance(body, dict):
        return f"not a {entity} record: a JSON {type(body).__name__}"
    problem = openapi.answer_problem(openapi.RESPONSE_SCHEMAS[entity], {k: v for k, v in body.items()
                                                                        if k not in ("locations", "contacts")})
    if problem is not None:
        return f"not a {entity} record: {problem}"
    return None


class Dispatcher:
    def __init__(self, engine: Engine, client: ServiceTitanClient, cfg: Config, worker: str, *,
                 rng: random.Random | None = None, on_answer: SendObserver | None = None,
                 refresh: Refresher | None = None) -> None:
        self.engine = engine
        self.client = client
        self.cfg = cfg
        self.worker = worker
        self.rng = rng or random.Random()
        self.stats = DispatchStats()
        self.live: set[int] = set()
        """Outbox ids this worker is sending right now (the only leases the heartbeat renews)."""
        self.on_answer = on_answer
        self.refresh = refresh
        """None: no check before sending (``sync.check_before_send: false``)."""
        self._last_check = -1e9
        self._refreshed: dict[int, Any] = {}
        """outbox id -> the remote version a check already merged for it (never held back twice for one)"""
        self.fatal: AuthError | None = None
        """Credentials refused during a run: it stops and raises this (exit 2)."""
        self.log = log.bind(worker=worker)

    # ----------------------------------------------------------------------------------- database

    def reclaim_expired(self) -> int:
        """Rows whose lease expired (their worker died) go back to pending, due now."""
        with self.engine.begin() as conn:
            n = outbox.requeue_expired(conn, landing_s=self.cfg.servicetitan.timeout_seconds)
        if n:
            self.stats.reclaimed += n
            self.log.warning("outbox.leases_reclaimed", count=n)
        return n

    def heartbeat(self) -> None:
        """Renew the leases of rows whose send is still alive (a row whose task died is left to expire)."""
        live = list(self.live)
        if not live:
            return
        with self.engine.begin() as conn:
            outbox.renew_leases(conn, self.worker, live, self.cfg.sync.lease_seconds)

    def next_due_in(self) -> float | None:
        """Seconds until the earliest claimable pending row is due (<= 0: due now); None when there is none
        (a row queued behind another worker's request in flight waits for that worker, not for time)."""
        with self.engine.connect() as conn:
            return outbox.next_due_in(conn)

    def release_all(self) -> int:
        """On shutdown: give back rows this worker holds but has not finished (they are resent later)."""
        with self.engine.begin() as conn:
            return outbox.requeue_held_by(conn, self.worker, landing_s=self.cfg.servicetitan.timeout_seconds)

    def claim(self, limit: int) -> list[Claim]:
        """Lease up to ``limit`` due rows and compute each body from the current mirror and shadow."""
        settings = self.cfg.patch_settings()
        with self.engine.begin() as conn:
            rows = outbox.claim_due(conn, limit, self.worker, self.cfg.sync.lease_seconds)
            if not rows:
                return []
            claims: list[Claim] = []
            by_entity: dict[str, list[tuple[int, int, int]]] = {}
            tokens: dict[int, int] = {}
            possibly_applied: dict[int, list[dict[str, Any]]] = {}
            for oid, entity_name, mid, tries, token, unconfirmed, operation, st_id, payload in rows:
                if operation == "delete":
                    # the row is gone from the mirror: its stored body (``PATCH active=false``) is what goes out
                    claims.append(Claim(oid, "customer" if entity_name == "customer" else "location", mid,
                                        int(st_id or 0), tries + 1, dict(payload), {}, {}, token,
                                        operation="delete"))
                    continue
                by_entity.setdefault(entity_name, []).append((oid, mid, tries))
                tokens[oid] = token
                possibly_applied[oid] = unconfirmed_versions(unconfirmed) if unconfirmed else []
            for name, items in by_entity.items():
                entity: Entity = "customer" if name == "customer" else "location"
                # the row's lock first: a pull writes a mirror row and its shadow under that lock in one
                # transaction, so the two reads below see one consistent pair, never a torn one
                mirror.lock(conn, entity, [m for _, m, _ in items])
                rows_now = mirror.load_mirror(conn, entity, [m for _, m, _ in items])
                shadows = shadow.load_shadows(conn, entity, rows_now)
                new = {m: r for m, r in rows_now.items() if r.st_id is None}
                new_locations = mirror.new_locations_of(conn, new) if entity == "customer" and new else {}
                for oid, mid, tries in items:
                    row, base = rows_now.get(mid), shadows.get(mid)
                    if row is not None and row.st_id is None:
                        made = self._claim_create(conn, entity, row, oid, tries, tokens[oid],
                                                  new_locations.get(mid, []), possibly_applied[oid])
                        if made is not None:
                            claims.append(made)
                        continue
                    diff, patch = (None, None) if row is None or base is None or row.st_id is None \
                        else plan_record(settings, entity, mid, row.record, base, possibly_applied[oid])
                    if row is None or patch is None:
                        outbox.supersede_claimed(conn, oid)
                        if row is not None:  # nothing left to send: the record is in sync (an operator's
                            mirror.mark_synced_if_pending(conn, entity, [mid])  # retry set it pending)
                        self.stats.superseded += 1
                        continue
                    if not patch.valid:
                        rejected.record(conn, entity, row, diff, patch, outbox_id=oid)
                        self.stats.rejected += 1
                        continue
                    assert row.st_id is not None
                    outbox.set_body(conn, oid, patch.body, diff, row.st_id)
                    claims.append(Claim(oid, entity, mid, row.st_id, tries + 1, patch.body, diff or {},
                                        row.record, tokens[oid], dict(base or {})))
            return claims

    def _claim_create(self, conn: Connection, entity: Entity, row: mirror.MirrorRow, oid: int, tries: int,
                      token: int, locations: list[tuple[int, dict[str, Any]]],
                      earlier: list[dict[str, Any]]) -> Claim | None:
        """A claimed row of a record without ``st_id``: its create body from the mirror as it is now (a customer
        with its new locations), or nothing to send (a customer with no location waits; a location of a new
        customer goes in that customer's create), or dead unsent (the body fails the schema)."""
        settings = self.cfg.patch_settings()
        kind, patch = plan_create(entity, row.mirror_id, row.record, row.customer_id, locations,
                                  application_guid=settings.application_guid, mirror_id_key=settings.mirror_id_key)
        if kind == "wait":
            outbox.supersede_claimed(conn, oid)
            mirror.mark_waiting(conn, [row.mirror_id], WAITING_FOR_LOCATION)
            self.stats.superseded += 1
            return None
        if kind == "rides" or patch is None:
            outbox.supersede_claimed(conn, oid)  # its customer's create carries it
            if row.customer_id is not None:
                changelog.log_recheck(conn, "customer", [row.customer_id])
            self.stats.superseded += 1
            return None
        if entity == "location" and patch.valid and outbox.carried_in_flight(conn, row.mirror_id):
            # a customer's create that carries it is on its way: its answer (or the lookup after it) decides
            outbox.requeue(conn, oid, entity, row.mirror_id, delay_s=self.cfg.servicetitan.timeout_seconds,
                           attempts=tries, status=None, error=None)
            return None
        if not patch.valid:
            rejected.record(conn, entity, row, {}, patch, outbox_id=oid)
            self.stats.rejected += 1
            return None
        diff = create_diff(entity, patch.body, row.record, dict(locations), settings.mirror_id_key)
        outbox.set_body(conn, oid, patch.body, diff, None, "create")
        lookup = bool(earlier) or outbox.create_maybe_sent(conn, entity, row.mirror_id, except_id=oid)
        if entity == "location":  # what a customer's create that carried it sent of it
            earlier = [*earlier, *outbox.carried_versions(conn, row.mirror_id)]
        return Claim(oid, entity, row.mirror_id, 0, tries + 1, patch.body, diff, row.record, token, {},
                     operation="create", earlier=earlier, locations=dict(locations), lookup=lookup)

    def complete(self, c: Claim, resp: ApiResponse, started_at: float) -> Outcome:
        outcome = classify(resp.status, resp.body)
        retry_cfg = self.cfg.retry
        error_body: Any = resp.body if resp.status and not (resp.body is None and resp.error) else \
            {"message": resp.error, "status": resp.status or None}
        if outcome is Outcome.SUCCEEDED:
            problem = not_a_record(c.entity, c.st_id, resp.body) if c.operation == "update" else \
                _not_created(c.entity, resp.body)
            if problem is not None:  # a 2xx that is not the record: a failed attempt, possibly applied
                outcome = Outcome.RETRY
                error_body = {"message": f"ServiceTitan answered {resp.status} with a body that is {problem}",
                              "body": resp.body}
                self.log.warning("outbox.answer_not_a_record", outbox_id=c.outbox_id, entity=c.entity,
                                 st_id=c.st_id, status=resp.status, problem=problem[:300])
        error_body = redact(error_body)  # an error body may echo our request headers (credentials): never stored
        error_json = json.dumps(error_body, default=str)
        with self.engine.begin() as conn:
            attempts.record(conn, outbox_id=c.outbox_id, attempt=c.attempt, worker=self.worker,
                            started_at=started_at, http_status=resp.status or None, latency_ms=resp.latency_ms,
                            outcome=outcome.value, error=None if outcome is Outcome.SUCCEEDED else error_json,
                            trace_id=resp.trace_id)
            if not outbox.lock_if_held(conn, c.outbox_id, self.worker, c.token):
                self.stats.lease_lost += 1
                self.log.warning("outbox.lease_lost", outbox_id=c.outbox_id, entity=c.entity, mirror_id=c.mirror_id)
                if outcome is not Outcome.DEAD and outcome is not Outcome.RATE_LIMITED and not resp.not_sent:
                    # it went out under a claim since lost: possibly applied, so possibly ours (pull: an echo)
                    ours = self._answered(c)
                    outbox.add_unconfirmed(conn, c.entity, c.mirror_id, json.dumps([ours], default=str))
                return outcome
            if outcome is Outcome.SUCCEEDED:
                if c.operation == "create":
                    self._apply_created(conn, c, resp.body)
                elif c.operation == "update":
                    self._apply_success(conn, c, resp.body)
                else:  # a propagated delete: the mirror row is gone, its tombstone keeps the record out
                    self.log.info("outbox.deactivated", entity=c.entity, mirror_id=c.mirror_id, st_id=c.st_id)
                outbox.succeed(conn, c.outbox_id, attempts=c.attempt, status=resp.status,
                               st_id=resp.body.get("id") if c.operation == "create" else None)
            elif resp.not_sent:  # no token: nothing was sent, so no attempt is spent (like a 429)
                outcome = Outcome.RATE_LIMITED
                outbox.requeue(conn, c.outbox_id, c.entity, c.mirror_id, delay_s=resp.retry_after_s or 5.0,
                               attempts=c.attempt - 1, status=None, error=error_json)
            elif outcome is Outcome.RATE_LIMITED:
                wait = resp.retry_after_s if resp.retry_after_s is not None else 1.0
                outbox.requeue(conn, c.outbox_id, c.entity, c.mirror_id, delay_s=wait, attempts=c.attempt - 1,
                               status=429, error=None)
            elif outcome is Outcome.RETRY and c.attempt < retry_cfg.max_attempts:
                delay = backoff_seconds(c.attempt, retry_cfg.base_delay_seconds, retry_cfg.max_delay_seconds, self.rng)
                if resp.status == 0:  # ServiceTitan may still be processing it: hold the record (docs/push.md)
                    delay = max(delay, retry_cfg.in_doubt_seconds)
                # no answer, a 5xx or garbage: ServiceTitan may have applied it. Remember what was sent, so the
                # pull takes those values for our own echo, not for a remote edit (docs/push.md)
                in_doubt = resp.status == 0 or resp.status >= 500 or 200 <= resp.status < 300
                sent = self._answered(c) if in_doubt else None
                outbox.requeue(conn, c.outbox_id, c.entity, c.mirror_id, delay_s=delay, attempts=c.attempt,
                               status=resp.status or None, error=error_json,
                               unconfirmed=json.dumps([sent], default=str) if sent else None)
            else:
                in_doubt = outcome is Outcome.RETRY and (resp.status == 0 or resp.status >= 500
                                                         or 200 <= resp.status < 300)
                outcome = Outcome.DEAD
                sent = self._answered(c) if in_doubt else None
                outbox.fail_dead(conn, c.outbox_id, attempts=c.attempt, status=resp.status or None, error=error_json,
                                 unconfirmed=json.dumps([sent], default=str) if sent else None)
                mirror.mark_error(conn, c.entity, c.mirror_id,
                                  dead_answer(c.entity, resp.status, c.attempt, error_body, resp.error, c.outbox_id))
        return outcome

    def _apply_success(self, conn: Connection, c: Claim, body: dict[str, Any]) -> None:
        """The answer is a version of the record: the one reconciler (``core.merge.merge``, as the pull uses it)
        decides the mirror, the shadow and any conflicts; this stores its result in one mirror UPDATE."""
        key = self.cfg.servicetitan.mirror_id_key
        remote = record_from_api(c.entity, body)
        remote["external_data"] = strip_key(remote["external_data"], key)
        current = mirror.load_mirror(conn, c.entity, [c.mirror_id], for_update=True).get(c.mirror_id)
        old_shadow = shadow.load_shadows(conn, c.entity, [c.mirror_id]).get(c.mirror_id)
        if current is None:
            shadow.write_shadow(conn, c.entity, c.mirror_id, c.st_id, remote)
            return
        bypass_triggers(conn)
        link = remote.get(CUSTOMER_LINK)
        if link is not None and not mirror.customer_mirror_ids(conn, [link]):
            # moved in ServiceTitan to a customer the mirror does not have yet: keep the known link (never
            # NULL for "not known yet"); the next pull fetches that customer and applies the move
            remote[CUSTOMER_LINK] = (old_shadow or {}).get(CUSTOMER_LINK)
        policy = self.cfg.sync.conflict_policy
        modified = remote.get("modified_on")
        # edited locally since the claim (a local write not drained yet, or a row queued behind this one that carries
        # one; stsync's own recheck markers do not count):
        # a mirror value equal to what we sent may be a newer write of the same value, so a stale answer must not
        # take a later remote revert over it (the revert rule needs the claim's base only when it is unedited)
        unsent = outbox.unsent_for(conn, c.entity, [c.mirror_id])
        edited = changelog.has_local_write(conn, c.entity, c.mirror_id) or any(
            r[1] == "pending" and r[4] is not None for r in unsent)
        result = merge.merge(c.entity, old_shadow, current.record, remote, policy,
                             remote_modified_on=parse_timestamp(modified) if modified else None,
                             local_changed_at=self._local_changed_at(conn, c, unsent) if policy == "newest_wins"
                             else None,
                             sync_active=self.cfg.sync.sync_active, answer_to=self._answered(c),
                             claimed_base=None if edited else c.base)
        if result.stale:
            # older than a version a pull has already applied (which saw this request applied, since the
            # answer's version came first): the answer must not undo that pull
            self.log.info("outbox.answer_older_than_known", outbox_id=c.outbox_id, entity=c.entity,
                          st_id=c.st_id, answer_modified_on=remote.get("modified_on"),
                          known_modified_on=(old_shadow or {}).get("modified_on"),
                          reverted=sorted(result.mirror_updates) or None)
        updates = result.mirror_updates
        customer_mirror_id = None
        if CUSTOMER_LINK in updates:
            customer_mirror_id = mirror.customer_mirror_ids(conn, [updates[CUSTOMER_LINK]]).get(
                updates[CUSTOMER_LINK])
        # pending again when it still differs from its new base (edited while the request was in flight, or
        # kept over a remote edit): pushed next
        mirror.update_mirror(conn, c.entity, c.mirror_id, updates, customer_mirror_id=customer_mirror_id,
                             status="resend" if result.push_needed else "synced")
        if result.push_needed:
            changelog.log_recheck(conn, c.entity, [c.mirror_id])
        if not result.stale:
            shadow.write_shadow(conn, c.entity, c.mirror_id, c.st_id, result.new_shadow)
        conflicts.record_merged(conn, c.entity, c.mirror_id, c.st_id, policy, result.conflicts)
        self.stats.conflicts += len(result.conflicts)
        for found in result.conflicts:
            self.log.info("outbox.conflict", entity=c.entity, mirror_id=c.mirror_id, st_id=c.st_id,
                          field=found.field, policy=policy, outcome=found.outcome)

    def _apply_created(self, conn: Connection, c: Claim, body: dict[str, Any]) -> None:
        """ServiceTitan created the record (the POST's answer, or the record an earlier attempt made, found by our
        external data): the row and each location created with it get their ``st_id``; the shadow is what
        ServiceTitan stored; the mirror takes ServiceTitan's form of what was sent unless edited since
        (``core.create.merge_created``), which is then PATCHed."""
        key = self.cfg.servicetitan.mirror_id_key
        earlier = c.earlier if c.found else []
        bypass_triggers(conn)
        linked = self._link(conn, c.entity, c.mirror_id, body,
                            sent_values(c.entity, c.body, c.sent, [{k: v for k, v in e.items() if k != "locations"}
                                                                   for e in earlier], key))
        if not linked or c.entity != "customer":
            return
        sent_locations = dict(zip(new_location_ids(c.body, key), c.body.get("locations") or [], strict=False))
        answered = [loc for loc in body.get("locations") or [] if isinstance(loc, dict)
                    and openapi.answer_problem(openapi.RESPONSE_SCHEMAS["location"], loc) is None]
        for i, loc in enumerate(answered):
            lmid = mirror_id_of(loc, key)
            if lmid is None and len(answered) == len(sent_locations):  # answered in the order sent
                lmid = list(sent_locations)[i]
            if lmid is None or lmid not in sent_locations:
                continue
            before = [e["locations"][str(lmid)] for e in earlier
                      if isinstance(e.get("locations"), dict) and isinstance(e["locations"].get(str(lmid)), dict)]
            self._link(conn, "location", lmid, loc, sent_values("location", sent_locations[lmid],
                                                                c.locations.get(lmid, {}), before, key))
        # locations inserted while the customer's create was on its way: each is now a POST /locations
        rest = [m for m, _ in mirror.new_locations_of(conn, [c.mirror_id]).get(c.mirror_id, [])]
        if rest:
            changelog.log_recheck(conn, "location", rest)

    def _link(self, conn: Connection, entity: Entity, mirror_id: int, api: dict[str, Any],
              sent: dict[str, Any]) -> bool:
        """One created record into its mirror row (see ``_apply_created``); False if it cannot be linked."""
        key = self.cfg.servicetitan.mirror_id_key
        st_id = api.get("id")
        current = mirror.load_mirror(conn, entity, [mirror_id], for_update=True).get(mirror_id)
        holder = mirror.mirror_ids_by_st_id(conn, entity, [st_id]).get(st_id) if isinstance(st_id, int) else None
        if current is not None and isinstance(st_id, int) and current.st_id == st_id:
            # the pull linked it first, from the feed's version, which is no older than this answer: nothing to
            # apply (an answer must not undo what a pull applied)
            self.log.info("outbox.created_already_linked", entity=entity, mirror_id=mirror_id, st_id=st_id)
            return True
        if current is None and isinstance(st_id, int) and holder is None:
            self._bury(conn, entity, mirror_id, st_id)
            return False
        if current is None or not isinstance(st_id, int) or (current.st_id not in (None, st_id)) \
                or holder not in (None, mirror_id):
            self.log.error("outbox.created_not_linked", entity=entity, mirror_id=mirror_id, st_id=st_id,
                           row_st_id=None if current is None else current.st_id, held_by=holder,
                           hint="the mirror row is gone or already points at another record")
            return False
        remote = record_from_api(entity, api)
        remote["external_data"] = strip_key(remote["external_data"], key)
        created.link(conn, entity, mirror_id, st_id, remote, sent, sync_active=self.cfg.sync.sync_active)
        self.log.info("outbox.created", entity=entity, mirror_id=mirror_id, st_id=st_id)
        return True

    def _bury(self, conn: Connection, entity: Entity, mirror_id: int, st_id: int) -> None:
        """The row was deleted while its create was on its way: the record exists now. Its tombstone gets the
        ``st_id`` (the pull never brings it back) and, under ``sync.local_deletes: propagate``, it is
        deactivated like any deleted row."""
        buried, propagate = created.bury(conn, self.cfg.patch_settings(), entity, mirror_id, st_id,
                                         propagate=self.cfg.sync.local_deletes == "propagate")
        self.log.warning("outbox.created_for_a_deleted_row", entity=entity, mirror_id=mirror_id, st_id=st_id,
                         tombstoned=buried, deactivating=propagate)

    def _answered(self, c: Claim) -> dict[str, Any]:
        """What the PATCH carried, {column: value}: the diff's columns, and the whole address if any part of it.
        A customer's create adds ``locations``: {mirror id: what it carried of that location}."""
        if c.operation == "create":
            return diff_sent_values(c.diff)
        cols = set(c.diff)
        if cols & set(address_columns(c.entity)):
            cols |= set(address_columns(c.entity))
        return {col: c.sent.get(col) for col in cols}

    def _local_changed_at(self, conn: Connection, c: Claim,
                          unsent: list[tuple[int, str, Any, Any, Any]]) -> datetime | None:
        """When the local edit that may conflict with the answer was committed: still in the change log, or on the
        row queued behind this one, or this row's own (``unsent``: the record's ``outbox.unsent_for`` rows);
        unknown is None (ServiceTitan wins), never "now"."""
        times = [changelog.latest_change_at(conn, c.entity, c.mirror_id), *(r[4] for r in unsent)]
        return max((t for t in times if t is not None), default=None)

    # ---------------------------------------------------------------------------------------- async

    async def _send(self, c: Claim) -> Outcome:
        self.live.add(c.outbox_id)
        try:
            return await self._send_live(c)
        except AuthError as exc:
            # the credentials are refused: a configuration error, nothing is retried; the row is given back as it
            # was (no attempt spent) and the run stops
            await asyncio.to_thread(self._release_unsent, [c])
            self.fatal = exc
            return Outcome.RATE_LIMITED
        finally:
            self.live.discard(c.outbox_id)

    def still_claimed(self, c: Claim) -> bool:
        """Immediately before the request goes out: this claim is still ours (and ``sent_at`` is stamped)."""
        with self.engine.begin() as conn:
            return outbox.mark_sent(conn, c.outbox_id, self.worker, c.token)

    async def _find_created(self, c: Claim) -> ApiResponse | None:
        """A create whose earlier attempt may have been applied: the record our external data names, as a
        create's answer (with the customer's locations), or an answer that is not ok (the lookup failed: nothing
        is sent), or None (not there: create it)."""
        guid, key = self.cfg.servicetitan.application_guid, self.cfg.servicetitan.mirror_id_key
        collection = NAMES[c.entity].collection
        resp = await self.client.find_by_external_data(collection, guid, key, [str(c.mirror_id)])
        data = resp.body.get("data") if resp.ok and isinstance(resp.body, dict) else None
        if not isinstance(data, list):
            return ApiResponse(resp.status if not resp.ok else 0, resp.body, resp.latency_ms,
                               error=resp.error or "the lookup of an earlier attempt's record failed")
        found = sorted((r for r in data if isinstance(r, dict) and mirror_id_of(r, key) == c.mirror_id
                        and isinstance(r.get("id"), int)), key=lambda r: r["id"])
        if not found:
            return None
        if len(found) > 1:
            self.log.error("outbox.create_duplicates_found", entity=c.entity, mirror_id=c.mirror_id,
                           st_ids=[r["id"] for r in found], hint="linked to the oldest; merge the others in "
                           "ServiceTitan")
        record = dict(found[0])
        if c.entity == "customer":
            locations = new_location_ids(c.body, key)
            record["locations"] = []
            for i in range(0, len(locations), IDS_PER_LIST):
                chunk = [str(m) for m in locations[i:i + IDS_PER_LIST]]
                lresp = await self.client.find_by_external_data("locations", guid, key, chunk)
                ldata = lresp.body.get("data") if lresp.ok and isinstance(lresp.body, dict) else None
                if not isinstance(ldata, list):
                    return ApiResponse(lresp.status if not lresp.ok else 0, lresp.body, lresp.latency_ms,
                                       error=lresp.error or "the lookup of an earlier attempt's locations failed")
                record["locations"] += [r for r in ldata
                                        if isinstance(r, dict) and r.get("customerId") == record["id"]]
        self.stats.linked += 1
        self.log.warning("outbox.create_found", entity=c.entity, mirror_id=c.mirror_id, st_id=record["id"],
                         hint="an earlier attempt was applied and its answer lost: linked, not created again")
        return ApiResponse(200, record, resp.latency_ms)

    async def _send_live(self, c: Claim) -> Outcome:
        started = time.time()

        async def before_send() -> bool:
            return await asyncio.to_thread(self.still_claimed, c)

        if c.operation == "create":
            found = await self._find_created(c) if c.lookup else None
            if found is not None:
                resp = found
                c.found = found.ok
            else:
                resp = await self.client.post(NAMES[c.entity].collection, c.body, before_send=before_send)
                if resp.ok and isinstance(resp.body, dict):
                    self.stats.created += 1
        else:
            resp = await self.client.patch(NAMES[c.entity].collection, c.st_id, c.body, before_send=before_send)
        if resp.fenced:  # frozen past its lease (GC pause, SIGSTOP, a long wait): another worker owns the row
            self.stats.fenced += 1
            self.log.warning("outbox.claim_lost_before_send", outbox_id=c.outbox_id, entity=c.entity,
                             mirror_id=c.mirror_id)
            return Outcome.RETRY
        outcome = await asyncio.to_thread(self.complete, c, resp, started)
        self.stats.sent += 1
        key = str(resp.status)
        self.stats.by_status[key] = self.stats.by_status.get(key, 0) + 1
        if self.on_answer is not None:
            self.on_answer(c.entity, resp, outcome)
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
        """Send everything due now (and whatever becomes due while busy); return when idle or stopped.

        With a ``refresh``, rows are claimed ahead in batches of up to ``CHECK_BATCH`` and checked with one list
        request per batch before they are sent (``_claim_checked``); the next batch is claimed and checked while
        the current one is being sent, so the check costs no throughput.
        """
        stop = stop or asyncio.Event()
        await asyncio.to_thread(self.reclaim_expired)
        inflight: set[asyncio.Task[Outcome]] = set()
        ready: list[tuple[Claim, float]] = []  # checked claims waiting for a free slot, with the check's time
        refill: asyncio.Task[tuple[list[tuple[Claim, float]], int]] | None = None
        nothing_due = False
        beat = asyncio.create_task(self._heartbeat_loop())
        next_reclaim = time.monotonic() + self.cfg.sync.lease_seconds / 2
        limit = self.cfg.servicetitan.max_concurrency
        try:
            while not stop.is_set() and self.fatal is None:
                if time.monotonic() >= next_reclaim:  # a busy worker also picks up a dead peer's rows
                    await asyncio.to_thread(self.reclaim_expired)
                    next_reclaim = time.monotonic() + self.cfg.sync.lease_seconds / 2
                free = limit - len(inflight)
                if self.refresh is None:
                    if free > 0:
                        for c in await asyncio.to_thread(self.claim, free):
                            inflight.add(asyncio.create_task(self._send(c)))
                    if not inflight:
                        break
                else:
                    if refill is None:
                        stale = [c for c, at in ready] if ready and \
                            time.monotonic() - ready[0][1] > CHECK_MAX_AGE_S else []
                        if stale:
                            ready.clear()
                        if stale or (len(ready) <= min(limit, CHECK_REFILL_AT) and not nothing_due):
                            refill = asyncio.create_task(self._claim_checked(stale, CHECK_BATCH))
                    while free > 0 and ready:
                        c, at = ready.pop(0)
                        self.stats.check_age_max_s = max(self.stats.check_age_max_s, round(time.monotonic() - at, 3))
                        inflight.add(asyncio.create_task(self._send(c)))
                        free -= 1
                    if not inflight and not ready and refill is None:
                        break
                stopper = asyncio.create_task(stop.wait())
                waiting: set[asyncio.Task[Any]] = {*inflight, stopper}
                if refill is not None:
                    waiting.add(refill)
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                stopper.cancel()
                if refill is not None and refill in done:
                    got, held_back = refill.result()
                    nothing_due = not got and not held_back  # held back: due again now, claimed next
                    ready.extend(got)
                    refill = None
                if done & inflight:
                    nothing_due = False  # a slot freed: look for due rows again (as the loop without a check)
                inflight -= done
                for t in done:
                    if t is stopper or t.cancelled() or t.exception() is None:
                        continue
                    self.log.error("outbox.send_crashed", error=repr(t.exception()))
            if inflight:
                _, inflight = await asyncio.wait(inflight, timeout=grace_seconds)
        finally:
            beat.cancel()
            if refill is not None:
                refill.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    ready.extend((await refill)[0])
            if ready:  # claimed and checked, never sent: due again now
                await asyncio.to_thread(self._release_unsent, [c for c, _ in ready])
            unfinished = [t for t in inflight if not t.done()]
            for t in unfinished:
                t.cancel()
            if unfinished or refill is not None:
                # their answers will never be recorded: give the rows back now rather than at lease expiry
                released = self.release_all()
                self.log.warning("outbox.released_on_stop", count=released)
        if self.fatal is not None:
            raise self.fatal
        return self.stats.as_dict()

    async def _claim_checked(self, recheck: list[Claim], want: int) -> tuple[list[tuple[Claim, float]], int]:
        """Claim up to ``want`` more rows and check them (with ``recheck``: claims whose check grew old) against
        ServiceTitan with one list request per entity; a record changed there since its shadow is merged first
        (``refresh``) and its row goes back to pending, due now, so its next claim plans from the merged state.
        Returns the claims to send, each with the time of its check, and how many were held back."""
        claims = list(recheck)
        if want > 0:
            claims += await asyncio.to_thread(self.claim, want)
        if not claims:
            return [], 0
        self.live.update(c.outbox_id for c in claims)  # held: the heartbeat renews their leases
        # at most one check per interval (``sync.check_min_interval_seconds``): under 3% of the budget at any load
        wait = self._last_check + self.cfg.sync.check_min_interval_seconds - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        self._last_check = time.monotonic()
        by_entity: dict[Entity, list[Claim]] = {}
        for c in claims:
            if c.operation == "update":  # a create has no ServiceTitan record to check yet
                by_entity.setdefault(c.entity, []).append(c)
        held_back: list[Claim] = []
        for entity, group in by_entity.items():
            for i in range(0, len(group), IDS_PER_LIST):
                chunk = group[i:i + IDS_PER_LIST]
                held_back += await self._check(entity, chunk)
        if held_back:
            await asyncio.to_thread(self._release_unsent, held_back)
        at = time.monotonic()
        back = {c.outbox_id for c in held_back}
        return [(c, at) for c in claims if c.outbox_id not in back], len(back)

    async def _check(self, entity: Entity, chunk: list[Claim]) -> list[Claim]:
        """One list request for ``chunk``: the claims to hold back (changed remotely, now merged)."""
        assert self.refresh is not None
        self.stats.checks += 1
        resp = await self.client.list_by_ids(NAMES[entity].collection, [c.st_id for c in chunk])
        data = resp.body.get("data") if resp.ok and isinstance(resp.body, dict) else None
        if not isinstance(data, list):  # the check narrows a window; it never blocks a send
            self.stats.checks_failed += 1
            self.log.warning("outbox.check_failed", entity=entity, records=len(chunk), status=resp.status,
                             error=resp.error)
            return []
        known = {c.st_id: c.base.get("modified_on") for c in chunk}
        changed = changed_since(data, known)
        by_st = {c.st_id: c for c in chunk}
        fresh = {st: rec for st, rec in changed.items()
                 if self._refreshed.get(by_st[st].outbox_id) != rec.get("modifiedOn")}
        if not fresh:
            return []
        try:
            await self.refresh(entity, list(fresh.values()))
        except Exception as exc:  # e.g. a location's new customer could not be fetched: send as planned
            self.stats.checks_failed += 1
            self.log.warning("outbox.check_failed", entity=entity, records=len(chunk), status=resp.status,
                             error=str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__)
            return []
        if len(self._refreshed) > 10_000:
            self._refreshed.clear()
        back = [by_st[st] for st in fresh]
        for c in back:
            self._refreshed[c.outbox_id] = fresh[c.st_id].get("modifiedOn")
        self.stats.changed_remotely += len(back)
        self.log.info("outbox.changed_before_send", entity=entity, records=len(back),
                      st_ids=sorted(c.st_id for c in back)[:20])
        return back

    def _release_unsent(self, claims: list[Claim]) -> None:
        """Claimed rows not sent (held back by the check, or left at shutdown): pending again, due now, no
        attempt spent; nothing went out, so nothing is possibly applied."""
        with self.engine.begin() as conn:
            for c in claims:
                if outbox.lock_if_held(conn, c.outbox_id, self.worker, c.token):
                    outbox.requeue(conn, c.outbox_id, c.entity, c.mirror_id, delay_s=0.0, attempts=c.attempt - 1,
                                   status=None, error=None)
        for c in claims:
            self.live.discard(c.outbox_id)

    async def _heartbeat_loop(self) -> None:
        interval = max(1.0, self.cfg.sync.lease_seconds / 3)
        while True:
            await asyncio.sleep(interval)
            try:
                await asyncio.to_thread(self.heartbeat)
            except Exception as exc:  # keep beating through a database blip
                self.log.warning("outbox.heartbeat_failed", error=str(exc).splitlines()[0])
