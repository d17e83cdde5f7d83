"""Push path end to end: real PostgreSQL, the sandbox over HTTP (in-process), the daemon's own jobs.

Each test proves one rule or invariant of DESIGN.md for the push direction.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import Engine, text

from sync.config import Config
from sync.sandbox import Sandbox
from tests.conftest import make_config
from tests.pushkit import dispatch_with, drain, link_mirror, rows, run_cycle, sql

GUID = "5f2b8a7e-3c1d-4e6f-9a0b-1c2d3e4f5a6b"


@pytest.fixture
def sb() -> Sandbox:
    s = Sandbox(tenant_id=1, rate_limit_per_second=None)
    s.seed(customers=12, locations=16, seed=7)
    return s


@pytest.fixture
def linked(engine: Engine, sb: Sandbox) -> dict[int, int]:
    return link_mirror(engine, sb)


@pytest.fixture
def cfg(database_url: str) -> Config:
    return make_config(database_url, retry={"base_delay_seconds": 0.01, "max_delay_seconds": 0.05})


def patches(sb: Sandbox) -> list[Any]:
    return [r for r in sb.requests if r.method == "PATCH"]


def first_customer(sb: Sandbox) -> dict[str, Any]:
    return sorted(sb.customers(), key=lambda c: c["id"])[0]


def test_name_edit_sends_exactly_name_and_external_data(engine: Engine, cfg: Config, sb: Sandbox,
                                                        linked: dict[int, int]) -> None:
    cust = first_customer(sb)
    mid = linked[cust["id"]]
    sql(engine, "UPDATE customers SET name = 'Renamed Co' WHERE id = :m", m=mid)
    run_cycle(engine, cfg, sb)
    sent = patches(sb)
    assert len(sent) == 1
    assert sent[0].path.endswith(f"/customers/{cust['id']}")
    assert sent[0].body == {
        "name": "Renamed Co",
        "externalData": {"patchMode": "Merge", "applicationGuid": GUID,
                         "externalData": [{"key": "mirrorId", "value": str(mid)}]},
    }
    assert sb.get_customer(cust["id"])["name"] == "Renamed Co"
    assert rows(engine, "SELECT state, attempts, last_status FROM outbox") == [("succeeded", 1, 200)]
    status = rows(engine, "SELECT sync_status, sync_error, synced_at IS NOT NULL FROM customers WHERE id = :m", m=mid)
    assert status == [("synced", None, True)]


def test_city_edit_sends_whole_address(engine: Engine, cfg: Config, sb: Sandbox, linked: dict[int, int]) -> None:
    cust = first_customer(sb)
    sql(engine, "UPDATE customers SET city = 'Springfield' WHERE st_id = :s", s=cust["id"])
    run_cycle(engine, cfg, sb)
    (sent,) = patches(sb)
    addr = cust["address"]
    assert set(sent.body) == {"address", "externalData"}
    assert sent.body["address"] == {
        "street": addr["street"], "unit": addr.get("unit") or "", "city": "Springfield", "state": addr["state"],
        "zip": addr["zip"], "country": addr["country"], "latitude": addr["latitude"], "longitude": addr["longitude"],
    }
    assert sb.get_customer(cust["id"])["address"]["city"] == "Springfield"


def test_no_op_update_sends_nothing(engine: Engine, cfg: Config, sb: Sandbox, linked: dict[int, int]) -> None:
    sql(engine, "UPDATE customers SET name = name, city = city")
    sql(engine, "UPDATE locations SET tag_type_ids = tag_type_ids")
    result = run_cycle(engine, cfg, sb)
    assert patches(sb) == []
    assert rows(engine, "SELECT count(*) FROM outbox") == [(0,)]
    assert result["dispatch"]["sent"] == 0


def test_edit_then_revert_sends_nothing(engine: Engine, cfg: Config, sb: Sandbox, linked: dict[int, int]) -> None:
    cust = first_customer(sb)
    sql(engine, "UPDATE customers SET name = 'Temp' WHERE st_id = :s", s=cust["id"])
    sql(engine, "UPDATE customers SET name = :n WHERE st_id = :s", s=cust["id"], n=cust["name"])
    run_cycle(engine, cfg, sb)
    assert patches(sb) == []


def test_ten_quick_edits_become_one_request_with_last_values(engine: Engine, cfg: Config, sb: Sandbox,
                                                             linked: dict[int, int]) -> None:
    cust = first_customer(sb)
    final_flag = not cust["doNotMail"]
    for i in range(10):
        sql(engine, "UPDATE customers SET name = :n, do_not_mail = :d WHERE st_id = :s",
            n=f"Name {i}", d=final_flag if i % 2 else not final_flag, s=cust["id"])
        if i == 4:  # half of them already drained into a pending row: later edits coalesce into it
            from sync.stages.detect import detect_all

            detect_all(engine, cfg)
    run_cycle(engine, cfg, sb)
    (sent,) = patches(sb)
    assert sent.body["name"] == "Name 9"
    assert sent.body["doNotMail"] is final_flag
    assert rows(engine, "SELECT state FROM outbox") == [("succeeded",)]


def test_tags_and_custom_fields_sent_as_full_lists(engine: Engine, cfg: Config, sb: Sandbox,
                                                   linked: dict[int, int]) -> None:
    loc = sorted(sb.locations(), key=lambda x: x["id"])[0]
    sql(engine, """UPDATE locations SET tag_type_ids = '{103,101}',
                   custom_fields = custom_fields || '{"302": "Two dogs"}' WHERE st_id = :s""", s=loc["id"])
    run_cycle(engine, cfg, sb)
    (sent,) = patches(sb)
    assert sent.body["tagTypeIds"] == [101, 103]
    expected = {str(cf["typeId"]): cf["value"] for cf in loc["customFields"] if cf.get("value") is not None}
    expected["302"] = "Two dogs"
    assert {str(cf["typeId"]): cf["value"] for cf in sent.body["customFields"]} == expected
    assert sorted(sb.get_location(loc["id"])["tagTypeIds"]) == [101, 103]


def test_external_data_merge_and_removal(engine: Engine, cfg: Config, sb: Sandbox, linked: dict[int, int]) -> None:
    cust = first_customer(sb)
    mid = linked[cust["id"]]
    sql(engine, """UPDATE customers SET external_data = '{"erpId": "E-1", "region": "north"}' WHERE id = :m""", m=mid)
    drain(engine, cfg, sb)
    sql(engine, """UPDATE customers SET external_data = '{"erpId": "E-2"}' WHERE id = :m""", m=mid)
    drain(engine, cfg, sb)
    second = patches(sb)[-1].body["externalData"]
    assert second["patchMode"] == "Merge"
    assert sorted(second["externalData"], key=lambda e: e["key"]) == [
        {"key": "erpId", "value": "E-2"}, {"key": "mirrorId", "value": str(mid)}, {"key": "region", "value": None}]
    assert len(patches(sb)) == 2


def test_location_customer_change_is_translated_to_servicetitan_id(engine: Engine, cfg: Config, sb: Sandbox,
                                                                   linked: dict[int, int]) -> None:
    loc = sorted(sb.locations(), key=lambda x: x["id"])[0]
    other = next(c for c in sb.customers() if c["id"] != loc["customerId"])
    sql(engine, "UPDATE locations SET customer_id = :c WHERE st_id = :s", c=linked[other["id"]], s=loc["id"])
    run_cycle(engine, cfg, sb)
    (sent,) = patches(sb)
    assert sent.body["customerId"] == other["id"]
    assert sb.get_location(loc["id"])["customerId"] == other["id"]


def test_normalised_value_is_adopted_and_never_bounces(engine: Engine, cfg: Config, sb: Sandbox,
                                                       linked: dict[int, int]) -> None:
    cust = first_customer(sb)
    mid = linked[cust["id"]]
    sql(engine, "UPDATE customers SET name = '  Padded Name  ', state = 'tx' WHERE id = :m", m=mid)
    drain(engine, cfg, sb)
    stored = sb.get_customer(cust["id"])
    assert stored["name"] == "Padded Name"
    assert rows(engine, "SELECT name, state FROM customers WHERE id = :m", m=mid) == [
        ("Padded Name", stored["address"]["state"])]
    assert rows(engine, "SELECT count(*) FROM change_log") == [(0,)]
    run_cycle(engine, cfg, sb)
    assert len(patches(sb)) == 1
    # a later edit of another field does not carry the normalised one along
    sql(engine, "UPDATE customers SET do_not_service = NOT do_not_service WHERE id = :m", m=mid)
    run_cycle(engine, cfg, sb)
    assert set(patches(sb)[-1].body) == {"doNotService", "externalData"}


def test_invalid_body_is_never_sent_and_names_the_column(engine: Engine, cfg: Config, sb: Sandbox,
                                                         linked: dict[int, int]) -> None:
    a, b = sorted(sb.customers(), key=lambda c: c["id"])[:2]
    sql(engine, "UPDATE customers SET type = 'Alien' WHERE st_id = :s", s=a["id"])
    sql(engine, "UPDATE customers SET name = 'Fine' WHERE st_id = :s", s=b["id"])
    run_cycle(engine, cfg, sb)
    assert [p.path.rsplit("/", 1)[1] for p in patches(sb)] == [str(b["id"])]
    dead = rows(engine, "SELECT state, last_error->>'message' FROM outbox WHERE st_id = :s", s=a["id"])
    assert dead[0][0] == "dead" and "type" in dead[0][1]
    err = rows(engine, "SELECT sync_status, sync_error->'columns' FROM customers WHERE st_id = :s", s=a["id"])
    assert err == [("error", ["type"])]


def test_customer_address_without_coordinates_is_dead_not_invented(engine: Engine, cfg: Config, sb: Sandbox,
                                                                   linked: dict[int, int]) -> None:
    cust = first_customer(sb)
    sql(engine, "UPDATE customers SET city = 'Nowhere', latitude = NULL, longitude = NULL WHERE st_id = :s",
        s=cust["id"])
    run_cycle(engine, cfg, sb)
    assert patches(sb) == []
    cols = rows(engine, "SELECT sync_error->'columns' FROM customers WHERE st_id = :s", s=cust["id"])[0][0]
    assert cols == ["latitude", "longitude"]


def test_servicetitan_400_makes_one_row_dead_others_succeed(engine: Engine, cfg: Config, sb: Sandbox,
                                                            linked: dict[int, int]) -> None:
    custs = sorted(sb.customers(), key=lambda c: c["id"])[:4]
    sql(engine, "UPDATE customers SET tag_type_ids = '{999999}' WHERE st_id = :s", s=custs[0]["id"])
    for c in custs[1:]:
        sql(engine, "UPDATE customers SET name = name || ' X' WHERE st_id = :s", s=c["id"])
    drain(engine, cfg, sb)
    states = dict(rows(engine, "SELECT st_id, state FROM outbox"))
    assert states == {custs[0]["id"]: "dead", **{c["id"]: "succeeded" for c in custs[1:]}}
    last_error = rows(engine, "SELECT last_status, last_error FROM outbox WHERE st_id = :s", s=custs[0]["id"])[0]
    assert last_error[0] == 400 and last_error[1]["status"] == 400 and last_error[1]["errors"]
    mirror = rows(engine, "SELECT sync_status, sync_error->>'outbox_id' IS NOT NULL FROM customers WHERE st_id = :s",
                  s=custs[0]["id"])
    assert mirror == [("error", True)]


def test_unknown_record_404_is_dead_and_marks_row(engine: Engine, cfg: Config, sb: Sandbox,
                                                  linked: dict[int, int]) -> None:
    cust = first_customer(sb)
    # a row pointing at a record ServiceTitan does not have (deleted or merged there): only stsync's own write
    # may change st_id (migration 0009), so the test writes it as stsync does, with the trigger bypass
    with engine.begin() as conn:
        conn.execute(text("SELECT set_config('stsync.bypass', 'on', true)"))
        conn.execute(text("UPDATE customers SET st_id = 99999999 WHERE st_id = :s"), {"s": cust["id"]})
    sql(engine, "UPDATE shadow SET st_id = 99999999 WHERE st_id = :s AND entity = 'customer'", s=cust["id"])
    sql(engine, "UPDATE customers SET name = 'Ghost' WHERE st_id = 99999999")
    run_cycle(engine, cfg, sb)
    assert rows(engine, "SELECT state, last_status FROM outbox") == [("dead", 404)]
    assert rows(engine, "SELECT sync_status FROM customers WHERE st_id = 99999999") == [("error",)]


def test_a_customer_inserted_without_a_location_waits_and_sends_nothing(engine: Engine, cfg: Config, sb: Sandbox,
                                                                         linked: dict[int, int]) -> None:
    sql(engine, "INSERT INTO customers (name, type) VALUES ('Walk-in', 'Residential')")
    run_cycle(engine, cfg, sb)
    assert patches(sb) == [] and [r for r in sb.requests if r.method == "POST" and "/connect/" not in r.path] == []
    assert rows(engine, "SELECT sync_status FROM customers WHERE st_id IS NULL") == [("waiting_for_location",)]


def test_local_delete_is_tombstoned_not_propagated(engine: Engine, cfg: Config, sb: Sandbox,
                                                   linked: dict[int, int]) -> None:
    loc = sorted(sb.locations(), key=lambda x: x["id"])[0]
    sql(engine, "DELETE FROM locations WHERE st_id = :s", s=loc["id"])
    run_cycle(engine, cfg, sb)
    assert patches(sb) == []
    assert rows(engine, "SELECT entity, st_id FROM tombstones") == [("location", loc["id"])]
    assert sb.get_location(loc["id"])["id"] == loc["id"]


def test_faults_429_5xx_timeouts_every_change_lands_and_429s_spend_no_attempts(
        engine: Engine, sb: Sandbox, linked: dict[int, int], database_url: str) -> None:
    cfg = make_config(database_url, retry={"base_delay_seconds": 0.01, "max_delay_seconds": 0.02, "max_attempts": 8},
                      servicetitan={"timeout_seconds": 0.3})
    sb.faults.seed = 3
    sb.faults.rate_429 = 0.25
    sb.faults.rate_5xx = 0.15
    sb.faults.rate_slow = 0.05
    sb.faults.slow_seconds = 1.0
    custs = sorted(sb.customers(), key=lambda c: c["id"])
    for c in custs:
        sql(engine, "UPDATE customers SET name = :n WHERE st_id = :s", n=f"Faulty {c['id']}", s=c["id"])
    drain(engine, cfg, sb, rounds=60)
    for c in custs:
        assert sb.get_customer(c["id"])["name"] == f"Faulty {c['id']}"
    assert rows(engine, "SELECT state, count(*) FROM outbox GROUP BY state") == [("succeeded", len(custs))]
    statuses = [s for (s,) in rows(engine, "SELECT http_status FROM outbox_attempts")]
    assert 429 in statuses and any(s and s >= 500 for s in statuses)
    # a 429 never uses up an attempt: attempts = non-429 tries
    for oid, attempts in rows(engine, "SELECT id, attempts FROM outbox"):
        non_429 = rows(engine, "SELECT count(*) FROM outbox_attempts WHERE outbox_id = :o "
                               "AND outcome <> 'rate_limited'", o=oid)[0][0]
        assert attempts == non_429


def test_two_dispatchers_never_send_the_same_row(engine: Engine, cfg: Config, sb: Sandbox,
                                                 linked: dict[int, int]) -> None:
    for c in sb.customers():
        sql(engine, "UPDATE customers SET name = name || ' 2' WHERE st_id = :s", s=c["id"])
    for loc in sb.locations():
        sql(engine, "UPDATE locations SET name = name || ' 2' WHERE st_id = :s", s=loc["id"])
    from sync.stages.detect import detect_all

    detect_all(engine, cfg)

    async def both() -> None:
        await asyncio.gather(dispatch_with(engine, cfg, sb, "w1"), dispatch_with(engine, cfg, sb, "w2"))

    asyncio.run(both())
    sent_paths = [p.path for p in patches(sb)]
    assert len(sent_paths) == len(set(sent_paths)) == len(sb.customers()) + len(sb.locations())
    workers = {w for (w,) in rows(engine, "SELECT DISTINCT worker FROM outbox_attempts")}
    assert rows(engine, "SELECT count(*) FROM outbox_attempts") == [(len(sent_paths),)]
    assert workers <= {"w1", "w2"}


def test_crashed_worker_rows_are_reclaimed_after_lease_expiry(engine: Engine, cfg: Config, sb: Sandbox,
                                                              linked: dict[int, int]) -> None:
    from sync.servicetitan.client import ServiceTitanClient
    from sync.stages.detect import detect_all
    from sync.stages.dispatch import Dispatcher
    from tests.pushkit import transport

    for c in sb.customers():
        sql(engine, "UPDATE customers SET name = name || ' 3' WHERE st_id = :s", s=c["id"])
    detect_all(engine, cfg)
    dead_worker = Dispatcher(engine, ServiceTitanClient(cfg.servicetitan, transport=transport(sb)), cfg, "dead")
    claimed = dead_worker.claim(5)  # ...and the process dies before sending
    assert len(claimed) == 5
    run_cycle(engine, cfg, sb)  # a live worker does not take leased rows
    assert rows(engine, "SELECT count(*) FROM outbox WHERE state = 'in_flight' AND lease_owner = 'dead'") == [(5,)]
    sql(engine, "UPDATE outbox SET lease_expires_at = now() - interval '1 second' WHERE lease_owner = 'dead'")
    drain(engine, cfg, sb)
    for c in sb.customers():
        assert c["name"].endswith(" 3")
    assert rows(engine, "SELECT state, count(*) FROM outbox GROUP BY state") == [("succeeded", len(sb.customers()))]


def test_edit_while_in_flight_queues_behind_and_lands(engine: Engine, cfg: Config, sb: Sandbox,
                                                      linked: dict[int, int]) -> None:
    from sync.servicetitan.client import ServiceTitanClient
    from sync.stages.detect import detect_all
    from sync.stages.dispatch import Dispatcher
    from tests.pushkit import transport

    cust = first_customer(sb)
    sql(engine, "UPDATE customers SET name = 'First' WHERE st_id = :s", s=cust["id"])
    detect_all(engine, cfg)
    worker = Dispatcher(engine, ServiceTitanClient(cfg.servicetitan, transport=transport(sb)), cfg, "w")
    (claim,) = worker.claim(10)
    sql(engine, "UPDATE customers SET name = 'Second' WHERE st_id = :s", s=cust["id"])
    detect_all(engine, cfg)
    assert rows(engine, "SELECT state FROM outbox ORDER BY id") == [("in_flight",), ("pending",)]
    assert worker.claim(10) == []  # one in flight per record

    async def send() -> None:
        await worker._send(claim)

    asyncio.run(send())
    drain(engine, cfg, sb)
    assert [p.body["name"] for p in patches(sb)] == ["First", "Second"]
    assert sb.get_customer(cust["id"])["name"] == "Second"


@pytest.mark.parametrize("policy", ["remote_wins", "local_wins"])
def test_remote_edit_seen_in_a_patch_response_conflicts_with_a_later_local_edit_per_policy(
        engine: Engine, sb: Sandbox, linked: dict[int, int], database_url: str, policy: str) -> None:
    from sync.servicetitan.client import ServiceTitanClient
    from sync.stages.detect import detect_all
    from sync.stages.dispatch import Dispatcher
    from tests.pushkit import transport

    cfg = make_config(database_url, sync={"conflict_policy": policy})
    cust = first_customer(sb)
    sql(engine, "UPDATE customers SET name = 'Sent Name' WHERE st_id = :s", s=cust["id"])
    detect_all(engine, cfg)
    worker = Dispatcher(engine, ServiceTitanClient(cfg.servicetitan, transport=transport(sb)), cfg, "w")
    (claim,) = worker.claim(10)  # the PATCH carries only the name
    sql(engine, "UPDATE customers SET city = 'Local City' WHERE st_id = :s", s=cust["id"])
    sb.edit_customer(cust["id"], address={"city": "Remote City"})  # not pulled yet

    async def send() -> None:
        await worker._send(claim)

    asyncio.run(send())
    (conflict,) = rows(engine, "SELECT field, local_value->>'city', remote_value->>'city', outcome FROM conflicts")
    assert conflict == ("address", "Local City", "Remote City", policy.split("_")[0])
    drain(engine, cfg, sb)
    final = "Remote City" if policy == "remote_wins" else "Local City"
    assert sb.get_customer(cust["id"])["address"]["city"] == final
    assert rows(engine, "SELECT city FROM customers WHERE st_id = :s", s=cust["id"]) == [(final,)]
    assert sb.get_customer(cust["id"])["name"] == "Sent Name"
