"""The pull path end to end: the sandbox (in-process, httpx.ASGITransport) -> sync.pull -> real PostgreSQL."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, text

from sync.config import Config
from sync.core.fields import FIELDS, NAMES, Entity, equal, record_from_api
from sync.db import mirror as records
from sync.errors import ServiceTitanError
from sync.sandbox import Sandbox, create_app
from sync.servicetitan.client import ApiResponse, ServiceTitanClient
from sync.stages import pull as pull_module
from sync.stages.pull import pull, pull_feed
from tests.conftest import make_config

FAST = {"servicetitan": {"requests_per_second": 1000}, "retry": {"base_delay_seconds": 0.001}}


@pytest.fixture
def sb() -> Sandbox:
    return Sandbox(rate_limit_per_second=None, export_page_size=500)


def cfg_for(database_url: str, **sync: Any) -> Config:
    return make_config(database_url, **FAST, sync=sync) if sync else make_config(database_url, **FAST)


class Wrapped:
    """A client that delegates to the real one; tests override ``export``/``get`` to inject trouble."""

    def __init__(self, inner: ServiceTitanClient) -> None:
        self.inner = inner
        self.exports = 0

    async def export(self, collection: str, continue_from: str | None, *, include_recent_changes: bool) -> ApiResponse:
        self.exports += 1
        return await self.inner.export(collection, continue_from, include_recent_changes=include_recent_changes)

    async def get(self, collection: str, st_id: int) -> ApiResponse:
        return await self.inner.get(collection, st_id)


def run(engine: Engine, cfg: Config, sb: Sandbox, wrap: Any = None, *, feed: Entity | None = None,
        **kw: Any) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        async with ServiceTitanClient(cfg.servicetitan, transport=httpx.ASGITransport(app=create_app(sb))) as st:
            client = wrap(st) if wrap else st
            if feed is not None:
                return await pull_feed(engine, client, cfg, feed, **kw)
            return await pull(engine, client, cfg, **kw)

    return asyncio.run(main())


def mirror(engine: Engine, entity: Entity) -> dict[int, records.MirrorRow]:
    """st_id -> mirror row (as canonical records)."""
    with engine.connect() as conn:
        ids = [i for (i,) in conn.execute(text(f"SELECT id FROM {NAMES[entity].table}"))]
        return {r.st_id: r for r in records.load_mirror(conn, entity, ids).values() if r.st_id is not None}


def shadows(engine: Engine, entity: Entity) -> dict[int, dict[str, Any]]:
    with engine.connect() as conn:
        return {s: dict(d) for s, d in conn.execute(text("SELECT st_id, data FROM shadow WHERE entity = :e"),
                                                       {"e": entity})}


def differing(entity: Entity, a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return [f.column for f in FIELDS[entity] if f.kind != "external_data" and not equal(f.kind, a.get(f.column),
                                                                                          b.get(f.column))]


def assert_mirror_equals_sandbox(engine: Engine, sb: Sandbox) -> None:
    for entity, remote in (("customer", sb.customers()), ("location", sb.locations())):
        rows, shadow = mirror(engine, entity), shadows(engine, entity)
        with engine.connect() as conn:
            count = conn.execute(text(f"SELECT count(*) FROM {NAMES[entity].table}")).scalar_one()
        assert count == len(rows) == len(remote) == len(shadow), entity  # no duplicates, no gaps
        for raw in remote:
            want = record_from_api(entity, raw)
            assert differing(entity, rows[raw["id"]].record, want) == [], (entity, raw["id"])
            assert differing(entity, shadow[raw["id"]], want) == [], (entity, raw["id"])


def scalar(engine: Engine, sql: str, **params: Any) -> Any:
    with engine.connect() as conn:
        return conn.execute(text(sql), params).scalar()


def local_sql(engine: Engine, sql: str, **params: Any) -> None:
    """A local application's write (triggers on, as any other program's)."""
    with engine.begin() as conn:
        conn.execute(text(sql), params)


def local_diff(engine: Engine, entity: Entity, st_id: int) -> list[str]:
    return differing(entity, mirror(engine, entity)[st_id].record, shadows(engine, entity)[st_id])


def no_patches(sb: Sandbox) -> bool:
    return not [r for r in sb.requests if r.method == "PATCH"]


# ---------------------------------------------------------------------------------------------- initial load


def test_initial_load_gives_a_mirror_equal_to_servicetitan(engine: Engine, database_url: str, sb: Sandbox) -> None:
    sb.seed(customers=2000, locations=3000)
    seen: list[tuple[str, int]] = []
    out = run(engine, cfg_for(database_url), sb, progress=lambda feed, n, rate: seen.append((feed, n)))

    assert out["customers"]["inserted"] == 2000 and out["locations"]["inserted"] == 3000
    assert out["customers"]["pages"] >= 4 and out["locations"]["drained"]
    assert_mirror_equals_sandbox(engine, sb)
    # every location points at its customer's mirror row
    assert scalar(engine, """SELECT count(*) FROM locations l JOIN customers c ON c.id = l.customer_id""") == 3000
    # inactive records are kept with their flag
    inactive = sum(not c["active"] for c in sb.customers())
    assert scalar(engine, "SELECT count(*) FROM customers WHERE NOT active") == inactive
    # the pull's own writes are not local changes: nothing to detect, nothing to send
    assert scalar(engine, "SELECT count(*) FROM change_log") == 0
    assert scalar(engine, "SELECT count(*) FROM outbox") == 0 and no_patches(sb)
    assert scalar(engine, "SELECT count(*) FROM customers WHERE sync_status <> 'synced' OR synced_at IS NULL") == 0
    with engine.connect() as conn:
        cursors = {f: (c, d, n) for f, c, d, n in conn.execute(
            text("SELECT feed, continue_from, initial_load_done, records_seen FROM feed_cursors"))}
    assert cursors["customers"][1:] == (True, 2000) and cursors["locations"][1:] == (True, 3000)
    assert cursors["customers"][0] and cursors["locations"][0]
    assert seen[-1] == ("locations", 3000) and [n for f, n in seen if f == "customers"][-1] == 2000


def test_initial_load_from_a_date_takes_only_records_modified_since(engine: Engine, database_url: str,
                                                                    sb: Sandbox) -> None:
    sb.seed(customers=100, locations=150)
    since = "2022-01-01"
    out = run(engine, cfg_for(database_url, initial_from=since), sb)
    expected = [c["id"] for c in sb.customers() if c["modifiedOn"] >= since]
    assert 0 < len(expected) < 100
    assert sorted(mirror(engine, "customer")) == sorted(
        set(expected) | {loc["customerId"] for loc in sb.locations() if loc["modifiedOn"] >= since})
    assert out["locations"]["records"] == sum(loc["modifiedOn"] >= since for loc in sb.locations())
    # older customers that newer locations need were fetched, so every pulled location is linked
    assert scalar(engine, "SELECT count(*) FROM locations WHERE customer_id IS NULL") == 0


# ---------------------------------------------------------------------------------------------- crash safety


class CrashAfterExports(Wrapped):
    def __init__(self, inner: ServiceTitanClient, pages: int) -> None:
        super().__init__(inner)
        self.pages = pages

    async def export(self, collection: str, continue_from: str | None, *, include_recent_changes: bool) -> ApiResponse:
        if self.exports >= self.pages:
            raise ConnectionResetError("simulated crash")
        return await super().export(collection, continue_from, include_recent_changes=include_recent_changes)


@pytest.mark.parametrize("where", ["between pages", "inside the page transaction"])
def test_a_crash_mid_load_resumes_without_duplicates_or_gaps(engine: Engine, database_url: str, sb: Sandbox,
                                                             monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    sb.seed(customers=1200, locations=1500)
    cfg = cfg_for(database_url)
    if where == "between pages":
        with pytest.raises(ConnectionResetError):
            run(engine, cfg, sb, lambda st: CrashAfterExports(st, pages=2))
        committed = 1000  # pages 1 and 2; page 3 never arrived
    else:
        real, calls = pull_module._store_cursor, []

        def dying(conn: Any, feed: str, page: Any) -> None:
            calls.append(feed)
            real(conn, feed, page)
            if len(calls) == 2:
                raise RuntimeError("killed before commit")

        monkeypatch.setattr(pull_module, "_store_cursor", dying)
        with pytest.raises(RuntimeError):
            run(engine, cfg, sb)
        monkeypatch.setattr(pull_module, "_store_cursor", real)
        committed = 500  # page 2's rows rolled back together with its cursor
    loaded = mirror(engine, "customer")
    assert len(loaded) == committed
    assert scalar(engine, "SELECT records_seen FROM feed_cursors WHERE feed = 'customers'") == committed

    # ServiceTitan keeps changing meanwhile: one record already loaded, one not yet
    done = next(iter(loaded))
    pending = next(c["id"] for c in sb.customers() if c["id"] not in loaded)
    sb.edit_customer(done, name="Changed After Crash")
    sb.edit_customer(pending, doNotMail=True, name="Also Changed")
    run(engine, cfg, sb)
    assert_mirror_equals_sandbox(engine, sb)
    # every record exactly once, plus the one edited after it had been loaded
    assert scalar(engine, "SELECT records_seen FROM feed_cursors WHERE feed = 'customers'") == 1200 + 1
    assert scalar(engine, "SELECT count(*) FROM change_log") == 0


# ---------------------------------------------------------------------------------------------- incremental


@pytest.fixture
def loaded(engine: Engine, database_url: str, sb: Sandbox) -> Config:
    sb.seed(customers=60, locations=80)
    cfg = cfg_for(database_url)
    run(engine, cfg, sb)
    return cfg


def first_customer(sb: Sandbox) -> dict[str, Any]:
    return sb.customers()[0]


def test_a_remote_edit_lands_in_the_mirror_without_echo(engine: Engine, loaded: Config, sb: Sandbox) -> None:
    cid = first_customer(sb)["id"]
    sb.edit_customer(cid, name="Renamed In ServiceTitan", address={"city": "Boulder"}, tagTypeIds=[101, 102])
    out = run(engine, loaded, sb)

    assert out["customers"]["applied"] == 1 and out["customers"]["records"] == 1
    row = mirror(engine, "customer")[cid].record
    assert (row["name"], row["city"], row["tag_type_ids"]) == ("Renamed In ServiceTitan", "Boulder", [101, 102])
    assert local_diff(engine, "customer", cid) == []
    assert scalar(engine, "SELECT count(*) FROM change_log") == 0  # no echo
    assert scalar(engine, "SELECT count(*) FROM outbox") == 0 and no_patches(sb)
    assert_mirror_equals_sandbox(engine, sb)


def test_local_and_remote_edits_of_different_fields_both_survive(engine: Engine, loaded: Config,
                                                                 sb: Sandbox) -> None:
    cid = first_customer(sb)["id"]
    local_sql(engine, "UPDATE customers SET do_not_service = NOT do_not_service WHERE st_id = :s", s=cid)
    local_value = mirror(engine, "customer")[cid].record["do_not_service"]
    sb.edit_customer(cid, name="Remote Name")
    out = run(engine, loaded, sb)

    row = mirror(engine, "customer")[cid].record
    assert row["name"] == "Remote Name" and row["do_not_service"] == local_value
    assert local_diff(engine, "customer", cid) == ["do_not_service"]  # still to be pushed
    assert out["customers"]["conflicts"] == 0 and scalar(engine, "SELECT count(*) FROM conflicts") == 0
    assert no_patches(sb)


@pytest.mark.parametrize(("policy", "local_first", "winner"), [
    ("remote_wins", False, "remote"),
    ("local_wins", True, "local"),
    ("newest_wins", True, "remote"),  # the remote edit is newer
    ("newest_wins", False, "local"),  # the local edit is newer
])
def test_a_same_field_conflict_resolves_per_policy_and_is_recorded(engine: Engine, database_url: str, sb: Sandbox,
                                                                   policy: str, local_first: bool,
                                                                   winner: str) -> None:
    sb.seed(customers=20, locations=0)
    cfg = cfg_for(database_url, conflict_policy=policy)
    run(engine, cfg, sb)
    cid = first_customer(sb)["id"]
    original = first_customer(sb)["name"]

    def local() -> None:
        local_sql(engine, "UPDATE customers SET name = 'Local Name' WHERE st_id = :s", s=cid)

    def remote() -> None:
        sb.edit_customer(cid, name="Remote Name")

    for step in (local, remote) if local_first else (remote, local):
        step()
        time.sleep(0.02)
    out = run(engine, cfg, sb)

    assert out["customers"]["conflicts"] == 1
    with engine.connect() as conn:
        c = conn.execute(text("SELECT * FROM conflicts")).mappings().one()
    assert (c["entity"], c["st_id"], c["field"], c["policy"], c["outcome"]) == ("customer", cid, "name", policy,
                                                                               winner)
    assert (c["base_value"], c["local_value"], c["remote_value"]) == (original, "Local Name", "Remote Name")
    row = mirror(engine, "customer")[cid]
    assert row.record["name"] == ("Remote Name" if winner == "remote" else "Local Name")
    assert shadows(engine, "customer")[cid]["name"] == "Remote Name"  # what ServiceTitan holds now
    rechecks = scalar(engine, "SELECT count(*) FROM change_log WHERE op = 'R' AND mirror_id = :m", m=row.mirror_id)
    assert rechecks == (1 if winner == "local" else 0)  # a local win must still be pushed
    assert local_diff(engine, "customer", cid) == ([] if winner == "remote" else ["name"])
    # the same remote version seen again (the whole feed replayed) is not a second conflict
    local_sql(engine, "UPDATE feed_cursors SET continue_from = NULL")
    again = run(engine, cfg, sb)
    assert again["customers"]["conflicts"] == 0 and scalar(engine, "SELECT count(*) FROM conflicts") == 1


def test_the_address_conflicts_as_one_value(engine: Engine, loaded: Config, sb: Sandbox) -> None:
    cid = first_customer(sb)["id"]
    local_sql(engine, "UPDATE customers SET street = '1 Local Way' WHERE st_id = :s", s=cid)
    sb.edit_customer(cid, address={"city": "Remote City"})
    run(engine, loaded, sb)
    with engine.connect() as conn:
        c = conn.execute(text("SELECT field, local_value, remote_value, outcome FROM conflicts")).one()
    assert c.field == "address" and c.outcome == "remote"
    assert c.local_value["street"] == "1 Local Way" and c.remote_value["city"] == "Remote City"
    row = mirror(engine, "customer")[cid].record
    assert row["city"] == "Remote City" and row["street"] == first_customer(sb)["address"]["street"]


def test_a_record_with_a_pending_push_is_rechecked(engine: Engine, loaded: Config, sb: Sandbox) -> None:
    cid = first_customer(sb)["id"]
    local_sql(engine, "UPDATE customers SET do_not_mail = NOT do_not_mail WHERE st_id = :s", s=cid)
    mid = mirror(engine, "customer")[cid].mirror_id
    local_sql(engine, """INSERT INTO outbox (entity, mirror_id, st_id, payload, diff)
                         VALUES ('customer', :m, :s, '{}', '{"do_not_mail": [false, true]}')""", m=mid, s=cid)
    sb.edit_customer(cid, name="Remote Name")
    run(engine, loaded, sb)
    assert scalar(engine, "SELECT count(*) FROM change_log WHERE op = 'R' AND mirror_id = :m", m=mid) == 1
    assert mirror(engine, "customer")[cid].record["name"] == "Remote Name"


def test_our_in_flight_patch_seen_in_the_feed_is_not_a_conflict(engine: Engine, loaded: Config,
                                                                sb: Sandbox) -> None:
    cid = first_customer(sb)["id"]
    row = mirror(engine, "customer")[cid]
    # a PATCH with name="Sent" is in flight; the user has since typed "Later"; ServiceTitan already shows "Sent"
    local_sql(engine, """INSERT INTO outbox (entity, mirror_id, st_id, state, payload, diff)
                         VALUES ('customer', :m, :s, 'in_flight', '{"name": "Sent"}', CAST(:d AS jsonb))""",
              m=row.mirror_id, s=cid, d=f'{{"name": ["{row.record["name"]}", "Sent"]}}')
    local_sql(engine, "UPDATE customers SET name = 'Later' WHERE st_id = :s", s=cid)
    sb.edit_customer(cid, name="Sent")
    run(engine, loaded, sb)
    assert scalar(engine, "SELECT count(*) FROM conflicts") == 0
    assert mirror(engine, "customer")[cid].record["name"] == "Later"
    assert shadows(engine, "customer")[cid]["name"] == "Sent"
    assert local_diff(engine, "customer", cid) == ["name"]


# ---------------------------------------------------------------------------------------------- repeats


def snapshot(engine: Engine) -> dict[str, Any]:
    """Physical row versions: any UPDATE, even to the same values, changes a row's xmin."""
    with engine.connect() as conn:
        return {t: sorted(conn.execute(text(f"SELECT xmin::text, * FROM {t}")).all())
                for t in ("customers", "locations", "shadow", "conflicts", "change_log", "outbox")}


