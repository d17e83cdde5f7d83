"""Shared plumbing for the benchmarks: throwaway databases, the sandbox as a separate process, `stsync`
subprocesses with their peak RSS, load averages, py-spy profiles and the JSON summary line.

Nothing here is timed by itself; each ``bench/*.py`` script measures one figure (see ``bench/README.md``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PY = sys.executable
DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/postgres"
SCHEMA = "stsync"
APP_GUID = "5f2b8a7e-3c1d-4e6f-9a0b-1c2d3e4f5a6b"
PY_SPY = str(Path(PY).parent / "py-spy")


# ------------------------------------------------------------------------------------------------ arguments


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--pg-url", default=os.environ.get("BENCH_PG_URL", DEFAULT_PG),
                   help="admin URL of the PostgreSQL server; a throwaway database is created and dropped on it "
                        "(env BENCH_PG_URL)")
    p.add_argument("--keep", action="store_true", help="keep the throwaway database and the logs (debugging)")
    return p


def latency_range(text: str) -> tuple[float, float]:
    lo, _, hi = text.partition(",")
    return float(lo), float(hi or lo)


# ------------------------------------------------------------------------------------------------ machine


def loadavg() -> list[float]:
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "load average: " + ", ".join(f"{x:.2f}" for x in loadavg())


def machine(pg_url: str) -> dict[str, Any]:
    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    pg = "?"
    with contextlib.suppress(Exception):
        import psycopg

        with psycopg.connect(pg_url.replace("postgresql+psycopg://", "postgresql://")) as conn:
            row = conn.execute("SHOW server_version").fetchone()
            pg = row[0] if row else "?"
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_gb": round(mem_kb / 1024 / 1024, 1),
            "kernel": platform.release(), "python": platform.python_version(), "postgresql": pg}


def code_version() -> dict[str, Any]:
    """The commit measured, and which files under sync/ differed from it (others may be editing)."""
    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], capture_output=True, text=True, cwd=ROOT, timeout=10).stdout.rstrip("\n")
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"commit": git("rev-parse", "--short", "HEAD"),
            "sync_changed": [ln[3:] for ln in git("status", "--short", "--", "sync", "migrations").splitlines()]}


class Run:
    """Collects a benchmark's summary: load before/after, machine, figures; prints the JSON line at the end."""

    def __init__(self, name: str, args: argparse.Namespace) -> None:
        self.name = name
        self.started = time.time()
        self.summary: dict[str, Any] = {
            "benchmark": name,
            "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "args": {k: v for k, v in vars(args).items() if k != "pg_url"},
            "machine": machine(args.pg_url),
            "code": code_version(),
            "uptime_before": uptime(),
            "load_before": loadavg(),
        }
        say(f"[{name}] {self.summary['uptime_before']}")

    def finish(self, **figures: Any) -> dict[str, Any]:
        self.summary.update(figures)
        self.summary["uptime_after"] = uptime()
        self.summary["load_after"] = loadavg()
        self.summary["wall_s"] = round(time.time() - self.started, 1)
        RESULTS.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        out = RESULTS / f"{self.name}-{stamp}.json"
        out.write_text(json.dumps(self.summary, indent=2, default=str))
        say(f"[{self.name}] {self.summary['uptime_after']}; summary saved to {out.relative_to(ROOT)}")
        print(json.dumps(self.summary, default=str), flush=True)
        return self.summary


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def median(xs: list[float]) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def percentile(xs: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100)."""
    if not xs:
        return None
    s = sorted(xs)
    k = max(0, min(len(s) - 1, int(-(-q * len(s) // 100)) - 1))
    return s[k]


# ------------------------------------------------------------------------------------------------ database


@contextlib.contextmanager
def throwaway_database(admin_url: str, prefix: str, *, keep: bool = False) -> Iterator[str]:
    """A fresh database migrated to head (schema ``stsync``); dropped afterwards unless ``keep``."""
    from sync import embedded
    from sync.db import engine as db

    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    url = embedded.create_database(admin_url, name)
    engine = db.make_engine(url, SCHEMA, pool_size=1)
    try:
        db.upgrade(engine, SCHEMA)
    finally:
        engine.dispose()
    say(f"database {name} created and migrated")
    try:
        yield url
    finally:
        if keep:
            say(f"database {name} kept")
        else:
            embedded.drop_database(admin_url, name)
            say(f"database {name} dropped")


def psycopg_url(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


def pg_stat_cpu() -> float:
    """CPU seconds used so far by all postgres server processes (user+sys), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        name = stat[stat.find("(") + 1:stat.rfind(")")]
        if name.startswith("postgres"):
            parts = stat[stat.rfind(")") + 2:].split()
            total += int(parts[11]) + int(parts[12])
    return total / tick


def proc_cpu(pid: int) -> float:
    """CPU seconds (user+sys) of one process so far."""
    tick = os.sysconf("SC_CLK_TCK")
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return 0.0
    parts = stat[stat.rfind(")") + 2:].split()
    return (int(parts[11]) + int(parts[12])) / tick


