"""Starting while the database is down or refuses: health answers, `migrate --wait` waits, a refusal is one line.

The database that is down and then comes up is a loopback port forwarding to the test server (``Forwarder``),
opened when the test says: the shared server itself is never stopped.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from sync import embedded
from tests.e2ekit import CONFIG, Env, Forwarder, free_port, stop, wait_for
from tests.pushkit import rows


def get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())
    except OSError:
        return 0, None


def config_for(env: Env, url: str, extra: str = "") -> Path:
    p = env.tmp / f"stsync-{uuid.uuid4().hex[:6]}.yaml"
    p.write_text(CONFIG.format(url=url, api=env.api, rps=60, grace=5, extra=extra))
    return p


@pytest.fixture
def forwarder(pg_server: embedded.Server) -> Iterator[Forwarder]:
    f = Forwarder(pg_server.url)
    yield f
    f.close()


def test_healthz_answers_while_the_database_is_down_and_the_jobs_start_when_it_comes_up(
        e2e: Env, forwarder: Forwarder) -> None:
    port = free_port()
    database = make_url(e2e.url).database
    assert database
    proc = e2e.start(config_for(e2e, forwarder.database_url(database),
                                extra=f"observability:\n  listen: 127.0.0.1:{port}"))
    try:
        base = f"http://127.0.0.1:{port}"
        status, body = wait_for(lambda: (lambda a: a if a[0] else None)(get(base + "/healthz")), 20, "/healthz")
        assert status == 200 and body["status"] == "alive"
        status, body = get(base + "/readyz")
        assert status == 503
        assert body["ready"] is False
        assert body["checks"]["database"].startswith("error: ")
        assert body["checks"]["scheduler"].startswith("not started: waiting for the database: database unreachable")
        assert "Connection refused" in body["checks"]["scheduler"]
        assert proc.poll() is None  # still waiting, not crashed

        forwarder.open()  # the database comes up
        wait_for(lambda: get(base + "/readyz")[0] == 200, 60, "/readyz to say ready once the database answers")
        status, body = get(base + "/readyz")
        assert body["checks"] == {"database": "ok", "servicetitan_token": "ok", "scheduler": "ok"}
    finally:
        assert stop(proc) == 0


def test_migrate_wait_waits_for_a_database_that_starts_later(e2e: Env, forwarder: Forwarder,
                                                             pg_server: embedded.Server) -> None:
    name = f"stsync_wait_{uuid.uuid4().hex[:8]}"
    embedded.create_database(pg_server.url, name)
    try:
        import subprocess
        import sys

        cfg = config_for(e2e, forwarder.database_url(name))
        proc = subprocess.Popen([sys.executable, "-m", "sync", "--config", str(cfg), "migrate", "--wait", "60"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(2.5)
        assert proc.poll() is None  # waiting
        forwarder.open()
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert out.strip().startswith('schema "stsync" at revision ')
        waits = [json.loads(line) for line in err.splitlines() if "migrate.waiting_for_database" in line]
        assert waits and all("Connection refused" in w["error"] for w in waits)
        from sync.db import engine as db

        engine = db.make_engine(forwarder.database_url(name), "stsync")
        try:
            assert rows(engine, "SELECT count(*) FROM customers") == [(0,)]
        finally:
            engine.dispose()
    finally:
        embedded.drop_database(pg_server.url, name)


def test_migrate_wait_gives_up_after_its_seconds_with_the_reason_in_one_line(e2e: Env,
                                                                              forwarder: Forwarder) -> None:
    started = time.monotonic()
    r = e2e.stsync(config_for(e2e, forwarder.database_url("postgres")), "migrate", "--wait", "2")
    assert r.returncode == 1
    assert time.monotonic() - started < 30
    errors = [line for line in r.stderr.splitlines() if line.startswith("stsync: error:")]
    assert errors == [line for line in r.stderr.splitlines() if not line.startswith("{")]  # only log lines besides
    assert len(errors) == 1
    assert errors[0].startswith("stsync: error: no answer within 2 s (--wait): database unreachable at ")
    assert "Connection refused" in errors[0]


@pytest.mark.parametrize("command", [["run"], ["once"], ["migrate", "--wait", "30"], ["status"]])
def test_a_role_the_database_refuses_is_one_line_exit_2_at_once(e2e: Env, command: list[str]) -> None:
    url = make_url(e2e.url).set(username="no_such_role", password=None).render_as_string(hide_password=False)
    started = time.monotonic()
    r = e2e.stsync(config_for(e2e, url), *command, timeout=60)
    assert r.returncode == 2, r.stderr
    assert time.monotonic() - started < 20  # not waited out
    said = [line for line in r.stderr.splitlines() if not line.startswith("{")]
    assert len(said) == 1, r.stderr
    assert said[0].startswith("stsync: error: the database at ")
    assert 'refused stsync: ' in said[0] and 'role "no_such_role" does not exist' in said[0]
    assert "unreachable" not in said[0]
    assert said[0].endswith("check the user, password and database name of database.url (or DATABASE_URL)")
