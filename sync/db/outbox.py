"""The ``outbox`` table: one row per request to send, its lease, its retries and its outcome.

Every statement that reads or writes ``outbox`` lives here. States (docs/contract.md, "Outbox states"): ``pending`` ->
``in_flight`` (leased by one worker) -> ``succeeded`` / ``dead`` / ``superseded``; an operator may close a
pending or dead row as ``discarded``. At most one ``pending`` and one
``in_flight`` row per record (unique indexes). ``unconfirmed`` holds, as a JSON array, the bodies of attempts whose
answers were lost (possibly applied by ServiceTitan: the pull takes those values for our own echo).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, bindparam, text
from sqlalchemy.dialects.postgresql import ARRAY, BIGINT
from sqlalchemy.exc import IntegrityError

from sync.core.diff import sent_values
from sync.db import control

STATES = ("pending", "in_flight", "succeeded", "dead", "superseded", "discarded", "held")
"""Every value of ``outbox.state``, in the order status and metrics show them."""

_IDS = bindparam("ids", type_=ARRAY(BIGINT))
_RELEASE_LEASE = "lease_owner = NULL, lease_expires_at = NULL"
_FOLDED_UNCONFIRMED = "(SELECT o.unconfirmed FROM outbox o WHERE o.id = :id)"
_CLAIMABLE = f"""o.state = 'pending' AND NOT {control.PAUSED}
                      AND NOT EXISTS (SELECT 1 FROM outbox f WHERE f.entity = o.entity
                                      AND f.mirror_id = o.mirror_id AND f.state = 'in_flight')"""
"""SQL over ``outbox o``: a pending row not queued behind a request in flight for its record, while sending is
not paused (`stsync pause`: nothing is claimed, so nothing is sent, by any replica)."""


def _as_list(expr: str) -> str:
    """SQL: an outbox.unconfirmed value as a JSON array (rows from before it was a list hold one object)."""
    return (f"CASE jsonb_typeof({expr}) WHEN 'object' THEN jsonb_build_array({expr}) "
            f"ELSE coalesce({expr}, '[]'::jsonb) END")


# ------------------------------------------------------------------------------------------------ detect


def upsert_pending(conn: Connection, entity: str, rows: Sequence[dict[str, Any]]) -> int:
    """Queue one pending row per record, folding into the record's existing pending row (coalescing).

    ``rows``: ``{"m": mirror id, "s": st_id, "p": body, "d": diff, "t": local change time (ISO) or None, "o":
    operation}`` (``o`` may be left out: ``update``).
    Returns how many were folded into an existing row rather than inserted.
    """
    # one statement for the whole batch (coalescing into existing pending rows via the unique index)
    # (coalesced = rows the upsert updated rather than inserted: xmax is set on an updated row version;
    # no separate lookup of pending rows, whose plan goes bad while the outbox grows fast)
    upserted = conn.execute(
        text("""INSERT INTO outbox (entity, mirror_id, st_id, payload, diff, local_changed_at, operation)
                SELECT :e, t.m, t.s, t.p, t.d, t.t, coalesce(t.o, 'update')
                FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS t(m bigint, s bigint, p jsonb, d jsonb,
                                                                   t timestamptz, o text)
                ON CONFLICT (entity, mirror_id) WHERE state = 'pending'
                DO UPDATE SET payload = EXCLUDED.payload, diff = EXCLUDED.diff, st_id = EXCLUDED.st_id,
                              operation = EXCLUDED.operation,
                              updated_at = now(),
                              local_changed_at = GREATEST(outbox.local_changed_at, EXCLUDED.local_changed_at)
                RETURNING (xmax <> 0)"""),
        # one JSON document for the batch: psycopg escapes text[] elements in Python, ~16% of detect's time
        {"e": entity, "rows": json.dumps(list(rows), default=str)},
    )
    return sum(1 for (updated,) in upserted if updated)


def hold_deletes(conn: Connection, records: Sequence[tuple[str, int]]) -> int:
    """The mass-delete guard: these records' pending delete rows wait ``held`` for an operator."""
    return int(conn.execute(
        text("""UPDATE outbox o SET state = 'held', updated_at = now()
                FROM jsonb_to_recordset(CAST(:r AS jsonb)) AS t(e text, m bigint)
                WHERE o.entity = t.e AND o.mirror_id = t.m AND o.state = 'pending' AND o.operation = 'delete'"""),
        {"r": json.dumps([{"e": e, "m": m} for e, m in records])}).rowcount)


