"""Experiment, not a benchmark: detect's "which of these records have a pending outbox row" query on a big outbox.

`sync.detect._detect_entity` runs, per batch of 500 records,
``SELECT mirror_id FROM outbox WHERE entity = :e AND state = 'pending' AND mirror_id = ANY(:ids)``. While a large
backlog is drained into a fresh outbox the table's statistics still say "empty", and the planner scans every
pending row of the entity (index condition on ``entity`` only, ``mirror_id = ANY`` as a filter): each batch
costs O(pending rows), the drain O(n^2). This script times that query and two alternatives on --pending rows:

- current, statistics taken while the outbox was empty (what a drain sees until autoanalyze runs);
- current, after ANALYZE;
- ``JOIN unnest(:ids)`` (one index probe per id whatever the statistics say);
- no lookup at all: the upsert's ``RETURNING (xmax <> 0)`` says which rows were coalesced into a pending row.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import DEFAULT_PG, SCHEMA, say
from sqlalchemy import bindparam, text
from sqlalchemy.dialects.postgresql import ARRAY, BIGINT

from sync import embedded
from sync.db import engine as db

IDS = bindparam("ids", type_=ARRAY(BIGINT))
CURRENT = text("SELECT mirror_id FROM outbox WHERE entity = :e AND state = 'pending' "
               "AND mirror_id = ANY(:ids)").bindparams(IDS)
UNNEST = text("SELECT o.mirror_id FROM unnest(:ids) AS t(id) JOIN outbox o ON o.entity = :e "
              "AND o.state = 'pending' AND o.mirror_id = t.id").bindparams(IDS)
UPSERT = text("""INSERT INTO outbox (entity, mirror_id, st_id, payload, diff)
                 SELECT :e, t.m, t.m, '{}', '{}' FROM unnest(:ids) AS t(m)
                 ON CONFLICT (entity, mirror_id) WHERE state = 'pending'
                 DO UPDATE SET payload = EXCLUDED.payload, updated_at = now()
                 RETURNING mirror_id, (xmax <> 0) AS coalesced""").bindparams(IDS)


def timed(engine: object, stmt: object, ids_sets: list[list[int]], rollback: bool = False) -> float:
    times = []
    for ids in ids_sets:
        with engine.connect() as conn:  # type: ignore[attr-defined]
            t = time.perf_counter()
            conn.execute(stmt, {"e": "customer", "ids": ids}).all()
            times.append((time.perf_counter() - t) * 1000)
            if rollback:
                conn.rollback()
    return round(statistics.median(times), 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pg-url", default=DEFAULT_PG)
    p.add_argument("--pending", type=int, default=100_000)
    args = p.parse_args()
    name = f"stsync_bench_exp_{uuid.uuid4().hex[:8]}"
    url = embedded.create_database(args.pg_url, name)
    try:
        engine = db.make_engine(url, SCHEMA, pool_size=1)
        db.upgrade(engine, SCHEMA)
        with engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("ANALYZE outbox"))  # empty
        with engine.begin() as conn:
            conn.execute(text("""INSERT INTO outbox (entity, mirror_id, st_id, payload, diff)
                                 SELECT 'customer', g, g, '{}', '{}' FROM generate_series(1, :n) g"""),
                         {"n": args.pending})
        # batches as detect sees them: 500 ids, half of them with a pending row
        sets = [list(range(start, start + 1000, 2)) for start in range(args.pending - 500, 20 * 1000 + args.pending
                                                                       - 500, 1000)][:20]
        out = {"pending_rows": args.pending,
               "current_stale_stats_ms": timed(engine, CURRENT, sets),
               "unnest_join_stale_stats_ms": timed(engine, UNNEST, sets),
               "upsert_returning_xmax_ms": timed(engine, UPSERT, sets, rollback=True)}
        with engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("ANALYZE outbox"))
        out["current_after_analyze_ms"] = timed(engine, CURRENT, sets)
        engine.dispose()
    finally:
        embedded.drop_database(args.pg_url, name)
    say(json.dumps(out, indent=1))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
