"""Push latency: an idle `stsync run`, single local edits one at a time, commit -> PATCH received by the sandbox.

Steps: a throwaway database; the sandbox as a separate process (limit --rate/s, --latency-ms per request)
with --records records; the mirror loaded by `stsync once`; `stsync run` started and left to go idle; then
--edits times: one UPDATE of one random customer or location name in its own transaction, and the time from
COMMIT to the arrival of its PATCH at the sandbox (the sandbox's request log stamps arrival before applying
its latency, so nothing is subtracted). The next edit waits for the outbox row to succeed plus a random pause,
so every edit meets an idle daemon (woken by NOTIFY, not by the 5-s poll). The daemon's log splits each figure
into commit -> detect batch logged, and detect -> PATCH arrival.

Targets: p50 < 100 ms, p99 < 500 ms.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
from common import (
    SCHEMA,
    Run,
    SandboxProcess,
    base_parser,
    latency_range,
    median,
    percentile,
    psycopg_url,
    say,
    spawn,
    stsync_cmd,
    throwaway_database,
    write_config,
)
from sqlalchemy import text

from sync.db import engine as db


def stats(xs: list[float]) -> dict[str, float | None]:
    def r(v: float | None) -> float | None:
        return None if v is None else round(v, 1)

    return {"n": len(xs), "p50": r(median(xs)), "p90": r(percentile(xs, 90)), "p99": r(percentile(xs, 99)),
            "max": r(max(xs, default=None)), "mean": r(sum(xs) / len(xs)) if xs else None}


def main() -> None:
    p = base_parser(__doc__ or "")
    p.add_argument("--edits", type=int, default=200)
    p.add_argument("--records", type=int, default=1000, help="sandbox records (half customers, half locations)")
    p.add_argument("--rate", type=float, default=60.0, help="the sandbox's limit and requests_per_second")
    p.add_argument("--latency-ms", default="80,250", help="sandbox latency per request, uniform LO,HI")
    p.add_argument("--pause-ms", default="100,400", help="random pause between edits, LO,HI")
    args = p.parse_args()
    run = Run("latency", args)
    tmp = Path(tempfile.mkdtemp(prefix="stsync-bench-latency-"))
    customers, locations = (args.records + 1) // 2, args.records // 2
    pause_lo, pause_hi = latency_range(args.pause_ms)
    rng = random.Random(8)

    with throwaway_database(args.pg_url, "stsync_bench_latency", keep=args.keep) as url, \
            SandboxProcess(customers=customers, locations=locations, rate=args.rate,
                           latency_ms=latency_range(args.latency_ms), log_dir=tmp) as sb:
        cfg = write_config(tmp / "stsync.yaml", url=url, api=sb.url, rps=args.rate)
        out = subprocess.run(stsync_cmd(cfg, "once"), capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            raise SystemExit(f"stsync once failed: {out.stderr[-2000:]}")
        engine = db.make_engine(url, SCHEMA, pool_size=2)
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM workers"))  # `stsync once` leaves its replica row (see push bench)
            targets = [("customers", m, s) for m, s in conn.execute(text("SELECT id, st_id FROM customers"))]
            targets += [("locations", m, s) for m, s in conn.execute(text("SELECT id, st_id FROM locations"))]

        daemon = spawn(stsync_cmd(cfg, "run"), tmp / "daemon.log")
        time.sleep(6)  # started, first pull/detect/dispatch runs done: idle
        sb.reset_log()
        edit_conn = psycopg.connect(psycopg_url(url))
        samples: list[dict[str, Any]] = []
        misses = 0
        for i in range(args.edits):
            table, mid, st_id = rng.choice(targets)
            edit_conn.execute(f"UPDATE {SCHEMA}.{table} SET name = %s WHERE id = %s", (f"Latency edit {i}", mid))
            t_commit = time.time()
            edit_conn.commit()
            t_committed = time.time()
            arrival = wait_for_patch(sb, st_id, t_commit, timeout=15)
            if arrival is None:
                misses += 1
                say(f"  edit {i}: no PATCH for {table} {st_id} within 15 s")
                continue
            samples.append({"i": i, "table": table, "commit": t_commit, "committed": t_committed,
                            "arrival": arrival, "ms": (arrival - t_commit) * 1000,
                            "ms_from_committed": (arrival - t_committed) * 1000})
            wait_sent(engine, table, mid)
            if (i + 1) % 50 == 0:
                say(f"  {i + 1} edits: p50 so far {median([s['ms'] for s in samples]):.1f} ms")
            time.sleep(rng.uniform(pause_lo, pause_hi) / 1000)
        edit_conn.close()
        daemon.stop()
        engine.dispose()
        breakdown = split_by_log(daemon.log_path, samples)

    lat = [s["ms"] for s in samples]
    figures = {
        "edits": args.edits, "missed": misses,
        "commit_to_patch_ms": stats(lat),
        "committed_to_patch_ms": stats([s["ms_from_committed"] for s in samples]),
        "commit_duration_ms_p50": round(median([(s["committed"] - s["commit"]) * 1000 for s in samples]) or 0, 2),
        **breakdown,
        "daemon_peak_rss_mb": daemon.peak_rss_mb,
        "targets": {"p50_ms": 100, "p99_ms": 500},
    }
    say(f"commit -> PATCH received: p50 {figures['commit_to_patch_ms']['p50']} ms, "
        f"p99 {figures['commit_to_patch_ms']['p99']} ms, max {figures['commit_to_patch_ms']['max']} ms "
        f"over {len(lat)} edits")
    if args.keep:
        say(f"logs kept in {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    run.finish(**figures)


def wait_for_patch(sb: SandboxProcess, st_id: int, since: float, timeout: float) -> float | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for r in reversed(sb.requests(limit=20)):
            if r["method"] == "PATCH" and r["record_id"] == st_id and r["time"] >= since - 0.001:
                return float(r["time"])
        time.sleep(0.01)
    return None


def wait_sent(engine: Any, table: str, mid: int, timeout: float = 15) -> None:
    entity = "customer" if table == "customers" else "location"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            busy = conn.execute(text("SELECT count(*) FROM outbox WHERE entity = :e AND mirror_id = :m "
                                     "AND state IN ('pending', 'in_flight')"), {"e": entity, "m": mid}).scalar_one()
            log_rows = conn.execute(text("SELECT count(*) FROM change_log")).scalar_one()
        if not busy and not log_rows:
            return
        time.sleep(0.01)


def split_by_log(log_path: Path, samples: list[dict[str, Any]]) -> dict[str, Any]:
    """commit -> `detect.batch` logged (the batch that drained it) and detect -> PATCH arrival, from the log."""
    batches: list[float] = []
    for line in log_path.read_text().splitlines():
        if '"detect.batch"' not in line:
            continue
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if ev.get("rows"):
            batches.append(datetime.fromisoformat(ev["timestamp"].replace("Z", "+00:00")).timestamp())
    to_detect, detect_to_patch = [], []
    for s in samples:
        after = [b for b in batches if s["commit"] <= b <= s["arrival"]]
        if after:
            to_detect.append((after[0] - s["commit"]) * 1000)
            detect_to_patch.append((s["arrival"] - after[0]) * 1000)
    return {"commit_to_detect_logged_ms": stats(to_detect), "detect_logged_to_patch_ms": stats(detect_to_patch)}


if __name__ == "__main__":
    main()
