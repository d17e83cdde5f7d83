"""Push utilization: drain a backlog of changed records through `stsync run` against a rate-limited sandbox.

Steps: a throwaway database; the sandbox as a separate process (`stsync sandbox`, enforcing --rate requests/s,
--latency-ms per request) seeded with --records records (half customers, half locations); the mirror loaded by
the real pull (`stsync once`); one UPDATE per table changes every record (the backlog, --records change-log
rows); then `stsync run` (requests_per_second = --rate) until the outbox is drained.

Figures (from the sandbox's request log, i.e. what ServiceTitan would see): achieved PATCH requests/s between
the first and the last PATCH / the limit (target >= 0.98), 429 share of all PATCHes (target < 0.5%), time to
drain (daemon start -> outbox empty), the rate per 10-s window, and the daemon's peak RSS (wait4 ru_maxrss)
and CPU per request. The check before sending (docs/push.md): list requests made (`checks`), their share of the
rate budget (`check_share_of_budget_pct`), and the window per PATCH, from the last list request that named the
record to the PATCH's arrival (`check_window_s`: median, p99, max). --no-check turns it off.
--profile-seconds attaches py-spy to the daemon mid-drain.
"""

from __future__ import annotations

import bisect
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from common import (
    PY,
    SCHEMA,
    Run,
    SandboxProcess,
    base_parser,
    latency_range,
    median,
    percentile,
    print_profile,
    proc_cpu,
    pyspy_attach,
    say,
    spawn,
    stsync_cmd,
    summarize_profile,
    throwaway_database,
    write_config,
)
from sqlalchemy import text

from sync.db import engine as db


