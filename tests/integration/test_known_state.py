"""An answer never undoes what is already known (issue 15, DESIGN.md invariant 9), on the real database and the
sandbox over an in-process transport. Each test is one behaviour seen on main before its fix."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, text

from sync.commands import outbox as outbox_admin
from sync.config import Config
from sync.db import shadow
from sync.sandbox import Sandbox, create_app
from tests.chaos_kit import Tamper, cycle, raw
from tests.conftest import make_config
from tests.pushkit import link_mirror, rows, sql


@pytest.fixture
def sb() -> Sandbox:
    s = Sandbox(tenant_id=1, rate_limit_per_second=None)
    s.seed(customers=4, locations=4, seed=11)
    return s


@pytest.fixture
def linked(engine: Engine, sb: Sandbox) -> dict[int, int]:
    return link_mirror(engine, sb)


def make_cfg(database_url: str, *, check: bool = True, **retry: Any) -> Config:
    """``check``: the check before sending (``sync.check_before_send``). Off where a test proves what an answer
    does: the check would otherwise learn the same thing first, from a list request."""
    return make_config(database_url, retry={"base_delay_seconds": 0.01, "max_delay_seconds": 0.05, **retry},
                       sync={"check_before_send": check, "check_min_interval_seconds": 0})


def first_customer(sb: Sandbox) -> dict[str, Any]:
    return sorted(sb.customers(), key=lambda c: c["id"])[0]


def patches(sb: Sandbox) -> list[Any]:
    return [r for r in sb.requests if r.method == "PATCH"]


def test_retry_of_a_dead_row_whose_change_already_landed_ends_synced(engine: Engine, database_url: str,
                                                                     sb: Sandbox, linked: dict[int, int]) -> None:
    cfg = make_cfg(database_url, max_attempts=1)
    cust = first_customer(sb)
    mid = linked[cust["id"]]
    tamper = Tamper(create_app(sb))
    tamper.add("PATCH", r"/customers/\d+$", lambda request, inner: _answer(raw(503, b'{"title": "down"}')))
    sql(engine, "UPDATE customers SET name = 'Landed Anyway' WHERE id = :m", m=mid)
    cycle(engine, cfg, sb, pull=False, transport=tamper)
    assert rows(engine, "SELECT state FROM outbox") == [("dead",)]
    sb.edit_customer(cust["id"], name="Landed Anyway")  # the same value reaches ServiceTitan another way
    cycle(engine, cfg, sb)  # the pull agrees with the local value: mirror == shadow
    with engine.begin() as conn:
        assert outbox_admin.retry(conn, all_dead=True) == 1
    cycle(engine, cfg, sb, pull=False)
    assert rows(engine, "SELECT state FROM outbox ORDER BY id") == [("superseded",)]
    assert rows(engine, "SELECT sync_status, sync_error FROM customers WHERE id = :m", m=mid) == [("synced", None)]
    assert patches(sb) == []  # nothing was left to send


async def _answer(resp: httpx.Response) -> httpx.Response:
    return resp


@pytest.mark.parametrize("body", [b"{}", b'{"id": "not a number"}', b"[]", b'{"name": "no id or address"}'])
def test_a_2xx_whose_body_is_not_a_record_is_a_failed_attempt_then_dead(engine: Engine, database_url: str,
                                                                         sb: Sandbox, linked: dict[int, int],
                                                                         body: bytes) -> None:
    cfg = make_cfg(database_url, max_attempts=2, check=False)
    cust = first_customer(sb)
    mid = linked[cust["id"]]
    tamper = Tamper(create_app(sb))

    async def applied_then_not_a_record(request: httpx.Request, inner: Any) -> httpx.Response:
        await inner(request)
        return raw(200, body)

    tamper.add("PATCH", r"/customers/\d+$", applied_then_not_a_record, times=10)
    sql(engine, "UPDATE customers SET name = 'Odd Answer' WHERE id = :m", m=mid)
    for _ in range(4):
        cycle(engine, cfg, sb, pull=False, transport=tamper)
        sql(engine, "UPDATE outbox SET next_attempt_at = now() WHERE state = 'pending'")
    assert rows(engine, "SELECT state, attempts FROM outbox") == [("dead", 2)]
    assert rows(engine, "SELECT outcome, http_status FROM outbox_attempts ORDER BY id") == [
        ("retry", 200), ("retry", 200)]
    status, error = rows(engine, "SELECT sync_status, sync_error FROM customers WHERE id = :m", m=mid)[0]
    assert status == "error" and "not a customer record" in error["message"]


def test_an_applied_change_whose_answer_was_not_a_record_is_found_landed_by_the_check(
        engine: Engine, database_url: str, sb: Sandbox, linked: dict[int, int]) -> None:
    """With the check before sending, the retry of an applied PATCH whose 2xx was garbage lists the record first,
    finds its own value there (the body it sent is possibly applied, so that value is ours) and sends nothing."""
    cfg = make_cfg(database_url, max_attempts=2)
    cust = first_customer(sb)
    mid = linked[cust["id"]]
    tamper = Tamper(create_app(sb))

    async def applied_then_not_a_record(request: httpx.Request, inner: Any) -> httpx.Response:
        await inner(request)
        return raw(200, b"{}")

    tamper.add("PATCH", r"/customers/\d+$", applied_then_not_a_record, times=10)
    sql(engine, "UPDATE customers SET name = 'Odd Answer' WHERE id = :m", m=mid)
    for _ in range(2):
        cycle(engine, cfg, sb, pull=False, transport=tamper)
        sql(engine, "UPDATE outbox SET next_attempt_at = now() WHERE state = 'pending'")
    assert rows(engine, "SELECT state, attempts FROM outbox") == [("superseded", 1)]
    assert rows(engine, "SELECT sync_status, name FROM customers WHERE id = :m", m=mid) == [("synced", "Odd Answer")]
    assert len(patches(sb)) == 1 and sb.get_customer(cust["id"])["name"] == "Odd Answer"


def test_the_check_before_sending_applies_a_move_to_a_customer_the_mirror_lacks(
        engine: Engine, database_url: str, sb: Sandbox, linked: dict[int, int]) -> None:
    cfg = make_cfg(database_url)
    loc = sorted(sb.locations(), key=lambda x: x["id"])[0]
    newcomer = sb.add_customer(name="Newcomer Inc")
    sb.edit_location(loc["id"], customerId=newcomer["id"])
    lid = rows(engine, "SELECT id FROM locations WHERE st_id = :s", s=loc["id"])[0][0]
    sql(engine, "UPDATE locations SET name = 'Renamed Site' WHERE id = :m", m=lid)
    cycle(engine, cfg, sb, pull=False)
    new_mid = rows(engine, "SELECT id FROM customers WHERE st_id = :s", s=newcomer["id"])[0][0]
    assert rows(engine, "SELECT name, customer_id, sync_status FROM locations WHERE id = :m", m=lid) == [
        ("Renamed Site", new_mid, "synced")]
    assert sb.get_location(loc["id"])["name"] == "Renamed Site"
    assert sb.get_location(loc["id"])["customerId"] == newcomer["id"]


def test_a_late_answer_does_not_undo_a_pulled_edit(engine: Engine, database_url: str, sb: Sandbox,
                                                  linked: dict[int, int]) -> None:
    cfg = make_cfg(database_url)
    cust = first_customer(sb)
    mid = linked[cust["id"]]
    tamper = Tamper(create_app(sb))
    answers: list[bytes] = []

    async def applied_answer_held_back(request: httpx.Request, inner: Any) -> httpx.Response:
        real = await inner(request)  # ServiceTitan applies the PATCH and answers with the record as it was then
        answers.append(real.content)
        return raw(real.status_code, real.content)

    tamper.add("PATCH", r"/customers/\d+$", applied_answer_held_back)
    sql(engine, "UPDATE customers SET name = 'Renamed Locally' WHERE id = :m", m=mid)
    # detect and claim now; the answer arrives after ServiceTitan's user edits and a pull applies that edit
    import asyncio

    from sync.daemon.service import Daemon

    async def go() -> None:
        d = Daemon(cfg, engine=engine, transport=tamper)
        try:
            await d.detect_job()
            (claim,) = await asyncio.to_thread(d.dispatcher.claim, 1)
            resp = await d.client.patch("customers", claim.st_id, claim.body)
            time.sleep(0.01)
            sb.edit_customer(cust["id"], doNotMail=not cust["doNotMail"])
            await d.pull_job()
            assert rows(engine, "SELECT do_not_mail FROM customers WHERE id = :m", m=mid) == [
                (not cust["doNotMail"],)]
            await asyncio.to_thread(d.dispatcher.complete, claim, resp, time.time())
        finally:
            await d.close()

    asyncio.run(go())
    assert answers and json.loads(answers[0])["doNotMail"] == cust["doNotMail"]  # the answer is older
    assert rows(engine, "SELECT name, do_not_mail FROM customers WHERE id = :m", m=mid) == [
        ("Renamed Locally", not cust["doNotMail"])]
    with engine.connect() as conn:
        base = shadow.load_shadows(conn, "customer", [mid])[mid]
    assert base["do_not_mail"] == (not cust["doNotMail"]) and base["name"] == "Renamed Locally"
    assert sb.get_customer(cust["id"])["doNotMail"] == (not cust["doNotMail"])
    assert rows(engine, "SELECT state FROM outbox") == [("succeeded",)]


def test_a_late_answer_does_not_undo_a_remote_revert_of_our_value(engine: Engine, database_url: str, sb: Sandbox,
                                                                  linked: dict[int, int]) -> None:
    """Ours applied; ServiceTitan's user set the old name back; a pull saw that (with our request in flight it
    cannot tell a revert from "not applied yet"); our answer, older, arrives: the revert stands on both sides."""
    cfg = make_cfg(database_url)
    cust = first_customer(sb)
    mid = linked[cust["id"]]
    import asyncio

    from sync.daemon.service import Daemon

    sql(engine, "UPDATE customers SET name = 'Renamed Locally' WHERE id = :m", m=mid)

    async def go() -> None:
        d = Daemon(cfg, engine=engine, transport=httpx.ASGITransport(app=create_app(sb)))
        try:
            await d.detect_job()
            (claim,) = await asyncio.to_thread(d.dispatcher.claim, 1)
            resp = await d.client.patch("customers", claim.st_id, claim.body)
            time.sleep(0.01)
            sb.edit_customer(cust["id"], name=cust["name"])  # the revert, after ours applied
            await d.pull_job()
            await asyncio.to_thread(d.dispatcher.complete, claim, resp, time.time())
            await d.cycle()
        finally:
            await d.close()

    asyncio.run(go())
    assert rows(engine, "SELECT name, sync_status FROM customers WHERE id = :m", m=mid) == [(cust["name"], "synced")]
    assert sb.get_customer(cust["id"])["name"] == cust["name"]
    assert len(patches(sb)) == 1  # the reverted value was not sent again


def test_a_late_answer_keeps_a_local_rewrite_of_our_value_made_after_a_remote_revert(
        engine: Engine, database_url: str, sb: Sandbox, linked: dict[int, int]) -> None:
    """Found by a randomized state machine run: ours applied; the user edited the name away and back to our value;
    ServiceTitan's user set the old name back; the late answer must not take that revert over the user's later
    write (the mirror equals what we sent, but it is a newer write of it)."""
    cfg = make_cfg(database_url, check=False)
    cust = first_customer(sb)
    mid = linked[cust["id"]]
    import asyncio

    from sync.daemon.service import Daemon

    sql(engine, "UPDATE customers SET name = 'Birch' WHERE id = :m", m=mid)

    async def go() -> None:
        d = Daemon(cfg, engine=engine, transport=httpx.ASGITransport(app=create_app(sb)))
        try:
            await d.detect_job()
            (claim,) = await asyncio.to_thread(d.dispatcher.claim, 1)
            resp = await d.client.patch("customers", claim.st_id, claim.body)  # applied; the answer is late
            sql(engine, "UPDATE customers SET name = 'Acme' WHERE id = :m", m=mid)
            time.sleep(0.01)
            sb.edit_customer(cust["id"], name=cust["name"])  # the remote revert of our Birch
            time.sleep(0.01)
            sql(engine, "UPDATE customers SET name = 'Birch' WHERE id = :m", m=mid)  # the user's last write
            await d.pull_job()
            await asyncio.to_thread(d.dispatcher.complete, claim, resp, time.time())
            sql(engine, "UPDATE outbox SET next_attempt_at = now() WHERE state = 'pending'")
            await d.cycle()
        finally:
            await d.close()

    asyncio.run(go())
    assert rows(engine, "SELECT name, sync_status FROM customers WHERE id = :m", m=mid) == [("Birch", "synced")]
    assert sb.get_customer(cust["id"])["name"] == "Birch"


def test_a_claim_reads_the_mirror_row_and_its_shadow_as_one_pair(engine: Engine, database_url: str,
                                                                 sb: Sandbox, linked: dict[int, int]) -> None:
    """A pull commits the mirror row and its shadow together, under the row's lock; a claim that reads the row
    before that commit and the shadow after it would see the pulled value as a local revert and PATCH it back."""
    cfg = make_cfg(database_url)
    cust = first_customer(sb)
    mid = linked[cust["id"]]
    sql(engine, "UPDATE customers SET do_not_service = NOT do_not_service WHERE id = :m", m=mid)
    import asyncio

    from sync.daemon.service import Daemon

    async def detect() -> None:
        d = Daemon(cfg, engine=engine, transport=httpx.ASGITransport(app=create_app(sb)))
        try:
            await d.detect_job()
        finally:
            await d.close()

    asyncio.run(detect())
    pulled = threading.Event()

    def pull_in_progress() -> None:
        """A pull that has locked and written the mirror row (a remote name change) and commits the shadow
        0.5 s later."""
        with engine.begin() as conn:
            conn.execute(text("SELECT set_config('stsync.bypass', 'on', true)"))
            conn.execute(text("SELECT id FROM customers WHERE id = :m FOR UPDATE"), {"m": mid})
            conn.execute(text("UPDATE customers SET name = 'Pulled Name' WHERE id = :m"), {"m": mid})
            started.set()
            time.sleep(0.5)
            conn.execute(text("""UPDATE shadow SET data = jsonb_set(data, '{name}', '"Pulled Name"')
                                 WHERE entity = 'customer' AND mirror_id = :m"""), {"m": mid})
        pulled.set()

    started = threading.Event()
    t = threading.Thread(target=pull_in_progress)
    t.start()
    assert started.wait(5)

    import sync.stages.dispatch as dispatch_module

    real_load_shadows = dispatch_module.shadow.load_shadows

    def load_shadows_after_the_pull(conn: Any, entity: Any, ids: Any) -> Any:
        pulled.wait(5)  # the claim's second read happens after the pull committed
        return real_load_shadows(conn, entity, ids)

    async def claim() -> Any:
        d = Daemon(cfg, engine=engine, transport=httpx.ASGITransport(app=create_app(sb)))
        try:
            dispatch_module.shadow.load_shadows = load_shadows_after_the_pull  # type: ignore[attr-defined]
            try:
                return await asyncio.to_thread(d.dispatcher.claim, 1)
            finally:
                dispatch_module.shadow.load_shadows = real_load_shadows  # type: ignore[attr-defined]
        finally:
            await d.close()

    (c,) = asyncio.run(claim())
    t.join()
    assert "name" not in c.body, f"the claim would revert the pulled name: {c.body}"
    assert set(c.body) == {"doNotService", "externalData"}


def test_an_answer_never_unlinks_a_location_from_its_customer(engine: Engine, database_url: str, sb: Sandbox,
                                                              linked: dict[int, int]) -> None:
    """A location moved in ServiceTitan to a customer the mirror does not have yet: the PATCH answer names that
    customer; the mirror keeps its link until a pull brings the customer, which then links the location."""
    cfg = make_cfg(database_url, check=False)
    loc = sorted(sb.locations(), key=lambda x: x["id"])[0]
    newcomer = sb.add_customer(name="Newcomer Inc")
    sb.edit_location(loc["id"], customerId=newcomer["id"])
    lid = rows(engine, "SELECT id FROM locations WHERE st_id = :s", s=loc["id"])[0][0]
    old_customer = rows(engine, "SELECT customer_id FROM locations WHERE id = :m", m=lid)[0][0]
    sql(engine, "UPDATE locations SET name = 'Renamed Site' WHERE id = :m", m=lid)
    cycle(engine, cfg, sb, pull=False)
    assert rows(engine, "SELECT name, customer_id FROM locations WHERE id = :m", m=lid) == [
        ("Renamed Site", old_customer)]
    cycle(engine, cfg, sb)  # the pull fetches the new customer and applies the move
    new_mid = rows(engine, "SELECT id FROM customers WHERE st_id = :s", s=newcomer["id"])[0][0]
    assert rows(engine, "SELECT customer_id, sync_status FROM locations WHERE id = :m", m=lid) == [
        (new_mid, "synced")]
    sql(engine, "UPDATE locations SET name = 'Renamed Again' WHERE id = :m", m=lid)
    cycle(engine, cfg, sb, pull=False)
    assert rows(engine, "SELECT state FROM outbox ORDER BY id") == [("succeeded",), ("succeeded",)]
    assert sb.get_location(loc["id"])["customerId"] == newcomer["id"]
    assert [set(p.body) for p in patches(sb)] == [{"name", "externalData"}, {"name", "externalData"}]


def test_a_discarded_change_does_not_ride_along_with_the_next_edit(engine: Engine, database_url: str,
                                                                   sb: Sandbox, linked: dict[int, int]) -> None:
    cfg = make_cfg(database_url, max_attempts=1)
    cust = first_customer(sb)
    mid = linked[cust["id"]]
    tamper = Tamper(create_app(sb))
    tamper.add("PATCH", r"/customers/\d+$", lambda request, inner: _answer(raw(503, b'{"title": "down"}')))
    sql(engine, "UPDATE customers SET city = 'Nowhere' WHERE id = :m", m=mid)
    cycle(engine, cfg, sb, pull=False, transport=tamper)
    ((oid, state),) = rows(engine, "SELECT id, state FROM outbox")
    assert state == "dead"
    with engine.begin() as conn:
        assert outbox_admin.discard(conn, oid) == ["city"]
    assert rows(engine, "SELECT state FROM outbox") == [("discarded",)]
    assert rows(engine, "SELECT city, sync_status FROM customers WHERE id = :m", m=mid) == [
        (cust["address"]["city"], "discarded")]
    sql(engine, "UPDATE customers SET name = 'Next Edit' WHERE id = :m", m=mid)
    cycle(engine, cfg, sb, pull=False)
    (sent,) = patches(sb)[-1:]
    assert set(sent.body) == {"name", "externalData"}, f"the discarded city rode along: {sent.body}"
    assert sb.get_customer(cust["id"])["address"]["city"] == cust["address"]["city"]


def test_discarding_an_old_dead_row_behind_a_later_success_leaves_the_record_synced(
        engine: Engine, database_url: str, sb: Sandbox, linked: dict[int, int]) -> None:
    """Found by a randomized state machine run: the record's status is its latest change's, not an old row's."""
    cfg = make_cfg(database_url, max_attempts=1)
    cust = first_customer(sb)
    mid = linked[cust["id"]]
    tamper = Tamper(create_app(sb))
    tamper.add("PATCH", r"/customers/\d+$", lambda request, inner: _answer(raw(503, b'{"title": "down"}')))
    sql(engine, "UPDATE customers SET name = 'First Try' WHERE id = :m", m=mid)
    cycle(engine, cfg, sb, pull=False, transport=tamper)
    ((dead_id, state),) = rows(engine, "SELECT id, state FROM outbox")
    assert state == "dead"
    sql(engine, "UPDATE customers SET do_not_mail = NOT do_not_mail WHERE id = :m", m=mid)
    cycle(engine, cfg, sb, pull=False)  # the later change (carrying the name too) succeeds
    assert rows(engine, "SELECT state FROM outbox ORDER BY id") == [("dead",), ("succeeded",)]
    with engine.begin() as conn:
        outbox_admin.discard(conn, dead_id)
    assert rows(engine, "SELECT sync_status, sync_error FROM customers WHERE id = :m", m=mid) == [("synced", None)]
    assert rows(engine, "SELECT state FROM outbox ORDER BY id") == [("discarded",), ("succeeded",)]


