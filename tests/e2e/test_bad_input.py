"""Bad input from every side, each with a clear one-line error and nothing lost.

Malformed configuration (unknown/missing keys, wrong types, unset variables, invalid YAML, unreadable files) is
covered in tests/test_config.py (``test_bad_config_is_one_line_exit_2`` and neighbours); this module covers the
mirror rows local applications write, and ServiceTitan's answers.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine

from sync.config import Config
from sync.core import openapi
from sync.errors import ServiceTitanError
from sync.sandbox import Sandbox, create_app
from sync.servicetitan.client import ServiceTitanClient
from sync.stages.pull import pull, pull_feed
from tests.chaos_kit import Tamper, cut_off, cycle, html_502, non_json_200, raw, rewrite_json, truncated_200
from tests.conftest import make_config
from tests.e2ekit import Env
from tests.pushkit import link_mirror, rows, sql


@pytest.fixture
def sb() -> Sandbox:
    s = Sandbox(tenant_id=1, rate_limit_per_second=None)
    s.seed(customers=8, locations=6, seed=5)
    return s


@pytest.fixture
def linked(engine: Engine, sb: Sandbox) -> dict[int, int]:
    return link_mirror(engine, sb)


@pytest.fixture
def cfg(database_url: str) -> Config:
    # the check before sending is off: these garbage answers come after ServiceTitan applied the PATCH, and the
    # check would find the change landed and send nothing more, where these tests prove the retry path
    # (tests/integration/test_known_state.py has the check's side of it)
    return make_config(database_url, retry={"base_delay_seconds": 0.01, "max_delay_seconds": 0.02, "max_attempts": 3},
                       servicetitan={"requests_per_second": 1000},
                       sync={"check_before_send": False, "check_min_interval_seconds": 0})


def customers(sb: Sandbox) -> list[int]:
    return sorted(c["id"] for c in sb.customers())


def patches(sb: Sandbox) -> list[Any]:
    return [r for r in sb.requests if r.method == "PATCH"]


def drain(engine: Engine, cfg: Config, sb: Sandbox, transport: Any = None, rounds: int = 12) -> None:
    for _ in range(rounds):
        cycle(engine, cfg, sb, pull=False, transport=transport)
        sql(engine, "UPDATE outbox SET next_attempt_at = now() WHERE state = 'pending'")
        if not rows(engine, "SELECT 1 FROM outbox WHERE state IN ('pending', 'in_flight') "
                            "UNION ALL SELECT 1 FROM change_log LIMIT 1"):
            return
    raise AssertionError("the outbox did not drain")


def one_line(value: Any) -> bool:
    return isinstance(value, str) and bool(value) and "\n" not in value


# ---------------------------------------------------------------------------------------------- rows ServiceTitan rejects


@pytest.mark.parametrize(("column", "edit", "error_key"), [
    ("name", "name = ''", "name"),
    ("name", "name = '   '", "name"),
    ("street", "street = '  '", "address.street"),
    ("tag_type_ids", "tag_type_ids = '{999999}'", "tagTypeIds"),
])
def test_a_row_servicetitan_rejects_is_dead_with_its_error_body_and_others_land(
        engine: Engine, cfg: Config, sb: Sandbox, linked: dict[int, int], column: str, edit: str,
        error_key: str) -> None:
    bad, *good = customers(sb)[:4]
    sql(engine, f"UPDATE customers SET {edit}, do_not_mail = NOT do_not_mail WHERE st_id = :s", s=bad)
    for st in good:
        sql(engine, "UPDATE customers SET name = name || ' (fine)' WHERE st_id = :s", s=st)
    drain(engine, cfg, sb)
    dead = rows(engine, "SELECT last_status, last_error FROM outbox WHERE st_id = :s", s=bad)
    assert len(dead) == 1 and dead[0][0] == 400
    body = dead[0][1]
    assert body["status"] == 400 and error_key in body["errors"]  # ServiceTitan's own error body, kept whole
    mirror = rows(engine, "SELECT sync_status, sync_error FROM customers WHERE st_id = :s", s=bad)[0]
    assert mirror[0] == "error" and column in mirror[1]["columns"] and one_line(mirror[1]["message"])
    assert mirror[1]["errors"] == body["errors"]
    assert rows(engine, "SELECT count(*) FROM outbox WHERE state = 'succeeded'") == [(3,)]
    assert all(sb.get_customer(st)["name"].endswith(" (fine)") for st in good)
    # nothing lost: fixing the column sends the whole pending diff, the other field included
    before = sb.get_customer(bad)["doNotMail"]
    fix = {"name": "name = 'Fixed Name'", "street": "street = '1 Fixed St'",
           "tag_type_ids": "tag_type_ids = '{}'"}[column]
    sql(engine, f"UPDATE customers SET {fix} WHERE st_id = :s", s=bad)
    drain(engine, cfg, sb)
    last = patches(sb)[-1].body
    assert "doNotMail" in last and sb.get_customer(bad)["doNotMail"] != before
    assert rows(engine, "SELECT sync_status, sync_error FROM customers WHERE st_id = :s", s=bad) == [("synced", None)]


@pytest.mark.parametrize("value", ["residential", "Alien", ""])
def test_a_type_outside_the_enum_is_never_sent(engine: Engine, cfg: Config, sb: Sandbox, linked: dict[int, int],
                                               value: str) -> None:
    st = customers(sb)[0]
    sql(engine, "UPDATE customers SET type = :t, name = 'With Bad Type' WHERE st_id = :s", t=value, s=st)
    drain(engine, cfg, sb)
    assert patches(sb) == []
    state, error = rows(engine, "SELECT state, last_error FROM outbox")[0]
    assert state == "dead" and "type" in error["validation"] and one_line(error["message"])
    assert rows(engine, "SELECT sync_error->'columns' FROM customers WHERE st_id = :s", s=st) == [(["type"],)]
    sql(engine, "UPDATE customers SET type = 'Commercial' WHERE st_id = :s", s=st)  # fixed: the whole diff goes
    drain(engine, cfg, sb)
    assert sb.get_customer(st)["name"] == "With Bad Type" and sb.get_customer(st)["type"] == "Commercial"


def test_the_openapi_file_sets_no_length_limits_so_long_values_are_sent_as_they_are(
        engine: Engine, cfg: Config, sb: Sandbox, linked: dict[int, int]) -> None:
    assert "maxLength" not in json.dumps(openapi.spec())  # ServiceTitan publishes no limits: nothing to check
    st = customers(sb)[0]
    long_name, long_value = "N" * 20_000, "V" * 200_000
    sql(engine, "UPDATE customers SET name = :n, custom_fields = CAST(:cf AS jsonb) WHERE st_id = :s",
        n=long_name, cf=json.dumps({"201": long_value}), s=st)
    drain(engine, cfg, sb)
    got = sb.get_customer(st)
    assert got["name"] == long_name and got["customFields"][0]["value"] == long_value
    assert rows(engine, "SELECT state FROM outbox") == [("succeeded",)]


# ---------------------------------------------------------------------------------------------- JSON columns


@pytest.mark.parametrize(("column", "value"), [
    ("custom_fields", [1, 2]),
    ("custom_fields", 5),
    ("custom_fields", "text"),
    ("custom_fields", {"not-a-type-id": "x"}),
    ("external_data", ["a", "b"]),
    ("external_data", 7),
])
def test_a_json_column_of_the_wrong_shape_is_never_sent(engine: Engine, cfg: Config, sb: Sandbox,
                                                        linked: dict[int, int], column: str, value: Any) -> None:
    bad, good = customers(sb)[:2]
    sql(engine, f"UPDATE customers SET {column} = CAST(:v AS jsonb) WHERE st_id = :s", v=json.dumps(value), s=bad)
    sql(engine, "UPDATE customers SET name = 'Unaffected' WHERE st_id = :s", s=good)
    drain(engine, cfg, sb)
    assert [p.record_id for p in patches(sb)] == [good]
    error = rows(engine, "SELECT last_error FROM outbox WHERE st_id = :s", s=bad)[0][0]
    assert column in error["validation"] and one_line(error["message"])
    assert rows(engine, "SELECT sync_status, sync_error->'columns' FROM customers WHERE st_id = :s", s=bad) == [
        ("error", [column])]


BUG_STR_VALUES = ("BUG: non-string values inside custom_fields / external_data (nested objects, arrays, booleans, "
                  "numbers) are turned into Python's str() (\"{'a': 1}\", '[1, 2]', 'True') by fields.canonical "
                  "and sent and stored in ServiceTitan as such, instead of being rejected before sending")


@pytest.mark.parametrize(("column", "value"), [
    ("custom_fields", {"201": {"a": 1}}),
    ("custom_fields", {"201": [1, 2]}),
    ("custom_fields", {"201": True}),
    ("custom_fields", {"201": 5}),
    ("external_data", {"k": {"x": 1}}),
])
def test_a_json_value_that_is_not_a_string_is_never_sent(engine: Engine, cfg: Config, sb: Sandbox,
                                                         linked: dict[int, int], column: str, value: Any) -> None:
    st = customers(sb)[0]
    sql(engine, f"UPDATE customers SET {column} = CAST(:v AS jsonb) WHERE st_id = :s", v=json.dumps(value), s=st)
    drain(engine, cfg, sb)
    sent = [json.dumps(p.body) for p in patches(sb)]
    assert not any("{'" in s or "[1, 2]" in s or '"True"' in s for s in sent), sent
    assert patches(sb) == []
    assert rows(engine, "SELECT sync_error->'columns' FROM customers WHERE st_id = :s", s=st) == [([column],)]


def test_a_huge_custom_field_map_with_unknown_type_ids_is_dead_with_servicetitans_error(
        engine: Engine, cfg: Config, sb: Sandbox, linked: dict[int, int]) -> None:
    st = customers(sb)[0]
    huge = {str(900_000 + i): f"value {i}" for i in range(5_000)}
    sql(engine, "UPDATE customers SET custom_fields = CAST(:v AS jsonb) WHERE st_id = :s", v=json.dumps(huge), s=st)
    drain(engine, cfg, sb)
    status, error = rows(engine, "SELECT last_status, last_error FROM outbox")[0]
    assert status == 400 and any(k.startswith("customFields") for k in error["errors"])
    assert rows(engine, "SELECT sync_status FROM customers WHERE st_id = :s", s=st) == [("error",)]


# ---------------------------------------------------------------------------------------------- deletes


def test_deleting_a_mirror_row_is_not_propagated_but_tombstoned_and_warned(e2e: Env) -> None:
    e2e.sb.seed(customers=3, locations=3, seed=9)
    link_mirror(e2e.engine, e2e.sb)
    loc_mid, loc_st, loc_name = rows(e2e.engine, "SELECT id, st_id, name FROM locations ORDER BY id LIMIT 1")[0]
    sql(e2e.engine, "DELETE FROM locations WHERE id = :m", m=loc_mid)
    cfg = e2e.config(extra="")
    proc = e2e.stsync(cfg, "once")
    assert proc.returncode == 0, proc.stderr
    warned = [json.loads(line) for line in proc.stderr.splitlines()
              if line.startswith("{") and "local_delete_not_propagated" in line]
    assert warned and warned[0]["level"] == "warning" and warned[0]["st_id"] == loc_st
    assert [r.method for r in e2e.sb.requests if r.record_id == loc_st] == []  # nothing sent about it
    assert e2e.sb.get_location(loc_st)["name"] == loc_name  # still there in ServiceTitan
    (old,) = rows(e2e.engine, "SELECT old_row FROM tombstones WHERE entity = 'location' AND st_id = :s", s=loc_st)
    assert old[0]["name"] == loc_name  # the deleted row is kept whole
    status = json.loads(e2e.stsync(cfg, "status", "--json").stdout)
    assert status["tombstones"] == 1


def test_deleting_a_customer_that_still_has_locations_is_refused_by_the_database(
        engine: Engine, sb: Sandbox, linked: dict[int, int]) -> None:
    from sqlalchemy.exc import IntegrityError

    with pytest.raises(IntegrityError, match="foreign key"):
        sql(engine, "DELETE FROM customers WHERE id = (SELECT customer_id FROM locations WHERE customer_id "
                    "IS NOT NULL LIMIT 1)")


# ---------------------------------------------------------------------------------------------- garbage answers (push)


async def deeply_nested_200(request: httpx.Request, inner: Any) -> httpx.Response:
    await inner(request)  # applied; the answer is 100,000 nested arrays (json raises RecursionError on it)
    return raw(200, b"[" * 100_000 + b"]" * 100_000)


GARBAGE = {"non-JSON 200": non_json_200, "truncated 200": truncated_200, "connection cut mid-body": cut_off,
           "HTML 502": html_502, "deeply nested 200": deeply_nested_200}


@pytest.mark.parametrize("kind", sorted(GARBAGE))
def test_garbage_answers_to_a_patch_are_retried_and_the_edit_lands(engine: Engine, cfg: Config, sb: Sandbox,
                                                                   linked: dict[int, int], kind: str) -> None:
    tamper = Tamper(create_app(sb))
    tamper.add("PATCH", r"/customers/\d+$", GARBAGE[kind], times=2, name=kind)
    st = customers(sb)[0]
    sql(engine, "UPDATE customers SET name = 'After Garbage' WHERE st_id = :s", s=st)
    drain(engine, cfg, sb, transport=tamper)
    assert tamper.hits == {kind: 2}
    assert sb.get_customer(st)["name"] == "After Garbage"
    assert rows(engine, "SELECT state, attempts FROM outbox") == [("succeeded", 3)]
    attempts = rows(engine, "SELECT outcome, error FROM outbox_attempts ORDER BY id")
    assert [a[0] for a in attempts] == ["retry", "retry", "succeeded"]
    assert all(a[1] is not None for a in attempts[:2])  # what came back is recorded
    assert rows(engine, "SELECT sync_status FROM customers WHERE st_id = :s", s=st) == [("synced",)]


@pytest.mark.parametrize("kind", ["non-JSON 200", "connection cut mid-body", "deeply nested 200"])
def test_garbage_on_every_attempt_ends_dead_with_a_one_line_reason(engine: Engine, cfg: Config, sb: Sandbox,
                                                                   linked: dict[int, int], kind: str) -> None:
    tamper = Tamper(create_app(sb))
    tamper.add("PATCH", r"/customers/\d+$", GARBAGE[kind], times=99, name=kind)
    bad, good = customers(sb)[:2]
    sql(engine, "UPDATE customers SET name = 'Never Confirmed' WHERE st_id = :s", s=bad)
    drain(engine, cfg, sb, transport=tamper)
    assert rows(engine, "SELECT state, attempts FROM outbox") == [("dead", 3)]  # retry.max_attempts
    err = rows(engine, "SELECT sync_error FROM customers WHERE st_id = :s", s=bad)[0][0]
    assert one_line(err["message"]) and err["outbox_id"]
    tamper.rules.clear()
    sql(engine, "UPDATE customers SET name = 'Fine Again' WHERE st_id = :s", s=good)
    drain(engine, cfg, sb, transport=tamper)
    assert sb.get_customer(good)["name"] == "Fine Again"


def test_an_answer_larger_than_the_bound_is_not_read_and_is_a_failed_attempt(engine: Engine, database_url: str,
                                                                            sb: Sandbox,
                                                                            linked: dict[int, int]) -> None:
    cfg = make_config(database_url, retry={"base_delay_seconds": 0.01, "max_delay_seconds": 0.02, "max_attempts": 3},
                      servicetitan={"requests_per_second": 1000, "max_answer_bytes": 4096},
                      sync={"check_before_send": False})
    tamper = Tamper(create_app(sb))

    async def huge(request: httpx.Request, inner: Any) -> httpx.Response:
        await inner(request)
        return raw(200, json.dumps({"id": 1, "padding": "x" * 20_000}).encode())

    tamper.add("PATCH", r"/customers/\d+$", huge, times=1, name="huge")
    st = customers(sb)[0]
    sql(engine, "UPDATE customers SET name = 'After Huge' WHERE st_id = :s", s=st)
    drain(engine, cfg, sb, transport=tamper)
    assert rows(engine, "SELECT state, attempts FROM outbox") == [("succeeded", 2)]
    (first, _) = rows(engine, "SELECT outcome, error FROM outbox_attempts ORDER BY id")
    assert first[0] == "retry" and "larger than 4096 bytes" in json.dumps(first[1])


# ---------------------------------------------------------------------------------------------- garbage answers (pull)


def run_pull(engine: Engine, cfg: Config, transport: Any) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        async with ServiceTitanClient(cfg.servicetitan, transport=transport) as st:
            return await pull(engine, st, cfg)

    return asyncio.run(main())


def run_pull_within(engine: Engine, cfg: Config, transport: Any, seconds: float) -> dict[str, Any]:
    """A pull that must end by itself (a test that would otherwise hang fails with TimeoutError)."""
    async def main() -> dict[str, Any]:
        async with ServiceTitanClient(cfg.servicetitan, transport=transport) as st:
            return await asyncio.wait_for(pull(engine, st, cfg), seconds)

    return asyncio.run(main())


def cursor(engine: Engine) -> Any:
    return rows(engine, "SELECT continue_from FROM feed_cursors WHERE feed = 'customers'")


def customers_feed(engine: Engine, cfg: Config, transport: Any) -> dict[str, Any]:
    """The customers feed alone (the locations feed would fetch a quarantined customer by id, whole)."""
    async def main() -> dict[str, Any]:
        async with ServiceTitanClient(cfg.servicetitan, transport=transport) as st:
            return await asyncio.wait_for(pull_feed(engine, st, cfg, "customer"), 20)

    return asyncio.run(main())


def _spoil(target: int, change: Any) -> Callable[..., Any]:
    """Export pages in which record ``target`` is changed by ``change`` (a function of the raw record dict)."""
    async def action(request: httpx.Request, inner: Any) -> httpx.Response:
        real = await inner(request)
        page = json.loads(real.content)
        for rec in page["data"]:
            if rec.get("id") == target:
                change(rec)
        text = json.dumps(page).replace('"__SURROGATE__"', '"bad \\ud800 name"').replace('"__INF__"', "Infinity")
        return raw(real.status_code, text.encode())

    return action


BAD_RECORDS: dict[str, Any] = {
    "id above bigint": lambda r: r.update(id=2**63 + 5),
    "lone surrogate in name": lambda r: r.update(name="__SURROGATE__"),
    "infinite latitude": lambda r: r["address"].update(latitude="__INF__"),
    "required field missing": lambda r: r.pop("name"),
    "no id": lambda r: r.pop("id"),
}


@pytest.mark.parametrize("kind", sorted(BAD_RECORDS))
def test_one_bad_export_record_is_quarantined_and_the_rest_of_the_page_applies(engine: Engine, cfg: Config,
                                                                               sb: Sandbox, kind: str) -> None:
    tamper = Tamper(create_app(sb))
    tamper.add("GET", r"/export/customers", _spoil(customers(sb)[0], BAD_RECORDS[kind]), times=1000)
    out = {"customers": customers_feed(engine, cfg, tamper)}
    n = len(sb.customers())
    assert out["customers"]["drained"] is True and out["customers"]["quarantined"] >= 1
    assert rows(engine, "SELECT count(*) FROM customers") == [(n - 1,)]  # every other record applied
    ((entity, reason, raw_text),) = rows(engine, "SELECT entity, reason, raw FROM quarantine")
    assert entity == "customer" and reason and raw_text.startswith("{")
    assert cursor(engine)[0][0]  # the feed moved on


def test_a_quarantined_record_is_released_when_a_good_version_arrives(engine: Engine, cfg: Config,
                                                                      sb: Sandbox) -> None:
    tamper = Tamper(create_app(sb))
    tamper.add("GET", r"/export/customers", _spoil(customers(sb)[0], BAD_RECORDS["lone surrogate in name"]),
               times=1000)
    customers_feed(engine, cfg, tamper)
    ((st_id,),) = rows(engine, "SELECT st_id FROM quarantine")
    sb.edit_customer(st_id, name="Fixed In ServiceTitan")
    customers_feed(engine, cfg, Tamper(create_app(sb)))  # fetched by id first, and in the feed: applied either way
    assert rows(engine, "SELECT count(*) FROM quarantine") == [(0,)]
    assert rows(engine, "SELECT name FROM customers WHERE st_id = :s", s=st_id) == [("Fixed In ServiceTitan",)]


def test_a_record_skipped_for_missing_fields_is_fetched_by_id_on_the_next_pull(engine: Engine, cfg: Config,
                                                                              sb: Sandbox) -> None:
    target = customers(sb)[0]
    tamper = Tamper(create_app(sb))
    tamper.add("GET", r"/export/customers", _spoil(target, BAD_RECORDS["required field missing"]), times=1000)
    customers_feed(engine, cfg, tamper)
    assert rows(engine, "SELECT st_id FROM quarantine") == [(target,)]
    sb.reset_log()
    customers_feed(engine, cfg, Tamper(create_app(sb)))
    assert any(r.endpoint == "GET /customers" and str(target) in r.query for r in sb.requests)  # fetched by id
    assert rows(engine, "SELECT count(*) FROM quarantine") == [(0,)]
    assert rows(engine, "SELECT count(*) FROM customers WHERE st_id = :s", s=target) == [(1,)]


def test_a_continuation_token_that_never_moves_ends_the_run_with_a_warning(
        engine: Engine, cfg: Config, sb: Sandbox, capsys: pytest.CaptureFixture[str]) -> None:
    """hasMore=true with the token it was asked with, for ever: the run ends, the locations feed is reached."""
    tamper = Tamper(create_app(sb))
    run_pull(engine, cfg, tamper)  # initial load; the cursor is now a token
    token = cursor(engine)[0][0]

    async def same_page(request: httpx.Request, inner: Any) -> httpx.Response:
        return raw(200, json.dumps({"hasMore": True, "continueFrom": token, "data": []}).encode())

    tamper.add("GET", r"/export/customers", same_page, times=10_000)

    out = run_pull_within(engine, cfg, tamper, 20)
    assert out["customers"]["cursor_stuck"] is True and out["customers"]["pages"] == 1
    assert out["locations"]["drained"] is True
    assert "pull.cursor_stuck" in capsys.readouterr().out
    assert cursor(engine) == [(token,)]


def test_a_rejected_continuation_token_falls_back_to_a_date_by_itself(engine: Engine, cfg: Config, sb: Sandbox,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    run_pull(engine, cfg, Tamper(create_app(sb)))  # initial load
    sql(engine, "UPDATE feed_cursors SET continue_from = 'expired-token-123' WHERE feed = 'customers'")
    st = customers(sb)[0]
    sb.edit_customer(st, name="Changed While The Token Expired")
    out = run_pull_within(engine, cfg, Tamper(create_app(sb)), 20)
    assert out["customers"]["drained"] is True
    assert rows(engine, "SELECT name FROM customers WHERE st_id = :s", s=st) == [("Changed While The Token Expired",)]
    assert "pull.cursor_rejected" in capsys.readouterr().out
    (token,) = cursor(engine)[0]
    assert token and token != "expired-token-123"
    again = run_pull_within(engine, cfg, Tamper(create_app(sb)), 20)  # and the feed goes on normally
    assert again["customers"]["drained"] is True and "cursor_rejected" not in json.dumps(again)


def test_a_pull_past_its_time_budget_ends_and_the_next_run_continues(engine: Engine, database_url: str,
                                                                      sb: Sandbox) -> None:
    cfg = make_config(database_url, sync={"pull_max_seconds_per_run": 1})
    tamper = Tamper(create_app(sb))
    pages = {"n": 0}

    async def endless(request: httpx.Request, inner: Any) -> httpx.Response:
        pages["n"] += 1
        await asyncio.sleep(0.3)
        return raw(200, json.dumps({"hasMore": True, "continueFrom": f"t{pages['n']}", "data": []}).encode())

    tamper.add("GET", r"/export/customers", endless, times=10_000)
    out = run_pull_within(engine, cfg, tamper, 20)
    assert out["customers"]["budget_spent"] is True and 2 <= out["customers"]["pages"] <= 6
    assert cursor(engine) == [(f"t{pages['n']}",)]  # the next run continues from there


@pytest.mark.parametrize(("kind", "message"), [
    ("non-JSON 200", "not {hasMore, continueFrom, data}"),
    ("truncated 200", "not {hasMore, continueFrom, data}"),
    ("connection cut mid-body", "no answer"),
    ("HTML 502", "answered 502"),
])
def test_a_garbage_export_page_raises_one_line_and_keeps_the_cursor(engine: Engine, cfg: Config, sb: Sandbox,
                                                                    kind: str, message: str) -> None:
    tamper = Tamper(create_app(sb))
    run_pull(engine, cfg, tamper)  # initial load
    before = cursor(engine)
    sb.edit_customer(customers(sb)[0], name="Seen Later")
    tamper.add("GET", r"/export/customers$", GARBAGE[kind], times=4, name=kind)  # every try of one pull
    with pytest.raises(ServiceTitanError, match=message) as err:
        run_pull(engine, cfg, tamper)
    assert "\n" not in str(err.value)
    assert cursor(engine) == before
    run_pull(engine, cfg, tamper)  # ServiceTitan is fine again: nothing was skipped
    assert rows(engine, "SELECT name FROM customers WHERE st_id = :s", s=customers(sb)[0]) == [("Seen Later",)]


def test_an_export_record_with_unknown_fields_is_applied(engine: Engine, cfg: Config, sb: Sandbox) -> None:
    def add_fields(body: Any) -> Any:
        body["someNewPageField"] = 1
        for r in body["data"]:
            r["brandNewField"] = {"nested": [1, 2]}
            r["address"]["plusFour"] = "1234"
        return body

    tamper = Tamper(create_app(sb))
    tamper.add("GET", r"/export/customers$", rewrite_json(add_fields), times=1)
    out = run_pull(engine, cfg, tamper)
    assert out["customers"]["inserted"] == 8 and out["customers"]["skipped"] == 0


BUG_MISSING = ("BUG: an export record missing required fields (name, type, address...) is applied as if they were "
               "null: the mirror's values are overwritten with NULL, silently (pull._parse_records only checks id)")


def test_an_export_record_missing_fields_is_skipped_not_applied_as_nulls(engine: Engine, cfg: Config,
                                                                         sb: Sandbox) -> None:
    tamper = Tamper(create_app(sb))
    run_pull(engine, cfg, tamper)
    victim, other = customers(sb)[:2]
    before = rows(engine, "SELECT name, type, street FROM customers WHERE st_id = :s", s=victim)
    sb.edit_customer(victim, doNotMail=True)
    sb.edit_customer(other, name="Other Edit")

    def strip(body: Any) -> Any:
        for r in body["data"]:
            if r["id"] == victim:
                for key in ("name", "type", "address"):
                    r.pop(key)
        return body

    tamper.add("GET", r"/export/customers$", rewrite_json(strip), times=1)
    out = run_pull(engine, cfg, tamper)
    assert rows(engine, "SELECT name FROM customers WHERE st_id = :s", s=other) == [("Other Edit",)]
    assert rows(engine, "SELECT name, type, street FROM customers WHERE st_id = :s", s=victim) == before
    assert out["customers"]["skipped"] == 1


BUG_NUL = ("BUG: a remote text value containing U+0000 (valid JSON, rejected by PostgreSQL text/jsonb) fails the "
           "whole page transaction on every pull: the feed is stuck and every later remote change is blocked")


def test_a_remote_value_postgresql_cannot_store_does_not_block_the_feed(engine: Engine, cfg: Config,
                                                                        sb: Sandbox) -> None:
    tamper = Tamper(create_app(sb))
    run_pull(engine, cfg, tamper)
    poisoned, other = customers(sb)[:2]
    sb.edit_customer(poisoned, name="Nul\x00Byte")
    sb.edit_customer(other, name="Must Arrive")
    try:
        run_pull(engine, cfg, tamper)
    except Exception as exc:  # the pull may report the bad record, but must not stop there
        assert "\n" not in str(exc)
    run_pull(engine, cfg, tamper)
    assert rows(engine, "SELECT name FROM customers WHERE st_id = :s", s=other) == [("Must Arrive",)]


def test_a_garbage_token_answer_is_one_line_and_nothing_is_sent(engine: Engine, cfg: Config, sb: Sandbox,
                                                                linked: dict[int, int]) -> None:
    async def garbage_token(request: httpx.Request, inner: Any) -> httpx.Response:
        return raw(200, b"<html>maintenance</html>", "text/html")

    tamper = Tamper(create_app(sb))
    tamper.add("POST", r"/connect/token$", garbage_token, times=99)
    st = customers(sb)[0]
    sql(engine, "UPDATE customers SET name = 'Waits For A Token' WHERE st_id = :s", s=st)
    cycle(engine, cfg, sb, pull=False, transport=tamper)
    state, error = rows(engine, "SELECT state, last_error FROM outbox")[0]
    assert state == "pending" and one_line(error["message"]) and "access_token" in error["message"]
    tamper.rules.clear()
    drain(engine, cfg, sb, transport=tamper)
    assert sb.get_customer(st)["name"] == "Waits For A Token"


def test_once_with_refused_credentials_exits_non_zero(e2e: Env, tmp_path: Any) -> None:
    cfg = tmp_path / "wrong.yaml"
    cfg.write_text(e2e.config().read_text().replace("${ST_SECRET:-sandbox-secret}", "wrong-secret-for-sure"))
    proc = e2e.stsync(cfg, "once")
    assert "refused the client credentials" in proc.stderr
    assert proc.returncode in (1, 2)


@pytest.mark.parametrize("command", ["once", "run"])
def test_a_wrong_app_key_is_one_line_exit_2_and_nothing_is_retried(e2e: Env, tmp_path: Any, command: str) -> None:
    e2e.sb.seed(customers=2, locations=1, seed=2)
    link_mirror(e2e.engine, e2e.sb)
    sql(e2e.engine, "UPDATE customers SET name = 'Waits For A Key' WHERE id = (SELECT min(id) FROM customers)")
    cfg = tmp_path / "wrong-key.yaml"
    cfg.write_text(e2e.config().read_text().replace("app_key: sandbox-app-key", "app_key: not-the-app-key"))
    proc = e2e.stsync(cfg, command, timeout=60)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("stsync: error: ")]
    assert errors and all("authentication failed" in line and "servicetitan.app_key" in line for line in errors)
    # (`run` logs JSON lines to stderr as it goes): no traceback, and the error is its last word
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("stsync: error: authentication failed")
    # the change waits, unspent, for the right key: nothing was retried into dead
    assert rows(e2e.engine, "SELECT state, attempts FROM outbox") in ([], [("pending", 0)])
    assert [r for r in e2e.sb.requests if r.method == "PATCH" and r.status == 200] == []
