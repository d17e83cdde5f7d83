"""End-to-end kit: the sandbox on a real socket, a fresh migrated database, `stsync` as subprocesses."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from sync import embedded
from sync.db import engine as db
from sync.sandbox import Sandbox, SandboxServer

CONFIG = """
database:
  url: {url}
servicetitan:
  tenant_id: 1
  client_id: sandbox-client
  client_secret: ${{ST_SECRET:-sandbox-secret}}
  app_key: sandbox-app-key
  application_guid: 5f2b8a7e-3c1d-4e6f-9a0b-1c2d3e4f5a6b
  api_base_url: {api}
  requests_per_second: {rps}
  timeout_seconds: 5
sync:
  push_interval_seconds: 1
  pull_interval_seconds: 3600
  lease_seconds: 5
  shutdown_grace_seconds: {grace}
retry:
  base_delay_seconds: 0.05
  max_delay_seconds: 0.5
logging:
  level: INFO
  format: json
{extra}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Env:
    engine: Engine
    url: str
    sb: Sandbox
    api: str
    tmp: Path

    def config(self, *, rps: float = 60, grace: float = 20, extra: str = "") -> Path:
        p = self.tmp / f"stsync-{uuid.uuid4().hex[:6]}.yaml"
        p.write_text(CONFIG.format(url=self.url, api=self.api, rps=rps, grace=grace, extra=extra))
        return p

    def start(self, config: Path, *args: str, log_name: str = "daemon") -> subprocess.Popen[str]:
        env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "STSYNC_CONFIG")}
        # the child keeps its own copy of the log's descriptor: the parent's is closed at once (no ResourceWarning)
        with open(self.tmp / f"{log_name}-{uuid.uuid4().hex[:4]}.log", "w") as log:
            return subprocess.Popen([sys.executable, "-m", "sync", "--config", str(config), "run", *args],
                                    stdout=log, stderr=subprocess.STDOUT, text=True, env=env)

    def stsync(self, config: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "STSYNC_CONFIG")}
        return subprocess.run([sys.executable, "-m", "sync", "--config", str(config), *args], capture_output=True,
                              text=True, env=env, timeout=timeout)


@pytest.fixture
def e2e(pg_server: embedded.Server, tmp_path: Path) -> Iterator[Env]:
    name = f"stsync_e2e_{uuid.uuid4().hex[:8]}"
    url = embedded.create_database(pg_server.url, name)
    engine = db.make_engine(url, "stsync")
    db.upgrade(engine, "stsync")
    sb = Sandbox(tenant_id=1, rate_limit_per_second=None)
    with SandboxServer(sb) as srv:
        yield Env(engine, url, sb, srv.url, tmp_path)
    engine.dispose()
    embedded.drop_database(pg_server.url, name)


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def stop(proc: subprocess.Popen[str], sig: int = signal.SIGTERM, timeout: float = 30) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
    return proc.wait(timeout=timeout)