def held_ids_locked(conn: Connection) -> list[tuple[int, str, int]]:
    """Held rows, locked: ``(id, entity, mirror id)`` in id order."""
    return [(r[0], r[1], r[2]) for r in conn.execute(
        text("SELECT id, entity, mirror_id FROM outbox WHERE state = 'held' ORDER BY id FOR UPDATE"))]


def release_held(conn: Connection, outbox_ids: Sequence[int]) -> int:
    """An operator sends held rows: pending, due now (queued behind a request in flight, as any row)."""
    return int(conn.execute(text("""UPDATE outbox SET state = 'pending', next_attempt_at = now(), updated_at = now()
                                    WHERE state = 'held' AND id = ANY(:ids)""").bindparams(_IDS),
                            {"ids": list(outbox_ids)}).rowcount)


def supersede_pending(conn: Connection, entity: str, mirror_ids: Sequence[int]) -> int:
    """Drop the pending rows of these records (no longer different from the shadow, or deleted)."""
    return int(conn.execute(
        text("""UPDATE outbox SET state = 'superseded', completed_at = now(), updated_at = now()
                WHERE entity = :e AND state = 'pending' AND mirror_id = ANY(:ids)""").bindparams(_IDS),
        {"e": entity, "ids": list(mirror_ids)}).rowcount)


def reject(conn: Connection, entity: str, mirror_id: int, st_id: int | None, payload: Any, diff: Any,
           error: Any, *, outbox_id: int | None = None, operation: str = "update") -> int:
    """A body that fails the schema: the row (a new one, or the claimed ``outbox_id``) ends dead, unsent."""
    if outbox_id is None:
        return int(conn.execute(
            text("""INSERT INTO outbox (entity, mirror_id, st_id, state, payload, diff, last_error, completed_at,
                                        operation)
                    VALUES (:e, :m, :s, 'dead', CAST(:p AS jsonb), CAST(:d AS jsonb), CAST(:err AS jsonb), now(), :o)
                    RETURNING id"""),
            {"e": entity, "m": mirror_id, "s": st_id, "p": json.dumps(payload), "d": json.dumps(diff),
             "err": json.dumps(error), "o": operation},
        ).scalar_one())
    conn.execute(
        text(f"""UPDATE outbox SET state = 'dead', payload = CAST(:p AS jsonb), diff = CAST(:d AS jsonb),
                last_error = CAST(:err AS jsonb), completed_at = now(), updated_at = now(), operation = :o,
                {_RELEASE_LEASE} WHERE id = :id"""),
        {"id": outbox_id, "p": json.dumps(payload), "d": json.dumps(diff), "err": json.dumps(error),
         "o": operation},
    )
    return outbox_id


def unconfirmed_for(conn: Connection, entity: str, mirror_ids: Sequence[int]) -> dict[int, list[Any]]:
    """The ``unconfirmed`` values (bodies possibly applied) of these records' unfinished rows."""
    out: dict[int, list[Any]] = {}
    for mid, stored in conn.execute(
            text("""SELECT mirror_id, unconfirmed FROM outbox
                    WHERE entity = :e AND mirror_id = ANY(:ids) AND state IN ('pending', 'in_flight')
                    AND unconfirmed IS NOT NULL""").bindparams(_IDS), {"e": entity, "ids": list(mirror_ids)}):
        out.setdefault(mid, []).append(stored)
    return out


def ids_pending(conn: Connection, entity: str) -> set[int]:
    """Mirror ids with a pending row (the dry run's preview)."""
    return {m for (m,) in conn.execute(
        text("SELECT mirror_id FROM outbox WHERE entity = :e AND state = 'pending'"), {"e": entity})}


