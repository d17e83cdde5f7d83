"""The pull path: ServiceTitan's export feeds -> three-way merge (sync.core.merge) -> mirror and shadow.

``pull`` drains ``/export/customers`` then ``/export/locations`` from the stored ``continueFrom`` token. Each page
is applied in ONE transaction that also stores the page's ``continueFrom``: a crash anywhere resumes at the first
page not yet committed, with no gap and no duplicate. The transaction runs with the trigger bypass, so the pull's
own mirror writes never enter the change log (no echo, never a PATCH).

The work per page is batched: one query each for the mirror ids, the mirror rows, the shadows, the outbox rows
and (``newest_wins`` only) the local change times; writes go as ``jsonb_to_recordset`` statements (one per set of
changed columns), so a page of 5,000 records is a handful of round trips. HTTP runs on the event loop and the
database work in a worker thread; the next page is fetched while the current one is applied.

See docs/pull.md for the decisions.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DataError, IntegrityError

from sync.config import Config
from sync.core.create import create_columns, mirror_id_of
from sync.core.create import sent_values as create_sent_values
from sync.core.diff import sent_values, strip_key, unconfirmed_versions
from sync.core.export import BIGINT_MAX, Page, missing_fields, newer, normalise, parse_page, unstorable, without_nul
from sync.core.fields import (
    CUSTOMER_LINK,
    ENTITIES,
    NAMES,
    Entity,
    parse_timestamp,
    record_from_api,
)
from sync.core.merge import MergeResult, Policy, is_echo, is_stale, merge
from sync.core.retry import Outcome, backoff_seconds, classify
from sync.db import changelog, conflicts, created, cursors, mirror, outbox, quarantine, shadow, tombstones
from sync.db.engine import bypass_triggers, connect
from sync.errors import ServiceTitanError
from sync.log import get_logger
from sync.servicetitan.client import IDS_PER_LIST, ApiResponse, ServiceTitanClient

_log = get_logger("stsync.pull")

PULL_ATTEMPTS = 4
"""Tries per export page / customer GET on transient failures (5xx, timeouts) before the pull gives up."""
MAX_RATE_LIMITED_WAITS = 50
CUSTOMER_FETCH_CONCURRENCY = 8
QUARANTINE_RAW_MAX = 100_000
"""Characters of a quarantined record's raw JSON kept."""
CURSOR_FALLBACK_MARGIN_S = 3600.0
"""A rejected continuation token: the feed restarts this long before the newest modifiedOn the mirror holds."""

Links = dict[str, dict[int, tuple[int, dict[str, Any]]]]
"""entity -> {st_id: (mirror id, our external_data)}: records new to the mirror that carry a mirror id of ours (a
create whose answer was lost, or a record made by hand with our external data): they link to that row."""

ProgressCallback = Callable[[str, int, float], None]
"""``progress(feed, records_so_far, records_per_second)``, called after each page."""

class CursorMovedError(Exception):
    """Another pull (a second replica) advanced this feed meanwhile: this one stops, nothing is applied twice."""


@dataclass
class FeedStats:
    pages: int = 0
    records: int = 0
    """Records in the pages, as received (repeats and skipped ones included)."""
    applied: int = 0
    """Existing mirror records whose mirror or shadow changed."""
    inserted: int = 0
    unchanged: int = 0
    """Repeats and echoes (remote equal to the shadow), and stale versions: no write at all."""
    stale: int = 0
    conflicts: int = 0
    skipped: int = 0
    tombstoned: int = 0
    customers_fetched: int = 0
    rechecks: int = 0
    quarantined: int = 0
    """Records put aside (``quarantine`` table): the rest of their page applied."""
    released: int = 0
    """Quarantined records applied at last."""
    linked: int = 0
    """Records new to the mirror that carry a mirror id of ours: linked to that row, never a second one."""

    def add(self, other: FeedStats) -> None:
        for k, v in asdict(other).items():
            setattr(self, k, getattr(self, k) + v)


@dataclass
class _Work:
    """What one page writes, collected before any write."""

    inserts: list[tuple[int, dict[str, Any], int | None]] = field(default_factory=list)
    """(st_id, record, customer mirror id)"""
    updates: dict[tuple[str, ...], list[dict[str, Any]]] = field(default_factory=dict)
    """changed columns -> rows for one UPDATE each"""
    shadows: list[dict[str, Any]] = field(default_factory=list)
    conflicts: list[dict[str, Any]] = field(default_factory=list)
    rechecks: list[int] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------- entry


