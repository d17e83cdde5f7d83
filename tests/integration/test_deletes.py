"""Local deletes (issue 17; DESIGN.md "Local deletes"): ``keep`` sends nothing, ``propagate`` deactivates, the
mass-delete guard holds a big delete for an operator, and a TRUNCATE is never propagated and restored by the pull.
Real PostgreSQL, the sandbox over HTTP, the daemon's own jobs."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import Engine

from sync.commands import outbox as outbox_admin
from sync.commands import status
from sync.config import Config
from sync.sandbox import Sandbox
from tests.conftest import make_config
from tests.pushkit import drain, link_mirror, pull_cycle, rows, run_cycle, sql


@pytest.fixture
def sb() -> Sandbox:
    s = Sandbox(tenant_id=1, rate_limit_per_second=None)
    s.seed(customers=12, locations=30, seed=11)
    return s


@pytest.fixture
def linked(engine: Engine, sb: Sandbox) -> dict[int, int]:
    return link_mirror(engine, sb)


def config(database_url: str, **sync: Any) -> Config:
    return make_config(database_url, retry={"base_delay_seconds": 0.01, "max_delay_seconds": 0.05}, sync=sync)


def patches(sb: Sandbox) -> list[Any]:
    return [r for r in sb.requests if r.method == "PATCH"]


def location_st_ids(engine: Engine, n: int) -> list[int]:
    return [s for (s,) in rows(engine, "SELECT st_id FROM locations ORDER BY id LIMIT :n", n=n)]


def test_keep_sends_nothing_on_delete(engine: Engine, database_url: str, sb: Sandbox,
                                      linked: dict[int, int]) -> None:
    cfg = config(database_url, local_deletes="keep")
    [st] = location_st_ids(engine, 1)
    sql(engine, "DELETE FROM locations WHERE st_id = :s", s=st)
    drain(engine, cfg, sb)
    assert patches(sb) == [] and sb.get_location(st)["active"] is True
    assert rows(engine, "SELECT entity, st_id FROM tombstones") == [("location", st)]


def test_propagate_deactivates_a_deleted_location_and_the_pull_does_not_bring_it_back(
        engine: Engine, database_url: str, sb: Sandbox, linked: dict[int, int]) -> None:
    cfg = config(database_url, local_deletes="propagate")
    pull_cycle(engine, cfg, sb)
    [st] = location_st_ids(engine, 1)
    sql(engine, "DELETE FROM locations WHERE st_id = :s", s=st)
    drain(engine, cfg, sb)
    [sent] = patches(sb)
    assert sent.path.endswith(f"/locations/{st}") and sent.body["active"] is False
    assert sb.get_location(st)["active"] is False
    assert rows(engine, "SELECT operation, state FROM outbox") == [("delete", "succeeded")]
    pull_cycle(engine, cfg, sb)  # the feed brings the deactivated record: tombstoned, not a new row
    assert rows(engine, "SELECT count(*) FROM locations WHERE st_id = :s", s=st) == [(0,)]


def test_twenty_deletes_with_a_guard_of_five_are_held_then_released(
        engine: Engine, database_url: str, sb: Sandbox, linked: dict[int, int]) -> None:
    cfg = config(database_url, local_deletes="propagate", max_deletes_per_cycle=5)
    doomed = location_st_ids(engine, 20)
    sql(engine, "DELETE FROM locations WHERE st_id = ANY(:s)", s=doomed)
    run_cycle(engine, cfg, sb)
    assert patches(sb) == []
    assert rows(engine, "SELECT state, count(*) FROM outbox GROUP BY state") == [("held", 20)]
    with engine.connect() as conn:
        st = status.collect(conn)
    assert st["held"] == 20 and st["outbox"]["held"] == 20
    assert "stsync outbox release --held" in status.render(st)
    with engine.begin() as conn:
        assert outbox_admin.release_held(conn) == 20
    drain(engine, cfg, sb)
    assert sorted(int(r.path.rsplit("/", 1)[-1]) for r in patches(sb)) == sorted(doomed)
    assert all(sb.get_location(s)["active"] is False for s in doomed)


def test_discarding_held_deletes_sends_nothing_and_puts_the_rows_back(
        engine: Engine, database_url: str, sb: Sandbox, linked: dict[int, int]) -> None:
    cfg = config(database_url, local_deletes="propagate", max_deletes_per_cycle=5)
    before = rows(engine, "SELECT id, st_id, name, city FROM locations ORDER BY id")
    sql(engine, "DELETE FROM locations")
    run_cycle(engine, cfg, sb)
    with engine.begin() as conn:
        assert outbox_admin.discard_held(conn) == len(before)
    drain(engine, cfg, sb)
    assert patches(sb) == []
    assert rows(engine, "SELECT id, st_id, name, city FROM locations ORDER BY id") == before
    assert rows(engine, "SELECT count(*) FROM tombstones") == [(0,)]
    assert rows(engine, "SELECT count(*) FROM change_log") == [(0,)]  # putting rows back is not a local insert


def test_a_truncate_is_recorded_never_propagated_and_the_next_pull_restores_the_rows(
        engine: Engine, database_url: str, sb: Sandbox, linked: dict[int, int]) -> None:
    cfg = config(database_url, local_deletes="propagate")
    pull_cycle(engine, cfg, sb)
    sql(engine, "TRUNCATE customers CASCADE")
    drain(engine, cfg, sb)
    assert patches(sb) == []
    with engine.connect() as conn:
        st = status.collect(conn)
    assert st["truncations"] == {"customer": 1, "location": 1}
    assert "never propagated" in status.render(st)
    pull_cycle(engine, cfg, sb)
    assert rows(engine, "SELECT count(*) FROM customers") == [(len(sb.customers()),)]
    assert rows(engine, "SELECT count(*) FROM locations WHERE customer_id IS NOT NULL") == [(len(sb.locations()),)]
    with engine.connect() as conn:
        assert status.collect(conn)["truncations"] == {}
    drain(engine, cfg, sb)
    assert patches(sb) == []


def test_a_mass_delete_spread_over_several_detect_batches_is_held_from_its_first_batch(
        engine: Engine, database_url: str, sb: Sandbox, linked: dict[int, int]) -> None:
    cfg = config(database_url, local_deletes="propagate", max_deletes_per_cycle=10, batch_size=4)
    doomed = location_st_ids(engine, 20)
    sql(engine, "DELETE FROM locations WHERE st_id = ANY(:s)", s=doomed)
    run_cycle(engine, cfg, sb)
    assert patches(sb) == []
    assert rows(engine, "SELECT state, count(*) FROM outbox GROUP BY state") == [("held", 20)]