def _dispatcher(engine: Engine, cfg: Config, sb: Sandbox, worker: str) -> Any:
    from sync.servicetitan.client import ServiceTitanClient
    from sync.stages.dispatch import Dispatcher

    client = ServiceTitanClient(cfg.servicetitan, transport=httpx.ASGITransport(app=create_app(sb)))
    return Dispatcher(engine, client, cfg, worker)


def _detect(engine: Engine, cfg: Config) -> None:
    from sync.stages.detect import detect_all

    detect_all(engine, cfg)


def test_a_frozen_replica_never_sends_its_old_body_over_a_newer_edit(engine: Engine, database_url: str,
                                                                     sb: Sandbox, linked: dict[int, int]) -> None:
    import asyncio

    cfg = make_cfg(database_url)
    cust = first_customer(sb)
    mid = linked[cust["id"]]
    sql(engine, "UPDATE customers SET name = 'Older Edit' WHERE id = :m", m=mid)
    _detect(engine, cfg)
    frozen, other = _dispatcher(engine, cfg, sb, "frozen"), _dispatcher(engine, cfg, sb, "other")
    (old_claim,) = frozen.claim(1)
    # frozen (GC pause, SIGSTOP) past its lease: the other replica takes the row back and sends the newer edit
    sql(engine, "UPDATE outbox SET lease_expires_at = now() - interval '1 second' WHERE id = :o", o=old_claim.outbox_id)
    assert other.reclaim_expired() == 1
    sql(engine, "UPDATE customers SET name = 'Newer Edit' WHERE id = :m", m=mid)
    _detect(engine, cfg)

    async def go() -> None:
        try:
            (new_claim,) = await asyncio.to_thread(other.claim, 1)
            await other._send(new_claim)
            await frozen._send(old_claim)  # it wakes up and would send what it claimed
        finally:
            await frozen.client.aclose()
            await other.client.aclose()

    asyncio.run(go())
    assert [p.body["name"] for p in patches(sb)] == ["Newer Edit"]
    assert sb.get_customer(cust["id"])["name"] == "Newer Edit"
    assert frozen.stats.fenced == 1
    assert rows(engine, "SELECT name, sync_status FROM customers WHERE id = :m", m=mid) == [("Newer Edit", "synced")]


