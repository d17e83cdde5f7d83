#!/usr/bin/env bash
# Every figure of docs/benchmarks.md, one after the other (about an hour on a 2-core machine).
# Needs PostgreSQL at 127.0.0.1:5432 (or BENCH_PG_URL) and the project's venv; the profiles need py-spy next to
# the venv's python (`.venv/bin/pip install py-spy`; not a project dependency), else they are skipped.
# Each script prints a JSON summary as its last stdout line and saves it under bench/results/; the whole output
# is kept in bench/results/run_all-*.log.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-../.venv/bin/python}
mkdir -p results
LOG=results/run_all-$(date -u +%Y%m%dT%H%M%SZ).log
if [ -x "$(dirname "$PY")/py-spy" ]; then PROFILING=1; else PROFILING=0; echo "no py-spy: no profiles" >&2; fi
prof() { if [ "$PROFILING" = 1 ]; then echo "$@"; fi; }

run() {
  echo "== $* ($(uptime))" | tee -a "$LOG"
  "$PY" "$@" 2>&1 | tee -a "$LOG"
}

# shellcheck disable=SC2046  # prof's output is meant to split into arguments
{
run detect_throughput.py $(prof --profile)                                       # 2. detect, idle poll
run initial_load.py $(prof --profile)                                            # 4. initial load
run latency.py                                                                   # 3. commit -> PATCH
run push_utilization.py --records 20000 $(prof --profile-seconds 30)             # 1. push at 60/s
run push_utilization.py --records 5000                                           # 5. memory vs backlog size
run push_utilization.py --records 20000 --rate 600 $(prof --profile-seconds 30)  # 1. where stsync tops out
}
echo "== done; summaries in bench/results/ (log: bench/$LOG)"