# ------------------------------------------------------------------------------------------------ sandbox


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class SandboxProcess:
    """``stsync sandbox`` in its own process on a socket, plus its admin API."""

    def __init__(self, *, customers: int, locations: int, rate: float, latency_ms: tuple[float, float],
                 page_size: int = 5000, log_dir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        lo, hi = latency_ms
        self.log_path = log_dir / f"sandbox-{self.port}.log"
        cmd = [PY, "-m", "sync", "sandbox", "--port", str(self.port), "--customers", str(customers),
               "--locations", str(locations), "--rate-limit", str(rate), "--latency-ms", f"{lo:g},{hi:g}"]
        self._log = open(self.log_path, "w")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT)
        self.http = httpx.Client(base_url=self.url, timeout=120)
        deadline = time.monotonic() + 600
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sandbox exited with {self.proc.returncode}: see {self.log_path}")
            with contextlib.suppress(httpx.HTTPError):
                if self.http.get("/_sandbox/health").status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("sandbox did not come up")
            time.sleep(0.2)
        self.configure(export_page_size=page_size)
        say(f"sandbox pid {self.proc.pid} on {self.url}: {customers} customers, {locations} locations, "
            f"limit {rate}/s, latency {lo:g}-{hi:g} ms, export pages of {page_size}")

    def configure(self, **settings: Any) -> dict[str, Any]:
        r = self.http.post("/_sandbox/config", json=settings)
        r.raise_for_status()
        return dict(r.json())

    def requests(self, limit: int | None = None) -> list[dict[str, Any]]:
        r = self.http.get("/_sandbox/requests", params={"limit": limit} if limit else None)
        r.raise_for_status()
        return list(r.json()["requests"])

    def counters(self) -> dict[str, dict[str, int]]:
        r = self.http.get("/_sandbox/counters")
        r.raise_for_status()
        return dict(r.json())

    def reset_log(self) -> None:
        self.http.delete("/_sandbox/requests").raise_for_status()

    def stop(self) -> None:
        self.http.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def __enter__(self) -> SandboxProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ------------------------------------------------------------------------------------------------ stsync


CONFIG = """\
database:
  url: {url}
  schema: stsync
servicetitan:
  tenant_id: 1
  client_id: sandbox-client
  client_secret: sandbox-secret
  app_key: sandbox-app-key
  application_guid: {guid}
  api_base_url: {api}
  requests_per_second: {rps}
  max_concurrency: {concurrency}
sync:
  pull_interval_seconds: {pull_interval}
  batch_size: {batch_size}
  check_before_send: {check}
logging:
  level: INFO
  format: json
"""


def write_config(path: Path, *, url: str, api: str, rps: float = 60, concurrency: int = 32,
                 pull_interval: float = 3600, batch_size: int = 500, check_before_send: bool = True) -> Path:
    path.write_text(CONFIG.format(url=url, api=api, rps=rps, concurrency=concurrency, guid=APP_GUID,
                                  pull_interval=pull_interval, batch_size=batch_size,
                                  check="true" if check_before_send else "false"))
    return path


def bench_config(url: str, *, batch_size: int = 500) -> Any:
    """The same configuration as an in-process ``Config`` (detect runs without HTTP)."""
    from sync.config import parse_config

    return parse_config({
        "database": {"url": url, "schema": SCHEMA},
        "servicetitan": {"tenant_id": 1, "client_id": "sandbox-client", "client_secret": "sandbox-secret",
                         "app_key": "sandbox-app-key", "application_guid": APP_GUID,
                         "api_base_url": "http://127.0.0.1:9"},
        "sync": {"batch_size": batch_size},
        "logging": {"level": "WARNING", "format": "json"},
    }, "bench", env={})


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "STSYNC_CONFIG")}


def stsync_cmd(config: Path, *args: str) -> list[str]:
    return [PY, "-m", "sync", "--config", str(config), *args]