async def pull(engine: Engine, client: ServiceTitanClient, cfg: Config, *, log: Any = None,
               progress: ProgressCallback | None = None, within: Connection | None = None,
               stop: asyncio.Event | None = None) -> dict[str, Any]:
    """Drain the customer feed, then the location feed. Returns ``{feed: summary}``. ``stop`` set (SIGTERM):
    each feed ends at the next page boundary (what was applied stays applied; the next run goes on from there).

    Raises ``ServiceTitanError`` when ServiceTitan answers an export page with an error (after retries for
    transient ones) or with a body that is not ``{hasMore, continueFrom, data}``; the cursor then stays at the
    last page applied.
    """
    lg = log or _log
    return {NAMES[e].feed: await pull_feed(engine, client, cfg, e, log=lg, progress=progress, within=within,
                                           stop=stop)
            for e in ENTITIES if stop is None or not stop.is_set()}


async def pull_feed(engine: Engine, client: ServiceTitanClient, cfg: Config, entity: Entity, *,
                    log: Any = None, progress: ProgressCallback | None = None,
                    within: Connection | None = None, stop: asyncio.Event | None = None) -> dict[str, Any]:
    """Follow one export feed until ``hasMore`` is false (or ``stop`` is set); one transaction per page.

    ``within``: apply every page in that connection's open transaction instead (the dry run's read-only pull:
    the caller rolls it back after predicting what the real cycle would send).
    """
    lg = log or _log
    feed = NAMES[entity].feed
    await asyncio.to_thread(_restore_read_only, engine, entity, lg, within)
    if within is None:
        await _refetch_quarantined(engine, client, cfg, entity, lg)
    truncated = await asyncio.to_thread(_restart_after_truncate, engine, entity, within)
    if truncated is not None:
        # the table was emptied by TRUNCATE (never propagated): the feed starts again from the beginning, once,
        # and brings every row back (a long feed over several runs, each going on from the stored cursor)
        lg.warning("pull.restoring_truncated", feed=feed, truncation_id=truncated, restart_from=cfg.sync.initial_from)
    stored, initial_done = await asyncio.to_thread(_read_cursor, engine, feed, within)
    token = stored or (None if initial_done else cfg.sync.initial_from)
    totals = FeedStats()
    started = time.monotonic()
    drained = moved = False

    asked = token
    stuck = over_budget = rejected = False
    fetch: asyncio.Task[Page] | None = asyncio.create_task(_fetch_page(client, cfg, feed, token, lg))
    try:
        while fetch is not None:
            try:
                page = await fetch
            except ServiceTitanError as exc:
                fetch = None
                if exc.status != 400 or rejected or asked is None or asked == cfg.sync.initial_from:
                    raise
                # a continuation token ServiceTitan no longer takes (expired, or not its own): go on from a date,
                # the newest modifiedOn the mirror holds minus a margin (repeats are free: echoes, stale versions)
                rejected = True
                asked = await asyncio.to_thread(_fallback_from, engine, entity, within)
                lg.warning("pull.cursor_rejected", feed=feed, status=400, error=str(exc)[:300], restart_from=asked,
                           margin_s=CURSOR_FALLBACK_MARGIN_S)
                fetch = asyncio.create_task(_fetch_page(client, cfg, feed, asked, lg))
                continue
            fetch = None
            fetched: dict[int, dict[str, Any] | None] = {}
            if entity == "location":
                fetched = await _fetch_missing_customers(engine, client, cfg, page.data, lg)
            links = await _find_ours(engine, client, cfg, entity, page.data, fetched, lg)
            # bounded: a continuation token that does not move, or a run past its time budget, ends this run
            # with a warning; the next run goes on from the stored cursor
            stuck = page.has_more and asked is not None and page.continue_from == asked
            over_budget = page.has_more and time.monotonic() - started > cfg.sync.pull_max_seconds_per_run
            stopping = stop is not None and stop.is_set()
            if page.has_more and not stuck and not over_budget and not stopping:
                asked = page.continue_from
                fetch = asyncio.create_task(_fetch_page(client, cfg, feed, page.continue_from, lg))
            page_started = time.monotonic()
            try:
                stats = await asyncio.to_thread(_apply_page, engine, cfg, entity, page, stored, fetched, lg, within,
                                                links)
            except CursorMovedError:
                moved = True
                lg.warning("pull.cursor_moved", feed=feed)
                break
            stored = page.continue_from or stored
            totals.add(stats)
            elapsed = max(time.monotonic() - started, 1e-6)
            # an idle page (nothing new) is DEBUG: a quiet feed must not fill the log
            (lg.info if stats.records else lg.debug)(
                "pull.page_applied", feed=feed, records=stats.records, applied=stats.applied, inserted=stats.inserted,
                unchanged=stats.unchanged, conflicts=stats.conflicts, skipped=stats.skipped,
                duration_ms=round((time.monotonic() - page_started) * 1000, 1))
            if progress is not None:
                progress(feed, totals.records, totals.records / elapsed)
            drained = not page.has_more
            if stop is not None and stop.is_set() and page.has_more:
                lg.info("pull.stopped", feed=feed, pages=totals.pages, records=totals.records,
                        hint="stopping: the next run goes on from the stored cursor")
                break
    finally:
        if fetch is not None:
            fetch.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await fetch

    duration = time.monotonic() - started
    summary: dict[str, Any] = {**asdict(totals), "drained": drained, "duration_s": round(duration, 3),
                               "rate": round(totals.records / duration, 1) if duration > 0 else None}
    if moved:
        summary["cursor_moved"] = True
    if stuck:
        summary["cursor_stuck"] = True
        lg.warning("pull.cursor_stuck", feed=feed, pages=totals.pages, records=totals.records,
                   hint="ServiceTitan answered hasMore=true with the token it was asked with; the next run asks "
                        "again")
    elif over_budget:
        summary["budget_spent"] = True
        lg.warning("pull.run_budget_spent", feed=feed, pages=totals.pages, records=totals.records,
                   seconds=round(duration, 1), limit_s=cfg.sync.pull_max_seconds_per_run,
                   hint="the feed has more; the next run continues from the stored cursor")
    if truncated is not None:
        summary["restoring_truncated"] = True
    if drained:
        (lg.info if totals.records else lg.debug)(
            "pull.feed_drained", feed=feed, pages=totals.pages, records=totals.records, applied=totals.applied,
            inserted=totals.inserted, unchanged=totals.unchanged, conflicts=totals.conflicts,
            duration_ms=round(duration * 1000, 1), rate=summary["rate"])
    return summary