def test_a_reclaimed_row_waits_until_the_dead_workers_request_can_no_longer_land(
        engine: Engine, database_url: str, sb: Sandbox, linked: dict[int, int]) -> None:
    cfg = make_config(database_url, servicetitan={"timeout_seconds": 3})
    cust = first_customer(sb)
    sql(engine, "UPDATE customers SET name = 'Sent Then Died' WHERE id = :m", m=linked[cust["id"]])
    _detect(engine, cfg)
    dead, survivor = _dispatcher(engine, cfg, sb, "dead"), _dispatcher(engine, cfg, sb, "survivor")
    (c,) = dead.claim(1)
    assert dead.still_claimed(c)  # its request went out; then the worker was killed
    sql(engine, "UPDATE outbox SET lease_expires_at = now() - interval '1 second' WHERE id = :o", o=c.outbox_id)
    assert survivor.reclaim_expired() == 1
    (due_in,) = rows(engine, "SELECT EXTRACT(EPOCH FROM next_attempt_at - now()) FROM outbox WHERE id = :o",
                     o=c.outbox_id)[0]
    assert 2.0 < float(due_in) <= 3.0
    assert survivor.claim(1) == []  # not before the first request could have landed
    sql(engine, "UPDATE outbox SET next_attempt_at = now() WHERE id = :o", o=c.outbox_id)
    assert len(survivor.claim(1)) == 1