def test_a_repeated_feed_changes_nothing(engine: Engine, loaded: Config, sb: Sandbox) -> None:
    before = snapshot(engine)
    with engine.begin() as conn:
        conn.execute(text("UPDATE feed_cursors SET continue_from = NULL"))
    out = run(engine, loaded, sb)
    assert out["customers"]["unchanged"] == 60 and out["locations"]["unchanged"] == 80
    assert out["customers"]["applied"] == out["customers"]["inserted"] == 0
    assert snapshot(engine) == before


def test_repeated_pages_during_a_load_are_harmless(engine: Engine, database_url: str, sb: Sandbox) -> None:
    sb.seed(customers=700, locations=900)
    cfg = cfg_for(database_url, include_recent_changes=True)

    class Twice(Wrapped):
        def __init__(self, inner: ServiceTitanClient) -> None:
            super().__init__(inner)
            self.last: dict[str, ApiResponse] = {}

        async def export(self, collection: str, continue_from: str | None, *,
                         include_recent_changes: bool) -> ApiResponse:
            resp = await super().export(collection, continue_from, include_recent_changes=include_recent_changes)
            prev = self.last.pop(collection, None)
            if prev is not None:  # deliver the previous page's records again along with this one
                resp.body = {**resp.body, "data": prev.body["data"] + resp.body["data"]}
            else:
                self.last[collection] = resp
            return resp

    out = run(engine, cfg, sb, Twice)
    assert out["customers"]["inserted"] == 700 and out["customers"]["unchanged"] > 0
    assert out["customers"]["records"] == 700 + out["customers"]["unchanged"]
    assert_mirror_equals_sandbox(engine, sb)
    assert scalar(engine, "SELECT count(*) FROM change_log") == 0