async def apply_fetched(engine: Engine, client: ServiceTitanClient, cfg: Config, entity: Entity,
                        data: list[Any], *, log: Any = None) -> FeedStats:
    """Merge records fetched outside the feeds (API dicts, e.g. the dispatcher's check before sending) into the
    mirror and shadow exactly as a feed page is merged, without touching the feed's cursor."""
    lg = log or _log
    fetched: dict[int, dict[str, Any] | None] = {}
    if entity == "location":
        fetched = await _fetch_missing_customers(engine, client, cfg, data, lg)
    links = await _find_ours(engine, client, cfg, entity, data, fetched, lg)

    def apply() -> FeedStats:
        stats = FeedStats(records=len(data))
        with connect(engine) as conn, conn.begin():
            bypass_triggers(conn)
            _apply_data(conn, cfg, entity, data, fetched, stats, lg, links)
        return stats

    return await asyncio.to_thread(apply)


async def _refetch_quarantined(engine: Engine, client: ServiceTitanClient, cfg: Config, entity: Entity,
                               log: Any) -> None:
    """Quarantined records (up to one list request's worth, least recently seen first) are fetched by id and
    merged: a record the feed moved past (required fields missing, say) is not lost until it changes again."""
    def ids() -> list[int]:
        with connect(engine) as conn, conn.begin():
            found = quarantine.refetchable(conn, entity, IDS_PER_LIST)
            quarantine.touch(conn, entity, found)
            return found

    wanted = await asyncio.to_thread(ids)
    if not wanted:
        return
    resp = await _call(f"{NAMES[entity].collection}?ids=", cfg, log,
                       lambda: client.list_by_ids(NAMES[entity].collection, wanted))
    data = resp.body.get("data") if resp.ok and isinstance(resp.body, dict) else None
    if not isinstance(data, list):
        log.warning("pull.quarantine_refetch_failed", entity=entity, records=len(wanted), status=resp.status,
                    error=resp.error)
        return
    stats = await apply_fetched(engine, client, cfg, entity, data, log=log)
    log.info("pull.quarantine_refetched", entity=entity, asked=len(wanted), found=len(data),
             released=stats.released, quarantined=stats.quarantined)


# ---------------------------------------------------------------------------------------------------- HTTP


async def _call(what: str, cfg: Config, log: Any, send: Callable[[], Any]) -> ApiResponse:
    """One API call with the pull's retry rules: 429 waits (the client's limiter already paused), transient
    failures back off up to PULL_ATTEMPTS tries; anything else comes back to the caller as is."""
    attempt = waits = 0
    while True:
        resp: ApiResponse = await send()
        outcome = classify(resp.status, resp.body)
        if outcome == Outcome.RATE_LIMITED and waits < MAX_RATE_LIMITED_WAITS:
            waits += 1
            await asyncio.sleep(resp.retry_after_s if resp.retry_after_s is not None else 1.0)
            continue
        if outcome != Outcome.RETRY:
            return resp
        attempt += 1
        if attempt >= PULL_ATTEMPTS:
            return resp
        delay = backoff_seconds(attempt, cfg.retry.base_delay_seconds, min(cfg.retry.max_delay_seconds, 30.0))
        log.warning("pull.retrying", request=what, status=resp.status, error=resp.error, attempt=attempt,
                    delay_s=round(delay, 3))
        await asyncio.sleep(delay)


