"""Experiment, not a benchmark: detect done entirely in PostgreSQL (docs/benchmarks.md, detect plan item 5).

One statement per batch drains the change log, compares each changed customer with its shadow column by column
(conservatively: a value that is not certainly equal counts as a change, which the claim would supersede if the
exact diff in Python is empty), upserts the outbox rows with the diff built in SQL (the payload is left to the
claim, which recomputes and validates the body anyway) and flips ``sync_status``. Python never touches a row.

Same mirror and changes as bench/detect_throughput.py (1,000,000 customers with canonical shadows, 100,000 rows
changed by one statement); each batch size is measured on its own round. A sample of the SQL diffs is checked
against ``sync.diff.local_diff``. Nothing in sync/ is modified.

    .venv/bin/python bench/experiments/sql_detect.py [--rows 1000000] [--batch-sizes 500,5000]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import SCHEMA, Run, base_parser, say, throwaway_database
from detect_throughput import LOAD_CUSTOMERS, LOAD_SHADOW, write_one_statement
from sqlalchemy import Engine, text

from sync.core.diff import local_diff
from sync.core.fields import writable_fields
from sync.db import engine as db
from sync.db import mirror as records


def column_diff_sql(mirror_id_key: str = "mirrorId") -> str:
    """jsonb {column: [shadow value, mirror value]} of the writable customer columns that may differ."""
    parts = []
    for f in writable_fields("customer"):
        c = f.column
        base = f"s.data->'{c}'"
        if f.kind == "id_list":
            local = f"to_jsonb(ARRAY(SELECT DISTINCT v FROM unnest(coalesce(m.{c}, '{{}}')) v ORDER BY v))"
            base = f"coalesce({base}, '[]'::jsonb)"
        elif f.kind == "custom_fields":
            local, base = f"coalesce(m.{c}, '{{}}'::jsonb)", f"coalesce({base}, '{{}}'::jsonb)"
        elif f.kind == "external_data":
            local = f"(coalesce(m.{c}, '{{}}'::jsonb) - '{mirror_id_key}')"
            base = f"(coalesce({base}, '{{}}'::jsonb) - '{mirror_id_key}')"
        else:
            local, base = f"coalesce(to_jsonb(m.{c}), 'null'::jsonb)", f"coalesce({base}, 'null'::jsonb)"
        parts.append(f"'{c}', CASE WHEN {local} IS DISTINCT FROM {base} THEN jsonb_build_array({base}, {local}) END")
    return "jsonb_strip_nulls(jsonb_build_object(" + ", ".join(parts) + "))"


def detect_sql() -> str:
    return f"""
WITH drained AS (
    DELETE FROM change_log WHERE id IN (
        SELECT id FROM change_log ORDER BY id LIMIT :n FOR UPDATE SKIP LOCKED)
    RETURNING entity, mirror_id, op, changed_at),
changed AS (
    SELECT mirror_id, max(changed_at) FILTER (WHERE op <> 'R') AS t, count(*) AS n FROM drained
    WHERE entity = 'customer' AND op <> 'D' GROUP BY mirror_id),
diffs AS (
    SELECT m.id, m.st_id, c.t, {column_diff_sql()} AS d
    FROM changed c JOIN customers m ON m.id = c.mirror_id
    JOIN shadow s ON s.entity = 'customer' AND s.mirror_id = m.id
    WHERE m.st_id IS NOT NULL),
up AS (
    INSERT INTO outbox (entity, mirror_id, st_id, payload, diff, local_changed_at)
    SELECT 'customer', id, st_id, '{{}}'::jsonb, d, t FROM diffs WHERE d <> '{{}}'::jsonb
    ON CONFLICT (entity, mirror_id) WHERE state = 'pending'
    DO UPDATE SET diff = EXCLUDED.diff, st_id = EXCLUDED.st_id, updated_at = now(),
                  local_changed_at = GREATEST(outbox.local_changed_at, EXCLUDED.local_changed_at)
    RETURNING mirror_id),
flipped AS (
    UPDATE customers SET sync_status = 'pending' FROM up
    WHERE customers.id = up.mirror_id AND customers.sync_status <> 'pending'
    RETURNING 1)
SELECT (SELECT count(*) FROM drained), (SELECT count(*) FROM up), (SELECT count(*) FROM flipped)
"""


def drain(engine: Engine, batch: int) -> tuple[int, int, float]:
    sql = text(detect_sql())
    drained = enqueued = 0
    started = time.perf_counter()
    while True:
        with engine.begin() as conn:
            db.bypass_triggers(conn)
            n, up, _ = conn.execute(sql, {"n": batch}).one()
        drained += n
        enqueued += up
        if n < batch:
            return drained, enqueued, time.perf_counter() - started


def check_sample(engine: Engine, size: int = 2000) -> int:
    """Outbox rows whose SQL diff names other columns than sync.diff.local_diff does (must be 0 here)."""
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT mirror_id, diff FROM outbox ORDER BY random() LIMIT :n"), {"n": size}).all()
        mirror = records.load_mirror(conn, "customer", [m for m, _ in rows])
        shadows = records.load_shadows(conn, "customer", mirror)
    bad = 0
    for mid, diff in rows:
        want = local_diff("customer", mirror[mid].record, shadows[mid])
        bad += set(want) != set(diff)
    return bad


def main() -> None:
    p = base_parser(__doc__ or "")
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--batch-sizes", default="500,5000")
    args = p.parse_args()
    run = Run("sql_detect_experiment", args)
    results: dict[str, Any] = {}
    with throwaway_database(args.pg_url, "stsync_bench_sqldetect", keep=args.keep) as url:
        engine = db.make_engine(url, SCHEMA, pool_size=1)
        with engine.begin() as conn:
            db.bypass_triggers(conn)
            conn.execute(text(LOAD_CUSTOMERS), {"n": args.rows})
            conn.execute(text(LOAD_SHADOW))
        with engine.begin() as conn:
            conn.execute(text("ANALYZE"))
        say(f"{args.rows} customers + shadows loaded")
        for k, batch in enumerate(int(b) for b in args.batch_sizes.split(",")):
            write_s = write_one_statement(engine, k)
            drained, enqueued, secs = drain(engine, batch)
            mismatched = check_sample(engine)
            results[f"batch_{batch}"] = {"rows": drained, "enqueued": enqueued, "detect_s": round(secs, 2),
                                         "rows_per_s": round(drained / secs), "write_s": round(write_s, 2),
                                         "sample_diffs_not_matching_python": mismatched}
            say(f"batch {batch}: {drained} rows in {secs:.2f} s = {drained / secs:,.0f} rows/s "
                f"({enqueued} enqueued; sample of 2000 diffs vs Python: {mismatched} differ)")
            with engine.begin() as conn:
                conn.execute(text("TRUNCATE outbox CASCADE"))
        engine.dispose()
    run.finish(**results)


if __name__ == "__main__":
    main()