def test_newest_wins_never_takes_now_for_the_time_of_a_local_edit(engine: Engine, database_url: str,
                                                                  sb: Sandbox, linked: dict[int, int]) -> None:
    """The local edit's row went dead and the change log is drained: its time is the row's, not "now", so a
    newer remote edit of the same field wins under newest_wins."""
    cfg = make_config(database_url, sync={"conflict_policy": "newest_wins"},
                      retry={"base_delay_seconds": 0.01, "max_delay_seconds": 0.05, "max_attempts": 1})
    cust = first_customer(sb)
    mid = linked[cust["id"]]
    tamper = Tamper(create_app(sb))
    tamper.add("PATCH", r"/customers/\d+$", lambda request, inner: _answer(raw(503, b'{"title": "down"}')))
    sql(engine, "UPDATE customers SET name = 'Older Local' WHERE id = :m", m=mid)
    cycle(engine, cfg, sb, pull=False, transport=tamper)
    assert rows(engine, "SELECT state FROM outbox") == [("dead",)]
    assert rows(engine, "SELECT count(*) FROM change_log") == [(0,)]
    time.sleep(0.05)
    sb.edit_customer(cust["id"], name="Newer Remote")
    cycle(engine, cfg, sb, transport=tamper)
    assert rows(engine, "SELECT field, outcome FROM conflicts") == [("name", "remote")]
    assert rows(engine, "SELECT name FROM customers WHERE id = :m", m=mid) == [("Newer Remote",)]