def test_an_older_version_of_a_record_does_not_undo_a_newer_one(engine: Engine, loaded: Config,
                                                                sb: Sandbox) -> None:
    cid = first_customer(sb)["id"]
    old = first_customer(sb)

    class Stale(Wrapped):
        async def export(self, collection: str, continue_from: str | None, *,
                         include_recent_changes: bool) -> ApiResponse:
            resp = await super().export(collection, continue_from, include_recent_changes=include_recent_changes)
            if collection == "customers":
                resp.body = {**resp.body, "data": [*resp.body["data"], old]}  # a stale repeat
            return resp

    sb.edit_customer(cid, name="Newer")
    first = run(engine, loaded, sb, Stale)  # both versions in one page
    assert mirror(engine, "customer")[cid].record["name"] == "Newer" and first["customers"]["applied"] == 1
    second = run(engine, loaded, sb, Stale)  # only the old one
    assert mirror(engine, "customer")[cid].record["name"] == "Newer"
    assert second["customers"]["stale"] == 1 and second["customers"]["applied"] == 0


# ---------------------------------------------------------------------------------------------- relationships


def test_a_location_whose_customer_is_not_in_the_mirror_is_still_linked(engine: Engine, database_url: str,
                                                                       sb: Sandbox) -> None:
    sb.seed(customers=5, locations=9)
    cfg = cfg_for(database_url)
    out = run(engine, cfg, sb, feed="location")  # the locations feed first: no customer in the mirror yet
    assert out["customers_fetched"] == 5 and out["inserted"] == 9
    assert len([r for r in sb.requests if r.endpoint == "GET /customers/{id}"]) == 5
    owners = {loc["id"]: loc["customerId"] for loc in sb.locations()}
    customers = {r.mirror_id: st for st, r in mirror(engine, "customer").items()}
    for st, row in mirror(engine, "location").items():
        assert customers[row.customer_id] == owners[st]
    # the customer feed later brings the same customers: no duplicates, nothing changes
    again = run(engine, cfg, sb)
    assert again["customers"]["unchanged"] == 5 and again["customers"]["inserted"] == 0
    assert_mirror_equals_sandbox(engine, sb)