# ------------------------------------------------------------------------------------------------ claims


def claim_due(conn: Connection, limit: int, worker: str,
              lease_seconds: float) -> list[tuple[int, str, int, int, int, Any, str, int | None, Any]]:
    """Lease up to ``limit`` due, claimable rows to ``worker``: ``(outbox id, entity, mirror id, attempts, claim
    token, unconfirmed, operation, st_id, payload)``. The token (the claiming transaction's id) fences the
    claim: a later claim of the row has another."""
    rows = conn.execute(text(f"""
        WITH due AS (
            SELECT o.id FROM outbox o
            WHERE o.next_attempt_at <= now() AND {_CLAIMABLE}
            ORDER BY o.next_attempt_at, o.id
            LIMIT :n FOR UPDATE SKIP LOCKED)
        UPDATE outbox o SET state = 'in_flight', lease_owner = :w,
               lease_expires_at = now() + make_interval(secs => :l), updated_at = now(),
               claim_token = txid_current(), sent_at = NULL
        FROM due WHERE o.id = due.id
        RETURNING o.id, o.entity, o.mirror_id, o.attempts, o.claim_token, o.unconfirmed, o.operation, o.st_id,
                  o.payload"""),
        {"n": limit, "w": worker, "l": lease_seconds}).all()
    return [(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8]) for r in rows]


def set_body(conn: Connection, outbox_id: int, payload: Any, diff: Any, st_id: int | None,
             operation: str = "update") -> None:
    """The body a claimed row is about to send (recomputed at claim time from the mirror and the shadow)."""
    conn.execute(text("UPDATE outbox SET payload = CAST(:p AS jsonb), diff = CAST(:d AS jsonb), "
                      "st_id = :s, operation = :o WHERE id = :id"),
                 {"id": outbox_id, "p": json.dumps(payload), "d": json.dumps(diff), "s": st_id, "o": operation})


_MAYBE_SENT = "(o.attempts > 0 OR o.unconfirmed IS NOT NULL OR o.sent_at IS NOT NULL)"
"""SQL over ``outbox o``: a row whose request may have gone out (answered or not)."""


def _created_maybe(entity: str, mirror_id: str) -> str:
    """SQL over ``outbox o``: a create of the record (``entity``, ``mirror_id``: SQL expressions) may have reached
    ServiceTitan: one of its own create rows may have been sent, or, for a location, a customer's create that
    carried it (``diff.locations`` names it)."""
    return f"""o.operation = 'create' AND {_MAYBE_SENT}
               AND ((o.entity = {entity} AND o.mirror_id = {mirror_id})
                    OR ({entity} = 'location' AND o.entity = 'customer'
                        AND o.diff -> 'locations' ? CAST({mirror_id} AS text)))"""


def create_maybe_sent(conn: Connection, entity: str, mirror_id: int, *, except_id: int) -> bool:
    """A create of this record may have reached ServiceTitan before (any state of its rows but ``except_id``, the
    claim being planned). Then a create is looked up first."""
    return conn.execute(text(f"""SELECT EXISTS (SELECT 1 FROM outbox o WHERE o.id <> :x
                                 AND {_created_maybe(':e', ':m')})"""),
                        {"e": entity, "m": mirror_id, "x": except_id}).scalar_one() is True


def deleted_create_maybe_sent(conn: Connection, entity: str) -> bool:
    """A row deleted before its create was answered: a tombstone without ``st_id`` whose create may have reached
    ServiceTitan (the pull must then look new records up: the record may be ours, to bury)."""
    return conn.execute(text(f"""SELECT EXISTS (SELECT 1 FROM tombstones t WHERE t.entity = :e AND t.st_id IS NULL
                                 AND EXISTS (SELECT 1 FROM outbox o
                                             WHERE {_created_maybe('t.entity', 't.mirror_id')}))"""),
                        {"e": entity}).scalar_one() is True


