"""Creates (issue 17; DESIGN.md "Creating records", invariant 8): a row inserted without ``st_id`` becomes exactly
one ServiceTitan record, whatever answers are lost. Real PostgreSQL, the sandbox over HTTP, the daemon's jobs."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import Engine, text

from sync.config import Config
from sync.sandbox import Fault, Sandbox
from tests.conftest import make_config
from tests.pushkit import drain, link_mirror, pull_cycle, rows, run_cycle, sql

GUID = "5f2b8a7e-3c1d-4e6f-9a0b-1c2d3e4f5a6b"
ADDRESS = "street, unit, city, state, zip, country, latitude, longitude"
HOME = "'1 Main St', NULL, 'Springfield', 'IL', '62701', 'USA', 39.78, -89.65"


@pytest.fixture
def sb() -> Sandbox:
    s = Sandbox(tenant_id=1, rate_limit_per_second=None)
    s.seed(customers=3, locations=3, seed=7)
    return s


@pytest.fixture
def linked(engine: Engine, sb: Sandbox) -> dict[int, int]:
    return link_mirror(engine, sb)


@pytest.fixture
def cfg(database_url: str) -> Config:
    return make_config(database_url, retry={"base_delay_seconds": 0.01, "max_delay_seconds": 0.05,
                                            "in_doubt_seconds": 0.0})


def posts(sb: Sandbox, path: str = "") -> list[Any]:
    return [r for r in sb.requests if r.method == "POST" and r.path.endswith(path) and "/connect/" not in r.path]


def insert_customer(engine: Engine, name: str, *, locations: int = 1) -> tuple[int, list[int]]:
    """One local transaction: a customer row and its location rows, none with st_id."""
    with engine.begin() as conn:
        cid = conn.execute(text(f"INSERT INTO customers (name, type, {ADDRESS}) VALUES (:n, 'Residential', {HOME}) "
                                "RETURNING id"), {"n": name}).scalar_one()
        lids = [conn.execute(text(f"INSERT INTO locations (customer_id, name, {ADDRESS}) VALUES (:c, :n, {HOME}) "
                                  "RETURNING id"), {"c": cid, "n": f"{name} site {i}"}).scalar_one()
                for i in range(locations)]
    return cid, lids


def named(sb: Sandbox, name: str) -> list[dict[str, Any]]:
    return [c for c in sb.customers() if c["name"] == name]


def test_a_customer_inserted_with_two_locations_goes_as_one_post(engine: Engine, cfg: Config, sb: Sandbox,
                                                                  linked: dict[int, int]) -> None:
    cid, lids = insert_customer(engine, "New Co", locations=2)
    drain(engine, cfg, sb)
    sent = posts(sb, "/customers")
    assert len(sent) == 1 and posts(sb, "/locations") == []
    body = sent[0].body
    assert [loc["name"] for loc in body["locations"]] == ["New Co site 0", "New Co site 1"]
    assert body["externalData"]["externalData"][0] == {"key": "mirrorId", "value": str(cid)}
    [created] = named(sb, "New Co")
    st_locations = sorted(loc["id"] for loc in sb.locations() if loc["customerId"] == created["id"])
    assert rows(engine, "SELECT st_id, sync_status FROM customers WHERE id = :c", c=cid) == [(created["id"], "synced")]
    assert rows(engine, "SELECT st_id, sync_status FROM locations WHERE id = ANY(:l) ORDER BY id", l=lids) == [
        (st_locations[0], "synced"), (st_locations[1], "synced")]
    assert rows(engine, "SELECT operation, state, st_id FROM outbox WHERE mirror_id = :c AND entity = 'customer'",
                c=cid) == [("create", "succeeded", created["id"])]
    assert rows(engine, "SELECT st_id FROM shadow WHERE entity = 'customer' AND mirror_id = :c", c=cid) == [
        (created["id"],)]
    assert rows(engine, "SELECT count(*) FROM outbox WHERE state <> 'succeeded'") == [(0,)]  # nothing more to send


def test_a_later_edit_of_a_created_row_is_an_ordinary_patch(engine: Engine, cfg: Config, sb: Sandbox,
                                                             linked: dict[int, int]) -> None:
    cid, _ = insert_customer(engine, "Edit Me")
    drain(engine, cfg, sb)
    [created] = named(sb, "Edit Me")
    sb.reset_log()
    sql(engine, "UPDATE customers SET name = 'Edited' WHERE id = :c", c=cid)
    drain(engine, cfg, sb)
    patched = [r for r in sb.requests if r.method == "PATCH"]
    assert [(r.path.rsplit("/", 1)[-1], r.body["name"]) for r in patched] == [(str(created["id"]), "Edited")]
    assert posts(sb) == []


def test_a_customer_without_a_location_waits_and_is_created_when_its_location_arrives(
        engine: Engine, cfg: Config, sb: Sandbox, linked: dict[int, int]) -> None:
    cid, _ = insert_customer(engine, "Lonely", locations=0)
    drain(engine, cfg, sb)
    assert posts(sb) == []
    assert rows(engine, "SELECT sync_status FROM customers WHERE id = :c", c=cid) == [("waiting_for_location",)]
    sql(engine, f"INSERT INTO locations (customer_id, name, {ADDRESS}) VALUES (:c, 'Lonely site', {HOME})", c=cid)
    drain(engine, cfg, sb)
    assert len(posts(sb, "/customers")) == 1 and len(named(sb, "Lonely")) == 1
    assert rows(engine, "SELECT sync_status FROM customers WHERE id = :c", c=cid) == [("synced",)]


def test_a_new_location_of_a_linked_customer_is_a_post_locations(engine: Engine, cfg: Config, sb: Sandbox,
                                                                  linked: dict[int, int]) -> None:
    st_customer, mid = sorted(linked.items())[0]
    sql(engine, f"INSERT INTO locations (customer_id, name, {ADDRESS}) VALUES (:c, 'Annex', {HOME})", c=mid)
    drain(engine, cfg, sb)
    [sent] = posts(sb, "/locations")
    assert sent.body["customerId"] == st_customer and posts(sb, "/customers") == []
    [annex] = [loc for loc in sb.locations() if loc["name"] == "Annex"]
    assert rows(engine, "SELECT st_id, sync_status FROM locations WHERE name = 'Annex'") == [(annex["id"], "synced")]


def test_an_invalid_create_is_never_sent_and_names_its_column(engine: Engine, cfg: Config, sb: Sandbox,
                                                               linked: dict[int, int]) -> None:
    cid, lids = insert_customer(engine, "Broken")
    sql(engine, "UPDATE locations SET city = NULL WHERE id = :l", l=lids[0])
    drain(engine, cfg, sb)
    assert posts(sb) == []
    [(state, operation, error)] = rows(engine, "SELECT state, operation, last_error->>'message' FROM outbox "
                                               "WHERE entity = 'customer' AND mirror_id = :c", c=cid)
    assert (state, operation) == ("dead", "create")
    assert f"location {lids[0]}: city" in error
    assert rows(engine, "SELECT sync_status FROM customers WHERE id = :c", c=cid) == [("error",)]


@pytest.mark.parametrize("fault", [Fault.dropped(after_apply=True), Fault.server_error(503, after_apply=True)],
                         ids=["dropped", "503"])
def test_a_lost_answer_after_apply_leaves_exactly_one_record_and_links_the_row(
        engine: Engine, cfg: Config, sb: Sandbox, linked: dict[int, int], fault: Fault) -> None:
    sb.faults.add(fault, endpoint="POST /customers")
    cid, lids = insert_customer(engine, "Once Only", locations=2)
    drain(engine, cfg, sb)
    [created] = named(sb, "Once Only")  # exactly one
    assert len(posts(sb, "/customers")) == 1  # the retry found it by our external data
    lookups = [r for r in sb.requests if r.method == "GET" and "externalDataValues" in (r.query or "")]
    assert lookups, "the re-send looked the record up first"
    assert rows(engine, "SELECT st_id FROM customers WHERE id = :c", c=cid) == [(created["id"],)]
    assert sorted(s for (s,) in rows(engine, "SELECT st_id FROM locations WHERE id = ANY(:l)", l=lids)) == sorted(
        loc["id"] for loc in sb.locations() if loc["customerId"] == created["id"])
    assert rows(engine, "SELECT count(*) FROM customers WHERE name = 'Once Only'") == [(1,)]



def test_a_pull_that_brings_our_created_record_before_its_answer_links_it_never_a_second_row(
        engine: Engine, cfg: Config, sb: Sandbox, linked: dict[int, int]) -> None:
    pull_cycle(engine, cfg, sb)  # the feeds' cursors are at the end of what the mirror holds
    sb.faults.add(Fault.dropped(after_apply=True), endpoint="POST /customers")
    cid, lids = insert_customer(engine, "Seen First", locations=1)
    run_cycle(engine, cfg, sb)  # the POST is applied, its answer lost
    [created] = named(sb, "Seen First")
    pull_cycle(engine, cfg, sb)  # the feeds bring the new customer and its location before any retry
    assert rows(engine, "SELECT count(*) FROM customers WHERE name = 'Seen First'") == [(1,)]
    assert rows(engine, "SELECT st_id FROM customers WHERE id = :c", c=cid) == [(created["id"],)]
    [st_location] = [loc["id"] for loc in sb.locations() if loc["customerId"] == created["id"]]
    assert rows(engine, "SELECT id, st_id FROM locations WHERE customer_id = :c", c=cid) == [(lids[0], st_location)]
    sql(engine, "UPDATE outbox SET next_attempt_at = now() WHERE state = 'pending'")
    drain(engine, cfg, sb)
    assert len(posts(sb, "/customers")) == 1 and len(named(sb, "Seen First")) == 1
    assert rows(engine, "SELECT sync_status FROM customers WHERE id = :c", c=cid) == [("synced",)]


def test_a_record_made_by_hand_with_our_external_data_links_to_its_row(
        engine: Engine, cfg: Config, sb: Sandbox, linked: dict[int, int]) -> None:
    pull_cycle(engine, cfg, sb)
    cid, _ = insert_customer(engine, "By Hand", locations=0)  # waits for a location: never sent
    run_cycle(engine, cfg, sb)
    made = sb.add_customer(name="By Hand (office)", externalData={
        "patchMode": "Merge", "applicationGuid": GUID, "externalData": [{"key": "mirrorId", "value": str(cid)}]})
    pull_cycle(engine, cfg, sb)
    assert rows(engine, "SELECT st_id, name FROM customers WHERE id = :c", c=cid) == [(made["id"], "By Hand (office)")]
    assert rows(engine, "SELECT count(*) FROM customers WHERE st_id = :s", s=made["id"]) == [(1,)]


def test_a_create_reclaimed_from_a_killed_worker_is_looked_up_not_sent_again(
        engine: Engine, cfg: Config, sb: Sandbox, linked: dict[int, int]) -> None:
    import asyncio

    from sync.servicetitan.client import ServiceTitanClient
    from sync.stages.detect import detect_all
    from sync.stages.dispatch import Dispatcher
    from tests.pushkit import transport

    cid, lids = insert_customer(engine, "Killed Mid Create", locations=1)
    detect_all(engine, cfg)

    async def send_and_die() -> None:  # the POST goes out and is applied; the worker dies before the answer counts
        async with ServiceTitanClient(cfg.servicetitan, transport=transport(sb)) as client:
            worker = Dispatcher(engine, client, cfg, "doomed")
            (claim,) = worker.claim(1)
            assert claim.operation == "create"
            resp = await client.post("customers", claim.body)
            assert resp.status == 200

    asyncio.run(send_and_die())
    sql(engine, "UPDATE outbox SET lease_expires_at = now() - interval '1 second', sent_at = now() - interval '1 hour'")
    drain(engine, cfg, sb)  # another worker reclaims the row: possibly applied, so it looks the record up first
    [created] = named(sb, "Killed Mid Create")
    assert len(posts(sb, "/customers")) == 1
    assert rows(engine, "SELECT st_id FROM customers WHERE id = :c", c=cid) == [(created["id"],)]
    assert rows(engine, "SELECT st_id IS NOT NULL FROM locations WHERE id = :l", l=lids[0]) == [(True,)]


def _pull_customers_only(engine: Engine, cfg: Config, sb: Sandbox) -> None:
    import asyncio

    from sync.servicetitan.client import ServiceTitanClient
    from sync.stages.pull import pull_feed
    from tests.pushkit import transport

    async def go() -> None:
        async with ServiceTitanClient(cfg.servicetitan, transport=transport(sb)) as client:
            await pull_feed(engine, client, cfg, "customer")

    asyncio.run(go())


def test_a_location_that_rode_in_a_lost_customer_create_is_looked_up_before_its_own_post(
        engine: Engine, cfg: Config, sb: Sandbox, linked: dict[int, int]) -> None:
    pull_cycle(engine, cfg, sb)
    sb.faults.add(Fault.dropped(after_apply=True), endpoint="POST /customers")
    _, (lid,) = insert_customer(engine, "Rode Along", locations=1)
    run_cycle(engine, cfg, sb)  # customer and location made, the answer lost
    _pull_customers_only(engine, cfg, sb)  # the customer links through its feed; its location's feed lags
    sql(engine, "UPDATE locations SET name = 'Rode Along, edited' WHERE id = :l", l=lid)
    drain(engine, cfg, sb)  # the location is now one of a linked customer: its create looks itself up first
    [created] = named(sb, "Rode Along")
    made = [loc for loc in sb.locations() if loc["customerId"] == created["id"]]
    assert [loc["name"] for loc in made] == ["Rode Along, edited"]  # one record, and the edit reached it
    assert posts(sb, "/locations") == []
    assert rows(engine, "SELECT st_id FROM locations WHERE id = :l", l=lid) == [(made[0]["id"],)]


def test_a_create_that_ended_dead_after_a_lost_answer_is_looked_up_when_retried(
        engine: Engine, database_url: str, sb: Sandbox, linked: dict[int, int]) -> None:
    from sync.commands import outbox as outbox_admin

    cfg = make_config(database_url, retry={"max_attempts": 1, "in_doubt_seconds": 0.0})
    sb.faults.add(Fault.dropped(after_apply=True), endpoint="POST /customers")
    cid, _ = insert_customer(engine, "Dead Then Retried")
    drain(engine, cfg, sb)
    [(oid, state)] = rows(engine, "SELECT id, state FROM outbox WHERE entity = 'customer' AND mirror_id = :c", c=cid)
    assert state == "dead"
    with engine.begin() as conn:
        outbox_admin.retry(conn, oid)
    drain(engine, cfg, sb)
    assert len(named(sb, "Dead Then Retried")) == 1 and len(posts(sb, "/customers")) == 1
    assert rows(engine, "SELECT st_id IS NOT NULL FROM customers WHERE id = :c", c=cid) == [(True,)]


def test_an_edit_of_a_new_location_made_while_its_create_was_lost_is_not_undone_by_the_link(
        engine: Engine, cfg: Config, sb: Sandbox, linked: dict[int, int]) -> None:
    import asyncio

    from sync.servicetitan.client import ServiceTitanClient
    from sync.stages.detect import detect_all
    from sync.stages.dispatch import Dispatcher
    from tests.pushkit import transport

    _, (lid,) = insert_customer(engine, "Edited While Lost", locations=1)
    detect_all(engine, cfg)

    async def send_and_die() -> None:
        async with ServiceTitanClient(cfg.servicetitan, transport=transport(sb)) as client:
            (claim,) = Dispatcher(engine, client, cfg, "doomed").claim(1)
            assert (await client.post("customers", claim.body)).status == 200

    asyncio.run(send_and_die())
    sql(engine, "UPDATE locations SET name = 'Renamed After Send' WHERE id = :l", l=lid)
    sql(engine, "UPDATE outbox SET lease_expires_at = now() - interval '1 second', sent_at = now() - interval '1 hour' "
                "WHERE state = 'in_flight'")
    drain(engine, cfg, sb)
    [created] = named(sb, "Edited While Lost")
    [loc] = [loc for loc in sb.locations() if loc["customerId"] == created["id"]]
    assert loc["name"] == "Renamed After Send"
    assert rows(engine, "SELECT name, st_id FROM locations WHERE id = :l", l=lid) == [("Renamed After Send", loc["id"])]


def test_a_row_deleted_while_its_create_was_lost_never_comes_back_and_propagate_deactivates_it(
        engine: Engine, database_url: str, sb: Sandbox, linked: dict[int, int]) -> None:
    cfg = make_config(database_url, sync={"local_deletes": "propagate"},
                      retry={"base_delay_seconds": 0.01, "max_delay_seconds": 0.05, "in_doubt_seconds": 0.0})
    pull_cycle(engine, cfg, sb)
    sb.faults.add(Fault.dropped(after_apply=True), endpoint="POST /customers")
    cid, lids = insert_customer(engine, "Deleted Meanwhile", locations=1)
    run_cycle(engine, cfg, sb)  # made in ServiceTitan, the answer lost
    sql(engine, "DELETE FROM locations WHERE id = ANY(:l)", l=lids)
    sql(engine, "DELETE FROM customers WHERE id = :c", c=cid)
    drain(engine, cfg, sb)
    pull_cycle(engine, cfg, sb)
    drain(engine, cfg, sb)
    assert rows(engine, "SELECT count(*) FROM customers WHERE name = 'Deleted Meanwhile'") == [(0,)]
    assert rows(engine, "SELECT count(*) FROM locations WHERE name LIKE 'Deleted Meanwhile%'") == [(0,)]
    [created] = named(sb, "Deleted Meanwhile")
    assert created["active"] is False
    assert all(not loc["active"] for loc in sb.locations() if loc["customerId"] == created["id"])
