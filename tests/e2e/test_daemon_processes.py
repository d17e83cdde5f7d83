"""The daemon as a real process (`stsync run` / `stsync once`) against the sandbox on a socket."""

from __future__ import annotations

import json
import signal
import time
import urllib.request
from typing import Any

import pytest
from sqlalchemy import text

from sync.sandbox import Fault
from tests.e2ekit import Env, free_port, stop, wait_for
from tests.pushkit import link_mirror, rows, sql


def live(env: Env) -> list[dict[str, Any]]:
    """The customers ServiceTitan has not merged into others (an edit of a merged one is never sent: docs/push.md)."""
    return [c for c in env.sb.customers() if not c.get("mergedToId")]


def edit_all(env: Env, suffix: str) -> int:
    sql(env.engine, "UPDATE customers SET name = name || :s WHERE merged_to_id IS NULL", s=suffix)
    return len(live(env))


def outbox_states(env: Env) -> dict[str, int]:
    return dict(rows(env.engine, "SELECT state, count(*) FROM outbox GROUP BY state"))


def settled(env: Env, expected: int) -> bool:
    states = outbox_states(env)
    return states.get("succeeded", 0) == expected and not rows(env.engine, "SELECT 1 FROM change_log LIMIT 1")


def test_once_dry_run_sends_nothing_and_prints_exact_bodies(e2e: Env) -> None:
    e2e.sb.seed(customers=5, locations=5, seed=1)
    ids = link_mirror(e2e.engine, e2e.sb)
    st_id = min(ids)
    sql(e2e.engine, "UPDATE customers SET name = 'Dry Run Co' WHERE st_id = :s", s=st_id)
    before = len(e2e.sb.requests)
    proc = e2e.stsync(e2e.config(), "once", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    (req,) = summary["dispatch"]["requests"]
    assert req["path"] == f"/customers/{st_id}"
    assert req["body"] == {"name": "Dry Run Co", "externalData": {
        "patchMode": "Merge", "applicationGuid": "5f2b8a7e-3c1d-4e6f-9a0b-1c2d3e4f5a6b",
        "externalData": [{"key": "mirrorId", "value": str(ids[st_id])}]}}
    assert [r for r in e2e.sb.requests[before:] if r.method == "PATCH"] == []
    assert rows(e2e.engine, "SELECT count(*) FROM outbox") == [(0,)]
    assert rows(e2e.engine, "SELECT count(*) FROM change_log") == [(1,)]  # state untouched


def test_once_dry_run_predicts_a_create_and_creates_nothing(e2e: Env) -> None:
    e2e.sb.seed(customers=2, locations=2, seed=1)
    link_mirror(e2e.engine, e2e.sb)
    with e2e.engine.begin() as conn:
        cid = conn.execute(text("INSERT INTO customers (name, type, street, city, state, zip, country) VALUES "
                                "('Dry New Co', 'Residential', '1 A St', 'Reno', 'NV', '89501', 'USA') "
                                "RETURNING id")).scalar_one()
        conn.execute(text("INSERT INTO locations (customer_id, name, street, city, state, zip, country) VALUES "
                          "(:c, 'Dry New Site', '1 A St', 'Reno', 'NV', '89501', 'USA')"), {"c": cid})
    before = len(e2e.sb.customers())
    proc = e2e.stsync(e2e.config(), "once", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    (req,) = json.loads(proc.stdout)["dispatch"]["requests"]
    assert (req["method"], req["path"], req["valid"]) == ("POST", "/customers", True)
    assert [loc["name"] for loc in req["body"]["locations"]] == ["Dry New Site"]
    assert len(e2e.sb.customers()) == before
    assert rows(e2e.engine, "SELECT st_id FROM customers WHERE id = :c", c=cid) == [(None,)]


def test_once_pushes_and_exits_0(e2e: Env) -> None:
    e2e.sb.seed(customers=5, locations=5, seed=1)
    link_mirror(e2e.engine, e2e.sb)
    n = edit_all(e2e, " (once)")
    proc = e2e.stsync(e2e.config(), "once")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["dispatch"]["succeeded"] == n
    assert all(c["name"].endswith(" (once)") for c in live(e2e))


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_metrics_healthz_and_readyz_answer(e2e: Env) -> None:
    e2e.sb.seed(customers=3, locations=3, seed=1)
    link_mirror(e2e.engine, e2e.sb)
    sql(e2e.engine, "UPDATE customers SET type = 'Alien' WHERE st_id = (SELECT min(st_id) FROM customers)")
    port = free_port()
    proc = e2e.start(e2e.config(extra=f"observability:\n  listen: 127.0.0.1:{port}"))
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: _status(base + "/healthz") == 200, 30, "/healthz")
        _, body = wait_for(lambda: (r := http_get(base + "/readyz"))[0] == 200 and r, 30, "/readyz ready")
        assert json.loads(body) == {"ready": True, "checks": {"database": "ok", "servicetitan_token": "ok",
                                                              "scheduler": "ok"}}
        wait_for(lambda: outbox_states(e2e).get("dead") == 1, 30, "the invalid row to end dead")
        _, metrics = http_get(base + "/metrics")
        assert 'stsync_outbox_rows{state="dead"} 1.0' in metrics
        assert 'stsync_outbox_rows{state="pending"} 0.0' in metrics
        assert "stsync_oldest_pending_seconds" in metrics and "stsync_push_lag_seconds" in metrics
        assert "stsync_database_up 1.0" in metrics
        assert 'stsync_outbox_rows{state="held"} 0.0' in metrics
        assert 'stsync_rows_to_create{entity="customer"} 0.0' in metrics
        assert "stsync_customers_waiting_for_location 0.0" in metrics
        assert "stsync_send_rate_per_second " in metrics and "stsync_send_rate_ceiling_per_second " in metrics
        sql(e2e.engine, "UPDATE customers SET name = 'Metric Co' WHERE st_id = (SELECT max(st_id) FROM customers)")
        wait_for(lambda: 'stsync_requests_total{code="200",operation="PATCH /customers/{id}"} 1.0' in http_get(base + "/metrics")[1],
                 30, "the request counter")
    finally:
        assert stop(proc) == 0


@pytest.mark.slow
def test_sigterm_during_the_initial_load_stops_at_the_next_page_and_the_next_run_goes_on(e2e: Env) -> None:
    e2e.sb.seed(customers=4000, locations=0, seed=6)
    e2e.sb.latency_ms = (300, 400)  # every export page takes a while
    cfg = e2e.config(grace=5)
    proc = e2e.start(cfg, log_name="initial-load")
    seen = "SELECT coalesce(sum(records_seen), 0) FROM feed_cursors"
    wait_for(lambda: rows(e2e.engine, seen)[0][0] > 0, 60, "the first page of the initial load")
    began = time.monotonic()
    assert stop(proc, signal.SIGTERM, timeout=30) == 0
    assert time.monotonic() - began < 5  # at the next page boundary, well within the grace period
    loaded = rows(e2e.engine, "SELECT count(*) FROM customers")[0][0]
    assert 0 < loaded < 4000 and loaded == rows(e2e.engine, seen)[0][0]  # what was applied stays applied
    logs = "".join(p.read_text() for p in e2e.tmp.glob("initial-load-*.log"))
    assert "pull.stopped" in logs and "Traceback" not in logs and "CancelledError" not in logs
    e2e.sb.latency_ms = (0, 0)
    assert e2e.stsync(cfg, "once").returncode == 0
    assert rows(e2e.engine, "SELECT count(*) FROM customers") == [(4000,)]


@pytest.mark.parametrize("where", ["in use", "not on this machine"])
def test_a_listen_address_that_cannot_be_used_is_one_line_exit_2(e2e: Env, where: str) -> None:
    import socket as socket_mod

    taken = socket_mod.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        listen = f"127.0.0.1:{taken.getsockname()[1]}" if where == "in use" else "203.0.113.7:9464"
        proc = e2e.stsync(e2e.config(extra=f"observability:\n  listen: {listen}"), "run", timeout=30)
    finally:
        taken.close()
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stsync: error: observability.listen: cannot listen on "), lines
    assert listen in lines[0] and ("in use" in lines[0] or "address" in lines[0])


def _status(url: str) -> int | None:
    try:
        return http_get(url)[0]
    except OSError:
        return None


@pytest.mark.slow
def test_sigterm_during_busy_dispatch_exits_0_within_grace_and_loses_nothing(e2e: Env) -> None:
    e2e.sb.seed(customers=300, locations=0, seed=2)
    e2e.sb.latency_ms = (150, 250)
    link_mirror(e2e.engine, e2e.sb)
    n = edit_all(e2e, " (term)")
    cfg = e2e.config(rps=40, grace=3)
    proc = e2e.start(cfg)
    wait_for(lambda: outbox_states(e2e).get("succeeded", 0) >= 20, 60, "dispatch to get busy")
    started = time.monotonic()
    assert stop(proc, signal.SIGTERM, timeout=30) == 0
    assert time.monotonic() - started < 3 + 10
    assert outbox_states(e2e).get("in_flight", 0) == 0  # finished or released, no lease left behind
    proc2 = e2e.start(cfg)
    try:
        wait_for(lambda: settled(e2e, n), 120, "every edit to land after restart")
    finally:
        assert stop(proc2) == 0
    assert all(c["name"].endswith(" (term)") for c in live(e2e))


@pytest.mark.slow
def test_two_run_processes_never_send_the_same_row(e2e: Env) -> None:
    e2e.sb.seed(customers=400, locations=0, seed=3)
    e2e.sb.latency_ms = (20, 80)
    link_mirror(e2e.engine, e2e.sb)
    n = edit_all(e2e, " (pair)")
    cfg = e2e.config(rps=100)
    procs = [e2e.start(cfg, log_name="a"), e2e.start(cfg, log_name="b")]
    try:
        wait_for(lambda: settled(e2e, n), 120, "every edit to land")
    finally:
        codes = [stop(p) for p in procs]
    assert codes == [0, 0]
    attempts = rows(e2e.engine, "SELECT outbox_id, count(*) FROM outbox_attempts GROUP BY outbox_id HAVING count(*) > 1")
    assert attempts == []
    workers = {w.split(":")[1] for (w,) in rows(e2e.engine, "SELECT DISTINCT worker FROM outbox_attempts")}
    assert len(workers) == 2  # both processes did work
    patches = [r.path for r in e2e.sb.requests if r.method == "PATCH"]
    assert len(patches) == len(set(patches)) == n


@pytest.mark.slow
def test_process_killed_mid_dispatch_loses_nothing(e2e: Env) -> None:
    e2e.sb.seed(customers=300, locations=0, seed=4)
    e2e.sb.latency_ms = (100, 200)
    link_mirror(e2e.engine, e2e.sb)
    n = edit_all(e2e, " (kill)")
    cfg = e2e.config(rps=40)
    proc = e2e.start(cfg)
    wait_for(lambda: outbox_states(e2e).get("succeeded", 0) >= 20, 60, "dispatch to get busy")
    stop(proc, signal.SIGKILL)
    left: dict[str, Any] = outbox_states(e2e)
    assert left.get("in_flight", 0) > 0  # killed with claimed work
    proc2 = e2e.start(cfg)
    try:
        wait_for(lambda: quiet(e2e) and all(c["name"].endswith(" (kill)") for c in live(e2e)), 120,
                 "every edit to land after the kill")
    finally:
        assert stop(proc2) == 0
    # a PATCH the killed process sent but never recorded is seen by the restarted pull as already applied:
    # its reclaimed row ends superseded (nothing left to send) instead of being sent twice
    states = outbox_states(e2e)
    assert set(states) <= {"succeeded", "superseded"} and sum(states.values()) == n, states
    assert rows(e2e.engine, "SELECT count(*) FROM customers WHERE sync_status <> 'synced'") == [(0,)]


@pytest.mark.slow
def test_process_killed_while_creates_are_in_flight_creates_each_record_exactly_once(e2e: Env) -> None:
    e2e.sb.seed(customers=2, locations=2, seed=4)
    link_mirror(e2e.engine, e2e.sb)
    e2e.sb.faults.add(Fault.late_answer(4000), endpoint="POST /customers")  # applied at once, answered late
    names = [f"Kill Create {i}" for i in range(12)]
    for name in names:
        with e2e.engine.begin() as conn:
            cid = conn.execute(text("INSERT INTO customers (name, type, street, city, state, zip, country) "
                                    "VALUES (:n, 'Residential', '1 Main St', 'Springfield', 'IL', '62701', 'USA') "
                                    "RETURNING id"), {"n": name}).scalar_one()
            conn.execute(text("INSERT INTO locations (customer_id, name, street, city, state, zip, country) "
                              "VALUES (:c, :n, '1 Main St', 'Springfield', 'IL', '62701', 'USA')"),
                         {"c": cid, "n": name})
    cfg = e2e.config()
    proc = e2e.start(cfg)
    wait_for(lambda: any(c["name"] in names for c in e2e.sb.customers()), 60, "a create to be applied")
    stop(proc, signal.SIGKILL)  # its answers are still on their way: every applied create is unrecorded
    assert outbox_states(e2e).get("in_flight", 0) > 0
    proc2 = e2e.start(cfg)
    try:
        wait_for(lambda: quiet(e2e) and rows(e2e.engine, "SELECT count(*) FROM customers WHERE st_id IS NULL")
                 == [(0,)], 120, "every create to land after the kill")
    finally:
        assert stop(proc2) == 0
    made = sorted(c["name"] for c in e2e.sb.customers() if c["name"] in names)
    assert made == sorted(names)  # exactly one record each
    assert rows(e2e.engine, "SELECT count(*) FROM locations WHERE st_id IS NULL") == [(0,)]
    assert len([loc for loc in e2e.sb.locations() if loc["name"] in names]) == len(names)


def quiet(env: Env) -> bool:
    return not rows(env.engine, "SELECT 1 FROM outbox WHERE state IN ('pending', 'in_flight') "
                                "UNION ALL SELECT 1 FROM change_log LIMIT 1")


def test_run_waits_out_an_unreachable_database_and_stops_on_sigterm(tmp_path: Any) -> None:
    import os
    import subprocess
    import sys

    cfg = tmp_path / "down.yaml"
    cfg.write_text("database:\n  url: postgresql://postgres@127.0.0.1:9/nowhere\nservicetitan:\n  tenant_id: 1\n"
                   "  client_id: c\n  client_secret: s3cr3t-xyz\n  app_key: k\n  application_guid: g\n")
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "STSYNC_CONFIG")}
    proc = subprocess.Popen([sys.executable, "-m", "sync", "--config", str(cfg), "run"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    time.sleep(4)
    assert proc.poll() is None  # still waiting, not crash-looping
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0
    events = [json.loads(line)["event"] for line in out.splitlines() if line.startswith("{")]
    assert events.count("daemon.database_unreachable") in (2, 3)  # 1 s, then 2 s backoff: no tight loop
    assert events[-1] == "daemon.stopped"
    assert "s3cr3t-xyz" not in out


@pytest.mark.slow
def test_three_replicas_share_the_rate_limit_and_survive_one_being_killed(e2e: Env) -> None:
    e2e.sb.seed(customers=450, locations=0, seed=5)
    e2e.sb.latency_ms = (20, 60)
    e2e.sb.configure(rate_limit_per_second=30.0)  # ServiceTitan enforces the tenant's limit across all replicas
    link_mirror(e2e.engine, e2e.sb)
    n = edit_all(e2e, " (trio)")
    cfg = e2e.config(rps=30)
    procs = [e2e.start(cfg, log_name=f"r{i}") for i in range(3)]
    try:
        wait_for(lambda: outbox_states(e2e).get("succeeded", 0) >= 150, 90, "a third of the backlog")
        stop(procs[0], signal.SIGKILL)  # the others carry on (and take over its leases)
        wait_for(lambda: quiet(e2e) and all(c["name"].endswith(" (trio)") for c in live(e2e)), 180,
                 "every edit to land")
    finally:
        codes = [stop(p) for p in procs[1:]]
    assert codes == [0, 0]
    patches = [r for r in e2e.sb.requests if r.method == "PATCH"]
    limited = [r for r in patches if r.status == 429]
    # some 429s when a replica joins or dies: the others keep their old share until their next heartbeat (2 s);
    # a 429 costs no attempt and pauses senders 0.1 s (docs/push.md: a longer shared pause halved throughput).
    # Seen: 2.6% and 5.3% of PATCHes depending on machine load; this bound only catches a broken share. The
    # limit itself is proven on the accepted requests just below.
    assert len(limited) <= 0.12 * len(patches), (len(limited), len(patches))
    # never more than the limit (plus one window's slack) in any one-second window, all replicas together
    times = sorted(r.time for r in patches if r.status != 429)
    worst = max(sum(1 for t in times[i:i + 60] if t - times[i] < 1.0) for i in range(len(times)))
    assert worst <= 30 * 1.1, worst
    states = outbox_states(e2e)
    assert set(states) <= {"succeeded", "superseded"} and sum(states.values()) == n