def test_a_location_whose_customer_is_gone_is_kept_unlinked(engine: Engine, database_url: str, sb: Sandbox) -> None:
    sb.seed(customers=3, locations=6)
    cfg = cfg_for(database_url)
    gone = sb.customers()[0]["id"]

    class Gone(Wrapped):
        async def get(self, collection: str, st_id: int) -> ApiResponse:
            if st_id == gone:
                return ApiResponse(404, {"title": "Customer not found", "status": 404}, 1.0)
            return await super().get(collection, st_id)

    out = run(engine, cfg, sb, Gone, feed="location")
    orphans = [loc["id"] for loc in sb.locations() if loc["customerId"] == gone]
    assert orphans and out["inserted"] == 6
    rows = mirror(engine, "location")
    assert all(rows[st].customer_id is None for st in orphans)
    assert all(local_diff(engine, "location", st) == [] for st in orphans)  # nothing for the push path to send
    # the customer does arrive later, and the location's next appearance links it
    run(engine, cfg, sb)
    sb.edit_location(orphans[0], name="Touched")
    run(engine, cfg, sb)
    linked = mirror(engine, "location")[orphans[0]]
    assert linked.record["customer_st_id"] == gone and linked.record["name"] == "Touched"


# ---------------------------------------------------------------------------------------------- bad answers


