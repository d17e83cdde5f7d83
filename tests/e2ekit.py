"""End-to-end kit: the sandbox on a real socket, a fresh migrated database, `stsync` as subprocesses."""

from __future__ import annotations

import contextlib
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


class Forwarder:
    """A TCP port on loopback that forwards to the test server (TCP or its unix socket), opened when the test
    says so: a database that is down, then starts, without restarting the shared server."""

    def __init__(self, server_url: str) -> None:
        from sqlalchemy.engine import make_url

        u = make_url(server_url)
        socket_dir = u.query.get("host")
        self._target: tuple[int, Any] = (
            (socket.AF_UNIX, os.path.join(str(socket_dir), f".s.PGSQL.{u.port or 5432}")) if socket_dir
            else (socket.AF_INET, (u.host or "127.0.0.1", u.port or 5432)))
        self.port = free_port()
        self.url = u.set(host="127.0.0.1", port=self.port, query={}).render_as_string(hide_password=False)
        self._listener: socket.socket | None = None
        self._sockets: list[socket.socket] = []
        self._stop = False

    def database_url(self, database: str) -> str:
        from sqlalchemy.engine import make_url

        return make_url(self.url).set(database=database).render_as_string(hide_password=False)

    def open(self) -> None:
        import threading

        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        listener.settimeout(0.2)
        self._listener = listener

        def pipe(src: socket.socket, dst: socket.socket) -> None:
            with contextlib.suppress(OSError):
                while data := src.recv(65536):
                    dst.sendall(data)
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

        def accept() -> None:
            while not self._stop:
                try:
                    client, _ = listener.accept()
                except TimeoutError:
                    continue
                except OSError:
                    return
                client.settimeout(None)
                upstream = socket.socket(self._target[0], socket.SOCK_STREAM)
                self._sockets += [client, upstream]
                upstream.connect(self._target[1])
                threading.Thread(target=pipe, args=(client, upstream), daemon=True).start()
                threading.Thread(target=pipe, args=(upstream, client), daemon=True).start()

        threading.Thread(target=accept, daemon=True).start()

    def close(self) -> None:
        self._stop = True
        for s in [*self._sockets, *([self._listener] if self._listener else [])]:
            with contextlib.suppress(OSError):
                s.close()