@dataclass
class Child:
    """A child process whose peak RSS comes from wait4 (exact) and a VmHWM/VmRSS sampler (timeline)."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    started: float = field(default_factory=time.monotonic)
    rss_samples: list[tuple[float, int]] = field(default_factory=list)
    hwm_kb: int = 0
    maxrss_kb: int = 0
    returncode: int | None = None
    cpu_s: float = 0.0
    target_pid: int = 0
    """the process to sample (the python child when run under py-spy)"""
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    @property
    def pid(self) -> int:
        return self.target_pid or self.proc.pid

    def _sample(self) -> None:
        while not self._stop.is_set():
            status = read_status(self.target_pid or self.proc.pid)
            if status:
                self.hwm_kb = max(self.hwm_kb, status.get("VmHWM", 0))
                self.rss_samples.append((round(time.monotonic() - self.started, 1), status.get("VmRSS", 0)))
            self._stop.wait(0.5)

    def wait(self, timeout: float | None = None) -> int:
        """Reap with wait4 (its ru_maxrss is the exact peak RSS)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(self.proc.pid, os.WNOHANG)
            if pid:
                self.maxrss_kb = int(usage.ru_maxrss)
                self.returncode = os.waitstatus_to_exitcode(status)
                self.proc.returncode = self.returncode
                self.cpu_s = round(usage.ru_utime + usage.ru_stime, 2)
                self._stop.set()
                return self.returncode
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"pid {self.proc.pid} still running")
            time.sleep(0.05)

    def stop(self, timeout: float = 60) -> int:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)  # the python process, also when it runs under py-spy
            try:
                return self.wait(timeout)
            except TimeoutError:
                self.proc.kill()
                return self.wait()
        return self.returncode

    @property
    def peak_rss_mb(self) -> float:
        return round(max(self.maxrss_kb, self.hwm_kb) / 1024, 1)

    def rss_timeline_mb(self, points: int = 12) -> list[tuple[float, float]]:
        s = self.rss_samples
        if not s:
            return []
        step = max(1, len(s) // points)
        return [(t, round(kb / 1024, 1)) for t, kb in s[::step]]


def read_status(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmHWM:", "VmRSS:")):
                    key, value = line.split(":", 1)
                    out[key] = int(value.split()[0])
    except OSError:
        return {}
    return out


def spawn(cmd: list[str], log_path: Path, *, profile_to: Path | None = None, rate: int = 100,
          gil: bool = True) -> Child:
    """Start ``cmd`` (its output to ``log_path``); with ``profile_to``, under ``py-spy record`` (raw format;
    ``gil``: only the GIL holder is sampled, see ``pyspy_attach``)."""
    log = open(log_path, "w")  # noqa: SIM115
    if profile_to is not None:
        cmd = [PY_SPY, "record", "--format", "raw", "--rate", str(rate), "--nonblocking", "-o", str(profile_to),
               *(["--gil"] if gil else []), "--", *cmd]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=clean_env(), cwd=ROOT)
    # under py-spy the sampler must watch py-spy's python child, not py-spy itself
    return Child(proc, log_path, target_pid=_python_child(proc.pid) if profile_to is not None else 0)


def _python_child(pid: int, timeout: float = 10) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                kids = f.read().split()
            if kids:
                return int(kids[0])
        time.sleep(0.02)
    return pid


# ------------------------------------------------------------------------------------------------ profiles


def pyspy_attach(pid: int, seconds: float, out: Path, *, rate: int = 100, gil: bool = True) -> subprocess.Popen[bytes]:
    """``py-spy record --pid`` for ``seconds`` in the background (raw collapsed stacks to ``out``).

    ``gil``: sample only the thread holding the GIL, i.e. attribute Python CPU (the scarce resource of one
    asyncio process with database worker threads); waits on PostgreSQL or the network do not show.
    """
    cmd = [PY_SPY, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", str(rate),
           "--nonblocking", "--format", "raw", "-o", str(out), *(["--gil"] if gil else [])]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


_FRAME = re.compile(r"^(?P<fn>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _frame_name(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    path = m.group("file")
    for marker in ("site-packages/", "/lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    with contextlib.suppress(ValueError):
        path = str(Path(path).relative_to(ROOT))
    return f"{m.group('fn')} ({path})"


def summarize_profile(path: Path, top: int = 15, within: str | None = None) -> dict[str, Any]:
    """Top functions by self and inclusive share of samples from a py-spy raw (collapsed) profile.

    ``within``: only stacks with a frame whose function name starts with it (e.g. ``detect_all``: the work,
    not the imports).
    """
    if not path.exists():
        return {"error": f"no profile at {path}"}
    self_c: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_frame_name(f) for f in stack.split(";") if f]
        if frames and frames[0].startswith("process "):
            frames = frames[1:]
        if frames and frames[0].startswith("thread "):
            frames = frames[1:]
        if not frames or (within and not any(f.startswith(within) for f in frames)):
            continue
        total += n
        self_c[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    if not total:
        return {"samples": 0}

    def share(c: Counter[str]) -> list[list[Any]]:
        return [[name, round(100 * n / total, 1)] for name, n in c.most_common(top)]

    sync_incl = Counter({k: v for k, v in incl.items() if "(sync/" in k})
    where = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
    return {"samples": total, "within": within, "file": where,
            "top_self_pct": share(self_c), "top_inclusive_pct": share(incl),
            "stsync_inclusive_pct": share(sync_incl)}


def print_profile(title: str, prof: dict[str, Any], top: int = 10) -> None:
    say(f"--- profile: {title} ({prof.get('samples', 0)} samples)")
    for label in ("top_self_pct", "stsync_inclusive_pct"):
        say(f"  {label}:")
        for name, pct in prof.get(label, [])[:top]:
            say(f"    {pct:5.1f}%  {name}")