def main() -> None:
    p = base_parser(__doc__ or "")
    p.add_argument("--records", type=int, default=20_000, help="backlog size (changed records)")
    p.add_argument("--rate", type=float, default=60.0,
                   help="requests/s: the sandbox's enforced limit and stsync's requests_per_second")
    p.add_argument("--latency-ms", default="80,250", help="sandbox latency per request, uniform LO,HI")
    p.add_argument("--max-concurrency", type=int, default=32, help="servicetitan.max_concurrency")
    p.add_argument("--client-rate", type=float, default=None,
                   help="stsync's requests_per_second if it should differ from the sandbox's limit (experiments)")
    p.add_argument("--exp-max-pause", type=float, default=None,
                   help="experiment: cap the limiter's pause after a 429 at this many seconds "
                        "(runs the daemon through bench/experiments/capped_pause.py)")
    p.add_argument("--exp-rewind", action="store_true",
                   help="experiment: a 429 pause restarts the limiter's slot schedule at its end (see "
                        "bench/experiments/capped_pause.py)")
    p.add_argument("--exp-window-guard", type=float, default=None,
                   help="experiment: a sliding-window limiter over release times with this guard in seconds "
                        "(see bench/experiments/capped_pause.py)")
    p.add_argument("--no-check", action="store_true", help="sync.check_before_send: false")
    p.add_argument("--profile-seconds", type=float, default=0.0,
                   help="py-spy the daemon for this long, from 15 s after the first PATCH (0: no profile)")
    args = p.parse_args()
    n = args.records
    run = Run(f"push_utilization_{args.rate:g}rps_{n}", args)
    tmp = Path(tempfile.mkdtemp(prefix="stsync-bench-push-"))
    customers, locations = (n + 1) // 2, n // 2

    with throwaway_database(args.pg_url, "stsync_bench_push", keep=args.keep) as url, \
            SandboxProcess(customers=customers, locations=locations, rate=args.rate,
                           latency_ms=latency_range(args.latency_ms), log_dir=tmp) as sb:
        client_rate = args.client_rate or args.rate
        cfg = write_config(tmp / "stsync.yaml", url=url, api=sb.url, rps=client_rate,
                           concurrency=args.max_concurrency, check_before_send=not args.no_check)
        say("loading the mirror with `stsync once` (the real pull) ...")
        t = time.monotonic()
        out = subprocess.run(stsync_cmd(cfg, "once"), capture_output=True, text=True, timeout=1800)
        if out.returncode != 0:
            raise SystemExit(f"stsync once failed: {out.stderr[-2000:]}")
        load_s = time.monotonic() - t
        engine = db.make_engine(url, SCHEMA, pool_size=2)
        with engine.begin() as conn:
            got = conn.execute(text("SELECT (SELECT count(*) FROM customers), (SELECT count(*) FROM locations)")).one()
            assert tuple(got) == (customers, locations), got
            t = time.monotonic()
            conn.execute(text("UPDATE customers SET name = name || ' *'"))
            conn.execute(text("UPDATE locations SET name = name || ' *'"))
        backlog_write_s = time.monotonic() - t
        with engine.connect() as conn:
            logged = conn.execute(text("SELECT count(*) FROM change_log")).scalar_one()
        assert logged == n, logged
        with engine.begin() as conn:
            # `stsync once` leaves its replica row behind (it never calls workers.leave): for up to 10 s the
            # daemon would count 2 replicas and send at half the rate. Remove it: the one-shot run is long gone.
            stale_workers = conn.execute(text("DELETE FROM workers")).rowcount
        say(f"mirror loaded in {load_s:.1f} s; backlog of {logged} changed records written in {backlog_write_s:.2f} s")

        sb.reset_log()
        sb_cpu0 = proc_cpu(sb.proc.pid)
        t_start = time.time()
        cmd = stsync_cmd(cfg, "run")
        if args.exp_window_guard is not None:
            os.environ["STSYNC_EXP_WINDOW_GUARD"] = str(args.exp_window_guard)
        if args.exp_max_pause is not None or args.exp_rewind or args.exp_window_guard is not None:
            os.environ["STSYNC_EXP_MAX_PAUSE"] = str(args.exp_max_pause or 1e9)
            os.environ["STSYNC_EXP_REWIND"] = "1" if args.exp_rewind else "0"
            cmd = [PY, str(Path(__file__).parent / "experiments" / "capped_pause.py"), *cmd[3:]]
        daemon = spawn(cmd, tmp / "daemon.log")
        say(f"stsync run pid {daemon.pid}: draining ...")
        first_sent_at: float | None = None
        profiler = None
        prof_path = tmp / "push.pyspy.txt"
        deadline = time.monotonic() + n / args.rate * 3 + 300
        last_print = 0.0
        daemon_cpu = 0.0
        while True:
            time.sleep(0.5)
            with engine.connect() as conn:
                log_left, active, ok, dead = conn.execute(text("""
                    SELECT (SELECT count(*) FROM change_log),
                           count(*) FILTER (WHERE state IN ('pending', 'in_flight')),
                           count(*) FILTER (WHERE state = 'succeeded'), count(*) FILTER (WHERE state = 'dead')
                    FROM outbox""")).one()
            now = time.time()
            if ok and first_sent_at is None:
                first_sent_at = now
            if (args.profile_seconds and profiler is None and first_sent_at is not None
                    and now - first_sent_at > 15):
                say(f"py-spy recording the daemon for {args.profile_seconds:g} s")
                profiler = pyspy_attach(daemon.pid, args.profile_seconds, prof_path)
            if now - last_print > 15:
                say(f"  t={now - t_start:6.1f}s change_log={log_left} pending/in_flight={active} "
                    f"succeeded={ok} dead={dead}")
                last_print = now
            if daemon.proc.poll() is not None:
                raise SystemExit(f"stsync run exited early ({daemon.proc.returncode}): see {daemon.log_path}")
            daemon_cpu = proc_cpu(daemon.pid)
            if log_left == 0 and active == 0 and ok + dead >= n:
                break
            if time.monotonic() > deadline:
                raise SystemExit("the backlog did not drain in time")
        t_done = time.time()
        sb_cpu = proc_cpu(sb.proc.pid) - sb_cpu0
        if profiler is not None:
            profiler.wait(timeout=args.profile_seconds + 60)
        daemon.stop()
        reqs = sb.requests()
        with engine.connect() as conn:
            att = conn.execute(text("""
                SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms),
                       percentile_cont(0.99) WITHIN GROUP (ORDER BY latency_ms), count(*)
                FROM outbox_attempts WHERE http_status BETWEEN 200 AND 299""")).one()
            states = dict(conn.execute(text("SELECT state, count(*) FROM outbox GROUP BY state")).all())
        engine.dispose()

    figures = analyse(reqs, args.rate, n, t_start, t_done)
    tag = f"push-{args.rate:g}rps-client{client_rate:g}-c{args.max_concurrency}-{n}"
    if args.no_check:
        tag += "-nocheck"
    if args.exp_max_pause is not None:
        tag += f"-pause{args.exp_max_pause:g}"
        figures["exp_max_pause_s"] = args.exp_max_pause
    if args.exp_window_guard is not None:
        tag += f"-window{args.exp_window_guard:g}"
        figures["exp_window_guard_s"] = args.exp_window_guard
    if args.exp_rewind:
        tag += "-rewind"
        figures["exp_rewind"] = True
    timeline = Path(__file__).parent / "results" / f"{tag}-timeline.csv"
    timeline.parent.mkdir(exist_ok=True)
    write_timeline(reqs, timeline)
    arrivals = timeline.with_name(f"{tag}-arrivals.csv")
    arrivals.write_text("time,status,record_id\n" + "".join(
        f"{r['time']:.6f},{r['status']},{r['record_id']}\n" for r in reqs if r["method"] == "PATCH"))
    figures["timeline_csv"] = timeline.name
    figures["arrivals_csv"] = arrivals.name
    figures.update({
        "backlog": n, "limit_rps": args.rate, "max_concurrency": args.max_concurrency,
        "latency_ms": args.latency_ms, "outbox_states": states,
        "client_latency_ms_p50": round(att[0] or 0, 1), "client_latency_ms_p99": round(att[1] or 0, 1),
        "daemon_peak_rss_mb": daemon.peak_rss_mb, "daemon_rss_timeline_mb": daemon.rss_timeline_mb(),
        "daemon_cpu_s": round(daemon_cpu, 1), "daemon_cpu_ms_per_request": round(daemon_cpu * 1000 / n, 2),
        "sandbox_cpu_ms_per_request": round(sb_cpu * 1000 / max(1, len(reqs)), 2),
        "client_rate_rps": client_rate, "stale_worker_rows_removed": stale_workers,
        "mirror_load_s": round(load_s, 1), "backlog_write_s": round(backlog_write_s, 2),
    })
    if profiler is not None:
        prof = summarize_profile(prof_path)
        print_profile("stsync run while draining", prof)
        figures["profile"] = prof
        keep = Path(__file__).parent / "results" / f"push-{args.rate:g}rps.pyspy.txt"
        keep.parent.mkdir(exist_ok=True)
        shutil.copy(prof_path, keep)
    say(f"achieved {figures['achieved_rps']} req/s of {args.rate:g} -> utilization {figures['utilization']}; "
        f"429 share {figures['share_429_pct']}%; drained in {figures['time_to_drain_s']} s; "
        f"peak RSS {daemon.peak_rss_mb} MB")
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        say(f"logs kept in {tmp}")
    run.finish(**figures)


