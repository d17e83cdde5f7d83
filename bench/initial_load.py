"""Initial load: `stsync once` into an empty mirror from the sandbox's export feeds.

Steps: the sandbox as a separate process seeded with --customers + --locations, export pages of --page-size,
--latency-ms per request, limit --rate/s; then --repeat times: a fresh migrated database and one `stsync once`
(pull: both feeds drained, then detect and dispatch, which find nothing). Figures: records/s over the pull
(the feeds' own durations, from the command's JSON summary) and over the whole process (start to exit, with
imports and connecting), peak RSS of the process (wait4 ru_maxrss). --profile adds one more run under
py-spy (Python CPU, GIL holder) and reports where it goes.

Target: >= 6,000 records/s (100,000 customers + 150,000 locations, pages of 5,000).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from common import (
    SCHEMA,
    Run,
    SandboxProcess,
    base_parser,
    latency_range,
    median,
    print_profile,
    say,
    spawn,
    stsync_cmd,
    summarize_profile,
    throwaway_database,
    write_config,
)
from sqlalchemy import text

from sync.db import engine as db


def one_load(args: Any, sb: SandboxProcess, tmp: Path, i: int, profile_to: Path | None = None) -> dict[str, Any]:
    with throwaway_database(args.pg_url, "stsync_bench_load", keep=args.keep) as url:
        cfg = write_config(tmp / f"stsync-{i}.yaml", url=url, api=sb.url, rps=args.rate)
        t = time.monotonic()
        child = spawn(stsync_cmd(cfg, "once"), tmp / f"once-{i}.log", profile_to=profile_to)
        rc = child.wait(timeout=3600)
        wall = time.monotonic() - t
        if rc != 0:
            raise SystemExit(f"stsync once failed ({rc}): see {child.log_path}")
        summary = None
        for line in child.log_path.read_text().splitlines():
            if line.startswith("{") and '"pull":' in line:
                with_keys = json.loads(line)
                if {"pull", "detect", "dispatch"} <= set(with_keys):
                    summary = with_keys
        if summary is None:
            raise SystemExit(f"no summary from stsync once: see {child.log_path}")
        engine = db.make_engine(url, SCHEMA, pool_size=1)
        with engine.connect() as conn:
            got = conn.execute(text("SELECT (SELECT count(*) FROM customers), (SELECT count(*) FROM locations), "
                                    "(SELECT count(*) FROM shadow), (SELECT count(*) FROM outbox)")).one()
        engine.dispose()
    pull = summary["pull"]
    n = args.customers + args.locations
    assert tuple(got) == (args.customers, args.locations, n, 0), got
    pull_s = sum(pull[f]["duration_s"] for f in ("customers", "locations"))
    res = {"records": n, "pull_s": round(pull_s, 1), "process_wall_s": round(wall, 1),
           "records_per_s_pull": round(n / pull_s), "records_per_s_process": round(n / wall),
           "customers_per_s": pull["customers"]["rate"], "locations_per_s": pull["locations"]["rate"],
           "pages": pull["customers"]["pages"] + pull["locations"]["pages"],
           "peak_rss_mb": child.peak_rss_mb, "cpu_s": child.cpu_s, "rss_timeline_mb": child.rss_timeline_mb()}
    say(f"load #{i}: {n} records, pull {pull_s:.1f} s = {res['records_per_s_pull']} records/s "
        f"(process {wall:.1f} s = {res['records_per_s_process']}/s), peak RSS {res['peak_rss_mb']} MB")
    return res


def main() -> None:
    p = base_parser(__doc__ or "")
    p.add_argument("--customers", type=int, default=100_000)
    p.add_argument("--locations", type=int, default=150_000)
    p.add_argument("--page-size", type=int, default=5000, help="sandbox export_page_size")
    p.add_argument("--latency-ms", default="80,250", help="sandbox latency per request, uniform LO,HI")
    p.add_argument("--rate", type=float, default=60.0, help="the sandbox's limit and requests_per_second")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--profile", action="store_true", help="one more load under py-spy")
    args = p.parse_args()
    run = Run(f"initial_load_{args.customers + args.locations}", args)
    tmp = Path(tempfile.mkdtemp(prefix="stsync-bench-load-"))
    figures: dict[str, Any] = {}
    with SandboxProcess(customers=args.customers, locations=args.locations, rate=args.rate,
                        latency_ms=latency_range(args.latency_ms), page_size=args.page_size, log_dir=tmp) as sb:
        runs = [one_load(args, sb, tmp, i + 1) for i in range(args.repeat)]
        figures["runs"] = runs
        for key in ("records_per_s_pull", "records_per_s_process", "pull_s", "peak_rss_mb"):
            figures[f"median_{key}"] = median([r[key] for r in runs])
        if args.profile:
            prof_path = tmp / "load.pyspy.txt"
            r = one_load(args, sb, tmp, 0, profile_to=prof_path)
            prof = summarize_profile(prof_path)
            print_profile("stsync once, initial load (Python CPU: GIL holder)", prof)
            figures["profile"] = {"records_per_s_pull_under_profiler": r["records_per_s_pull"], **prof}
            keep = Path(__file__).parent / "results" / "initial_load.pyspy.txt"
            keep.parent.mkdir(exist_ok=True)
            shutil.copy(prof_path, keep)
    if args.keep:
        say(f"logs kept in {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    say(f"initial load: median {figures['median_records_per_s_pull']} records/s over the pull "
        f"({figures['median_records_per_s_process']}/s for the whole process); target 6000")
    run.finish(**figures)


if __name__ == "__main__":
    main()
