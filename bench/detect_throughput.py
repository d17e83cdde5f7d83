"""Detect + diff + enqueue throughput on a large mirror, and the cost of an idle detect poll.

Steps: a throwaway database; --rows customers bulk-loaded with SQL together with their shadow rows in the
canonical JSON of sync/fields.py (so an unchanged row diffs empty: checked on a sample); then, --repeat times
each:

- **one statement**: ``UPDATE customers SET name = name || ' (edited)' WHERE id % 10 = k`` (--rows/10 rows);
- **separate transactions**: the same for another --rows/10 rows, one autocommitted UPDATE per row, from
  --writers parallel connections;

each followed by ``sync.stages.detect.detect_all`` (the daemon's detect job, batch_size --batch-size) in a separate
process, which drains the change log into the outbox. Figures: write time, detect rows/s (target >= 20,000/s),
the detect process's peak RSS (ru_maxrss), for a 10x smaller backlog too; then ``EXPLAIN (ANALYZE, BUFFERS)``
of the detect query on the empty change log (must not touch the mirror), right after the drain and after
VACUUM, the wall time of an idle ``detect_batch`` call, and the dispatcher's idle claim query.
--profile runs one extra drain under py-spy.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
from common import (
    PY,
    PY_SPY,
    SCHEMA,
    Run,
    base_parser,
    bench_config,
    median,
    percentile,
    print_profile,
    psycopg_url,
    read_status,
    say,
    summarize_profile,
    throwaway_database,
)
from sqlalchemy import Engine, text

from sync.db import engine as db

LOAD_CUSTOMERS = """
INSERT INTO customers (id, st_id, name, type, street, unit, city, state, zip, country, latitude, longitude,
                       active, do_not_mail, do_not_service, tag_type_ids, custom_fields, external_data, balance,
                       tax_exempt, created_on, created_by_id, modified_on, merged_to_id, sync_status, synced_at)
SELECT g, 10000000 + g, 'Customer ' || g, CASE WHEN g % 5 = 0 THEN 'Commercial' ELSE 'Residential' END,
       (g % 9999 + 1) || ' Main St', CASE WHEN g % 7 = 0 THEN 'Apt ' || (g % 50) END,
       (ARRAY['Springfield', 'Riverside', 'Franklin', 'Greenville'])[g % 4 + 1], 'IL',
       lpad((g % 99999)::text, 5, '0'), 'USA',
       round((30 + (g % 1000) / 100.0)::numeric, 6)::float8, round((-90 - (g % 997) / 100.0)::numeric, 6)::float8,
       g % 13 <> 0, g % 11 = 0, false,
       CASE WHEN g % 3 = 0 THEN ARRAY[1001, 1004]::bigint[] ELSE '{}'::bigint[] END,
       CASE WHEN g % 4 = 0 THEN jsonb_build_object('101', 'Gate ' || g) ELSE '{}'::jsonb END, '{}'::jsonb,
       (g % 100000) / 100.0, g % 17 = 0, timestamptz '2020-01-01 00:00:00+00' + g * interval '1 minute', 9000,
       timestamptz '2023-01-01 00:00:00+00' + g * interval '1 second', NULL, 'synced', now()
