"""Security: secrets only from the environment, never in logs, exceptions, command output or the database; SQL
only through bound parameters; TLS always verified; the daemon runs under the least-privilege roles listed in
docs/deploy.md.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine
from sqlalchemy.engine import make_url

from sync import embedded
from sync.config import ServiceTitanConfig, parse_config
from sync.errors import ConfigError
from sync.sandbox import Fault, Sandbox, SandboxServer
from sync.servicetitan.client import ServiceTitanClient
from tests.chaos_kit import cycle, grep_secrets, plain_dsn
from tests.conftest import make_config
from tests.e2ekit import Env, free_port, stop, wait_for
from tests.pushkit import link_mirror, rows, sql

GUID = "5f2b8a7e-3c1d-4e6f-9a0b-1c2d3e4f5a6b"
SECRET_CONFIG = """
database:
  url: ${{ST_DB_URL}}
servicetitan:
  tenant_id: 1
  client_id: sandbox-client
  client_secret: ${{ST_CLIENT_SECRET}}
  app_key: ${{ST_APP_KEY}}
  application_guid: {guid}
  api_base_url: {api}
  timeout_seconds: 1
sync:
  push_interval_seconds: 0.5
  pull_interval_seconds: 1
  lease_seconds: 5
  shutdown_grace_seconds: 2
retry:
  base_delay_seconds: 0.05
  max_delay_seconds: 0.2
  max_attempts: 3
observability:
  listen: 127.0.0.1:{port}
logging:
  level: DEBUG
  format: json