def carried_in_flight(conn: Connection, location_id: int) -> bool:
    """A customer's create that carries this new location is in flight right now."""
    return conn.execute(text("""SELECT EXISTS (SELECT 1 FROM outbox WHERE entity = 'customer' AND operation = 'create'
                                AND state = 'in_flight' AND diff -> 'locations' ? CAST(:m AS text))"""),
                        {"m": location_id}).scalar_one() is True


def clear_unconfirmed(conn: Connection, entity: str, mirror_id: int) -> None:
    """The record was linked from ServiceTitan's own version: what earlier create attempts sent is settled (kept,
    it would be PATCHed again as a revert after the mirror took ServiceTitan's form of it)."""
    conn.execute(text("""UPDATE outbox SET unconfirmed = NULL WHERE entity = :e AND mirror_id = :m
                         AND state IN ('pending', 'in_flight')"""), {"e": entity, "m": mirror_id})


def queue_delete(conn: Connection, entity: str, mirror_id: int, st_id: int, body: Any) -> None:
    """A deactivation of a record whose mirror row is gone (``sync.local_deletes: propagate``)."""
    upsert_pending(conn, entity, [{"m": mirror_id, "s": st_id, "p": body, "d": {}, "t": None, "o": "delete"}])


def supersede_claimed(conn: Connection, outbox_id: int) -> None:
    """A claimed row with nothing left to send (the record no longer differs from the shadow, or is gone)."""
    conn.execute(text(f"UPDATE outbox SET state = 'superseded', completed_at = now(), {_RELEASE_LEASE} "
                      "WHERE id = :id"), {"id": outbox_id})


def next_due_in(conn: Connection) -> float | None:
    """Seconds until the earliest claimable pending row is due (<= 0: due now); None when there is none."""
    # ORDER BY ... LIMIT 1 walks outbox_due_idx (min() with the anti-join would read every pending row)
    due = conn.execute(text(f"""
        SELECT EXTRACT(EPOCH FROM o.next_attempt_at - now()) FROM outbox o WHERE {_CLAIMABLE}
        ORDER BY o.next_attempt_at LIMIT 1""")).scalar_one_or_none()
    return None if due is None else float(due)


def renew_leases(conn: Connection, worker: str, outbox_ids: Sequence[int], lease_seconds: float) -> None:
    conn.execute(text("UPDATE outbox SET lease_expires_at = now() + make_interval(secs => :l) "
                      "WHERE state = 'in_flight' AND lease_owner = :w AND id = ANY(CAST(:ids AS bigint[]))"),
                 {"w": worker, "l": lease_seconds, "ids": list(outbox_ids)})


def mark_sent(conn: Connection, outbox_id: int, worker: str, claim_token: int) -> bool:
    """Just before the request goes out: True (and ``sent_at`` stamped) if this claim is still held."""
    return conn.execute(text("UPDATE outbox SET sent_at = now() WHERE id = :id AND state = 'in_flight' "
                             "AND lease_owner = :w AND claim_token = :t RETURNING 1"),
                        {"id": outbox_id, "w": worker, "t": claim_token}).first() is not None


def lock_if_held(conn: Connection, outbox_id: int, worker: str, claim_token: int) -> bool:
    """Lock the row if this claim is still held (False: the lease was lost, the answer is not ours)."""
    return conn.execute(text("SELECT 1 FROM outbox WHERE id = :id AND state = 'in_flight' "
                             "AND lease_owner = :w AND claim_token = :t FOR UPDATE"),
                        {"id": outbox_id, "w": worker, "t": claim_token}).first() is not None


def add_unconfirmed(conn: Connection, entity: str, mirror_id: int, sent: str) -> int:
    """A body that went out under a claim since lost (``sent``: a JSON array of one body) is possibly applied:
    the record's unfinished row carries it, so the pull takes its values for our own echo."""
    return int(conn.execute(text(f"""UPDATE outbox SET unconfirmed = {_as_list('unconfirmed')} || CAST(:u AS jsonb)
                                   WHERE entity = :e AND mirror_id = :m AND state IN ('pending', 'in_flight')"""),
                            {"e": entity, "m": mirror_id, "u": sent}).rowcount)


