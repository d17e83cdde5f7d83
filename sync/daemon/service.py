"""The daemon: APScheduler jobs (pull, detect, dispatch, housekeeping) on one asyncio loop.

A LISTEN connection (its own thread) wakes detect the moment a local write commits; the job intervals are
the safety net. Database work runs in worker threads (``asyncio.to_thread``) so HTTP never waits on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from sqlalchemy import Connection, Engine

from sync.config import Config
from sync.core.fields import Entity
from sync.daemon.health import Probes, bind, serve
from sync.daemon.listener import NotifyListener
from sync.daemon.metrics import Metrics
from sync.db import workers as workers_mod
from sync.db.engine import bypass_triggers, check_current, make_engine, notify_channel, ping, refused
from sync.errors import AuthError, DatabaseAccessError, DatabaseError, MigrationRequiredError, StsyncError
from sync.log import get_logger
from sync.servicetitan import client as client_mod
from sync.servicetitan.client import ServiceTitanClient
from sync.stages.detect import detect_all, preview_in
from sync.stages.dispatch import Dispatcher
from sync.stages.housekeeping import prune
from sync.stages.pull import apply_fetched, pull

log = get_logger("stsync.daemon")

OPERATOR_WAKES_DISPATCH = frozenset({"retry", "release", "resume"})
"""NOTIFY payloads of the operator's commands that make outbox rows due (``sync/commands``)."""