def write_timeline(reqs: list[dict[str, Any]], path: Path) -> None:
    """Per second since the first PATCH: PATCHes answered 2xx, 429s."""
    patches = [r for r in reqs if r["method"] == "PATCH"]
    if not patches:
        return
    t0 = min(r["time"] for r in patches)
    rows: dict[int, list[int]] = {}
    for r in patches:
        row = rows.setdefault(int(r["time"] - t0), [0, 0])
        row[0 if 200 <= r["status"] < 300 else 1] += 1
    lines = ["second,ok,rejected"] + [f"{s},{v[0]},{v[1]}" for s, v in sorted(rows.items())]
    path.write_text("\n".join(lines) + "\n")


def analyse(reqs: list[dict[str, Any]], limit: float, n: int, t_start: float, t_done: float) -> dict[str, Any]:
    patches = [r for r in reqs if r["method"] == "PATCH"]
    ok = sorted(r["time"] for r in patches if 200 <= r["status"] < 300)
    r429 = [r for r in patches if r["status"] == 429]
    other = [r for r in patches if not (200 <= r["status"] < 300) and r["status"] != 429]
    if len(ok) < 2:
        return {"error": "fewer than two successful PATCHes"}
    first, last = ok[0], ok[-1]
    span = last - first
    achieved = (len(ok) - 1) / span
    admitted = [r for r in reqs if r["endpoint"] != "POST /connect/token" and r["status"] != 429
                and first <= r["time"] <= last]
    # rate per 10-s window over the drain (full windows only)
    windows: list[float] = []
    w = first
    while w + 10 <= last:
        windows.append(sum(1 for x in ok if w <= x < w + 10) / 10)
        w += 10
    # the worst 1-s count seen by the sandbox's own sliding window (should never exceed the limit)
    worst = 0
    j = 0
    for i, x in enumerate(ok):
        while ok[j] <= x - 1.0:
            j += 1
        worst = max(worst, i - j + 1)
    # the check before sending: list requests naming records (GET /customers?ids=..., /locations?ids=...)
    checks = [r for r in reqs if r["method"] == "GET" and r["endpoint"] in ("GET /customers", "GET /locations")
              and "ids" in parse_qs(r.get("query") or "")]
    checked_at: dict[int, list[float]] = {}
    for r in checks:
        for i in parse_qs(r["query"])["ids"][0].split(","):
            checked_at.setdefault(int(i), []).append(r["time"])
    gaps: list[float] = []
    for r in patches:
        if 200 <= r["status"] < 300 and r["record_id"] is not None:
            times = checked_at.get(r["record_id"], [])
            i = bisect.bisect_right(times, r["time"])
            if i:
                gaps.append(r["time"] - times[i - 1])
    in_span = [r for r in checks if first <= r["time"] <= last]
    return {
        "checks": len(checks), "checks_per_patch": round(len(checks) / max(1, len(patches)), 4),
        "check_share_of_budget_pct": round(100 * len(in_span) / span / limit, 2),
        "patches_checked": len(gaps),
        "check_window_s": {"median": median(gaps), "p99": percentile(gaps, 99),
                           "max": round(max(gaps), 3) if gaps else None},
        "patches_ok": len(ok), "patches_429": len(r429), "patches_other": len(other),
        "share_429_pct": round(100 * len(r429) / max(1, len(patches)), 3),
        "achieved_rps": round(achieved, 2), "utilization": round(achieved / limit, 4),
        "admitted_rps_all_endpoints": round((len(admitted) - 1) / span, 2),
        "rps_10s_windows": {"min": min(windows, default=None), "p5": percentile(windows, 5),
                            "median": median(windows), "max": max(windows, default=None)},
        "max_ok_in_any_1s": worst,
        "first_patch_after_start_s": round(first - t_start, 2),
        "send_span_s": round(span, 1),
        "time_to_drain_s": round(t_done - t_start, 1),
        "ideal_drain_s": round(n / limit, 1),
    }


if __name__ == "__main__":
    main()