# ------------------------------------------------------------------------------------------------ outcomes


def succeed(conn: Connection, outbox_id: int, *, attempts: int, status: int, st_id: int | None = None) -> None:
    """``st_id``: a create's new record."""
    conn.execute(text(f"""UPDATE outbox SET state = 'succeeded', attempts = :a, last_status = :s,
                         last_error = NULL, completed_at = now(), updated_at = now(),
                         st_id = coalesce(CAST(:st AS bigint), st_id), {_RELEASE_LEASE} WHERE id = :id"""),
                 {"id": outbox_id, "a": attempts, "s": status, "st": st_id})


def fail_dead(conn: Connection, outbox_id: int, *, attempts: int, status: int | None, error: str,
              unconfirmed: str | None = None) -> None:
    """A permanent failure: the row ends dead with ServiceTitan's body (``error``, JSON text). ``unconfirmed``
    (a JSON array of one body): the last attempt's answer was lost, so it may have been applied; kept for an
    operator's retry (a create is then looked up first)."""
    conn.execute(text(f"""UPDATE outbox SET state = 'dead', attempts = :a, last_status = :s,
                         last_error = CAST(:e AS jsonb), completed_at = now(), updated_at = now(),
                         unconfirmed = CASE WHEN CAST(:u AS jsonb) IS NULL THEN unconfirmed
                                            ELSE {_as_list('unconfirmed')} || CAST(:u AS jsonb) END,
                         {_RELEASE_LEASE} WHERE id = :id"""),
                 {"id": outbox_id, "a": attempts, "s": status, "e": error, "u": unconfirmed})


def carried_versions(conn: Connection, location_id: int) -> list[dict[str, Any]]:
    """What customers' creates that carried this new location and may have been sent carried of it (their last
    body, and the bodies of attempts whose answers were lost)."""
    out: list[dict[str, Any]] = []
    for diff, unconfirmed in conn.execute(text(f"""
            SELECT o.diff, o.unconfirmed FROM outbox o WHERE o.entity = 'customer' AND o.operation = 'create'
            AND {_MAYBE_SENT} AND o.diff -> 'locations' ? CAST(:m AS text) ORDER BY o.id"""), {"m": location_id}):
        key = str(location_id)
        for version in [diff, *(unconfirmed if isinstance(unconfirmed, list) else [unconfirmed])]:
            locations = version.get("locations") if isinstance(version, dict) else None
            if isinstance(locations, dict) and isinstance(locations.get(key), dict):
                out.append(dict(locations[key]))
    return out


