"""Prometheus metrics of one daemon process, on its own registry (several daemons in one test process stay apart).

Counters are incremented from the dispatcher's answers (``record_answer``); outbox depth, ages and lags are read
from the database at scrape time (the tables are the truth, shared by every replica).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import Engine

from sync import build
from sync.core.fields import ENTITIES
from sync.core.retry import Outcome
from sync.db import changelog, control, cursors, mirror, outbox, quarantine, tombstones
from sync.servicetitan.client import ApiResponse
from sync.servicetitan.ratelimit import RateLimiter


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # process_cpu_seconds_total, process_resident_memory_bytes, ...
        PlatformCollector(registry=self.registry)  # python_info
        GCCollector(registry=self.registry)  # python_gc_*
        Info("stsync_build", "The stsync release and the commit it was built from",
             registry=self.registry).info({"version": build.version(), "commit": build.commit()})
        self.requests = Counter("stsync_requests_total", "ServiceTitan calls that left this process, by operation "
                                "and HTTP status (code 0: no answer)", ["operation", "code"], registry=self.registry)
        self.rate_limited = Counter("stsync_rate_limited_total", "429 answers received (every kind of call)",
                                    registry=self.registry)
        self.retries = Counter("stsync_retries_total", "Transient failures scheduled for another attempt",
                               registry=self.registry)
        self.dead = Counter("stsync_dead_total", "Outbox rows that ended dead in this process (ServiceTitan's "
                            "answers, and bodies rejected before sending)", registry=self.registry)
        self.latency = Histogram("stsync_request_latency_seconds", "ServiceTitan call latency, by operation",
                                 ["operation"], registry=self.registry,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.pulled = Counter("stsync_pulled_records_total", "Export feed records processed", ["feed"],
                              registry=self.registry)
        self.conflicts = Counter("stsync_conflicts_total", "Field conflicts recorded (pull, check before sending, "
                                 "PATCH answers)", registry=self.registry)

    def record_request(self, operation: str, code: int, seconds: float) -> None:
        """Every ServiceTitan call (sync.servicetitan.client.RequestObserver)."""
        self.requests.labels(operation, str(code)).inc()
        self.latency.labels(operation).observe(seconds)
        if code == 429:
            self.rate_limited.inc()

    def record_answer(self, entity: str, resp: ApiResponse, outcome: Outcome) -> None:
        """What the dispatcher made of one answer (sync.stages.dispatch.SendObserver)."""
        if outcome is Outcome.RETRY:
            self.retries.inc()
        elif outcome is Outcome.DEAD:
            self.dead.inc()

    def watch_limiter(self, limiter: RateLimiter) -> None:
        """The request rate this process allows itself now, and its ceiling (its share of the tenant's limit):
        below the ceiling the limiter is backing off after 429s (sync.servicetitan.ratelimit)."""
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
        held = GaugeMetricFamily("stsync_quarantined_records", "Feed records that could not be stored",
                                 labels=["entity"])
        to_create = GaugeMetricFamily("stsync_rows_to_create", "Mirror rows without st_id (to create in ServiceTitan, "
                                      "waiting for a location, or dead with a reason)", labels=["entity"])
        waiting = GaugeMetricFamily("stsync_customers_waiting_for_location",
                                    "New customers that wait for a location before they can be created")
        truncated = GaugeMetricFamily("stsync_truncations_unrestored",
                                      "TRUNCATEs of a mirror table the pull has not restored yet", labels=["entity"])
        paused = GaugeMetricFamily("stsync_paused", "1 while sending is paused (stsync pause): nothing is sent")
        up = GaugeMetricFamily("stsync_database_up", "1 when the database answered this scrape")
        try:
            with self.engine.connect() as conn:
                for state, n in outbox.count_by_state(conn).items():
                    depth.add_metric([state], n)
                oldest.add_metric([], outbox.oldest_pending_seconds(conn) or 0.0)
                push_lag.add_metric([], changelog.push_lag_seconds(conn) or 0.0)
                kept = quarantine.count(conn)
                cut = tombstones.truncations_unrestored(conn)
                for entity in ENTITIES:
                    held.add_metric([entity], kept.get(entity, 0))
                    to_create.add_metric([entity], mirror.count_to_create(conn, entity))
                    truncated.add_metric([entity], cut.get(entity, 0))
                waiting.add_metric([], mirror.count_by_status(conn, "customer", "waiting_for_location"))
                paused.add_metric([], 1 if control.paused(conn) is not None else 0)
                for c in cursors.all_cursors(conn):
                    pull_lag.add_metric([c["feed"]], float(c["pull_age_s"] or 0))
                    cursor_age.add_metric([c["feed"]], float(c["moved_age_s"] or 0))
            up.add_metric([], 1)
        except Exception:
            up.add_metric([], 0)
        yield from (depth, oldest, push_lag, pull_lag, cursor_age, held, to_create, waiting, truncated, paused, up)
