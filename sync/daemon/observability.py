"""Optional HTTP listener (``observability.listen``): /healthz, /readyz and Prometheus /metrics.

Counters are incremented by the dispatcher and the pull; outbox depth, ages and lags are read from the
database at scrape time (the tables are the truth, shared by every replica).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import Engine, text
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sync.commands.status import OUTBOX_STATES

if TYPE_CHECKING:
    from sync.daemon.service import Daemon
    from sync.servicetitan.ratelimit import RateLimiter


class Metrics:
    """The process's metrics, on its own registry (several daemons in one test process stay apart)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("stsync_requests_total", "ServiceTitan requests sent by the dispatcher",
                                ["entity", "status"], registry=self.registry)
        self.rate_limited = Counter("stsync_rate_limited_total", "429 answers received", registry=self.registry)
        self.retries = Counter("stsync_retries_total", "Transient failures scheduled for another attempt",
                               registry=self.registry)
        self.dead = Counter("stsync_dead_total", "Outbox rows that ended dead in this process",
                            registry=self.registry)
        self.latency = Histogram("stsync_request_latency_seconds", "PATCH latency", registry=self.registry,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.pulled = Counter("stsync_pulled_records_total", "Export feed records processed", ["feed"],
                              registry=self.registry)
        self.conflicts = Counter("stsync_conflicts_total", "Field conflicts resolved by the pull",
                                 registry=self.registry)

    def watch_limiter(self, limiter: RateLimiter) -> None:
        """The request rate this process allows itself now, and its ceiling (its share of the tenant's limit):
        below the ceiling the limiter is backing off after 429s (sync.ratelimit)."""
        Gauge("stsync_send_rate_per_second", "Requests per second this process sends at now",
              registry=self.registry).set_function(limiter.current_rate)
        Gauge("stsync_send_rate_ceiling_per_second", "This process's share of requests_per_second",
              registry=self.registry).set_function(lambda: limiter.ceiling)

    def attach_database(self, engine: Engine) -> None:
        self.registry.register(_DatabaseCollector(engine))


class _DatabaseCollector:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        depth = GaugeMetricFamily("stsync_outbox_rows", "Outbox rows per state", labels=["state"])
        oldest = GaugeMetricFamily("stsync_oldest_pending_seconds", "Age of the oldest pending outbox row")
        push_lag = GaugeMetricFamily("stsync_push_lag_seconds",
                                     "Age of the oldest unprocessed local change (change log or pending outbox)")
        pull_lag = GaugeMetricFamily("stsync_pull_lag_seconds", "Seconds since the last pull", labels=["feed"])
        cursor_age = GaugeMetricFamily("stsync_pull_cursor_age_seconds", "Seconds since a feed cursor moved",
                                       labels=["feed"])
        up = GaugeMetricFamily("stsync_database_up", "1 when the database answered this scrape")
        try:
            with self.engine.connect() as conn:
                counts = dict.fromkeys(OUTBOX_STATES, 0)
                rows = conn.execute(text("SELECT state, count(*) FROM outbox GROUP BY state"))
                counts.update({s: n for s, n in rows})
                for state, n in counts.items():
                    depth.add_metric([state], n)
                age = conn.execute(text("SELECT extract(epoch FROM now() - min(created_at)) FROM outbox "
                                        "WHERE state = 'pending'")).scalar()
                oldest.add_metric([], float(age or 0))
                lag = conn.execute(text("""SELECT extract(epoch FROM now() - least(
                        (SELECT min(changed_at) FROM change_log),
                        (SELECT min(created_at) FROM outbox WHERE state IN ('pending', 'in_flight'))))""")).scalar()
                push_lag.add_metric([], float(lag or 0))
                for feed, last_pull, updated in conn.execute(text(
                        "SELECT feed, extract(epoch FROM now() - last_pull_at), extract(epoch FROM now() - updated_at) "
                        "FROM feed_cursors")):
                    pull_lag.add_metric([feed], float(last_pull or 0))
                    cursor_age.add_metric([feed], float(updated or 0))
            up.add_metric([], 1)
        except Exception:
            up.add_metric([], 0)
        yield from (depth, oldest, push_lag, pull_lag, cursor_age, up)


def create_app(daemon: Daemon) -> Starlette:
    async def healthz(_: Request) -> Response:
        return JSONResponse({"status": "alive", "worker": daemon.worker})

    async def readyz(_: Request) -> Response:
        checks: dict[str, Any] = {}

        def db_ok() -> None:
            with daemon.engine.connect() as conn:
                conn.execute(text("SELECT 1"))

        try:
            await asyncio.wait_for(asyncio.to_thread(db_ok), timeout=5)
            checks["database"] = "ok"
        except Exception as exc:
            checks["database"] = f"error: {type(exc).__name__}"
        try:
            await asyncio.wait_for(daemon.client.token(), timeout=10)
            checks["servicetitan_token"] = "ok"  # noqa: S105
        except Exception as exc:
            checks["servicetitan_token"] = f"error: {type(exc).__name__}"
        sched = daemon.scheduler
        checks["scheduler"] = "ok" if sched is not None and sched.running and not daemon.stopping.is_set() \
            else "not running"
        ready = all(v == "ok" for v in checks.values())
        return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)

    async def metrics(_: Request) -> Response:
        started = time.perf_counter()
        body = await asyncio.to_thread(generate_latest, daemon.metrics.registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST,
                        headers={"X-Scrape-Ms": f"{(time.perf_counter() - started) * 1000:.1f}"})

    return Starlette(routes=[Route("/healthz", healthz), Route("/readyz", readyz), Route("/metrics", metrics)])


async def serve(daemon: Daemon, listen: str) -> None:
    """Serve until the daemon stops."""
    import uvicorn

    host, _, port = listen.rpartition(":")
    server = uvicorn.Server(uvicorn.Config(create_app(daemon), host=host or "127.0.0.1", port=int(port),
                                           log_level="warning", access_log=False, lifespan="off"))
    # the daemon owns SIGTERM/SIGINT (graceful stop); uvicorn must not take them over
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
    task = asyncio.create_task(server.serve())
    await daemon.stopping.wait()
    server.should_exit = True
    await task