def worker_id() -> str:
    """Identifies this process in leases and attempt history."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class Daemon:
    """Owns the engine, the ServiceTitan client and the scheduler; one per process."""

    def __init__(self, cfg: Config, *, dry_run: bool = False, engine: Engine | None = None,
                 transport: Any = None) -> None:
        self.cfg = cfg
        self.dry_run = dry_run
        self.worker = worker_id()
        self._owns_engine = engine is None
        self.engine = engine or make_engine(cfg.database_url(), cfg.db_schema, pool_size=cfg.database.pool_size)
        self.transport = transport
        self.scheduler: AsyncIOScheduler | None = None
        self.stopping = asyncio.Event()
        self.log = log.bind(worker=self.worker)
        self.client = ServiceTitanClient(cfg.servicetitan, transport=transport)
        self.metrics = Metrics()
        self.client.observe = self.metrics.record_request
        self.metrics.attach_database(self.engine)
        self.metrics.watch_limiter(self.client.limiter)
        self.dispatcher = Dispatcher(self.engine, self.client, cfg, self.worker, on_answer=self.metrics.record_answer,
                                     refresh=self._refresh if cfg.sync.check_before_send else None)
        self._running: set[asyncio.Task[Any]] = set()
        self._active: set[str] = set()
        """Scheduler jobs running right now (by job id)."""
        self._again: set[str] = set()
        """Jobs woken while running: they run once more as soon as they finish (a wake-up is never lost)."""
        self._progress_shown = False
        self.errors: list[BaseException] = []
        """What jobs failed with (logged and survived by `run`; `once` reports it in its exit code)."""
        self.fatal: AuthError | DatabaseAccessError | None = None
        """Credentials refused while running: the daemon stops and ``run_daemon`` raises it (exit 2)."""
        self._signals = 0
        self.waiting_for: str | None = None
        """Why the jobs have not started yet (/readyz says it)."""
        self.listening: socket.socket | None = None
        """The observability socket, bound early by ``run_daemon`` (None: ``run_forever`` binds it)."""
        self._counted: dict[str, int] = {}
        """Dispatcher totals already added to the metrics (``DispatchStats`` counts since the process began)."""
        # every log line of this process carries the tenant (asyncio tasks and threads inherit the context)
        structlog.contextvars.bind_contextvars(tenant=cfg.servicetitan.tenant_id)
        self.dry_run_requests: list[dict[str, Any]] = []

    # ------------------------------------------------------------------------------------------ jobs

    async def _refresh(self, entity: Entity, data: list[dict[str, Any]]) -> None:
        """The dispatcher's check found these records changed in ServiceTitan: merge them as the pull would."""
        stats = await apply_fetched(self.engine, self.client, self.cfg, entity, data, log=self.log)
        self.metrics.conflicts.inc(stats.conflicts)
        self.log.info("pull.fetched_applied", entity=entity, records=stats.records, applied=stats.applied,
                      conflicts=stats.conflicts, skipped=stats.skipped)

    async def _guard(self, job: str, coro: Any) -> dict[str, Any]:
        """Run a job body; an outage is logged as one line and survived (the next run retries)."""
        try:
            result: dict[str, Any] = await coro
            return result
        except StsyncError as exc:
            self.errors.append(exc)
            self.log.error(f"{job}.failed", error=str(exc))
            if isinstance(exc, AuthError | DatabaseAccessError) and self.scheduler is not None:
                self.fatal = exc  # a configuration error: `stsync run` stops and exits 2, nothing is retried
                self.stopping.set()
        except Exception as exc:
            from sqlalchemy.exc import DBAPIError

            self.errors.append(exc)
            if isinstance(exc, DBAPIError):
                said = str(exc.orig or exc).strip().splitlines()[0]
                self.log.error(f"{job}.failed", error="database: " + said)
                if refused(exc) and self.scheduler is not None:  # e.g. the role's password changed while running
                    self.fatal = DatabaseAccessError(f"the database refused stsync: {said}: check the user, "
                                                     "password and database name of database.url")
                    self.stopping.set()
            else:
                self.log.exception(f"{job}.crashed", error=repr(exc))
        return {"error": True}

    async def pull_job(self) -> dict[str, Any]:
        if self.dry_run:
            self.log.info("pull.deferred_to_dry_run")  # the dry run pulls read-only, then predicts
            return {}
        return await self._guard("pull", self._pull())

    async def _pull(self) -> dict[str, Any]:
        result: dict[str, Any] = await pull(self.engine, self.client, self.cfg, progress=self._progress,
                                            stop=self.stopping)
        for feed, summary in result.items():
            if isinstance(summary, dict):
                self.metrics.pulled.labels(feed).inc(summary.get("records", 0))
                self.metrics.conflicts.inc(summary.get("conflicts", 0))
        if self._progress_shown:
            sys.stderr.write("\n")
            self._progress_shown = False
        return result

    def _progress(self, feed: str, records: int, rate: float) -> None:
        """A live line on a terminal during a long pull (the initial load); log lines otherwise."""
        if sys.stderr.isatty() and self.cfg.logging.format == "console":
            sys.stderr.write(f"\r  pull {feed}: {records:,} records ({rate:,.0f}/s)   ")
            sys.stderr.flush()
            self._progress_shown = True
        else:
            (self.log.info if records else self.log.debug)("pull.progress", feed=feed, records=records,
                                                           records_per_second=round(rate, 1))

    async def detect_job(self) -> dict[str, Any]:
        if self.dry_run:
            return {}
        return await self._guard("detect", self._detect())

    async def _detect(self) -> dict[str, Any]:
        result = await asyncio.to_thread(detect_all, self.engine, self.cfg)
        self.metrics.dead.inc(result.dead)  # rejected before sending (the body fails ServiceTitan's schema)
        if result.enqueued or result.rows:
            self.wake("dispatch")
        return result.as_dict()

    async def dispatch_job(self) -> dict[str, Any]:
        if self.dry_run:
            return await self._guard("dispatch", self._dry_run())
        return await self._guard("dispatch", self._dispatch())

    async def _dispatch(self) -> dict[str, Any]:
        result = await self.dispatcher.run(self.stopping, grace_seconds=self.cfg.sync.shutdown_grace_seconds)
        for name, metric in (("rejected", self.metrics.dead), ("conflicts", self.metrics.conflicts)):
            total = int(result.get(name, 0))  # (answers' outcomes are counted as they come: record_answer)
            metric.inc(total - self._counted.get(name, 0))
            self._counted[name] = total
        if self.scheduler is not None and not self.stopping.is_set() and "dispatch" not in self._again:
            # a retry due before the next scheduled run (a 429's Retry-After at the end of a backlog) is sent
            # when it is due, not up to a whole push interval later
            wait = await asyncio.to_thread(self.dispatcher.next_due_in)
            job = self.scheduler.get_job("dispatch")
            if wait is not None and job is not None and job.next_run_time is not None:
                at = datetime.now(UTC) + timedelta(seconds=max(0.1, wait))
                if at < job.next_run_time:
                    job.modify(next_run_time=at)
        return result

    async def _dry_run(self) -> dict[str, Any]:
        """What a real cycle would send: a read-only pull (every page merged in one transaction), then the
        prediction in that same transaction, which is then rolled back: nothing is written, nothing is sent."""
        conn = await asyncio.to_thread(self._dry_transaction)
        try:
            await pull(self.engine, self.client, self.cfg, within=conn)
            planned = await asyncio.to_thread(preview_in, conn, self.cfg)
        finally:
            await asyncio.to_thread(self._end_dry_transaction, conn)
        for req in planned:
            self.log.info("outbox.dry_run", **req)
        self.dry_run_requests = planned
        return {"would_send": len(planned), "requests": planned}

    def _dry_transaction(self) -> Connection:
        conn = self.engine.connect()
        conn.begin()
        bypass_triggers(conn)
        return conn

    @staticmethod
    def _end_dry_transaction(conn: Connection) -> None:
        conn.rollback()
        conn.close()

    async def workers_job(self) -> dict[str, Any]:
        """Heartbeat; take this replica's share of the tenant's request budget."""
        live = await asyncio.to_thread(workers_mod.heartbeat, self.engine, self.worker)
        rate = self.cfg.servicetitan.requests_per_second * client_mod.RATE_HEADROOM / live
        if abs(rate - self.client.limiter.ceiling) > 1e-9:
            self.client.limiter.set_rate(rate)
            self.log.info("daemon.rate_share", replicas=live, requests_per_second=round(rate, 3))
        return {"replicas": live, "rate": rate}

    async def workers_job_guarded(self) -> dict[str, Any]:
        if self.dry_run:
            return {}
        return await self._guard("workers", self.workers_job())

    async def housekeeping_job(self) -> dict[str, Any]:
        if self.dry_run:
            return {}
        return await self._guard("housekeeping", asyncio.to_thread(
            prune, self.engine, self.cfg.housekeeping.retain_days))

    # ------------------------------------------------------------------------------------- lifecycle

    def _tracked(self, job: Any, job_id: str) -> Any:
        """A scheduler job whose task shutdown can wait for (only scheduler runs, never the main task).

        APScheduler skips a run that comes due while the job is still running (``max_instances`` 1), so a
        wake-up then would wait a whole interval: instead the run repeats while it was woken meanwhile.
        """

        async def run() -> Any:
            task = asyncio.current_task()
            if task is not None:
                self._running.add(task)
                task.add_done_callback(self._running.discard)
            self._active.add(job_id)
            try:
                while True:
                    self._again.discard(job_id)
                    result = await job()
                    if job_id not in self._again or self.stopping.is_set():
                        return result
            finally:
                self._active.discard(job_id)
                self._again.discard(job_id)

        run.__name__ = getattr(job, "__name__", "job")
        return run

    def _wake_from_thread(self, loop: asyncio.AbstractEventLoop, job_id: str) -> None:
        loop.call_soon_threadsafe(self.wake, job_id)

    def _notified(self, loop: asyncio.AbstractEventLoop, payload: str) -> None:
        """A NOTIFY (from the listener's thread): a local write wakes detect; an operator's command that made
        rows due (`outbox retry`, `release --held`, `resume`) wakes dispatch too, and `resync` wakes the pull."""
        self._wake_from_thread(loop, "detect")
        if payload in OPERATOR_WAKES_DISPATCH:
            self._wake_from_thread(loop, "dispatch")
        elif payload == "resync":
            self._wake_from_thread(loop, "pull")

    def wake(self, job_id: str) -> None:
        """Run a job now (coalesced with a run already due); safe from the event loop only."""
        if self.scheduler is None or self.stopping.is_set():
            return
        if job_id in self._active:
            self._again.add(job_id)
            return
        job = self.scheduler.get_job(job_id)
        if job is not None:
            job.modify(next_run_time=datetime.now(UTC))

    async def cycle(self) -> dict[str, Any]:
        """One full cycle: pull, then detect, then dispatch everything due now."""
        await self.workers_job_guarded()
        return {
            "pull": await self.pull_job(),
            "detect": await self.detect_job(),
            "dispatch": await self.dispatch_job(),
        }

    async def run_forever(self, *, wait_for_database: bool = False) -> None:
        """Serve /healthz at once, wait for the database if asked (``run_daemon``), then run the jobs until
        SIGTERM/SIGINT."""
        # bound first: an address that cannot be used stops the daemon with one line before anything started
        sock = self.listening or (bind(self.cfg.observability.listen) if self.cfg.observability.listen else None)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self._signalled, sig)
        # alive from the first second: a liveness probe must not restart a pod that waits for its database
        http = asyncio.create_task(serve(self.probes(), sock, self.stopping)) if sock is not None else None
        try:
            if wait_for_database and not await self._wait_for_database():
                self.log.info("daemon.stopped", reason="signal while waiting for the database")
                return
            await self._run_jobs()
        finally:
            self.stopping.set()
            if http is not None:
                await asyncio.wait({http}, timeout=5)
            await self.close()

    def _signalled(self, sig: signal.Signals) -> None:
        """The first SIGTERM/SIGINT stops gracefully (in-flight requests finish within the grace period); a second
        one exits at once: what was committed stays committed, an open transaction rolls back, and a claimed row
        is taken over by another replica when its lease expires (its answer, if any, is then in doubt)."""
        self._signals += 1
        if self._signals == 1:
            self.stopping.set()
            return
        self.log.warning("daemon.stopped_at_once", signal=sig.name, running_jobs=len(self._running))
        sys.stderr.flush()
        os._exit(128 + sig.value)

    async def _wait_for_database(self, max_backoff: float = 30.0) -> bool:
        """Until the database answers and its schema is current; False if stopped while waiting.

        An outage at start is waited out with backoff (logged once per try), not crash-looped; a refusal
        (DatabaseAccessError) or a schema that needs `stsync migrate` is an error at once.
        """
        backoff = 1.0
        while True:
            self.waiting_for = "waiting for the database"
            try:
                newer = await asyncio.to_thread(check_current, self.engine, self.cfg.db_schema)
                if newer is not None:  # a rolling upgrade: the newer release's migration says we may run
                    self.log.warning("daemon.schema_newer_compatible", detail=newer)
                self.waiting_for = None
                return True
            except (MigrationRequiredError, DatabaseAccessError):
                raise
            except DatabaseError as exc:
                self.waiting_for = f"waiting for the database: {exc}"
                self.log.error("daemon.database_unreachable", error=str(exc), retry_in_s=backoff)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), backoff)
                if self.stopping.is_set():
                    return False
                backoff = min(backoff * 2, max_backoff)

    async def _run_jobs(self) -> None:
        cfg = self.cfg.sync
        loop = asyncio.get_running_loop()
        sched = AsyncIOScheduler(job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 3600})
        jobs = [(self.pull_job, "pull", cfg.pull_interval_seconds, True),
                (self.detect_job, "detect", cfg.push_interval_seconds, True),
                (self.dispatch_job, "dispatch", cfg.push_interval_seconds, True),
                (self.workers_job_guarded, "workers", workers_mod.HEARTBEAT_EVERY_S, False),
                (self.housekeeping_job, "housekeeping", self.cfg.housekeeping.interval_seconds, False)]
        for fn, job_id, every, at_once in jobs:
            sched.add_job(self._tracked(fn, job_id), "interval", seconds=every, id=job_id,
                          **({"next_run_time": datetime.now(UTC)} if at_once else {}))
        self.scheduler = sched
        listener = NotifyListener(self.cfg.database_url(), notify_channel(self.cfg.db_schema),
                                  lambda payload: self._notified(loop, payload))
        if not self.dry_run:
            await self.workers_job_guarded()  # know the replica count before the first request
        sched.start()
        listener.start()
        self.log.info("daemon.started", dry_run=self.dry_run, schema=self.cfg.db_schema,
                      listen=self.cfg.observability.listen)
        try:
            await self.stopping.wait()
        finally:
            self.log.info("daemon.stopping", running_jobs=len(self._running))
            sched.pause()  # no new runs; running jobs see `stopping` and wind down
            listener.stop()
            grace = self.cfg.sync.shutdown_grace_seconds
            if self._running:  # the dispatcher finishes or releases its in-flight rows within the grace period
                await asyncio.wait(set(self._running), timeout=grace + 5)
            sched.shutdown(wait=False)  # (this cancels whatever job is still running)
            with contextlib.suppress(Exception):
                await asyncio.to_thread(workers_mod.leave, self.engine, self.worker)
            self.log.info("daemon.stopped")

    def probes(self) -> Probes:
        """What /healthz, /readyz and /metrics look at."""

        def database() -> None:
            with self.engine.connect() as conn:
                ping(conn)

        def scheduler() -> str:
            sched = self.scheduler
            if self.stopping.is_set():
                return "stopping"
            if sched is None or not sched.running:
                return f"not started: {self.waiting_for}" if self.waiting_for else "not started"
            return "ok"

        return Probes(worker=self.worker, database=database, token=self.client.token, scheduler=scheduler,
                      registry=self.metrics.registry)

    async def close(self) -> None:
        await self.client.aclose()
        if self._owns_engine:
            self.engine.dispose()