def _failed(what: str, resp: ApiResponse) -> str:
    """One line: the request, and ServiceTitan's status and title, or why no answer came (in words)."""
    if resp.status == 0:
        return f"{what} got no answer: {resp.error or 'connection error'}"
    title = resp.body.get("title") if isinstance(resp.body, dict) else None
    return f"{what} answered {resp.status}" + (f" {str(title).splitlines()[0][:200]}" if title else "")


async def _fetch_page(client: ServiceTitanClient, cfg: Config, feed: str, token: str | None, log: Any) -> Page:
    resp = await _call(f"export/{feed}", cfg, log, lambda: client.export(
        feed, token, include_recent_changes=cfg.sync.include_recent_changes))
    if not (200 <= resp.status < 300):
        raise ServiceTitanError(_failed(f"GET /export/{feed}", resp), status=resp.status, body=resp.body)
    return parse_page(feed, resp.body)


async def _fetch_missing_customers(engine: Engine, client: ServiceTitanClient, cfg: Config, data: list[Any],
                                   log: Any) -> dict[int, dict[str, Any] | None]:
    """GET the customers this location page refers to that the mirror lacks: st_id -> record (None: 404)."""
    wanted = {raw.get("customerId") for raw in data if isinstance(raw, dict)}
    ids = {i for i in wanted if isinstance(i, int) and not isinstance(i, bool)}
    if not ids:
        return {}

    def known() -> set[int]:
        with connect(engine) as conn:
            return set(mirror.customer_mirror_ids(conn, ids))

    missing = sorted(ids - await asyncio.to_thread(known))
    if not missing:
        return {}
    gate = asyncio.Semaphore(CUSTOMER_FETCH_CONCURRENCY)

    async def one(st_id: int) -> tuple[int, dict[str, Any] | None]:
        async with gate:
            resp = await _call(f"customers/{st_id}", cfg, log, lambda: client.get("customers", st_id))
        if resp.status == 404:
            log.warning("pull.customer_not_found", customer_st_id=st_id)
            return st_id, None
        if not resp.ok:
            raise ServiceTitanError(_failed(f"GET /customers/{st_id}", resp), status=resp.status,
                                    body=resp.body)
        log.info("pull.customer_fetched", customer_st_id=st_id)
        return st_id, normalise(record_from_api("customer", resp.body))

    return dict(await asyncio.gather(*(one(i) for i in missing)))


async def _find_ours(engine: Engine, client: ServiceTitanClient, cfg: Config, entity: Entity, data: list[Any],
                     fetched: Mapping[int, Any], log: Any) -> Links:
    """Which records new to the mirror carry a mirror id of ours. Only asked while the mirror has rows without
    ``st_id`` (creates), or deleted rows whose create may have gone out (to bury): the new records are listed by
    id with our application guid (the feeds never show our external data), 50 per request. A failed lookup
    fails the page: a record of ours must never become a second mirror row."""
    key, guid = cfg.servicetitan.mirror_id_key, cfg.servicetitan.application_guid
    asked: dict[Entity, set[int]] = {entity: {r["id"] for r in data if isinstance(r, dict)
                                              and isinstance(r.get("id"), int) and not isinstance(r.get("id"), bool)}}
    if fetched:
        asked.setdefault("customer", set()).update(i for i, rec in fetched.items() if rec is not None)

    def new_ids() -> dict[Entity, list[int]]:
        out: dict[Entity, list[int]] = {}
        with connect(engine) as conn:
            for e, ids in asked.items():
                if ids and (mirror.has_unlinked(conn, e) or outbox.deleted_create_maybe_sent(conn, e)):
                    known = mirror.mirror_ids_by_st_id(conn, e, ids)
                    out[e] = sorted(i for i in ids if i not in known)
        return out

    links: Links = {}
    for e, ids in (await asyncio.to_thread(new_ids)).items():
        collection = NAMES[e].collection
        for i in range(0, len(ids), IDS_PER_LIST):
            chunk = ids[i:i + IDS_PER_LIST]

            def ask(c: list[int] = chunk, col: str = collection) -> Any:
                return client.list_with_external_data(col, c, guid)

            resp = await _call(f"{collection}?ids", cfg, log, ask)
            found = resp.body.get("data") if resp.ok and isinstance(resp.body, dict) else None
            if not isinstance(found, list):
                raise ServiceTitanError(_failed(f"GET /{collection}?ids=... (our external data)", resp),
                                        status=resp.status, body=resp.body)
            for rec in found:
                mid = mirror_id_of(rec, key) if isinstance(rec, dict) else None
                if mid is not None and isinstance(rec.get("id"), int):
                    ext = strip_key(record_from_api(e, {"externalData": rec.get("externalData")})["external_data"],
                                    key)
                    links.setdefault(e, {})[rec["id"]] = (mid, ext)
    if links:
        log.info("pull.records_of_ours", **{e: len(v) for e, v in links.items()})
    return links


# ---------------------------------------------------------------------------------------------------- cursor


