"""What an operator watches (issue 18): each counter of /metrics moves when its event happens, and a quiet feed
logs nothing at INFO. Driven through the daemon's own jobs against
the sandbox, read from the registry /metrics serves (``prometheus_client.generate_latest``)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from prometheus_client import generate_latest
from sqlalchemy import Engine

from sync.config import Config
from sync.daemon.service import Daemon
from sync.sandbox import Fault, Sandbox
from tests.conftest import make_config
from tests.pushkit import link_mirror, sql, transport


@pytest.fixture
def sb() -> Sandbox:
    s = Sandbox(tenant_id=1, rate_limit_per_second=None)
    s.seed(customers=6, locations=4, seed=3)
    return s


@pytest.fixture
def cfg(database_url: str) -> Config:
    return make_config(database_url, retry={"base_delay_seconds": 0.01, "max_delay_seconds": 0.05})


def scrape(engine: Engine, cfg: Config, sb: Sandbox, *jobs: Callable[[Daemon], Awaitable[Any]]) -> dict[str, float]:
    """Run ``jobs`` on one daemon, then read its metrics as /metrics shows them: {sample line name: value}."""

    async def go() -> bytes:
        d = Daemon(cfg, engine=engine, transport=transport(sb))
        try:
            for job in jobs:
                await job(d)
            return generate_latest(d.metrics.registry)
        finally:
            await d.close()

    out: dict[str, float] = {}
    for line in asyncio.run(go()).decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def test_pulled_records_are_counted_per_feed(engine: Engine, cfg: Config, sb: Sandbox) -> None:
    seen = scrape(engine, cfg, sb, lambda d: d.pull_job())
    assert seen['stsync_pulled_records_total{feed="customers"}'] == 6
    assert seen['stsync_pulled_records_total{feed="locations"}'] == 4


def test_a_conflict_resolved_by_the_pull_is_counted(engine: Engine, cfg: Config, sb: Sandbox) -> None:
    ids = link_mirror(engine, sb)
    st = min(ids)
    sb.edit_customer(st, name="Remote Side")
    sql(engine, "UPDATE customers SET name = 'Local Side' WHERE id = :m", m=ids[st])
    seen = scrape(engine, cfg, sb, lambda d: d.pull_job())
    assert seen["stsync_conflicts_total"] == 1


def test_a_body_rejected_before_sending_counts_as_dead(engine: Engine, cfg: Config, sb: Sandbox) -> None:
    ids = link_mirror(engine, sb)
    sql(engine, "UPDATE customers SET type = 'Alien' WHERE id = :m", m=ids[min(ids)])
    seen = scrape(engine, cfg, sb, lambda d: d.detect_job(), lambda d: d.dispatch_job())
    assert seen["stsync_dead_total"] == 1
    assert seen['stsync_outbox_rows{state="dead"}'] == 1


def test_every_servicetitan_call_is_counted_by_operation_and_code(engine: Engine, cfg: Config, sb: Sandbox) -> None:
    ids = link_mirror(engine, sb)
    sql(engine, "UPDATE customers SET name = 'Counted' WHERE id = :m", m=ids[min(ids)])
    sb.faults.add(Fault.rate_limited(retry_after=0), endpoint="GET /export/locations", times=1)
    seen = scrape(engine, cfg, sb, lambda d: d.pull_job(), lambda d: d.detect_job(), lambda d: d.dispatch_job())
    calls = {k: v for k, v in seen.items() if k.startswith("stsync_requests_total{")}
    assert calls['stsync_requests_total{code="200",operation="POST /connect/token"}'] == 1
    assert calls['stsync_requests_total{code="200",operation="GET /export/customers"}'] >= 1
    assert calls['stsync_requests_total{code="429",operation="GET /export/locations"}'] == 1
    assert calls['stsync_requests_total{code="200",operation="GET /export/locations"}'] >= 1
    assert calls['stsync_requests_total{code="200",operation="PATCH /customers/{id}"}'] == 1
    assert seen["stsync_rate_limited_total"] == 1
    assert seen['stsync_request_latency_seconds_count{operation="PATCH /customers/{id}"}'] == 1
    assert sum(calls.values()) == len(sb.requests)  # every request the sandbox saw (the token too)


def test_standard_collectors_and_the_build_are_exported(engine: Engine, cfg: Config, sb: Sandbox) -> None:
    from sync import __version__, build

    seen = scrape(engine, cfg, sb)
    assert seen["process_resident_memory_bytes"] > 0
    assert seen["process_cpu_seconds_total"] > 0
    assert any(k.startswith("python_info{") for k in seen)
    assert any(k.startswith("python_gc_collections_total{") for k in seen)
    (info,) = [k for k in seen if k.startswith("stsync_build_info{")]
    assert f'version="{__version__}"' in info and f'commit="{build.commit()}"' in info
    assert build.commit() != "unknown"  # the tests run from the git tree


def test_an_idle_pull_logs_nothing_at_info(engine: Engine, cfg: Config, sb: Sandbox) -> None:
    from structlog.testing import capture_logs

    from tests.pushkit import pull_cycle

    pull_cycle(engine, cfg, sb)  # the initial load: logged at INFO
    with capture_logs() as events:
        pull_cycle(engine, cfg, sb)  # nothing new in either feed
    idle = [e for e in events if e["event"].startswith("pull.")]
    assert idle, "the idle pull still logs its pages, at DEBUG"
    assert [e["event"] for e in idle if e["log_level"] != "debug"] == []
