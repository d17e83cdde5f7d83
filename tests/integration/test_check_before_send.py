"""The check before sending (docs/push.md): the records of a claimed batch are listed with one ``GET ?ids=``
just before their PATCHes go out; one changed in ServiceTitan since its shadow is merged first (conflicts
recorded by the policy) and its body recomputed, so a remote edit made since the last pull is not overwritten."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest
from sqlalchemy import Engine

from sync.config import Config
from sync.sandbox import Sandbox, create_app
from tests.chaos_kit import Tamper, cycle, raw
from tests.conftest import make_config
from tests.pushkit import link_mirror, rows, sql


@pytest.fixture
def sb() -> Sandbox:
    s = Sandbox(tenant_id=1, rate_limit_per_second=None)
    s.seed(customers=6, locations=2, seed=0)
    return s


@pytest.fixture
def linked(engine: Engine, sb: Sandbox) -> dict[int, int]:
    return link_mirror(engine, sb)


def make_cfg(database_url: str, policy: str = "remote_wins", **sync: Any) -> Config:
    return make_config(database_url, sync={"conflict_policy": policy, "check_min_interval_seconds": 0, **sync},
                       retry={"base_delay_seconds": 0.01, "max_delay_seconds": 0.05})


def lists(sb: Sandbox) -> list[Any]:
    return [r for r in sb.requests if r.method == "GET" and r.endpoint in ("GET /customers", "GET /locations")]


def patches(sb: Sandbox) -> list[Any]:
    return [r for r in sb.requests if r.method == "PATCH"]


def customers(sb: Sandbox) -> list[dict[str, Any]]:
    return sorted(sb.customers(), key=lambda c: c["id"])


@pytest.mark.parametrize(("policy", "city"), [("remote_wins", "remote"), ("local_wins", "local")])
def test_a_remote_address_edit_since_the_last_pull_is_a_conflict_not_overwritten(
        engine: Engine, database_url: str, sb: Sandbox, linked: dict[int, int], policy: str, city: str) -> None:
    cust = customers(sb)[0]
    mid = linked[cust["id"]]
    sql(engine, "UPDATE customers SET city = 'Local City' WHERE id = :m", m=mid)
    sb.edit_customer(cust["id"], address={**cust["address"], "state": "ZZ", "city": "Remote City"})
    cycle(engine, make_cfg(database_url, policy), sb, pull=False)  # no pull: only the check can see the edit
    assert rows(engine, "SELECT field, outcome FROM conflicts") == [("address", city)]
    want = ("Remote City", "ZZ") if city == "remote" else ("Local City", cust["address"]["state"])
    assert rows(engine, "SELECT city, state, sync_status FROM customers WHERE id = :m", m=mid) == [(*want, "synced")]
    st = sb.get_customer(cust["id"])["address"]
    assert (st["city"], st["state"]) == want  # both sides end at what the conflict says
    assert len(patches(sb)) == (0 if city == "remote" else 1)


def test_a_remote_edit_of_another_field_reaches_the_mirror_before_the_patch(
        engine: Engine, database_url: str, sb: Sandbox, linked: dict[int, int]) -> None:
    cust = customers(sb)[0]
    mid = linked[cust["id"]]
    sql(engine, "UPDATE customers SET name = 'Local Name' WHERE id = :m", m=mid)
    sb.edit_customer(cust["id"], doNotMail=not cust["doNotMail"])
    cycle(engine, make_cfg(database_url), sb, pull=False)
    assert rows(engine, "SELECT name, do_not_mail, sync_status FROM customers WHERE id = :m", m=mid) == [
        ("Local Name", not cust["doNotMail"], "synced")]
    (patch,) = patches(sb)
    assert set(patch.body) == {"name", "externalData"}
    assert rows(engine, "SELECT count(*) FROM conflicts") == [(0,)]


def test_one_list_request_checks_a_whole_batch_and_nothing_is_held_back_when_unchanged(
        engine: Engine, database_url: str, sb: Sandbox, linked: dict[int, int]) -> None:
    sql(engine, "UPDATE customers SET name = name || ' *'")
    cycle(engine, make_cfg(database_url), sb, pull=False)
    (check,) = lists(sb)
    q = parse_qs(check.query)
    assert sorted(int(i) for i in q["ids"][0].split(",")) == sorted(c["id"] for c in customers(sb))
    assert q["active"] == ["Any"]  # inactive records too (the list is active-only by default)
    assert check.time <= min(p.time for p in patches(sb))
    assert len(patches(sb)) == 6
    assert rows(engine, "SELECT state, count(*) FROM outbox GROUP BY state") == [("succeeded", 6)]


def test_a_failed_check_never_blocks_a_send(engine: Engine, database_url: str, sb: Sandbox,
                                            linked: dict[int, int]) -> None:
    cust = customers(sb)[0]
    mid = linked[cust["id"]]
    tamper = Tamper(create_app(sb))

    async def down(request: httpx.Request, inner: Any) -> httpx.Response:
        return raw(503, b'{"title": "down"}')

    tamper.add("GET", r"/customers$", down)
    sql(engine, "UPDATE customers SET name = 'Sent Anyway' WHERE id = :m", m=mid)
    out = cycle(engine, make_cfg(database_url), sb, pull=False, transport=tamper)
    assert out["dispatch"]["checks_failed"] == 1
    assert sb.get_customer(cust["id"])["name"] == "Sent Anyway"
    assert rows(engine, "SELECT state FROM outbox") == [("succeeded",)]


def test_without_the_check_no_list_request_is_made(engine: Engine, database_url: str, sb: Sandbox,
                                                   linked: dict[int, int]) -> None:
    cust = customers(sb)[0]
    sql(engine, "UPDATE customers SET name = 'Unchecked' WHERE id = :m", m=linked[cust["id"]])
    cycle(engine, make_cfg(database_url, check_before_send=False), sb, pull=False)
    assert lists(sb) == [] and len(patches(sb)) == 1