def _restore_read_only(engine: Engine, entity: Entity, log: Any, within: Connection | None = None) -> None:
    """Read-only columns edited locally (flagged by detect) take ServiceTitan's last-synced values back."""
    with _transaction(engine, within) as conn:
        flagged = mirror.read_only_flagged(conn, entity)
        if not flagged:
            return
        bypass_triggers(conn)
        mirror.lock(conn, entity, flagged)
        bases = shadow.load_shadows(conn, entity, flagged)
        for mid, columns in flagged.items():
            base = bases.get(mid)
            if base is not None:
                mirror.update_mirror(conn, entity, mid, {c: base.get(c) for c in columns if c in base})
            mirror.clear_read_only_flag(conn, entity, mid)
            log.info("pull.read_only_restored", entity=entity, mirror_id=mid, columns=columns)


def _restart_after_truncate(engine: Engine, entity: Entity, within: Connection | None = None) -> int | None:
    """A TRUNCATE of this entity's mirror table not handled yet: the feed's cursor goes back to the start and the
    truncation is marked as being restored, in one transaction. Returns its id, or None."""
    with _transaction(engine, within) as conn:
        latest = tombstones.latest_truncation(conn, entity)
        if latest is not None:
            cursors.restart(conn, NAMES[entity].feed)
            tombstones.mark_truncations_restored(conn, entity, latest)
        return latest


def _fallback_from(engine: Engine, entity: Entity, within: Connection | None = None) -> str | None:
    """Where a feed restarts when its token is rejected: the newest ``modifiedOn`` of its records in the mirror,
    minus ``CURSOR_FALLBACK_MARGIN_S`` (None: from the beginning)."""
    with _transaction(engine, within) as conn:
        newest = shadow.newest_modified_on(conn, entity)
    if newest is None:
        return None
    return (parse_timestamp(newest) - timedelta(seconds=CURSOR_FALLBACK_MARGIN_S)).isoformat()


def _read_cursor(engine: Engine, feed: str, within: Connection | None = None) -> tuple[str | None, bool]:
    with _transaction(engine, within) as conn:
        return cursors.read(conn, feed)


@contextlib.contextmanager
def _transaction(engine: Engine, within: Connection | None) -> Iterator[Connection]:
    """A new transaction committed at the end, or the caller's open one (``within``), left open."""
    if within is not None:
        yield within
        return
    with connect(engine) as conn, conn.begin():
        yield conn


def _lock_cursor(conn: Connection, feed: str, expected: str | None) -> None:
    if cursors.lock(conn, feed) != expected:
        raise CursorMovedError(feed)


def _store_cursor(conn: Connection, feed: str, page: Page) -> None:
    cursors.store(conn, feed, continue_from=page.continue_from, drained=not page.has_more, records=len(page.data))


# ---------------------------------------------------------------------------------------------------- apply