def run_daemon(cfg: Config, *, dry_run: bool = False) -> None:
    sock = bind(cfg.observability.listen) if cfg.observability.listen else None  # before anything: exit 2 at once
    daemon = Daemon(cfg, dry_run=dry_run)
    daemon.listening = sock
    asyncio.run(daemon.run_forever(wait_for_database=True))
    if daemon.fatal is not None:
        raise daemon.fatal


def run_once(cfg: Config, *, dry_run: bool = False) -> dict[str, Any]:
    engine = make_engine(cfg.database_url(), cfg.db_schema, pool_size=1)
    newer = check_current(engine, cfg.db_schema)
    engine.dispose()
    if newer is not None:
        log.warning("daemon.schema_newer_compatible", detail=newer)

    async def _main() -> dict[str, Any]:
        d = Daemon(cfg, dry_run=dry_run)
        started = time.monotonic()
        try:
            out = await d.cycle()
        finally:
            if not dry_run:  # a daemon started right after must not count this process as a replica
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(workers_mod.leave, d.engine, d.worker)
            await d.close()
        out["duration_s"] = round(time.monotonic() - started, 3)
        # our own errors are already one line a user can act on; anything else is named by its class
        out["errors"] = [str(e).splitlines()[0] if isinstance(e, StsyncError) and str(e) else
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}" for e in d.errors]
        out["exit_code"] = 2 if any(isinstance(e, AuthError) for e in d.errors) else (1 if d.errors else 0)
        return out

    return asyncio.run(_main())