def test_a_local_edit_of_a_read_only_column_is_flagged_counted_and_put_back(engine: Engine, database_url: str,
                                                                            sb: Sandbox,
                                                                            linked: dict[int, int]) -> None:
    from sync.commands import status

    cfg = make_cfg(database_url)
    cust = first_customer(sb)
    mid = linked[cust["id"]]
    sql(engine, "UPDATE customers SET balance = 999 WHERE id = :m", m=mid)
    cycle(engine, cfg, sb, pull=False)
    assert patches(sb) == []  # never sent
    (error,) = rows(engine, "SELECT sync_error FROM customers WHERE id = :m", m=mid)[0]
    assert error["read_only_columns"] == ["balance"] and "balance" in error["message"]
    with engine.connect() as conn:
        assert status.collect(conn)["read_only_edits"] == {"customer": 1, "location": 0}
    cycle(engine, cfg, sb)  # the next pull puts ServiceTitan's value back
    assert rows(engine, "SELECT balance, sync_error FROM customers WHERE id = :m", m=mid) == [
        (cust["balance"], None)]
    assert patches(sb) == []


def test_a_revert_after_a_lost_answer_is_sent(engine: Engine, database_url: str, sb: Sandbox,
                                             linked: dict[int, int]) -> None:
    """name A -> B is applied but its answer is lost (B possibly applied); the user sets A back: equal to the
    shadow, yet ServiceTitan may hold B, so A is sent."""
    from tests.chaos_kit import cut_off

    cfg = make_cfg(database_url, in_doubt_seconds=0)
    cust = first_customer(sb)
    mid = linked[cust["id"]]
    original = cust["name"]
    tamper = Tamper(create_app(sb))
    tamper.add("PATCH", r"/customers/\d+$", cut_off)
    sql(engine, "UPDATE customers SET name = 'Lost Answer' WHERE id = :m", m=mid)
    cycle(engine, cfg, sb, pull=False, transport=tamper)
    assert sb.get_customer(cust["id"])["name"] == "Lost Answer"  # applied; the answer never came
    sql(engine, "UPDATE customers SET name = :n WHERE id = :m", n=original, m=mid)
    sql(engine, "UPDATE outbox SET next_attempt_at = now() WHERE state = 'pending'")
    cycle(engine, cfg, sb, pull=False)  # detect runs at once on the local write, before any pull
    cycle(engine, cfg, sb)
    assert sb.get_customer(cust["id"])["name"] == original
    assert rows(engine, "SELECT name, sync_status FROM customers WHERE id = :m", m=mid) == [(original, "synced")]