def requeue(conn: Connection, outbox_id: int, entity: str, mirror_id: int, *, delay_s: float, attempts: int,
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


def _requeue_once(conn: Connection, outbox_id: int, entity: str, mirror_id: int, *, delay_s: float,
                  attempts: int, status: int | None, error: str | None, unconfirmed: str | None) -> None:
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
        conn.execute(text(f"""UPDATE outbox SET state = 'superseded', attempts = :a, last_status = :s,
                             last_error = coalesce(CAST(:err AS jsonb), last_error), completed_at = now(),
                             updated_at = now(), {_RELEASE_LEASE} WHERE id = :id"""),
                     {"id": outbox_id, "a": attempts, "s": status, "err": error})
        return
    conn.execute(text(f"""UPDATE outbox SET state = 'pending', attempts = :a, last_status = :s,
                         last_error = coalesce(CAST(:err AS jsonb), last_error), updated_at = now(),
                         next_attempt_at = now() + make_interval(secs => :d),
                         unconfirmed = CASE WHEN CAST(:u AS jsonb) IS NULL THEN unconfirmed
                                            ELSE {_as_list('unconfirmed')} || CAST(:u AS jsonb) END,
                         {_RELEASE_LEASE} WHERE id = :id"""),
                 {"id": outbox_id, "a": attempts, "s": status, "err": error, "d": delay_s, "u": unconfirmed})


def requeue_expired(conn: Connection, *, landing_s: float) -> int:
    """In-flight rows whose lease expired (their worker died) go back to pending (see ``_requeue_in_flight``)."""
    return _requeue_in_flight(conn, "lease_expires_at < now()", {}, landing_s)


def requeue_held_by(conn: Connection, worker: str, *, landing_s: float) -> int:
    """On shutdown: the rows ``worker`` holds but has not finished go back to pending."""
    return _requeue_in_flight(conn, "lease_owner = :w", {"w": worker}, landing_s)


def _requeue_in_flight(conn: Connection, condition: str, params: dict[str, Any], landing_s: float) -> int:
    """A row whose request went out (``sent_at``) is due once that request can no longer land (``landing_s``,
    the client timeout, after it was sent), so the successor is never overtaken by it; one never sent is due now."""
    held = conn.execute(text(f"""SELECT id, entity, mirror_id, attempts, diff,
                                        GREATEST(0, EXTRACT(EPOCH FROM sent_at + make_interval(secs => :land) - now()))
                                 FROM outbox WHERE state = 'in_flight' AND {condition}
                                 ORDER BY id FOR UPDATE SKIP LOCKED"""),
                        {**params, "land": landing_s}).all()
    for oid, entity, mirror_id, attempts, diff, wait in held:
        # the request may have gone out (a killed worker, a cancelled send): what it carried is possibly
        # applied by ServiceTitan, so the pull must take it for ours (the diff holds it since the claim)
        # (sent_at is NULL also for a row claimed by a release before migration 0006: kept possibly applied)
        sent = sent_values(diff)
        requeue(conn, oid, entity, mirror_id, delay_s=float(wait or 0.0), attempts=attempts, status=None,
                error=None, unconfirmed=json.dumps([sent], default=str) if sent else None)
    return len(held)


# ------------------------------------------------------------------------------------------------ pull


def unsent_for(conn: Connection, entity: str, mirror_ids: Sequence[int]) -> list[tuple[int, str, Any, Any, Any]]:
    """Pending and in-flight rows of these records: ``(mirror id, state, diff, unconfirmed, local_changed_at)``."""
    rows = conn.execute(
        # the time of the local edit the row carries (not updated_at, which moves whenever stsync touches it)
        text("""SELECT mirror_id, state, diff, unconfirmed, local_changed_at FROM outbox
                WHERE entity = :e AND mirror_id = ANY(:ids) AND state IN ('pending', 'in_flight')""")
        .bindparams(_IDS), {"e": entity, "ids": list(mirror_ids)})
    return [(r[0], r[1], r[2], r[3], r[4]) for r in rows]


def dead_local_change_times(conn: Connection, entity: str, mirror_ids: Sequence[int]) -> dict[int, Any]:
    """When the local edit of each record's dead rows was made (its mirror values stay unsent)."""
    rows = conn.execute(
        text("""SELECT mirror_id, max(local_changed_at) FROM outbox
                WHERE state = 'dead' AND entity = :e AND mirror_id = ANY(:ids) AND local_changed_at IS NOT NULL
                GROUP BY mirror_id""").bindparams(_IDS), {"e": entity, "ids": list(mirror_ids)})
    return {mid: at for mid, at in rows}


# ------------------------------------------------------------------------------------------------ operators


def list_rows(conn: Connection, *, state: str | None, entity: str | None, limit: int) -> list[dict[str, Any]]:
    return [dict(r) for r in conn.execute(text("""
        SELECT id, entity, mirror_id, st_id, operation, state, attempts, last_status, next_attempt_at, created_at,
               updated_at, coalesce(last_error->>'title', last_error->>'message') AS error,
               last_error->>'title' AS error_title, last_error->>'message' AS error_message,
               coalesce(last_error->'errors', last_error->'validation') AS field_errors
        FROM outbox WHERE (CAST(:s AS text) IS NULL OR state = :s) AND (CAST(:e AS text) IS NULL OR entity = :e)
        ORDER BY id DESC LIMIT :n"""), {"s": state, "e": entity, "n": limit}).mappings()]


def get(conn: Connection, outbox_id: int) -> dict[str, Any] | None:
    row = conn.execute(text("SELECT * FROM outbox WHERE id = :id"), {"id": outbox_id}).mappings().first()
    return None if row is None else dict(row)


def dead_ids_locked(conn: Connection) -> list[int]:
    return [i for (i,) in conn.execute(text("SELECT id FROM outbox WHERE state = 'dead' ORDER BY id FOR UPDATE"))]


def lock_row(conn: Connection, outbox_id: int) -> tuple[str, int, str] | None:
    """``(entity, mirror id, state)`` of the row, locked; None when there is no such row."""
    row = conn.execute(text("SELECT entity, mirror_id, state FROM outbox WHERE id = :id FOR UPDATE"),
                       {"id": outbox_id}).first()
    return None if row is None else (row[0], row[1], row[2])


def newer_exists(conn: Connection, outbox_id: int, entity: str, mirror_id: int) -> bool:
    """A later row of the same record exists (a later change, sent or queued)."""
    return conn.execute(text("SELECT EXISTS (SELECT 1 FROM outbox WHERE entity = :e AND mirror_id = :m AND id > :id)"),
                        {"e": entity, "m": mirror_id, "id": outbox_id}).scalar_one() is True


def has_pending(conn: Connection, entity: str, mirror_id: int) -> bool:
    return conn.execute(text("SELECT id FROM outbox WHERE entity = :e AND mirror_id = :m AND state = 'pending'"),
                        {"e": entity, "m": mirror_id}).first() is not None


def mark_superseded(conn: Connection, outbox_id: int) -> None:
    conn.execute(text("UPDATE outbox SET state = 'superseded', updated_at = now() WHERE id = :id"),
                 {"id": outbox_id})


def reset_to_pending(conn: Connection, outbox_id: int) -> None:
    """An operator's retry: due now, with fresh attempts (the body is recomputed when it is claimed)."""
    conn.execute(text("""UPDATE outbox SET state = 'pending', attempts = 0, next_attempt_at = now(),
                         completed_at = NULL, updated_at = now() WHERE id = :id"""), {"id": outbox_id})


def discard(conn: Connection, outbox_id: int) -> None:
    """An operator closed the row without sending it."""
    conn.execute(text("""UPDATE outbox SET state = 'discarded', completed_at = now(), updated_at = now(),
                         last_error = coalesce(last_error, '{}'::jsonb) || '{"discarded": true}'::jsonb
                         WHERE id = :id"""), {"id": outbox_id})


def dead_since(conn: Connection, after_id: int) -> list[tuple[int, str, int | None, str | None]]:
    """Dead rows with an id above ``after_id``: ``(id, entity, st_id, message)`` (the demo's live report)."""
    rows = conn.execute(text("SELECT id, entity, st_id, last_error->>'message' FROM outbox "
                             "WHERE state = 'dead' AND id > :i ORDER BY id"), {"i": after_id})
    return [(r[0], r[1], r[2], r[3]) for r in rows]


# ------------------------------------------------------------------------------------------------ status


def count_by_state(conn: Connection) -> dict[str, int]:
    counts = dict.fromkeys(STATES, 0)
    counts.update({s: n for s, n in conn.execute(text("SELECT state, count(*) FROM outbox GROUP BY state"))})
    return counts


def oldest_pending_seconds(conn: Connection) -> float | None:
    age = conn.execute(text("SELECT extract(epoch FROM now() - min(created_at)) FROM outbox "
                            "WHERE state = 'pending'")).scalar()
    return None if age is None else float(age)


def prune_finished(conn: Connection, retain_days: float, *, batch: int = 5000) -> int:
    """Delete succeeded and superseded rows older than ``retain_days`` (their attempts go with them)."""
    deleted = 0
    while True:
        n = conn.execute(text("""DELETE FROM outbox WHERE id IN (
                                     SELECT id FROM outbox WHERE state IN ('succeeded', 'superseded')
                                     AND completed_at < now() - CAST(:d AS double precision) * interval '1 day'
                                     LIMIT :b)"""),
                         {"d": retain_days, "b": batch}).rowcount
        deleted += n
        if n < batch:
            return deleted