def _parse_records(entity: Entity, data: list[Any], stats: FeedStats, log: Any,
                   quarantined: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """st_id -> canonical record; a record repeated within the page counts once (the newest version). A record
    that cannot be used (no id, required fields missing, a value PostgreSQL cannot store, a value that does not
    convert) goes to ``quarantined`` instead, and the rest of the page applies."""
    out: dict[int, dict[str, Any]] = {}

    def put_aside(raw: Any, st_id: Any, reason: str, **fields: Any) -> None:
        quarantined.append(_put_aside(entity, raw, st_id, reason, stats, log, **fields))

    for i, raw in enumerate(data):
        st_id = raw.get("id") if isinstance(raw, dict) else None
        if not isinstance(st_id, int) or isinstance(st_id, bool):
            put_aside(raw, None, "no id", position=i)
            continue
        missing = missing_fields(entity, raw)
        if missing:
            put_aside(raw, st_id, "missing required fields: " + ", ".join(missing), fields=missing)
            continue
        raw, had_nul = without_nul(raw)
        if had_nul:
            log.warning("pull.nul_removed", entity=entity, st_id=st_id)
        problem = unstorable(raw)
        if problem is not None:
            put_aside(raw, st_id, f"cannot be stored: {problem}")
            continue
        try:
            rec = normalise(record_from_api(entity, raw))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            put_aside(raw, st_id, f"does not convert: {type(exc).__name__}: {str(exc)[:200]}")
            continue
        seen = out.get(st_id)
        if seen is not None and newer(seen, rec):
            continue
        out[st_id] = rec
    return out


def _put_aside(entity: Entity, raw: Any, st_id: Any, reason: str, stats: FeedStats, log: Any,
               **fields: Any) -> dict[str, Any]:
    """A quarantine row for a record that cannot be used (``sync.db.quarantine.put``), counted and logged."""
    reason = _storable_text(reason)[:1000]
    stats.skipped += 1
    stats.quarantined += 1
    is_id = isinstance(st_id, int) and not isinstance(st_id, bool)
    storable = is_id and -BIGINT_MAX - 1 <= st_id <= BIGINT_MAX
    text = json.dumps(raw, default=str)[:QUARANTINE_RAW_MAX]  # ASCII: surrogates and NUL are escaped
    key = str(st_id) if is_id else "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:32]
    log.warning("pull.record_quarantined", entity=entity, st_id=st_id if storable else None, reason=reason[:300],
                **fields)
    return {"key": key, "st_id": st_id if storable else None, "raw": text, "reason": reason}


def _storable_text(value: str) -> str:
    """Text PostgreSQL can store: NUL and lone surrogates (from the record, quoted in a reason) escaped."""
    return value.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")


def _apply_guarded(conn: Connection, cfg: Config, entity: Entity, recs: dict[int, dict[str, Any]],
                   stats: FeedStats, log: Any, customer_ids: dict[int, int] | None,
                   quarantined: list[dict[str, Any]], links: Links) -> None:
    """Apply ``recs``; if the database refuses the batch (a value the checks did not foresee), apply the records
    one by one, each in its own savepoint, and quarantine those it refuses: one record never blocks a feed."""
    batch = FeedStats()
    try:
        with conn.begin_nested():
            _apply_records(conn, cfg, entity, recs, batch, log, customer_ids, links)
        stats.add(batch)
        return
    except (DataError, IntegrityError) as exc:  # the data; a lost connection or a lock timeout is raised
        log.warning("pull.page_applied_record_by_record", entity=entity, records=len(recs),
                    error=str(exc.orig).splitlines()[0][:300] if exc.orig else type(exc).__name__)
    for st_id, rec in recs.items():
        one = FeedStats()
        try:
            with conn.begin_nested():
                _apply_records(conn, cfg, entity, {st_id: rec}, one, log, customer_ids, links)
            stats.add(one)
        except (DataError, IntegrityError) as exc:
            reason = "the database refused it: " + (str(exc.orig).splitlines()[0] if exc.orig else type(exc).__name__)
            quarantined.append(_put_aside(entity, rec, st_id, reason, stats, log))


def _settle_quarantine(conn: Connection, entity: Entity, recs: dict[int, dict[str, Any]],
                       quarantined: list[dict[str, Any]], stats: FeedStats) -> None:
    """Store what was put aside; records applied at last leave the quarantine."""
    quarantine.put(conn, entity, quarantined)
    held = {q["st_id"] for q in quarantined}
    stats.released += quarantine.release(conn, entity, (i for i in recs if i not in held))


def _apply_page(engine: Engine, cfg: Config, entity: Entity, page: Page, expected: str | None,
                fetched: dict[int, dict[str, Any] | None], log: Any, within: Connection | None = None,
                links: Links | None = None) -> FeedStats:
    feed = NAMES[entity].feed
    stats = FeedStats(pages=1, records=len(page.data))
    with _transaction(engine, within) as conn:
        bypass_triggers(conn)
        _lock_cursor(conn, feed, expected)
        _apply_data(conn, cfg, entity, page.data, fetched, stats, log, links)
        _store_cursor(conn, feed, page)
    return stats


def _apply_data(conn: Connection, cfg: Config, entity: Entity, data: list[Any],
                fetched: dict[int, dict[str, Any] | None], stats: FeedStats, log: Any,
                links: Links | None = None) -> None:
    """Parse, merge and write API records (a feed page, or records fetched by id) in ``conn``'s transaction;
    what cannot be used is quarantined."""
    quarantined: list[dict[str, Any]] = []
    recs = _parse_records(entity, data, stats, log, quarantined)
    links = links or {}
    customer_ids = _resolve_customers(conn, cfg, recs, fetched, stats, log, links) if entity == "location" else None
    _apply_guarded(conn, cfg, entity, recs, stats, log, customer_ids, quarantined, links)
    _settle_quarantine(conn, entity, recs, quarantined, stats)


def _resolve_customers(conn: Connection, cfg: Config, recs: dict[int, dict[str, Any]],
                       fetched: dict[int, dict[str, Any] | None], stats: FeedStats, log: Any,
                       links: Links) -> dict[int, int]:
    """ServiceTitan customer id -> mirror id for this location page; fetched customers are applied first.

    A location whose customer cannot be resolved (GET answered 404) keeps ``customer_id`` NULL, and so does its
    shadow (``customer_st_id`` None), so the push path never sees a change to send.
    """
    wanted = {r["customer_st_id"] for r in recs.values() if r.get("customer_st_id") is not None}
    known = mirror.customer_mirror_ids(conn, wanted)
    arrived = {st: rec for st, rec in fetched.items() if rec is not None and st in wanted and st not in known}
    if arrived:
        cust = FeedStats()
        _apply_records(conn, cfg, "customer", arrived, cust, log, None, links)
        quarantine.release(conn, "customer", arrived)  # fetched by id, whole: out of quarantine if it was in
        stats.customers_fetched += cust.inserted + cust.applied
        stats.conflicts += cust.conflicts
        known.update(mirror.customer_mirror_ids(conn, arrived))
    for st_id, rec in recs.items():
        cst = rec.get("customer_st_id")
        if cst is not None and cst not in known:
            log.warning("pull.location_without_customer", location_st_id=st_id, customer_st_id=cst)
            rec["customer_st_id"] = None
    return known


def _apply_records(conn: Connection, cfg: Config, entity: Entity, recs: dict[int, dict[str, Any]],
                   stats: FeedStats, log: Any, customer_ids: dict[int, int] | None, links: Links | None = None) -> None:
    """Merge ``recs`` (st_id -> remote canonical record) into the mirror and shadow; batched writes."""
    if not recs:
        return
    policy: Policy = cfg.sync.conflict_policy
    existing = mirror.mirror_ids_by_st_id(conn, entity, recs)
    new = {s for s in recs if s not in existing}
    of_ours = (links or {}).get(entity, {})
    ours = {s: of_ours[s] for s in new if s in of_ours}
    if ours:
        stats.linked += _link_ours(conn, cfg, entity, recs, ours, log)
        existing = mirror.mirror_ids_by_st_id(conn, entity, recs)
        new = {s for s in recs if s not in existing}
    if new:
        buried = tombstones.buried_st_ids(conn, entity, new)
        for s in buried:
            log.info("pull.record_tombstoned", entity=entity, st_id=s)
        stats.tombstoned += len(buried)
        new -= buried

    # Repeats and echoes (remote == shadow) and stale versions need neither the mirror row nor a lock.
    sync_active = cfg.sync.sync_active
    shadows = shadow.load_shadows(conn, entity, existing.values())
    todo: dict[int, int] = {}
    for st_id, mid in existing.items():
        base, remote = shadows.get(mid), recs[st_id]
        if base is not None and is_stale(base, remote):
            stats.stale += 1
            stats.unchanged += 1
        elif base is not None and is_echo(entity, base, remote, sync_active=sync_active):
            stats.unchanged += 1
        else:
            todo[st_id] = mid

    ids = sorted(todo.values())
    rows: dict[int, mirror.MirrorRow] = {}
    unsent: dict[int, dict[str, Any]] = {}
    changed_at: dict[int, datetime] = {}
    dead_at: dict[int, datetime] = {}
    if ids:
        mirror.lock(conn, entity, ids)
        rows = mirror.load_mirror(conn, entity, ids)
        shadows.update(shadow.load_shadows(conn, entity, ids))  # again, under the lock
        for mid, state, diff, unconfirmed, updated_at in outbox.unsent_for(conn, entity, ids):
            slot = unsent.setdefault(mid, {})
            slot[state] = diff
            if unconfirmed:  # sent by attempts whose answers were lost: possibly applied, our own values
                slot.setdefault("unconfirmed", []).extend(unconfirmed_versions(unconfirmed))
            if updated_at is not None:
                slot["at"] = max(slot.get("at", updated_at), updated_at)
        if policy == "newest_wins":
            changed_at = changelog.local_change_times(conn, entity, ids)
            dead_at = outbox.dead_local_change_times(conn, entity, ids)

    work = _Work()
    for st_id in sorted(new):
        work.inserts.append((st_id, recs[st_id], _customer_mid(recs[st_id], customer_ids)))
    for st_id, mid in todo.items():
        remote = recs[st_id]
        row = rows.get(mid)
        if row is None:  # deleted between the id lookup and the lock
            continue
        ob = unsent.get(mid, {})
        # when the local edit was committed (the change log, the row carrying it, or its dead row); unknown
        # is None, which newest_wins resolves for ServiceTitan: never "now"
        local_times = [t for t in (changed_at.get(mid), ob.get("at"), dead_at.get(mid)) if t is not None]
        remote_mod = parse_timestamp(remote["modified_on"]) if remote.get("modified_on") else None
        result = merge(entity, shadows.get(mid), row.record, remote, policy, remote_modified_on=remote_mod,
                       local_changed_at=max(local_times) if local_times else None, sync_active=cfg.sync.sync_active,
                       in_flight=sent_values(ob.get("in_flight"), row.record),
                       unconfirmed=ob.get("unconfirmed", ()))
        if result.stale:
            stats.stale += 1
        if not result.changed:
            stats.unchanged += 1
            continue
        stats.applied += 1
        _collect(work, entity, mid, st_id, result, customer_ids, policy)
        stats.conflicts += len(result.conflicts)
        for c in result.conflicts:
            log.info("pull.conflict", entity=entity, mirror_id=mid, st_id=st_id, field=c.field, policy=policy,
                     outcome=c.outcome)
        if ob or any(c.outcome == "local" for c in result.conflicts):
            work.rechecks.append(mid)

    _write(conn, entity, work, stats)


def _link_ours(conn: Connection, cfg: Config, entity: Entity, recs: dict[int, dict[str, Any]],
               ours: dict[int, tuple[int, dict[str, Any]]], log: Any) -> int:
    """New records that carry a mirror id of ours link to that row (it gets its ``st_id``; the mirror takes
    ServiceTitan's values of what its create carried, unless edited since; ``core.create.merge_created``),
    never a second row. A row deleted meanwhile gets the record's ``st_id`` on its tombstone (the record is never
    a row again; under ``propagate`` it is deactivated). A row already linked to another record is left alone:
    the record arrives as a row of its own."""
    rows = mirror.load_mirror(conn, entity, [m for m, _ in ours.values()], for_update=True)

    def carried(rows_of: list[tuple[int, str, Any, Any, Any]]) -> dict[int, list[dict[str, Any]]]:
        """mirror id -> what creates of it may have carried (an in-flight one, attempts whose answers were lost)"""
        out: dict[int, list[dict[str, Any]]] = {}
        for m, state, diff, unconfirmed, _ in rows_of:
            out.setdefault(m, []).extend(([sent_values(diff)] if state == "in_flight" else [])
                                         + unconfirmed_versions(unconfirmed))
        return out

    own = carried(outbox.unsent_for(conn, entity, list(rows)))
    # a new location may have gone out inside its customer's create: what that create carried of it
    customers = carried(outbox.unsent_for(conn, "customer", [r.customer_id for r in rows.values()
                                                             if r.customer_id is not None])) \
        if entity == "location" else {}
    linked = 0
    for st_id, (mid, ext) in sorted(ours.items()):
        row = rows.get(mid)
        if row is None:
            buried, _ = created.bury(conn, cfg.patch_settings(), entity, mid, st_id,
                                     propagate=cfg.sync.local_deletes == "propagate")
            log.warning("pull.record_of_ours_not_linked", entity=entity, st_id=st_id, mirror_id=mid,
                        reason="the row was deleted" if buried else "no such row")
            continue
        if row.st_id is not None:
            log.warning("pull.record_of_ours_not_linked", entity=entity, st_id=st_id, mirror_id=mid,
                        reason=f"the row is linked to {row.st_id}")
            continue
        # what its create carried; none known: ServiceTitan's values are taken for every column a create sends
        earlier = own.get(mid, []) + [v["locations"][str(mid)] for v in customers.get(row.customer_id or 0, [])
                                      if isinstance(v.get("locations"), dict)
                                      and isinstance(v["locations"].get(str(mid)), dict)]
        remote = dict(recs[st_id], external_data=ext)
        columns = create_columns(entity)
        sent = create_sent_values(entity, columns, row.record, earlier, cfg.servicetitan.mirror_id_key)
        if not created.link(conn, entity, mid, st_id, remote, sent, sync_active=cfg.sync.sync_active):
            changelog.log_recheck(conn, entity, [mid])  # its queued create is now an update (or nothing)
        outbox.clear_unconfirmed(conn, entity, mid)  # settled: never PATCHed again as a "revert"
        log.info("pull.record_of_ours_linked", entity=entity, st_id=st_id, mirror_id=mid)
        linked += 1
    return linked


def _customer_mid(rec: Mapping[str, Any], customer_ids: dict[int, int] | None) -> int | None:
    cst = rec.get(CUSTOMER_LINK)
    return None if customer_ids is None or cst is None else customer_ids.get(cst)


def _collect(work: _Work, entity: Entity, mid: int, st_id: int, result: MergeResult,
             customer_ids: dict[int, int] | None, policy: Policy) -> None:
    if result.mirror_updates or result.shadow_changed:
        cols = tuple(sorted(result.mirror_updates))
        row = {c: result.mirror_updates[c] for c in cols}
        if CUSTOMER_LINK in row:
            row[CUSTOMER_LINK] = _customer_mid(result.mirror_updates, customer_ids)
        row["stsync_id"] = mid
        row["stsync_synced"] = not result.push_needed
        work.updates.setdefault(cols, []).append(row)
    if result.shadow_changed:
        work.shadows.append({"mirror_id": mid, "st_id": st_id, "data": result.new_shadow,
                             "modified_on": result.new_shadow.get("modified_on")})
    for c in result.conflicts:
        work.conflicts.append({"e": entity, "m": mid, "s": st_id, "f": c.field, "b": json.dumps(c.base),
                               "l": json.dumps(c.local), "r": json.dumps(c.remote), "p": policy, "o": c.outcome})


def _write(conn: Connection, entity: Entity, work: _Work, stats: FeedStats) -> None:
    stats.inserted += mirror.insert_pulled(conn, entity, work.inserts)
    for cols, rows in work.updates.items():
        mirror.update_pulled(conn, entity, cols, rows)
    shadow.write_shadows(conn, entity, work.shadows)
    conflicts.record(conn, work.conflicts)
    if work.rechecks:
        changelog.log_recheck(conn, entity, work.rechecks)
        stats.rechecks += len(work.rechecks)