def test_our_own_answer_does_not_undo_an_address_conflicts_outcome(engine: Engine, database_url: str,
                                                                   sb: Sandbox, linked: dict[int, int]) -> None:
    """City edited locally; the PATCH (whole address) is slow; ServiceTitan changes the state meanwhile; the pull
    records the address conflict and ServiceTitan wins; then the slow PATCH lands. Both sides must end at the
    conflict's winner, not at an address neither side had."""
    import asyncio

    from sync.daemon.service import Daemon

    cfg = make_cfg(database_url)
    cust = first_customer(sb)
    mid = linked[cust["id"]]
    sql(engine, "UPDATE customers SET city = 'Local City' WHERE id = :m", m=mid)

    async def go() -> None:
        d = Daemon(cfg, engine=engine, transport=httpx.ASGITransport(app=create_app(sb)))
        try:
            await d.detect_job()
            (claim,) = await asyncio.to_thread(d.dispatcher.claim, 1)
            assert set(claim.body["address"]) >= {"city", "state"}
            sb.edit_customer(cust["id"], address={"state": "ZZ"})
            await d.pull_job()  # the conflict: ServiceTitan wins the address
            resp = await d.client.patch("customers", claim.st_id, claim.body)  # the slow PATCH lands now
            await asyncio.to_thread(d.dispatcher.complete, claim, resp, time.time())
        finally:
            await d.close()

    asyncio.run(go())
    assert rows(engine, "SELECT field, outcome FROM conflicts") == [("address", "remote")]
    for _ in range(3):
        cycle(engine, cfg, sb)
    remote = sb.get_customer(cust["id"])["address"]
    assert (remote["city"], remote["state"]) == (cust["address"]["city"], "ZZ")
    assert rows(engine, "SELECT city, state FROM customers WHERE id = :m", m=mid) == [(cust["address"]["city"], "ZZ")]


