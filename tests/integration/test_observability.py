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
from sync.sandbox import Sandbox
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


def test_requests_are_counted_by_status(engine: Engine, cfg: Config, sb: Sandbox) -> None:
    ids = link_mirror(engine, sb)
    sql(engine, "UPDATE customers SET name = 'Counted' WHERE id = :m", m=ids[min(ids)])
    seen = scrape(engine, cfg, sb, lambda d: d.detect_job(), lambda d: d.dispatch_job())
    assert seen['stsync_requests_total{entity="customer",status="200"}'] == 1


def test_an_idle_pull_logs_nothing_at_info(engine: Engine, cfg: Config, sb: Sandbox) -> None:
    from structlog.testing import capture_logs

    from tests.pushkit import pull_cycle

    pull_cycle(engine, cfg, sb)  # the initial load: logged at INFO
    with capture_logs() as events:
        pull_cycle(engine, cfg, sb)  # nothing new in either feed
    idle = [e for e in events if e["event"].startswith("pull.")]
    assert idle, "the idle pull still logs its pages, at DEBUG"
    assert [e["event"] for e in idle if e["log_level"] != "debug"] == []