def answering(status: int, body: Any) -> Any:
    class Bad(Wrapped):
        async def export(self, collection: str, continue_from: str | None, *,
                         include_recent_changes: bool) -> ApiResponse:
            self.exports += 1
            return ApiResponse(status, body, 1.0)

    return Bad


@pytest.mark.parametrize(("status", "body", "message"), [
    (400, {"title": "One or more validation errors occurred.", "status": 400}, "answered 400 One or more"),
    (503, "<html>down</html>", "answered 503"),
    (200, {"items": []}, "not {hasMore, continueFrom, data}"),
    (200, {"hasMore": True, "continueFrom": None, "data": []}, "without a continueFrom"),
])
def test_a_bad_export_answer_raises_and_keeps_the_cursor(engine: Engine, loaded: Config, sb: Sandbox, status: int,
                                                         body: Any, message: str) -> None:
    before = scalar(engine, "SELECT continue_from FROM feed_cursors WHERE feed = 'customers'")
    with pytest.raises(ServiceTitanError, match=message) as err:
        run(engine, loaded, sb, answering(status, body))
    assert "\n" not in str(err.value)
    assert scalar(engine, "SELECT continue_from FROM feed_cursors WHERE feed = 'customers'") == before


def test_a_record_without_an_id_is_skipped_and_extra_fields_are_ignored(engine: Engine, database_url: str,
                                                                        sb: Sandbox) -> None:
    sb.seed(customers=10, locations=0)

    class Odd(Wrapped):
        async def export(self, collection: str, continue_from: str | None, *,
                         include_recent_changes: bool) -> ApiResponse:
            resp = await super().export(collection, continue_from, include_recent_changes=include_recent_changes)
            if collection == "customers" and resp.body["data"]:
                data = [{**r, "someNewField": {"x": 1}} for r in resp.body["data"]]
                resp.body = {**resp.body, "data": [{"name": "no id"}, *data]}
            return resp

    out = run(engine, cfg_for(database_url), sb, Odd)
    assert out["customers"]["skipped"] == 1 and out["customers"]["inserted"] == 10