"""


def run_cli(config: Path, *args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "STSYNC_CONFIG")}
    full.update(env)
    return subprocess.run([sys.executable, "-m", "sync", "--config", str(config), *args], capture_output=True,
                          text=True, env=full, timeout=timeout)


def every_row_as_text(engine: Engine) -> str:
    """Every row of every table in the schema (all columns, any type) as text."""
    out = []
    with engine.connect() as conn:
        tables = [t for (t,) in conn.exec_driver_sql(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'stsync'")]
        for t in tables:
            out += [r[0] for r in conn.exec_driver_sql(f'SELECT t::text FROM stsync."{t}" t')]
    return "\n".join(out)


def http_get(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return str(resp.read().decode())
    except urllib.error.HTTPError as err:
        return str(err.read().decode())


def test_secrets_and_tokens_never_reach_logs_output_or_the_database(e2e: Env, tmp_path: Path) -> None:
    secret, app_key = f"cs-{uuid.uuid4().hex}", f"ak-{uuid.uuid4().hex}"
    db_password = f"dbpw-{uuid.uuid4().hex[:16]}"
    sb = e2e.sb
    sb.client_secret, sb.app_key = secret, app_key
    tokens: list[str] = []
    issue = sb.issue_token

    def recording_issue(*args: Any) -> dict[str, Any]:
        payload = issue(*args)
        tokens.append(payload["access_token"])
        return payload

    sb.issue_token = recording_issue  # type: ignore[method-assign]
    sb.seed(customers=6, locations=4, seed=3)
    link_mirror(e2e.engine, sb)
    st_ids = sorted(c["id"] for c in sb.customers())
    url = make_url(e2e.url).set(password=db_password).render_as_string(hide_password=False)
    port = free_port()
    cfg = tmp_path / "secret.yaml"
    cfg.write_text(SECRET_CONFIG.format(guid=GUID, api=e2e.api, port=port))
    env = {"ST_DB_URL": url, "ST_CLIENT_SECRET": secret, "ST_APP_KEY": app_key}
    secrets = {"client secret": secret, "app key": app_key, "database password": db_password}

    # every path that touches a credential: token fetch, 401 + refresh, 429, 5xx, dead 400, pull, dry run
    sql(e2e.engine, "UPDATE customers SET name = 'Pushed With A Secret' WHERE st_id = :s", s=st_ids[0])
    sql(e2e.engine, "UPDATE customers SET tag_type_ids = '{999999}' WHERE st_id = :s", s=st_ids[1])
    sql(e2e.engine, "UPDATE customers SET type = 'Alien' WHERE st_id = :s", s=st_ids[2])
    sb.faults.add(Fault.rate_limited(0.2), method="PATCH")
    sb.faults.add(Fault.server_error(502, html=True), method="PATCH")
    # error bodies that echo the request's headers (app key, bearer token): a 503 retried, a 400 that ends dead
    sb.faults.add(Fault.server_error(503, echo_headers=True), method="PATCH", record_id=st_ids[0])
    sql(e2e.engine, "UPDATE customers SET name = 'Echoed And Dead' WHERE st_id = :s", s=st_ids[5])
    sb.faults.add(Fault.server_error(400, echo_headers=True), method="PATCH", record_id=st_ids[5], times=None)
    out = [run_cli(cfg, "once", "--dry-run", env=env), run_cli(cfg, "check-config", env=env)]
    log_file = tmp_path / "daemon.log"
    with open(log_file, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "sync", "--config", str(cfg), "run"], stdout=log,
                                stderr=subprocess.STDOUT, text=True,
                                env={**{k: v for k, v in os.environ.items() if k != "DATABASE_URL"}, **env})
        try:
            wait_for(lambda: sb.get_customer(st_ids[0])["name"] == "Pushed With A Secret", 60, "the push")
            sb.expire_tokens()  # the next call gets a 401, the client fetches a new token
            sb.edit_customer(st_ids[3], name="Remote Edit")
            sql(e2e.engine, "UPDATE customers SET name = 'After Refresh' WHERE st_id = :s", s=st_ids[4])
            wait_for(lambda: sb.get_customer(st_ids[4])["name"] == "After Refresh", 60, "the push after a 401")
            wait_for(lambda: rows(e2e.engine, "SELECT name FROM customers WHERE st_id = :s", s=st_ids[3])
                     == [("Remote Edit",)], 60, "the pull")
            scraped = http_get(f"http://127.0.0.1:{port}/metrics") + http_get(f"http://127.0.0.1:{port}/readyz")
        finally:
            assert stop(proc, signal.SIGTERM) == 0
    assert len(tokens) >= 2 and any(r.status == 401 for r in sb.requests)  # the refresh path was taken
    assert any(r.status == 429 for r in sb.requests) and any(r.status == 502 for r in sb.requests)
    assert any(r.status == 503 for r in sb.requests) and any(r.status == 400 for r in sb.requests)
    dead = rows(e2e.engine, "SELECT id FROM outbox WHERE state = 'dead' ORDER BY id")
    assert len(dead) == 3
    echoed = json.dumps([r[0] for r in rows(e2e.engine, "SELECT last_error FROM outbox WHERE state = 'dead'")])
    assert '"request"' in echoed and "***" in echoed  # the echo was stored, with the credentials masked
    out += [run_cli(cfg, "status", "--json", env=env), run_cli(cfg, "status", env=env),
            run_cli(cfg, "outbox", "list", "--json", env=env), run_cli(cfg, "conflicts", "list", "--json", env=env),
            *(run_cli(cfg, "outbox", "show", str(oid), env=env) for (oid,) in dead)]
    assert all(p.returncode == 0 for p in out), [p.stderr for p in out if p.returncode]
    # failures print their one-line errors: none may carry a credential either
    wrong = f"wrong-{uuid.uuid4().hex}"
    failed = [run_cli(cfg, "once", env={**env, "ST_CLIENT_SECRET": wrong}),
              run_cli(cfg, "status", env={**env, "ST_DB_URL": make_url(url).set(port=9).render_as_string(
                  hide_password=False)})]
    assert "refused the client credentials" in failed[0].stderr
    assert failed[1].returncode == 1 and failed[1].stderr.count("\n") == 1, failed[1].stderr
    secrets["wrong client secret"] = wrong

    logs = log_file.read_text()
    assert "outbox.sent" in logs and "pull.page_applied" in logs  # the daemon worked (at logging.level DEBUG)
    texts = {"daemon log (DEBUG)": logs, "metrics and readyz": scraped,
             **{f"stsync {' '.join(p.args[4:])}": p.stdout + p.stderr for p in out + failed},
             "database (every row of every table)": every_row_as_text(e2e.engine)}
    every_secret = {**secrets, **{f"access token {i}": t for i, t in enumerate(tokens)}}
    leaks = {where: grep_secrets(text, every_secret) for where, text in texts.items()}
    assert {k: v for k, v in leaks.items() if v} == {}


def test_wrong_secret_error_names_the_settings_not_the_value(tmp_path: Path) -> None:
    sb = Sandbox(tenant_id=1, rate_limit_per_second=None)
    with SandboxServer(sb) as srv:
        cfg = tmp_path / "c.yaml"
        cfg.write_text(SECRET_CONFIG.format(guid=GUID, api=srv.url, port=free_port()))
        wrong = f"wrong-{uuid.uuid4().hex}"
        p = run_cli(cfg, "check-config", env={"ST_DB_URL": "postgresql://u:pw-in-url-123@127.0.0.1:9/x",
                                              "ST_CLIENT_SECRET": wrong, "ST_APP_KEY": "k" * 12})
    assert p.returncode == 0 and wrong not in p.stdout + p.stderr and "pw-in-url-123" not in p.stdout + p.stderr


# ---------------------------------------------------------------------------------------------- SQL injection

NASTY = [
    "'); DROP TABLE customers; --",
    "Robert'); DROP TABLE stsync.outbox;--",
    "$$; DROP SCHEMA stsync CASCADE; $$",
    "\\'; DELETE FROM shadow; --",
    "%s %(name)s :name :1 ? $1",
    "\"quoted\" O'Brien & Sons <b>",
]


def test_sql_metacharacters_round_trip_through_push_and_pull_as_data(engine: Engine, database_url: str) -> None:
    sb = Sandbox(tenant_id=1, rate_limit_per_second=None)
    sb.seed(customers=2 * len(NASTY), locations=2, seed=4)
    link_mirror(engine, sb)
    cfg = make_config(database_url, servicetitan={"requests_per_second": 1000})
    ids = sorted(c["id"] for c in sb.customers())
    pushed, pulled = ids[:len(NASTY)], ids[len(NASTY):]
    tables_before = rows(engine, "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'stsync'")
    counts_before = rows(engine, "SELECT (SELECT count(*) FROM customers), (SELECT count(*) FROM shadow)")
    for st, value in zip(pushed, NASTY, strict=True):  # a local app writes them (with bound parameters)
        sql(engine, "UPDATE customers SET name = :v, custom_fields = CAST(:cf AS jsonb), "
                    "external_data = CAST(:ed AS jsonb) WHERE st_id = :s",
            v=value, cf=json.dumps({"201": value}), ed=json.dumps({value: value}), s=st)
    for st, value in zip(pulled, NASTY, strict=True):  # and ServiceTitan users type them
        sb.edit_customer(st, name=value, customFields=[{"typeId": 202, "value": value}])
    cycle(engine, cfg, sb)
    cycle(engine, cfg, sb)
    for st, value in zip(pushed, NASTY, strict=True):
        remote = sb.get_customer(st)
        assert remote["name"] == value.strip() and remote["customFields"][0]["value"] == value
        assert sb.external_data("customer", st)[GUID][value] == value
    for st, value in zip(pulled, NASTY, strict=True):
        assert rows(engine, "SELECT name, custom_fields->>'202' FROM customers WHERE st_id = :s", s=st) == [
            (value.strip(), value)]
    assert rows(engine, "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'stsync'") == \
        tables_before
    assert rows(engine, "SELECT (SELECT count(*) FROM customers), (SELECT count(*) FROM shadow)") == counts_before
    assert rows(engine, "SELECT state, count(*) FROM outbox GROUP BY state") == [("succeeded", len(NASTY))]


@pytest.mark.parametrize("schema", ["stsync; DROP TABLE x", 'a"b', "Upper", "x" * 70])
def test_identifiers_that_reach_sql_text_are_validated(schema: str) -> None:
    with pytest.raises(ConfigError, match=r"database\.schema"):
        make_config("postgresql://u@h/d", database={"schema": schema})


# ---------------------------------------------------------------------------------------------- TLS


def test_tls_certificates_and_host_names_are_always_verified() -> None:
    cfg = make_config("postgresql://u@h/d", servicetitan={"api_base_url": None, "environment": "production"})
    client = ServiceTitanClient(cfg.servicetitan)
    ctx = client._http._transport._pool._ssl_context  # type: ignore[attr-defined]
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert cfg.servicetitan.api_root.startswith("https://") and cfg.servicetitan.token_url.startswith("https://")
    # there is no setting to turn it off
    fields = set(ServiceTitanConfig.model_fields)
    assert not {f for f in fields if any(w in f for w in ("verify", "tls", "ssl", "insecure", "cert"))}
    with pytest.raises(ConfigError, match="unknown key"):
        make_config("postgresql://u@h/d", servicetitan={"verify_tls": False})


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    key, cert = tmp / "key.pem", tmp / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    return key, cert


def test_a_server_with_an_untrusted_certificate_never_sees_the_client_secret(tmp_path: Path) -> None:
    import asyncio

    key, cert = _self_signed(tmp_path)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    received: list[bytes] = []
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        listener.settimeout(20)
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                received.append(tls.recv(65536))
        except (ssl.SSLError, OSError):
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    secret = f"cs-{uuid.uuid4().hex}"
    cfg = make_config("postgresql://u@h/d", servicetitan={"api_base_url": f"https://127.0.0.1:{port}",
                                                           "client_secret": secret})

    async def call() -> Any:
        async with ServiceTitanClient(cfg.servicetitan) as st:
            return await st.get("customers", 1)

    resp = asyncio.run(call())
    thread.join(timeout=20)
    listener.close()
    # the TLS handshake was refused, and the reason is said in words
    assert resp.status == 0 and "TLS certificate of 127.0.0.1 not trusted" in (resp.error or ""), resp.error
    assert received == [] or all(secret.encode() not in r for r in received)
    assert received == []


BUG_PLAIN_HTTP = ("BUG: api_base_url / auth_url accept plain http:// for any host, so the client secret, app key and "
                  "bearer tokens can be sent unencrypted to a non-loopback host; only loopback (sandbox) URLs should "
                  "be allowed without TLS")


@pytest.mark.parametrize("key", ["api_base_url", "auth_url"])
def test_plain_http_is_refused_for_anything_but_loopback(key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        parse_config({"servicetitan": {"tenant_id": 1, "client_id": "c", "client_secret": "s", "app_key": "k",
                                       "application_guid": GUID, key: "http://api.servicetitan.io/connect/token"}},
                      env={})


@pytest.mark.parametrize("url", ["http://127.0.0.1.attacker.example", "http://127.evil.example:8765",
                                 "http://localhost.attacker.example", "http://sandbox.localhost", "http://10.0.0.1"])
def test_plain_http_to_a_host_that_only_looks_like_loopback_is_refused(url: str) -> None:
    with pytest.raises(ConfigError, match="api_base_url"):
        make_config("postgresql://u@h/d", servicetitan={"api_base_url": url})


@pytest.mark.parametrize("url", ["http://127.0.0.1:8765", "http://127.1.2.3:8765", "http://localhost:8765",
                                 "http://[::1]:8765"])
def test_plain_http_stays_allowed_for_a_loopback_sandbox(url: str) -> None:
    cfg = make_config("postgresql://u@h/d", servicetitan={"api_base_url": url})
    assert cfg.servicetitan.api_root == url


# ---------------------------------------------------------------------------------------------- least privilege


def test_the_daemon_runs_under_the_least_privilege_roles_of_deploy_md(pg_server: embedded.Server,
                                                                     tmp_path: Path) -> None:
    suffix = uuid.uuid4().hex[:8]  # roles are cluster-wide: never collide with another run
    owner, daemon, app = f"stsync_owner_{suffix}", f"stsync_daemon_{suffix}", f"app_writer_{suffix}"
    name = f"stsync_roles_{suffix}"
    admin = plain_dsn(pg_server.url)
    url = embedded.create_database(pg_server.url, name)

    def as_role(role: str) -> str:
        return make_url(url).set(username=role, password=None).render_as_string(hide_password=False)

    def exec_as(role_url: str, *statements: str) -> None:
        with psycopg.connect(plain_dsn(role_url), autocommit=True) as conn:
            for s in statements:
                conn.execute(s)  # type: ignore[arg-type]

    def pulled_as_daemon() -> Any:
        with psycopg.connect(plain_dsn(as_role(daemon))) as conn:
            return conn.execute("SELECT count(*) FROM stsync.customers WHERE name = "
                                "'Pulled By The Daemon Role'").fetchone()

    sb = Sandbox(tenant_id=1, rate_limit_per_second=None)
    sb.seed(customers=5, locations=5, seed=6)
    try:
        # exactly the statements of docs/deploy.md, "Database roles and privileges"
        exec_as(url, f"CREATE ROLE {owner} LOGIN", f'GRANT CREATE ON DATABASE "{name}" TO {owner}',
                f"CREATE ROLE {daemon} LOGIN", f"CREATE ROLE {app} LOGIN")
        with SandboxServer(sb) as srv:
            cfg = tmp_path / "roles.yaml"
            cfg.write_text(SECRET_CONFIG.format(guid=GUID, api=srv.url, port=free_port()))
            env = {"ST_CLIENT_SECRET": "sandbox-secret", "ST_APP_KEY": "sandbox-app-key"}
            migrated = run_cli(cfg, "migrate", env={**env, "ST_DB_URL": as_role(owner)})
            assert migrated.returncode == 0, migrated.stderr
            exec_as(as_role(owner),
                    f"GRANT USAGE ON SCHEMA stsync TO {daemon}",
                    f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA stsync TO {daemon}",
                    f"GRANT USAGE ON SCHEMA stsync TO {app}",
                    f"GRANT SELECT, INSERT, UPDATE, DELETE ON stsync.customers, stsync.locations TO {app}")
            denv = {**env, "ST_DB_URL": as_role(daemon)}
            once = run_cli(cfg, "once", env=denv)  # the initial load, as the daemon role
            assert once.returncode == 0, once.stderr
            assert json.loads(once.stdout)["pull"]["customers"]["inserted"] == 5
            exec_as(as_role(app), "UPDATE stsync.customers SET name = 'Edited By The App' WHERE id = 1",
                    "UPDATE stsync.locations SET name = 'Location By The App' WHERE id = 1")
            log_file = tmp_path / "daemon.log"
            with open(log_file, "w") as log:
                full = {**{k: v for k, v in os.environ.items() if k != "DATABASE_URL"}, **denv}
                proc = subprocess.Popen([sys.executable, "-m", "sync", "--config", str(cfg), "run"], stdout=log,
                                        stderr=subprocess.STDOUT, text=True, env=full)
                try:
                    wait_for(lambda: any(c["name"] == "Edited By The App" for c in sb.customers())
                             and any(loc["name"] == "Location By The App" for loc in sb.locations()), 60,
                             "the app's edits to be pushed by the daemon role")
                    sb.edit_customer(max(c["id"] for c in sb.customers()), name="Pulled By The Daemon Role")
                    wait_for(lambda: pulled_as_daemon() == (1,), 60, "the pull, as the daemon role")
                finally:
                    assert stop(proc, signal.SIGTERM) == 0
            logs = log_file.read_text()
            assert "permission denied" not in logs.lower() and '"level": "error"' not in logs, logs[-2000:]
            status = run_cli(cfg, "status", "--json", env=denv)
            assert status.returncode == 0 and json.loads(status.stdout)["outbox"]["succeeded"] == 2
            # and no more than that: no DDL, no migrations, no access for the app beyond the mirror
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                exec_as(as_role(daemon), "CREATE TABLE stsync.intruder (x int)")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                exec_as(as_role(daemon), "DROP TABLE stsync.outbox")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                exec_as(as_role(app), "SELECT * FROM stsync.outbox")
            refused = run_cli(cfg, "migrate", env=denv)
            assert refused.returncode != 0 and "permission denied" in refused.stderr
    finally:
        embedded.drop_database(pg_server.url, name)
        with psycopg.connect(admin, autocommit=True) as conn:
            for role in (app, daemon, owner):
                conn.execute(f"DROP ROLE IF EXISTS {role}")  # type: ignore[arg-type]


def test_migrate_without_ddl_rights_is_a_one_line_error(pg_server: embedded.Server, tmp_path: Path) -> None:
    suffix = uuid.uuid4().hex[:8]
    role, name = f"stsync_norights_{suffix}", f"stsync_norights_{suffix}"
    url = embedded.create_database(pg_server.url, name)
    try:
        with psycopg.connect(plain_dsn(url), autocommit=True) as conn:
            conn.execute(f"CREATE ROLE {role} LOGIN")  # type: ignore[arg-type]
        cfg = tmp_path / "c.yaml"
        cfg.write_text(SECRET_CONFIG.format(guid=GUID, api="http://127.0.0.1:9", port=free_port()))
        p = run_cli(cfg, "migrate", env={"ST_DB_URL": make_url(url).set(username=role).render_as_string(
            hide_password=False), "ST_CLIENT_SECRET": "s" * 8, "ST_APP_KEY": "k" * 8})
        assert p.returncode == 1 and "permission denied" in p.stderr
        assert p.stderr.count("\n") == 1, p.stderr
    finally:
        embedded.drop_database(pg_server.url, name)
        with psycopg.connect(plain_dsn(pg_server.url), autocommit=True) as conn:
            conn.execute(f"DROP ROLE IF EXISTS {role}")  # type: ignore[arg-type]


def test_the_sandbox_refuses_to_serve_its_admin_routes_beyond_loopback_without_a_token() -> None:
    out = subprocess.run([sys.executable, "-m", "sync", "sandbox", "--host", "0.0.0.0", "--port", "1"],
                         capture_output=True, text=True, timeout=60,
                         env={k: v for k, v in os.environ.items() if k != "STSYNC_SANDBOX_ADMIN_TOKEN"})
    assert out.returncode == 2 and "--admin-token" in out.stderr and out.stderr.count("\n") == 1, out.stderr


def test_the_sandbox_admin_routes_need_the_token_when_one_is_set() -> None:
    import asyncio

    import httpx

    from sync.sandbox import create_app

    sb = Sandbox(tenant_id=1, admin_token="adm-" + uuid.uuid4().hex)

    async def call(headers: dict[str, str]) -> int:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(sb)),
                                     base_url="http://sb") as http:
            return (await http.get("/_sandbox/requests", headers=headers)).status_code

    assert asyncio.run(call({})) == 401
    assert asyncio.run(call({"X-Sandbox-Admin-Token": "wrong"})) == 401
    assert asyncio.run(call({"X-Sandbox-Admin-Token": sb.admin_token or ""})) == 200