FROM generate_series(1, :n) g
"""

# the shadow holds canonical values keyed by mirror column (sync/fields.py, sync/records.py)
LOAD_SHADOW = """
INSERT INTO shadow (entity, mirror_id, st_id, data, modified_on)
SELECT 'customer', c.id, c.st_id, jsonb_build_object(
           'name', c.name, 'type', c.type, 'street', c.street, 'unit', c.unit, 'city', c.city, 'state', c.state,
           'zip', c.zip, 'country', c.country, 'latitude', c.latitude, 'longitude', c.longitude,
           'active', c.active, 'do_not_mail', c.do_not_mail, 'do_not_service', c.do_not_service,
           'tag_type_ids', to_jsonb(c.tag_type_ids), 'custom_fields', c.custom_fields,
           'external_data', c.external_data, 'balance', c.balance::float8, 'tax_exempt', c.tax_exempt,
           'created_on', to_char(c.created_on AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS') || '+00:00',
           'created_by_id', c.created_by_id,
           'modified_on', to_char(c.modified_on AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS') || '+00:00',
           'merged_to_id', c.merged_to_id),
       c.modified_on
FROM customers c
"""

DETECT_QUERY = """DELETE FROM change_log WHERE id IN (
    SELECT id FROM change_log ORDER BY id LIMIT 500 FOR UPDATE SKIP LOCKED)
RETURNING entity, mirror_id, op, old_row"""

CLAIM_QUERY = """
WITH due AS (
    SELECT o.id FROM outbox o
    WHERE o.state = 'pending' AND o.next_attempt_at <= now()
      AND NOT EXISTS (SELECT 1 FROM outbox f WHERE f.entity = o.entity
                      AND f.mirror_id = o.mirror_id AND f.state = 'in_flight')
    ORDER BY o.next_attempt_at, o.id
    LIMIT 32 FOR UPDATE SKIP LOCKED)
UPDATE outbox o SET state = 'in_flight', lease_owner = 'bench', lease_expires_at = now() + interval '30 s',
       updated_at = now()
FROM due WHERE o.id = due.id
RETURNING o.id, o.entity, o.mirror_id, o.attempts"""


# ------------------------------------------------------------------------------------------------ worker


PENDING_LOOKUP = "SELECT mirror_id FROM outbox WHERE entity = :e AND state = 'pending' AND mirror_id = ANY(:ids)"
NO_LOOKUP = ("SELECT mirror_id FROM outbox WHERE false AND entity = :e "
             "AND mirror_id = ANY(CAST(:ids AS bigint[]))")


def patch_pending_lookup() -> None:
    """Experiment (--exp-skip-pending-lookup): detect without its pending-row lookup, i.e. what detect costs
    once that lookup is folded into the upsert (``RETURNING (xmax <> 0)`` tells which rows coalesced; see
    bench/experiments/pending_lookup.py). Exact for this benchmark, where no changed record has a pending row.
    Rewrites that one SQL string as sync.stages.detect builds it; nothing in sync/ is modified."""
    raise SystemExit("--exp-skip-pending-lookup is obsolete: detect has had no pending-row lookup since the "
                     "upsert counts coalesced rows itself (RETURNING (xmax <> 0))")


def worker(url: str, batch_size: int, exp_skip_lookup: bool = False) -> None:
    """Child process: detect_all once, print {duration_s, result, peak RSS} as JSON."""
    from sync.stages.detect import detect_all

    if exp_skip_lookup:
        patch_pending_lookup()

    cfg = bench_config(url, batch_size=batch_size)
    engine = db.make_engine(url, SCHEMA, pool_size=1)
    with engine.connect() as conn:  # connect before the clock starts, as a running daemon would be
        conn.execute(text("SELECT 1"))
    t = time.perf_counter()
    result = detect_all(engine, cfg)
    duration = time.perf_counter() - t
    engine.dispose()
    import resource

    print(json.dumps({"duration_s": duration, "result": result.as_dict(),
                      "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      "vmhwm_kb": read_status(os.getpid()).get("VmHWM", 0)}))


def run_detect(url: str, batch_size: int, profile_to: Path | None = None,
               exp_skip_lookup: bool = False) -> dict[str, Any]:
    cmd = [PY, __file__, "--worker", url, "--batch-size", str(batch_size),
           *(["--exp-skip-pending-lookup"] if exp_skip_lookup else [])]
    if profile_to is not None:
        # wall clock (--idle): detect is one synchronous thread, so waits on PostgreSQL show as such
        cmd = [PY_SPY, "record", "--format", "raw", "--rate", "100", "--nonblocking", "--idle",
               "-o", str(profile_to), "--", *cmd]
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "STSYNC_CONFIG")}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if out.returncode != 0:
        raise SystemExit(f"detect worker failed: {out.stderr[-3000:]}")
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("{")][-1]
    data: dict[str, Any] = json.loads(line)
    return data


# ------------------------------------------------------------------------------------------------ writes


def write_one_statement(engine: Engine, k: int, modulus: int = 10) -> float:
    t = time.perf_counter()
    with engine.begin() as conn:
        conn.execute(text("UPDATE customers SET name = name || ' (edited)' WHERE id % :m = :k"),
                     {"m": modulus, "k": k})
    return time.perf_counter() - t


def write_separate(url: str, ids: list[int], writers: int) -> float:
    """One autocommitted UPDATE per row, ``writers`` connections in parallel."""
    chunks = [ids[i::writers] for i in range(writers)]
    conns = [psycopg.connect(psycopg_url(url), autocommit=True) for _ in range(writers)]
    errors: list[BaseException] = []

    def write(conn: psycopg.Connection[Any], chunk: list[int]) -> None:
        try:
            for mid in chunk:
                conn.execute("UPDATE stsync.customers SET name = name || ' (edited)' WHERE id = %s", (mid,))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(c, ch)) for c, ch in zip(conns, chunks, strict=True)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    elapsed = time.perf_counter() - t
    for c in conns:
        c.close()
    if errors:
        raise errors[0]
    return elapsed


def count(engine: Engine, sql: str) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text(sql)).scalar_one())


def drain_and_check(engine: Engine, url: str, expected: int, batch_size: int,
                    profile_to: Path | None = None, exp_skip_lookup: bool = False) -> dict[str, Any]:
    logged = count(engine, "SELECT count(*) FROM change_log")
    assert logged == expected, (logged, expected)
    res = run_detect(url, batch_size, profile_to, exp_skip_lookup)
    pending = count(engine, "SELECT count(*) FROM outbox WHERE state = 'pending'")
    left = count(engine, "SELECT count(*) FROM change_log")
    assert pending == expected and left == 0, (pending, left)
    with engine.begin() as conn:  # the next round starts from an empty outbox
        conn.execute(text("TRUNCATE outbox CASCADE"))
    rows = res["result"]["rows"]
    return {"rows": rows, "detect_s": round(res["duration_s"], 2), "rows_per_s": round(rows / res["duration_s"]),
            "peak_rss_mb": round(max(res["maxrss_kb"], res["vmhwm_kb"]) / 1024, 1), "result": res["result"]}


# ------------------------------------------------------------------------------------------------ idle poll


def explain(engine: Engine, sql: str) -> list[str]:
    with engine.connect() as conn:
        trans = conn.begin()
        plan = [r[0] for r in conn.execute(text("EXPLAIN (ANALYZE, BUFFERS, TIMING) " + sql))]
        trans.rollback()
    return plan


def idle_poll(engine: Engine, url: str, label: str) -> dict[str, Any]:
    from sync.stages.detect import detect_batch

    plan = explain(engine, DETECT_QUERY)
    mirror_touched = any(t in line for line in plan for t in (" customers", " locations", " shadow"))
    cfg = bench_config(url)
    times = []
    for _ in range(200):
        t = time.perf_counter()
        detect_batch(engine, cfg)
        times.append((time.perf_counter() - t) * 1000)
    exec_ms = next((ln.split(":", 1)[1].strip() for ln in plan if ln.startswith("Execution Time")), None)
    buffers = next((ln.strip() for ln in plan if "Buffers:" in ln), None)
    say(f"idle detect poll ({label}): execution {exec_ms}, {buffers}; detect_batch wall p50 "
        f"{median(times):.2f} ms; touches the mirror: {mirror_touched}")
    return {"plan": plan, "execution_time": exec_ms, "top_buffers": buffers, "touches_mirror": mirror_touched,
            "detect_batch_wall_ms_p50": round(median(times) or 0, 2),
            "detect_batch_wall_ms_p99": round(percentile(times, 99) or 0, 2)}


# ------------------------------------------------------------------------------------------------ main


def main() -> None:
    p = base_parser(__doc__ or "")
    p.add_argument("--rows", type=int, default=1_000_000, help="mirror size (customers)")
    p.add_argument("--repeat", type=int, default=3, help="rounds of each kind (one statement, separate)")
    p.add_argument("--writers", type=int, default=4, help="parallel writer connections (separate transactions)")
    p.add_argument("--batch-size", type=int, default=500, help="sync.batch_size for detect")
    p.add_argument("--profile", action="store_true", help="one extra one-statement drain under py-spy")
    p.add_argument("--exp-skip-pending-lookup", action="store_true",
                   help="experiment: detect without its pending-row lookup (see patch_pending_lookup); no "
                        "effect from commit 31ac5fb on, which removed that lookup from sync/detect.py")
    p.add_argument("--one-statement-only", action="store_true",
                   help="skip the separate-transactions rounds and the small backlog (experiments)")
    p.add_argument("--worker", metavar="URL", help=argparse_hidden())
    args = p.parse_args()
    if args.worker:
        worker(args.worker, args.batch_size, args.exp_skip_pending_lookup)
        return
    n_changes = args.rows // 10
    if 2 * args.repeat + (1 if args.profile else 0) > 9:
        raise SystemExit("at most 9 rounds (one id % 10 class each; class 9 is for the small-backlog check)")
    run = Run(f"detect_throughput_{args.rows}" + ("_exp_skip_lookup" if args.exp_skip_pending_lookup else "")
              + (f"_batch{args.batch_size}" if args.batch_size != 500 else ""), args)
    figures: dict[str, Any] = {"mirror_rows": args.rows, "changes_per_round": n_changes,
                               "batch_size": args.batch_size, "writers": args.writers}
    with throwaway_database(args.pg_url, "stsync_bench_detect", keep=args.keep) as url:
        engine = db.make_engine(url, SCHEMA, pool_size=2)
        t = time.perf_counter()
        with engine.begin() as conn:
            db.bypass_triggers(conn)
            conn.execute(text(LOAD_CUSTOMERS), {"n": args.rows})
            conn.execute(text("SELECT setval(pg_get_serial_sequence('customers', 'id'), :n)"), {"n": args.rows})
            conn.execute(text(LOAD_SHADOW))
        with engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("VACUUM ANALYZE"))
        figures["bulk_load_s"] = round(time.perf_counter() - t, 1)
        say(f"{args.rows} customers + shadows loaded in {figures['bulk_load_s']} s")
        figures["sample_diffs_empty"] = check_sample(engine, url)

        k = 0
        one, sep = [], []
        for i in range(args.repeat):
            w = write_one_statement(engine, k)
            r = drain_and_check(engine, url, n_changes, args.batch_size, exp_skip_lookup=args.exp_skip_pending_lookup)
            r["write_s"] = round(w, 2)
            one.append(r)
            say(f"one statement #{i + 1}: {n_changes} rows written in {w:.2f} s; detect {r['detect_s']} s = "
                f"{r['rows_per_s']} rows/s, peak RSS {r['peak_rss_mb']} MB")
            k += 1
        for i in range(0 if args.one_statement_only else args.repeat):
            ids = list(range(k if k else 10, args.rows + 1, 10))
            w = write_separate(url, ids, args.writers)
            r = drain_and_check(engine, url, len(ids), args.batch_size, exp_skip_lookup=args.exp_skip_pending_lookup)
            r["write_s"] = round(w, 2)
            r["write_tx_per_s"] = round(len(ids) / w)
            sep.append(r)
            say(f"separate transactions #{i + 1}: {len(ids)} rows written in {w:.1f} s "
                f"({r['write_tx_per_s']} tx/s, {args.writers} writers); detect {r['detect_s']} s = "
                f"{r['rows_per_s']} rows/s, peak RSS {r['peak_rss_mb']} MB")
            k += 1
        # a 10x smaller backlog (id % 100 = 99, inside the unused class 9): is detect's memory flat?
        small: dict[str, Any] = {}
        if not args.one_statement_only:
            write_one_statement(engine, 99, modulus=100)
            small = drain_and_check(engine, url, args.rows // 100, args.batch_size,
                                    exp_skip_lookup=args.exp_skip_pending_lookup)
            say(f"small backlog ({small['rows']} rows): {small['rows_per_s']} rows/s, "
                f"peak RSS {small['peak_rss_mb']} MB")

        figures["one_statement"] = {"rounds": one, "median_rows_per_s": median([r["rows_per_s"] for r in one]),
                                    "median_write_s": median([r["write_s"] for r in one]),
                                    "median_detect_s": median([r["detect_s"] for r in one])}
        figures["separate_transactions"] = {
            "rounds": sep, "median_rows_per_s": median([r["rows_per_s"] for r in sep]),
            "median_write_s": median([r["write_s"] for r in sep]),
            "median_detect_s": median([r["detect_s"] for r in sep])}
        figures["small_backlog"] = small
        figures["detect_peak_rss_mb"] = max(r["peak_rss_mb"] for r in [*one, *sep, small] if r)

        if args.profile:
            prof_path = Path(tempfile.gettempdir()) / f"detect-{os.getpid()}.pyspy.txt"
            write_one_statement(engine, k)
            r = drain_and_check(engine, url, n_changes, args.batch_size, profile_to=prof_path,
                                exp_skip_lookup=args.exp_skip_pending_lookup)
            prof = summarize_profile(prof_path, within="detect_all")
            print_profile("detect_all (wall clock, 100 Hz)", prof)
            figures["profile"] = {"rows_per_s_under_profiler": r["rows_per_s"], **prof}
            keep = Path(__file__).parent / "results" / "detect.pyspy.txt"
            keep.parent.mkdir(exist_ok=True)
            keep.write_text(prof_path.read_text())
            prof_path.unlink()

        # idle poll on the 1M-row mirror: change log empty (100k+ dead tuples just deleted), then vacuumed
        figures["idle_poll_after_drain"] = idle_poll(engine, url, "right after draining")
        with engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("VACUUM change_log"))
        figures["idle_poll_after_vacuum"] = idle_poll(engine, url, "after VACUUM change_log")
        with engine.begin() as conn:  # the dispatcher's idle poll: an outbox of finished rows, nothing due
            conn.execute(text("""INSERT INTO outbox (entity, mirror_id, st_id, state, payload, diff, completed_at)
                                 SELECT 'customer', id, st_id, 'succeeded', '{}', '{}', now()
                                 FROM customers WHERE id % 10 = 0"""))
        with engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("ANALYZE outbox"))
        claim = explain(engine, CLAIM_QUERY)
        figures["idle_claim"] = {
            "outbox_rows": count(engine, "SELECT count(*) FROM outbox"), "plan": claim,
            "execution_time": next((ln.split(":", 1)[1].strip() for ln in claim
                                    if ln.startswith("Execution Time")), None)}
        say(f"idle claim on {figures['idle_claim']['outbox_rows']} finished outbox rows: "
            f"{figures['idle_claim']['execution_time']}")
        engine.dispose()

    say(f"detect: one statement {figures['one_statement']['median_rows_per_s']} rows/s, separate transactions "
        f"{figures['separate_transactions']['median_rows_per_s']} rows/s (median of {args.repeat}; target 20000)")
    run.finish(**figures)


def check_sample(engine: Engine, url: str, size: int = 2000) -> bool:
    """Unchanged rows must diff empty against their bulk-loaded shadow (else the benchmark measures nonsense)."""
    from sync.core.plan import plan_record
    from sync.db import mirror as records
    from sync.db import shadow

    cfg = bench_config(url)
    with engine.connect() as conn:
        ids = [m for (m,) in conn.execute(text("SELECT id FROM customers TABLESAMPLE SYSTEM (1) LIMIT :n"),
                                          {"n": size})]
        rows = records.load_mirror(conn, "customer", ids)
        shadows = shadow.load_shadows(conn, "customer", rows)
    settings = cfg.patch_settings()
    bad = {mid: diff for mid, row in rows.items()
           if (diff := plan_record(settings, "customer", mid, row.record, shadows[mid])[0])}
    if bad:
        raise SystemExit(f"bulk-loaded shadow differs from its mirror row, e.g. {next(iter(bad.items()))}")
    say(f"sample of {len(rows)} unchanged rows: every diff empty")
    return True


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    sys.exit(main())
