"""Operator commands (`stsync outbox ...`, `conflicts list`, `status`) as real subprocesses, on dead rows,
conflicts, local-only rows and tombstones that the daemon itself produced against the sandbox."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from sync.config import load_config
from sync.daemon.service import Daemon
from sync.sandbox.seed import TAG_TYPES
from tests.e2ekit import Env, stop, wait_for
from tests.pushkit import link_mirror, rows, sql

GUID = "5f2b8a7e-3c1d-4e6f-9a0b-1c2d3e4f5a6b"
UNKNOWN_TAG = 999999
TABLE_COLUMNS = ["id", "entity", "mirror_id", "st_id", "state", "attempts", "last_status", "updated_at", "error",
                 "fields"]


@dataclass
class Dead:
    """A tenant linked to the mirror after one `stsync once` that left two real dead rows and two successes."""

    cfg: Path
    tag_st: int  # customer whose tag_type_ids ServiceTitan rejected (400)
    tag_mid: int
    tag_oid: int
    tag_before: list[int]
    alien_st: int  # customer whose type = 'Alien' failed validation before sending
    alien_mid: int
    alien_oid: int
    ok_oid: int  # a customer edit that succeeded
    loc_oid: int  # a location edit that succeeded
    loc_mid: int


def ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-2000:]}"
    return proc


def one_line_error(proc: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("stsync: error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def cli_json(env: Env, cfg: Path, *args: str) -> Any:
    return json.loads(ok(env.stsync(cfg, *args, "--json")).stdout)


def patches(env: Env, path: str) -> list[Any]:
    return [r for r in env.sb.requests if r.method == "PATCH" and r.path.endswith(path)]


def outbox_row(env: Env, oid: int) -> dict[str, Any]:
    with env.engine.connect() as conn:
        return dict(conn.execute(text("SELECT * FROM outbox WHERE id = :i"), {"i": oid}).mappings().one())


def mirror(env: Env, mid: int) -> dict[str, Any]:
    with env.engine.connect() as conn:
        return dict(conn.execute(text("SELECT * FROM customers WHERE id = :i"), {"i": mid}).mappings().one())


def outbox_counts(env: Env) -> dict[str, int]:
    return dict(rows(env.engine, "SELECT state, count(*) FROM outbox GROUP BY state"))


def cycle(env: Env, cfg: Path) -> dict[str, Any]:
    """What `stsync once` does (pull, detect, dispatch over HTTP to the sandbox's socket), in this process to
    keep set-up cheap; the commands under test all run as subprocesses."""

    async def go() -> dict[str, Any]:
        d = Daemon(load_config(str(cfg)), engine=env.engine)
        try:
            return await d.cycle()
        finally:
            await d.close()

    out = asyncio.run(go())
    assert not any(isinstance(v, dict) and v.get("error") for v in out.values()), out
    return out


def make_dead_rows(env: Env) -> Dead:
    env.sb.seed(customers=5, locations=3, seed=3)
    ids = link_mirror(env.engine, env.sb)
    tag_st, alien_st, ok_st = sorted(ids)[:3]
    tag_before = next(c["tagTypeIds"] for c in env.sb.customers() if c["id"] == tag_st)
    sql(env.engine, "UPDATE customers SET tag_type_ids = ARRAY[:t]::bigint[] WHERE st_id = :s", t=UNKNOWN_TAG,
        s=tag_st)
    sql(env.engine, "UPDATE customers SET type = 'Alien' WHERE st_id = :s", s=alien_st)
    sql(env.engine, "UPDATE customers SET name = 'Okay Co' WHERE st_id = :s", s=ok_st)
    loc_mid = rows(env.engine, "SELECT min(id) FROM locations")[0][0]
    sql(env.engine, "UPDATE locations SET name = 'Front Yard' WHERE id = :m", m=loc_mid)
    cfg = env.config()
    cycle(env, cfg)

    def oid(entity: str, mid: int) -> int:
        (row,) = rows(env.engine, "SELECT id FROM outbox WHERE entity = :e AND mirror_id = :m", e=entity, m=mid)
        return int(row[0])

    dead = Dead(cfg=cfg, tag_st=tag_st, tag_mid=ids[tag_st], tag_oid=oid("customer", ids[tag_st]),
                tag_before=tag_before, alien_st=alien_st, alien_mid=ids[alien_st],
                alien_oid=oid("customer", ids[alien_st]), ok_oid=oid("customer", ids[ok_st]),
                loc_oid=oid("location", loc_mid), loc_mid=loc_mid)
    states = dict(rows(env.engine, "SELECT id, state FROM outbox"))
    assert states == {dead.tag_oid: "dead", dead.alien_oid: "dead", dead.ok_oid: "succeeded",
                      dead.loc_oid: "succeeded"}
    return dead


# ---------------------------------------------------------------------------------------------- list / show


def test_outbox_list_and_show_on_real_dead_rows(e2e: Env) -> None:
    d = make_dead_rows(e2e)
    db_rows = {r[0]: r[1:] for r in rows(e2e.engine, "SELECT id, entity, mirror_id, st_id, state, attempts, "
                                                     "last_status FROM outbox")}

    table = ok(e2e.stsync(d.cfg, "outbox", "list")).stdout.strip().splitlines()
    assert table[0].split() == TABLE_COLUMNS
    assert [int(line.split()[0]) for line in table[1:]] == sorted(db_rows, reverse=True)  # newest first
    for line in table[1:]:
        cells = line.split()
        entity, mirror_id, st_id, state, attempts, _ = db_rows[int(cells[0])]
        assert cells[1:6] == [entity, str(mirror_id), str(st_id), state, str(attempts)]
    tag_line = next(line for line in table[1:] if int(line.split()[0]) == d.tag_oid)
    assert " dead " in tag_line and " 400 " in tag_line
    assert "One or more validation errors occurred." in tag_line
    assert tag_line.rstrip().endswith(f"tagTypeIds: Tag type {UNKNOWN_TAG} does not exist.")  # the field errors
    alien_line = next(line for line in table[1:] if int(line.split()[0]) == d.alien_oid)
    assert "request body fails ServiceTitan's schema" in alien_line  # the reason shows for never-sent rows too

    listed = cli_json(e2e, d.cfg, "outbox", "list")
    assert [r["id"] for r in listed] == sorted(db_rows, reverse=True)
    for r in listed:
        assert (r["entity"], r["mirror_id"], r["st_id"], r["state"], r["attempts"], r["last_status"]) == \
            db_rows[r["id"]]
    by_id = {r["id"]: r for r in listed}
    assert by_id[d.tag_oid]["error_title"] == "One or more validation errors occurred."
    assert (by_id[d.alien_oid]["attempts"], by_id[d.alien_oid]["last_status"]) == (0, None)
    assert "'Alien' is not one of" in by_id[d.alien_oid]["error_message"]
    assert by_id[d.alien_oid]["fields"].startswith("type: 'Alien' is not one of")
    assert by_id[d.tag_oid]["fields"] == f"tagTypeIds: Tag type {UNKNOWN_TAG} does not exist."
    assert by_id[d.tag_oid]["operation"] == "update"
    assert by_id[d.ok_oid]["error_title"] is None and by_id[d.ok_oid]["error_message"] is None

    dead_table = ok(e2e.stsync(d.cfg, "outbox", "list", "--state", "dead")).stdout.strip().splitlines()
    assert dead_table[0].split() == TABLE_COLUMNS
    assert [int(line.split()[0]) for line in dead_table[1:]] == sorted([d.tag_oid, d.alien_oid], reverse=True)
    assert all(line.split()[4] == "dead" for line in dead_table[1:])
    customers = cli_json(e2e, d.cfg, "outbox", "list", "--entity", "customer")
    assert [r["id"] for r in customers] == sorted([d.tag_oid, d.alien_oid, d.ok_oid], reverse=True)
    assert d.loc_oid not in {r["id"] for r in customers}

    # show: payload (exactly what was sent), diff, every attempt with its status and ServiceTitan's error body
    ext = {"patchMode": "Merge", "applicationGuid": GUID,
           "externalData": [{"key": "mirrorId", "value": str(d.tag_mid)}]}
    shown = json.loads(ok(e2e.stsync(d.cfg, "outbox", "show", str(d.tag_oid))).stdout)
    assert (shown["id"], shown["state"], shown["attempts"], shown["last_status"]) == (d.tag_oid, "dead", 1, 400)
    assert shown["payload"] == {"tagTypeIds": [UNKNOWN_TAG], "externalData": ext}
    assert shown["diff"] == {"tag_type_ids": [d.tag_before, [UNKNOWN_TAG]]}
    (sent,) = patches(e2e, f"/customers/{d.tag_st}")
    assert sent.status == 400 and sent.body == shown["payload"]
    assert shown["last_error"]["errors"] == {"tagTypeIds": [f"Tag type {UNKNOWN_TAG} does not exist."]}
    (attempt,) = shown["attempt_history"]
    assert (attempt["attempt"], attempt["http_status"], attempt["outcome"]) == (1, 400, "dead")
    assert attempt["error"]["title"] == "One or more validation errors occurred."
    assert attempt["error"]["errors"] == {"tagTypeIds": [f"Tag type {UNKNOWN_TAG} does not exist."]}
    assert attempt["started_at"] <= attempt["finished_at"]

    alien = json.loads(ok(e2e.stsync(d.cfg, "outbox", "show", str(d.alien_oid))).stdout)
    assert (alien["state"], alien["attempts"], alien["last_status"]) == ("dead", 0, None)
    assert alien["payload"]["type"] == "Alien" and alien["diff"]["type"][1] == "Alien"
    assert list(alien["last_error"]["validation"]) == ["type"]
    assert alien["attempt_history"] == []  # rejected before sending
    assert patches(e2e, f"/customers/{d.alien_st}") == []

    one_line_error(e2e.stsync(d.cfg, "outbox", "show", "424242"), 1, "no outbox row 424242")


# ---------------------------------------------------------------------------------------------- retry


def test_retry_one_dead_row_then_fix_and_once_succeeds(e2e: Env) -> None:
    d = make_dead_rows(e2e)
    assert ok(e2e.stsync(d.cfg, "outbox", "retry", str(d.tag_oid))).stdout.strip() == "1 row(s) queued again"
    row = outbox_row(e2e, d.tag_oid)
    assert (row["state"], row["attempts"], row["completed_at"]) == ("pending", 0, None)
    assert row["next_attempt_at"] <= rows(e2e.engine, "SELECT now()")[0][0]
    m = mirror(e2e, d.tag_mid)
    assert (m["sync_status"], m["sync_error"]) == ("pending", None)
    assert outbox_row(e2e, d.alien_oid)["state"] == "dead"  # the other dead row is untouched

    fixed = min(t for t in TAG_TYPES if t not in d.tag_before)
    sql(e2e.engine, "UPDATE customers SET tag_type_ids = ARRAY[:t]::bigint[] WHERE id = :m", t=fixed, m=d.tag_mid)
    ok(e2e.stsync(d.cfg, "once"))

    row = outbox_row(e2e, d.tag_oid)
    assert (row["state"], row["attempts"], row["last_status"]) == ("succeeded", 1, 200)
    assert rows(e2e.engine, "SELECT count(*) FROM outbox WHERE mirror_id = :m AND entity = 'customer'",
                m=d.tag_mid) == [(1,)]  # the fix rode on the retried row
    sent = patches(e2e, f"/customers/{d.tag_st}")
    assert [r.status for r in sent] == [400, 200]
    assert sent[-1].body["tagTypeIds"] == [fixed]
    assert row["payload"] == sent[-1].body
    assert e2e.sb.get_customer(d.tag_st)["tagTypeIds"] == [fixed]
    m = mirror(e2e, d.tag_mid)
    assert (m["sync_status"], m["sync_error"], m["tag_type_ids"]) == ("synced", None, [fixed])
    assert outbox_row(e2e, d.alien_oid)["state"] == "dead"
    assert patches(e2e, f"/customers/{d.alien_st}") == []

    # a row that is not dead: one line on stderr, exit 1; neither ID nor --all-dead: usage error, exit 2
    one_line_error(e2e.stsync(d.cfg, "outbox", "retry", str(d.tag_oid)), 1,
                   f"outbox row {d.tag_oid} is succeeded", "only dead rows")
    usage = e2e.stsync(d.cfg, "outbox", "retry")
    assert usage.returncode == 2, usage
    assert "Usage:" in usage.stderr and "give one outbox ID or --all-dead" in usage.stderr
    assert outbox_row(e2e, d.tag_oid)["state"] == "succeeded"
    assert outbox_row(e2e, d.alien_oid)["state"] == "dead"  # the refused calls changed nothing


def test_retry_all_dead_resends_recomputed_bodies(e2e: Env) -> None:
    d = make_dead_rows(e2e)
    assert ok(e2e.stsync(d.cfg, "outbox", "retry", "--all-dead")).stdout.strip() == "2 row(s) queued again"
    for oid in (d.tag_oid, d.alien_oid):
        row = outbox_row(e2e, oid)
        assert (row["state"], row["attempts"], row["completed_at"]) == ("pending", 0, None)
    assert outbox_counts(e2e) == {"pending": 2, "succeeded": 2}

    cycle(e2e, d.cfg)
    # the mirror was not fixed: ServiceTitan rejects the tag again, the 'Alien' body is again never sent
    assert [r.status for r in patches(e2e, f"/customers/{d.tag_st}")] == [400, 400]
    assert patches(e2e, f"/customers/{d.alien_st}") == []
    assert outbox_counts(e2e) == {"dead": 2, "succeeded": 2}
    assert (outbox_row(e2e, d.tag_oid)["attempts"], outbox_row(e2e, d.alien_oid)["attempts"]) == (1, 0)
    assert rows(e2e.engine, "SELECT http_status, outcome FROM outbox_attempts WHERE outbox_id = :o ORDER BY id",
                o=d.tag_oid) == [(400, "dead"), (400, "dead")]
    assert rows(e2e.engine, "SELECT count(*) FROM outbox_attempts WHERE outbox_id = :o", o=d.alien_oid) == [(0,)]
    assert mirror(e2e, d.alien_mid)["sync_error"]["columns"] == ["type"]
    assert mirror(e2e, d.tag_mid)["sync_error"]["columns"] == ["tag_type_ids"]


# ---------------------------------------------------------------------------------------------- discard


def test_discard_closes_rows_puts_their_fields_back_and_nothing_is_sent(e2e: Env) -> None:
    d = make_dead_rows(e2e)
    before = len(e2e.sb.requests)
    assert ok(e2e.stsync(d.cfg, "outbox", "discard", str(d.tag_oid))).stdout.strip() == \
        f"outbox row {d.tag_oid} discarded; back to the last-synced value: tag_type_ids"
    row = outbox_row(e2e, d.tag_oid)
    assert row["state"] == "discarded" and row["completed_at"] is not None
    assert row["last_error"]["discarded"] is True
    assert row["last_error"]["errors"] == {"tagTypeIds": [f"Tag type {UNKNOWN_TAG} does not exist."]}  # kept
    m = mirror(e2e, d.tag_mid)
    assert m["sync_status"] == "discarded"
    assert f"outbox row {d.tag_oid} discarded" in m["sync_error"]["message"]

    # a pending row can be discarded too (the 'Alien' row, put back to pending as `retry` does)
    sql(e2e.engine, "UPDATE outbox SET state = 'pending', attempts = 0, completed_at = NULL WHERE id = :o",
        o=d.alien_oid)
    ok(e2e.stsync(d.cfg, "outbox", "discard", str(d.alien_oid)))
    assert outbox_row(e2e, d.alien_oid)["state"] == "discarded"
    assert mirror(e2e, d.alien_mid)["sync_status"] == "discarded"
    assert mirror(e2e, d.alien_mid)["type"] != "Alien"

    ok(e2e.stsync(d.cfg, "once"))
    assert [r for r in e2e.sb.requests[before:] if r.method == "PATCH"] == []
    assert outbox_counts(e2e) == {"discarded": 2, "succeeded": 2}
    m = mirror(e2e, d.tag_mid)
    assert (m["sync_status"], sorted(m["tag_type_ids"])) == ("discarded", sorted(d.tag_before))  # put back
    assert e2e.sb.get_customer(d.tag_st)["tagTypeIds"] == d.tag_before

    one_line_error(e2e.stsync(d.cfg, "outbox", "discard", str(d.ok_oid)), 1, f"outbox row {d.ok_oid} is succeeded")
    assert outbox_row(e2e, d.ok_oid)["state"] == "succeeded"


# ---------------------------------------------------------------------------------------------- conflicts


def test_conflicts_list_shows_a_real_conflict(e2e: Env) -> None:
    e2e.sb.seed(customers=3, locations=2, seed=4)
    ids = link_mirror(e2e.engine, e2e.sb)
    st = min(ids)
    base = next(c["name"] for c in e2e.sb.customers() if c["id"] == st)
    cfg = e2e.config()
    sql(e2e.engine, "UPDATE customers SET name = 'Local Name' WHERE id = :m", m=ids[st])
    e2e.sb.edit_customer(st, name="Remote Name")
    ok(e2e.stsync(cfg, "once"))

    listed = cli_json(e2e, cfg, "conflicts", "list")
    assert len(listed) == 1
    c = listed[0]
    assert {k: c[k] for k in ("entity", "mirror_id", "st_id", "field", "base_value", "local_value",
                              "remote_value", "policy", "outcome")} == {
        "entity": "customer", "mirror_id": ids[st], "st_id": st, "field": "name", "base_value": base,
        "local_value": "Local Name", "remote_value": "Remote Name", "policy": "remote_wins", "outcome": "remote"}
    assert rows(e2e.engine, "SELECT id, field FROM conflicts") == [(c["id"], "name")]
    # remote_wins: the mirror took ServiceTitan's value and nothing was pushed back
    assert mirror(e2e, ids[st])["name"] == "Remote Name"
    assert patches(e2e, f"/customers/{st}") == []
    assert e2e.sb.get_customer(st)["name"] == "Remote Name"

    table = ok(e2e.stsync(cfg, "conflicts", "list")).stdout.strip().splitlines()
    assert table[0].split() == ["id", "entity", "mirror_id", "st_id", "field", "local_value", "remote_value",
                                "outcome", "detected_at"]
    (line,) = table[1:]
    assert line.split()[:5] == [str(c["id"]), "customer", str(ids[st]), str(st), "name"]
    assert "Local Name" in line and "Remote Name" in line and " remote " in line
    assert cli_json(e2e, cfg, "conflicts", "list", "--entity", "location") == []

    shown = json.loads(ok(e2e.stsync(cfg, "conflicts", "show", str(c["id"]))).stdout)
    assert {k: shown[k] for k in ("base_value", "local_value", "remote_value", "policy", "outcome", "kept")} == {
        "base_value": base, "local_value": "Local Name", "remote_value": "Remote Name", "policy": "remote_wins",
        "outcome": "remote", "kept": "Remote Name"}
    assert [r["id"] for r in shown["record_conflicts"]] == [c["id"]]
    missing = e2e.stsync(cfg, "conflicts", "show", "999999")
    assert missing.returncode == 1
    assert missing.stderr.strip() == "stsync: error: no conflict 999999: see `stsync conflicts list`"


# ---------------------------------------------------------------------------------------------- status


def test_status_json_counts_match_the_tables(e2e: Env) -> None:
    d = make_dead_rows(e2e)
    sql(e2e.engine, "INSERT INTO customers (name, type) VALUES ('Local Only Co', 'Residential')")
    gone = rows(e2e.engine, "SELECT id, st_id FROM locations WHERE id <> :m ORDER BY id LIMIT 1", m=d.loc_mid)[0]
    sql(e2e.engine, "DELETE FROM locations WHERE id = :m", m=gone[0])
    sql(e2e.engine, "UPDATE outbox SET state = 'pending', attempts = 0, completed_at = NULL, "
                    "next_attempt_at = now() + interval '1 hour' WHERE id = :o", o=d.alien_oid)  # not due yet
    cycle(e2e, d.cfg)

    status = cli_json(e2e, d.cfg, "status")
    counts = outbox_counts(e2e)
    assert counts == {"dead": 1, "pending": 1, "succeeded": 2}
    assert status["outbox"] == {s: counts.get(s, 0) for s in ("pending", "in_flight", "succeeded", "dead",
                                                              "superseded", "discarded", "held")}
    assert status["dead"] == 1
    assert status["oldest_pending_seconds"] is not None and status["oldest_pending_seconds"] >= 0
    assert status["to_create"] == {"customer": 1, "location": 0} and status["waiting_for_location"] == 1
    assert status["local_only"] == {"customer": 0, "location": 0}
    assert rows(e2e.engine, "SELECT sync_status FROM customers WHERE st_id IS NULL") == [("waiting_for_location",)]
    assert status["tombstones"] == 1
    assert rows(e2e.engine, "SELECT entity, mirror_id, st_id FROM tombstones") == [("location", gone[0], gone[1])]
    assert status["conflicts"] == 0
    assert status["change_log_backlog"] == 0
    assert status["rows_with_sync_error"] == {
        "customer": rows(e2e.engine, "SELECT count(*) FROM customers WHERE sync_error IS NOT NULL")[0][0],
        "location": 0}
    assert status["last_pull_at"] is not None
    assert set(status["cursors"]) == {"customers", "locations"}

    text_out = ok(e2e.stsync(d.cfg, "status")).stdout
    assert "pending=1  in_flight=0  succeeded=2  dead=1  superseded=0" in text_out
    assert "dead rows:      1" in text_out
    assert "to create:      customer=1  location=0   (rows without st_id; 1 customer(s) waiting" in text_out
    assert "tombstones:     1" in text_out


def test_local_delete_is_not_resurrected_by_the_pull_of_the_same_cycle(e2e: Env) -> None:
    e2e.sb.seed(customers=3, locations=3, seed=5)
    link_mirror(e2e.engine, e2e.sb)
    cfg = e2e.config()
    cycle(e2e, cfg)  # initial load done
    mid, st = rows(e2e.engine, "SELECT id, st_id FROM locations ORDER BY id LIMIT 1")[0]
    sql(e2e.engine, "DELETE FROM locations WHERE id = :m", m=mid)
    e2e.sb.edit_location(st, name="Edited In ServiceTitan")  # the record shows up in the feed again
    cycle(e2e, cfg)
    assert rows(e2e.engine, "SELECT st_id FROM tombstones") == [(st,)]
    assert rows(e2e.engine, "SELECT count(*) FROM locations WHERE st_id = :s", s=st) == [(0,)]


# ---------------------------------------------------------------------------------------------- while running


def daemon_started(env: Env) -> bool:
    return any("daemon.started" in p.read_text() for p in env.tmp.glob("daemon-*.log"))


@pytest.mark.slow
def test_retry_all_dead_while_the_daemon_runs_sends_once(e2e: Env) -> None:
    d = make_dead_rows(e2e)
    e2e.sb.tag_type_ids.add(UNKNOWN_TAG)  # the tag now exists in ServiceTitan: a resend can succeed
    proc = e2e.start(e2e.config(grace=2))
    try:
        wait_for(lambda: daemon_started(e2e), 30, "the daemon to start")
        assert ok(e2e.stsync(d.cfg, "outbox", "retry", "--all-dead")).stdout.strip() == "2 row(s) queued again"
        wait_for(lambda: outbox_row(e2e, d.tag_oid)["state"] == "succeeded", 30, "the retried row to land")
        wait_for(lambda: outbox_row(e2e, d.alien_oid)["state"] == "dead", 30, "the invalid row to end dead again")
        time.sleep(2.5)  # more dispatch runs (push interval 1 s): a duplicate send would show up here
        assert proc.poll() is None
    finally:
        assert stop(proc) == 0
    sent = patches(e2e, f"/customers/{d.tag_st}")
    assert [r.status for r in sent] == [400, 200]  # the original rejection, then exactly one resend
    assert sent[1].body["tagTypeIds"] == [UNKNOWN_TAG]
    assert e2e.sb.get_customer(d.tag_st)["tagTypeIds"] == [UNKNOWN_TAG]
    assert patches(e2e, f"/customers/{d.alien_st}") == []
    row = outbox_row(e2e, d.tag_oid)
    assert (row["state"], row["attempts"], row["last_status"]) == ("succeeded", 1, 200)
    assert rows(e2e.engine, "SELECT http_status FROM outbox_attempts WHERE outbox_id = :o ORDER BY id",
                o=d.tag_oid) == [(400,), (200,)]
    assert outbox_counts(e2e) == {"dead": 1, "succeeded": 3}
    assert mirror(e2e, d.tag_mid)["sync_status"] == "synced"


@pytest.mark.slow
def test_sigterm_on_an_idle_daemon_does_not_wait_out_the_grace_period(e2e: Env) -> None:
    e2e.sb.seed(customers=2, locations=0, seed=6)
    link_mirror(e2e.engine, e2e.sb)
    proc = e2e.start(e2e.config(grace=4))
    wait_for(lambda: daemon_started(e2e), 30, "the daemon to start")
    time.sleep(1.0)  # the first pull/detect/dispatch runs are over: nothing is in flight
    # (regression: the main task once registered itself as a running job and shutdown waited grace + 5 s on it)
    started = time.monotonic()
    assert stop(proc) == 0
    assert time.monotonic() - started < 3.0


def test_once_does_not_stay_counted_as_a_replica(e2e: Env) -> None:
    # (regression: `stsync once` heartbeated into `workers` and never left, so a daemon started within 10 s
    # counted two replicas and sent at half the tenant's rate)
    e2e.sb.seed(customers=2, locations=0, seed=6)
    link_mirror(e2e.engine, e2e.sb)
    ok(e2e.stsync(e2e.config(), "once"))
    assert rows(e2e.engine, "SELECT count(*) FROM workers") == [(0,)]


def test_a_wake_up_while_the_job_runs_is_not_lost(e2e: Env) -> None:
    # (regression: APScheduler skips a run that comes due while the job still runs, so a NOTIFY during a
    # dispatch run waited a whole push interval: 5.1 s from commit to PATCH in the latency benchmark)
    from apscheduler.schedulers.asyncio import AsyncIOScheduler

    cfg = load_config(e2e.config())
    calls: list[int] = []

    async def main() -> None:
        d = Daemon(cfg, engine=e2e.engine)
        d.scheduler = AsyncIOScheduler()
        started, release = asyncio.Event(), asyncio.Event()

        async def job() -> dict[str, Any]:
            calls.append(len(calls))
            if len(calls) == 1:
                started.set()
                await release.wait()
            return {}

        run = asyncio.create_task(d._tracked(job, "dispatch")())
        await started.wait()
        d.wake("dispatch")  # arrives while the first run is still under way
        release.set()
        await run
        d.wake("dispatch")  # after the run: an ordinary reschedule, no extra run here
        await asyncio.sleep(0.05)
        await d.close()

    asyncio.run(main())
    assert calls == [0, 1]


@pytest.mark.slow
def test_a_retry_due_before_the_next_run_is_sent_when_due(e2e: Env) -> None:
    # (regression: the dispatcher returned with the row waiting out a 1-s Retry-After and the next run came a
    # whole push interval later: a 5-s gap at the end of every benchmark drain)
    from sync.sandbox import Fault

    e2e.sb.seed(customers=1, locations=0, seed=6)
    link_mirror(e2e.engine, e2e.sb)
    cfg = e2e.config()
    cfg.write_text(cfg.read_text().replace("push_interval_seconds: 1", "push_interval_seconds: 15"))
    proc = e2e.start(cfg)
    try:
        wait_for(lambda: daemon_started(e2e), 30, "the daemon to start")
        time.sleep(1.0)
        e2e.sb.faults.add(Fault.rate_limited(1.0, "seconds"), method="PATCH")
        sql(e2e.engine, "UPDATE customers SET name = 'Waits out a 429'")
        wait_for(lambda: [r for r in e2e.sb.requests if r.method == "PATCH" and r.status == 200], 20, "the retry")
    finally:
        stop(proc)
    sent = [r for r in e2e.sb.requests if r.method == "PATCH"]
    assert [r.status for r in sent] == [429, 200]
    assert sent[1].time - sent[0].time < 3.0  # Retry-After 1 s, not the 15-s interval


# ---------------------------------------------------------------------------------------------- held deletes


def test_held_deletes_are_listed_released_and_sent_by_the_commands(e2e: Env) -> None:
    e2e.sb.seed(customers=3, locations=8, seed=5)
    link_mirror(e2e.engine, e2e.sb)
    cfg = e2e.config()  # its sync section, with the two keys added
    text_ = cfg.read_text().replace("sync:\n", "sync:\n  local_deletes: propagate\n  max_deletes_per_cycle: 3\n", 1)
    cfg.write_text(text_)
    doomed = [s for (s,) in rows(e2e.engine, "SELECT st_id FROM locations ORDER BY id LIMIT 5")]
    sql(e2e.engine, "DELETE FROM locations WHERE st_id = ANY(:s)", s=doomed)
    cycle(e2e, cfg)
    assert patches(e2e, "") == []
    held = cli_json(e2e, cfg, "outbox", "list", "--state", "held")
    assert sorted(r["st_id"] for r in held) == sorted(doomed)
    assert "held deletes:   5" in ok(e2e.stsync(cfg, "status")).stdout
    assert "5 held row(s) released" in ok(e2e.stsync(cfg, "outbox", "release", "--held")).stdout
    cycle(e2e, cfg)
    assert sorted(int(r.path.rsplit("/", 1)[-1]) for r in patches(e2e, "")) == sorted(doomed)
    assert all(e2e.sb.get_location(s)["active"] is False for s in doomed)
    usage = e2e.stsync(cfg, "outbox", "discard")
    assert usage.returncode == 2 and "give one outbox ID or --held" in usage.stderr


def test_retry_all_dead_while_detect_queues_a_row_of_the_same_record_supersedes_instead_of_failing(
        e2e: Env) -> None:
    import threading

    from sync.commands import outbox as outbox_admin

    d = make_dead_rows(e2e)
    entity, mid = rows(e2e.engine, "SELECT entity, mirror_id FROM outbox WHERE id = :o", o=d.alien_oid)[0]
    detect_like = e2e.engine.connect()
    tx = detect_like.begin()  # a detect transaction that has queued a pending row of the record, not committed
    detect_like.execute(text("INSERT INTO outbox (entity, mirror_id, st_id, payload, diff) "
                             "VALUES (:e, :m, NULL, '{}', '{}')"), {"e": entity, "m": mid})
    done: list[Any] = []

    def operator() -> None:
        try:
            with e2e.engine.begin() as conn:
                done.append(outbox_admin.retry(conn, all_dead=True))
        except Exception as exc:  # the test reports it
            done.append(exc)

    t = threading.Thread(target=operator)
    t.start()
    time.sleep(1.0)  # the retry now waits on the one-pending-row index for the detect transaction
    tx.commit()
    detect_like.close()
    t.join(30)
    assert done and not isinstance(done[0], Exception), done
    assert outbox_row(e2e, d.alien_oid)["state"] == "superseded"
    assert rows(e2e.engine, "SELECT count(*) FROM outbox WHERE entity = :e AND mirror_id = :m AND state = 'pending'",
                e=entity, m=mid) == [(1,)]


def test_a_second_sigterm_exits_at_once_and_what_was_committed_stays(e2e: Env) -> None:
    from sync.sandbox import Fault

    e2e.sb.seed(customers=3, locations=0, seed=6)
    ids = link_mirror(e2e.engine, e2e.sb)
    e2e.sb.faults.add(Fault.slow(30_000), endpoint="PATCH /customers/{id}", times=None)  # answers that never come
    proc = e2e.start(e2e.config(grace=60))
    wait_for(lambda: daemon_started(e2e), 30, "the daemon to start")
    sql(e2e.engine, "UPDATE customers SET name = 'Stuck Co' WHERE st_id = :s", s=min(ids))
    wait_for(lambda: rows(e2e.engine, "SELECT 1 FROM outbox WHERE state = 'in_flight'"), 30, "a request in flight")
    proc.send_signal(signal.SIGTERM)
    time.sleep(1.0)
    assert proc.poll() is None  # the first one waits for the request in flight (grace 60 s)
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 128 + signal.SIGTERM
    assert time.monotonic() - started < 5
    log = next(e2e.tmp.glob("daemon-*.log")).read_text()
    assert "daemon.stopped_at_once" in log and "Traceback" not in log
    # the committed state is there: the row is in flight under a lease another replica will take over
    assert rows(e2e.engine, "SELECT state, lease_expires_at IS NOT NULL FROM outbox") == [("in_flight", True)]


# ---------------------------------------------------------------------------------------------- pause / resume


def quiet_config(e2e: Env, extra: str = "") -> Path:
    """A daemon whose push interval is an hour: whatever it sends at once was woken by a NOTIFY."""
    path = e2e.config(extra=extra)
    path.write_text(path.read_text().replace("push_interval_seconds: 1", "push_interval_seconds: 3600"))
    return path


def test_pause_stops_sending_while_edits_queue_and_resume_sends_them_at_once(e2e: Env) -> None:
    import urllib.request

    from tests.e2ekit import free_port

    e2e.sb.seed(customers=3, locations=0, seed=6)
    ids = link_mirror(e2e.engine, e2e.sb)
    st = min(ids)
    port = free_port()
    cfg = quiet_config(e2e, extra=f"observability:\n  listen: 127.0.0.1:{port}")
    proc = e2e.start(cfg)
    try:
        wait_for(lambda: daemon_started(e2e), 30, "the daemon to start")
        said = ok(e2e.stsync(cfg, "pause", "--reason", "maintenance window")).stdout
        assert said.startswith("paused since ") and "nothing is sent until `stsync resume`" in said

        sql(e2e.engine, "UPDATE customers SET name = 'Paused Co' WHERE st_id = :s", s=st)
        wait_for(lambda: rows(e2e.engine, "SELECT 1 FROM outbox WHERE state = 'pending'"), 20,
                 "detect to queue the edit while paused")
        time.sleep(2.0)
        assert patches(e2e, f"/customers/{st}") == []
        status = cli_json(e2e, cfg, "status")
        assert status["paused"]["reason"] == "maintenance window" and "@" in status["paused"]["by"]
        assert status["outbox"]["pending"] == 1
        assert ok(e2e.stsync(cfg, "status")).stdout.startswith("PAUSED:         nothing is sent since ")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
            assert "stsync_paused 1.0" in answer.read().decode()

        resumed = time.monotonic()
        assert ok(e2e.stsync(cfg, "resume")).stdout.startswith("resumed (paused since ")
        wait_for(lambda: patches(e2e, f"/customers/{st}"), 15, "the queued edit to be sent after resume")
        assert time.monotonic() - resumed < 15  # woken by the NOTIFY, not by the hour-long interval
        assert e2e.sb.get_customer(st)["name"] == "Paused Co"
        assert cli_json(e2e, cfg, "status")["paused"] is None
        assert ok(e2e.stsync(cfg, "resume")).stdout.strip() == "not paused: nothing to resume"
    finally:
        assert stop(proc) == 0


# ---------------------------------------------------------------------------------------------- resync


def test_resync_merges_records_by_id_safely_and_all_restarts_the_feeds(e2e: Env) -> None:
    e2e.sb.seed(customers=3, locations=0, seed=6)
    ids = link_mirror(e2e.engine, e2e.sb)
    a, b = sorted(ids)[:2]
    cfg = e2e.config()
    e2e.sb.edit_customer(a, name="Remote Side")  # not pulled yet
    sql(e2e.engine, "UPDATE customers SET name = 'Local Side' WHERE st_id = :s", s=b)  # not sent yet
    r = e2e.stsync(cfg, "resync", "customer", str(a), str(b), "999999")
    assert r.returncode == 1, r.stderr  # one id is unknown to ServiceTitan: said, and the exit code says so
    assert r.stdout.strip() == "customers: 2 fetched, 1 changed the mirror, 0 conflicts; not found in ServiceTitan: 999999"
    assert mirror(e2e, ids[a])["name"] == "Remote Side"
    assert mirror(e2e, ids[b])["name"] == "Local Side"  # the unsent local edit stays, and is still to send
    assert rows(e2e.engine, "SELECT mirror_id FROM change_log") == [(ids[b],)]
    assert patches(e2e, "") == []

    ok(e2e.stsync(cfg, "once"))  # the first pull drains the feeds
    assert rows(e2e.engine, "SELECT bool_and(initial_load_done) FROM feed_cursors") == [(True,)]
    said = ok(e2e.stsync(cfg, "resync", "--all")).stdout
    assert said.startswith("feeds customers, locations start again from the beginning at the next pull")
    assert rows(e2e.engine, "SELECT feed, continue_from, initial_load_done FROM feed_cursors ORDER BY feed") == [
        ("customers", None, False), ("locations", None, False)]

    bad = e2e.stsync(cfg, "resync")
    assert bad.returncode == 1
    assert bad.stderr.strip().startswith("stsync: error: say what to resync: ")


def test_outbox_retry_wakes_a_running_daemon_to_send_at_once(e2e: Env) -> None:
    e2e.sb.seed(customers=2, locations=0, seed=6)
    ids = link_mirror(e2e.engine, e2e.sb)
    st = min(ids)
    cfg = quiet_config(e2e)  # an hour between dispatch runs: only a wake-up sends at once
    proc = e2e.start(cfg)
    try:
        wait_for(lambda: daemon_started(e2e), 30, "the daemon to start")
        sql(e2e.engine, "UPDATE customers SET name = '' WHERE st_id = :s", s=st)  # ServiceTitan answers 400
        wait_for(lambda: rows(e2e.engine, "SELECT id FROM outbox WHERE state = 'dead'"), 30, "the refused row")
        ((dead,),) = rows(e2e.engine, "SELECT id FROM outbox WHERE state = 'dead'")
        sent_before = len(patches(e2e, f"/customers/{st}"))
        assert sent_before == 1
        retried = time.monotonic()
        ok(e2e.stsync(cfg, "outbox", "retry", str(dead)))  # NOTIFYs `customers` (the mirror's status), then `retry`
        wait_for(lambda: len(patches(e2e, f"/customers/{st}")) == 2, 15, "the retried row to be sent")
        assert time.monotonic() - retried < 15
    finally:
        assert stop(proc) == 0