def test_a_dry_run_predicts_what_a_real_cycle_sends(engine: Engine, database_url: str, sb: Sandbox,
                                                    linked: dict[int, int]) -> None:
    """A pending local edit that a remote edit of the same field beats (remote_wins): the real cycle pulls
    first and sends nothing; the dry run must predict that, and change nothing."""
    import asyncio

    from sync.daemon.service import Daemon

    cfg = make_cfg(database_url)
    cust, other = sorted(sb.customers(), key=lambda c: c["id"])[:2]
    mid, other_mid = linked[cust["id"]], linked[other["id"]]
    sql(engine, "UPDATE customers SET name = 'Local Loses' WHERE id = :m", m=mid)
    sql(engine, "UPDATE customers SET name = 'Local Alone' WHERE id = :m", m=other_mid)
    sb.edit_customer(cust["id"], name="Remote Wins")
    before = rows(engine, "SELECT continue_from FROM feed_cursors ORDER BY feed")

    async def dry() -> list[dict[str, Any]]:
        d = Daemon(cfg, engine=engine, dry_run=True, transport=httpx.ASGITransport(app=create_app(sb)))
        try:
            await d.cycle()
            return d.dry_run_requests
        finally:
            await d.close()

    predicted = asyncio.run(dry())
    assert [(r["mirror_id"], r["body"]["name"]) for r in predicted] == [(other_mid, "Local Alone")]
    # nothing written: the local edits, the cursors and the conflicts are as they were
    assert rows(engine, "SELECT name FROM customers WHERE id IN (:a, :b) ORDER BY id", a=mid, b=other_mid) == [
        ("Local Loses",), ("Local Alone",)] if mid < other_mid else [("Local Alone",), ("Local Loses",)]
    assert rows(engine, "SELECT continue_from FROM feed_cursors ORDER BY feed") == before
    assert rows(engine, "SELECT count(*) FROM conflicts") == [(0,)]
    assert patches(sb) == []
    cycle(engine, cfg, sb)  # the real cycle sends exactly what was predicted
    assert [(p.body["name"]) for p in patches(sb)] == ["Local Alone"]


def test_a_local_edit_of_a_customer_servicetitan_merged_away_is_not_sent_and_ends_dead_with_a_reason(
        engine: Engine, database_url: str, sb: Sandbox, linked: dict[int, int]) -> None:
    """Decided (issue 16, 11; docs/push.md "Merged records"): not sent to the merged-away record (nobody uses it)
    nor redirected to the survivor (it could overwrite the survivor's values); dead, naming the survivor."""
    cfg = make_cfg(database_url)
    loser, survivor = sorted(sb.customers(), key=lambda c: c["id"])[:2]
    sb.edit_customer(loser["id"], mergedToId=survivor["id"], active=False)
    cycle(engine, cfg, sb)  # the pull brings the merge
    mid = linked[loser["id"]]
    sql(engine, "UPDATE customers SET name = 'Edited After The Merge' WHERE id = :m", m=mid)
    cycle(engine, cfg, sb, pull=False)
    assert patches(sb) == []
    assert rows(engine, "SELECT state FROM outbox") == [("dead",)]
    status, error = rows(engine, "SELECT sync_status, sync_error FROM customers WHERE id = :m", m=mid)[0]
    assert status == "error" and f"merged into customer {survivor['id']}" in error["message"]