# ---------------------------------------------------------------------------------------------- bookkeeping


def test_a_locally_deleted_record_is_not_brought_back(engine: Engine, loaded: Config, sb: Sandbox) -> None:
    loc = sb.locations()[0]
    mid = mirror(engine, "location")[loc["id"]].mirror_id
    local_sql(engine, "DELETE FROM locations WHERE id = :m", m=mid)
    local_sql(engine, """INSERT INTO tombstones (entity, mirror_id, st_id, old_row)
                         VALUES ('location', :m, :s, '{}')""", m=mid, s=loc["id"])
    sb.edit_location(loc["id"], name="Edited Remotely")
    out = run(engine, loaded, sb)
    assert out["locations"]["tombstoned"] == 1 and loc["id"] not in mirror(engine, "location")


def test_a_second_puller_that_moved_the_cursor_stops_this_one(engine: Engine, loaded: Config, sb: Sandbox) -> None:
    sb.edit_customer(first_customer(sb)["id"], name="X")

    class Raced(Wrapped):
        async def export(self, collection: str, continue_from: str | None, *,
                         include_recent_changes: bool) -> ApiResponse:
            resp = await super().export(collection, continue_from, include_recent_changes=include_recent_changes)
            local_sql(engine, "UPDATE feed_cursors SET continue_from = 'elsewhere' WHERE feed = :f", f=collection)
            return resp

    out = run(engine, loaded, sb, Raced)
    assert out["customers"]["cursor_moved"] and out["customers"]["applied"] == 0
    assert scalar(engine, "SELECT continue_from FROM feed_cursors WHERE feed = 'customers'") == "elsewhere"
