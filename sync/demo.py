"""`stsync demo`: the whole daemon against the built-in ServiceTitan sandbox, with nothing configured.

Starts the sandbox on a free local port, finds a database (``--database-url``/``DATABASE_URL``, else the local
server, else an embedded PostgreSQL), creates a throwaway database there, migrates, seeds ServiceTitan-side
data, runs the daemon, and makes local and remote edits while it prints what happens. Everything it created
is removed on exit (``--duration`` elapsed, Ctrl-C or SIGTERM).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import threading
import time
import uuid
from typing import Any

import click
from sqlalchemy import Engine, text

from sync import embedded
from sync.config import Config, parse_config
from sync.daemon.service import Daemon
from sync.db import conflicts, outbox
from sync.db import engine as db
from sync.log import configure_logging
from sync.sandbox import Fault, Sandbox, SandboxServer

GUID = "0f4a9c52-5b1e-4c0e-9d67-3e2a1b7c8d90"


class Printer:
    """Coloured lines on a terminal, plain lines in a pipe."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream or sys.stdout
        self.color = bool(getattr(self.stream, "isatty", lambda: False)())

    def __call__(self, tag: str, message: str, color: str = "white") -> None:
        stamp = time.strftime("%H:%M:%S")
        label = f"[{tag}]".ljust(10)
        if self.color:
            label = click.style(label, fg=color, bold=True)
        click.echo(f"{stamp} {label} {message}", file=self.stream)
        self.stream.flush()


def _short(body: Any, limit: int = 160) -> str:
    text_ = json.dumps(body, separators=(",", ":"))
    return text_ if len(text_) <= limit else text_[: limit - 3] + "..."


class DemoDaemon(Daemon):
    def __init__(self, cfg: Config, engine: Engine, say: Printer) -> None:
        super().__init__(cfg, engine=engine)
        self.say = say
        self.pulled = 0
        """Feed records merged into the mirror (loaded or changed) while the demo ran."""

    async def pull_job(self) -> dict[str, Any]:
        result = await super().pull_job()
        for feed, r in result.items():
            if not isinstance(r, dict):
                continue
            applied = r.get("applied", 0)
            self.pulled += int(r.get("inserted", 0)) + int(applied)
            if r.get("inserted"):
                self.say("pull", f"{feed}: {r['inserted']} records loaded into the mirror", "cyan")
            elif applied or r.get("conflicts"):
                self.say("pull", f"{feed}: {applied} remote change(s) applied, {r.get('conflicts', 0)} conflict(s)",
                         "cyan")
        return result


class Scenario:
    """Scripted local (SQL) and remote (ServiceTitan) edits, one every ``step`` seconds."""

    def __init__(self, engine: Engine, sb: Sandbox, say: Printer) -> None:
        self.engine, self.sb, self.say = engine, sb, say
        self.i = 0
        self.created: list[int] = []
        self.noop: tuple[int, int, int] | None = None
        """The no-op save to report on: (mirror id, st_id, requests seen by the sandbox when it was made)."""
        self.held_back: list[tuple[int, int, int]] = []
        """The 503-twice edits to report on: (mirror id, st_id, step made)."""

    def _sql(self, statement: str, **params: Any) -> None:
        with self.engine.begin() as conn:
            conn.execute(text(statement), params)

    def _pick(self, table: str, offset: int) -> tuple[int, int] | None:
        with self.engine.connect() as conn:
            row = conn.execute(text(f"SELECT id, st_id FROM {table} WHERE st_id IS NOT NULL AND merged_to_id IS NULL "
                                    "ORDER BY id "
                                    "OFFSET :o LIMIT 1"), {"o": offset}).first()
        return (int(row[0]), int(row[1])) if row else None

    def step(self) -> None:
        n, self.i = self.i, self.i + 1
        if self._pick("locations", 0) is None:
            return  # initial load not finished yet
        self.follow_up(n)
        kind = (0, 6, 1, 7, 2, 3, 4, 8, 5)[n % 9]
        if kind == 6:
            self.create(n)
            return
        if kind == 7:
            self.mass_delete()
            return
        if kind == 8:
            self.linked_report()
            self.undo_mass_delete()
            return
        pick = self._pick("customers", (n * 7) % 25) or self._pick("customers", n % 5)
        loc = self._pick("locations", (n * 5) % 25) or self._pick("locations", n % 5)
        if pick is None or loc is None:
            return
        mid, st_id = pick
        if kind == 0:
            name = f"Renamed Customer {n}"
            self.say("local", f"UPDATE customers SET name = '{name}' WHERE id = {mid}", "yellow")
            self._sql("UPDATE customers SET name = :n WHERE id = :m", n=name, m=mid)
        elif kind == 1:
            cur = self.sb.get_customer(st_id)
            self.say("remote", f"edit in ServiceTitan: customer {st_id} doNotMail -> {not cur['doNotMail']}",
                     "magenta")
            self.sb.edit_customer(st_id, doNotMail=not cur["doNotMail"])
        elif kind == 2:
            # hold the push back (ServiceTitan answers 503 twice) so the next pull sees both edits: a conflict
            self.sb.faults.add(Fault.server_error(503), times=2, method="PATCH", entity="customer", record_id=st_id)
            self.say("local", f"UPDATE customers SET name = 'Local Name {n}' WHERE id = {mid}  "
                              "(ServiceTitan will answer 503 twice)", "yellow")
            self._sql("UPDATE customers SET name = :n WHERE id = :m", n=f"Local Name {n}", m=mid)
            self.held_back.append((mid, st_id, n))
            self.say("remote", f"edit in ServiceTitan: customer {st_id} name -> 'Remote Name {n}' (same field)",
                     "magenta")
            self.sb.edit_customer(st_id, name=f"Remote Name {n}")
        elif kind == 3:
            self.say("local", f"UPDATE locations SET city = 'Springfield' WHERE id = {loc[0]}  (address goes whole)",
                     "yellow")
            self._sql("UPDATE locations SET city = 'Springfield' WHERE id = :m", m=loc[0])
        elif kind == 4:
            self.say("local", f"UPDATE customers SET name = name WHERE id = {mid}  (a save that changes nothing)",
                     "yellow")
            self._sql("UPDATE customers SET name = name WHERE id = :m", m=mid)
            self.noop = (mid, st_id, len(self.sb.requests))
        else:
            self.say("local", f"UPDATE customers SET type = 'Alien' WHERE id = {mid}  (ServiceTitan would reject it)",
                     "yellow")
            self._sql("UPDATE customers SET type = 'Alien' WHERE id = :m", m=mid)


    def follow_up(self, n: int) -> None:
        """What became of earlier steps: the no-op save (nothing sent) and the edits answered 503 twice."""
        if self.noop is not None:
            mid, st_id, seen = self.noop
            self.noop = None
            sent = [r for r in list(self.sb.requests)[seen:] if r.method == "PATCH"
                    and r.path.endswith(f"/customers/{st_id}")]
            if not sent:
                self.say("push", f"nothing sent for customers row {mid}: the save changed no value (no diff, no "
                                 "request)", "green")
        for item in list(self.held_back):
            mid, st_id, made = item
            if n - made < 2:
                continue
            self.held_back.remove(item)
            with self.engine.connect() as conn:
                row = conn.execute(text("SELECT state, attempts FROM outbox WHERE entity = 'customer' AND "
                                        "mirror_id = :m ORDER BY id DESC LIMIT 1"), {"m": mid}).first()
                name = conn.execute(text("SELECT name FROM customers WHERE id = :m"), {"m": mid}).scalar()
            remote = self.sb.get_customer(st_id)["name"]
            answers = [str(r.status) for r in self.sb.requests if r.method == "PATCH"
                       and r.path.endswith(f"/customers/{st_id}")]
            answered = f"ServiceTitan answered {', '.join(answers)}" if answers else \
                "nothing sent (the check before sending found the remote edit first)"
            what = f"outbox row {row[0]} after {row[1]} attempt(s)" if row else "no outbox row"
            self.say("outcome", f"customers row {mid} (the both-sides edit): {answered}; {what}; mirror name {name!r} "
                                f"= ServiceTitan's {remote!r}" if name == remote else
                     f"customers row {mid} (the both-sides edit): {answered}; {what}; mirror name {name!r}, "
                     f"ServiceTitan's {remote!r} (not converged yet)", "green" if name == remote else "red")

    def create(self, n: int) -> None:
        name = f"New Customer {n}"
        self.say("local", f"INSERT INTO customers (name, ...) VALUES ('{name}', ...) and a location for it, in one "
                          "transaction  (created in ServiceTitan with one POST)", "yellow")
        with self.engine.begin() as conn:
            cid = conn.execute(text("INSERT INTO customers (name, type, street, city, state, zip, country, latitude, "
                                    "longitude) VALUES (:n, 'Residential', '12 Elm St', 'Dayton', 'OH', '45402', "
                                    "'USA', 39.76, -84.19) RETURNING id"), {"n": name}).scalar_one()
            conn.execute(text("INSERT INTO locations (customer_id, name, street, city, state, zip, country) "
                              "VALUES (:c, :n, '12 Elm St', 'Dayton', 'OH', '45402', 'USA')"), {"c": cid, "n": name})
        self.created.append(int(cid))

    def linked_report(self) -> None:
        waiting = []
        with self.engine.connect() as conn:
            for cid in self.created:
                st = conn.execute(text("SELECT st_id FROM customers WHERE id = :c"), {"c": cid}).scalar_one_or_none()
                if st is None:
                    waiting.append(cid)
                else:
                    self.say("create", f"customers row {cid} is ServiceTitan customer {st} (st_id written back)",
                             "green")
        self.created = waiting

    def mass_delete(self) -> None:
        with self.engine.connect() as conn:
            held = conn.execute(text("SELECT count(*) FROM outbox WHERE state = 'held'")).scalar_one()
        if held:
            return
        self.say("local", "DELETE FROM locations WHERE id IN (the last 8)  (more than sync.max_deletes_per_cycle: "
                          "held, none sent)", "yellow")
        self._sql("DELETE FROM locations WHERE id IN (SELECT id FROM locations WHERE st_id IS NOT NULL "
                  "ORDER BY id DESC LIMIT 8)")

    def undo_mass_delete(self) -> None:
        from sync.commands import outbox as outbox_admin  # the operator's `stsync outbox discard --held`

        with self.engine.begin() as conn:
            n = outbox_admin.discard_held(conn)
        if n:
            self.say("operator", f"stsync outbox discard --held  ({n} held deletes dropped, the rows are back)",
                     "blue")


def _poll(engine: Engine, last_conflict: int, last_dead: int) -> tuple[list[Any], list[Any], int]:
    with engine.connect() as conn:
        return (conflicts.since(conn, last_conflict), outbox.dead_since(conn, last_dead),
                outbox.count_by_state(conn)["held"])


async def _report(engine: Engine, sb: Sandbox, say: Printer, stop: asyncio.Event) -> None:
    seen_requests = 0
    last_conflict = 0
    last_dead = 0
    last_held = 0
    while not stop.is_set():
        log = sb.requests
        for r in list(log)[seen_requests:]:
            if r.method in ("PATCH", "POST") and "/connect/" not in r.path:
                color = "green" if 200 <= r.status < 300 else "red"
                path = "/" + r.path.split("/tenant/", 1)[-1].split("/", 1)[-1]
                say("push", f"{r.method} {path} -> {r.status}  {_short(r.body)}", color)
        seen_requests = len(log)

        conflicts, dead, held = await asyncio.to_thread(_poll, engine, last_conflict, last_dead)
        if held and held != last_held:
            say("guard", f"{held} deletes held by the mass-delete guard: nothing sent; `stsync outbox release --held` "
                         "sends them, `stsync outbox discard --held` puts the rows back", "red")
        last_held = held
        for cid, entity, st_id, field, local, remote, outcome in conflicts:
            say("conflict", f"{entity} {st_id} {field}: local {json.dumps(local)} vs remote {json.dumps(remote)} "
                            f"-> {outcome} wins", "red")
            last_conflict = cid
        for oid, entity, st_id, message in dead:
            say("dead", f"outbox {oid} ({entity} {st_id}) not sent: {message}", "red")
            last_dead = oid
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=0.3)


def demo_config(database_url: str, api_url: str) -> Config:
    return parse_config({
        "database": {"url": database_url, "schema": "stsync"},
        "servicetitan": {"tenant_id": 1, "client_id": "sandbox-client", "client_secret": "sandbox-secret",
                         "app_key": "sandbox-app-key", "application_guid": GUID, "api_base_url": api_url},
        "sync": {"push_interval_seconds": 1, "pull_interval_seconds": 2, "conflict_policy": "remote_wins",
                 "local_deletes": "propagate", "max_deletes_per_cycle": 5},
        "retry": {"base_delay_seconds": 2, "max_delay_seconds": 10},
        "logging": {"level": "ERROR", "format": "console"},
    }, "<demo>", env={})


def summary(engine: Engine, sb: Sandbox, pulled: int, url: str, *, kept: bool = False) -> list[str]:
    """The one screen the demo ends with: what was pushed, pulled, in conflict or dead, and the SQL to look."""
    from sync.commands.status import collect

    with engine.connect() as conn:
        s = collect(conn)
    sent = [r for r in sb.requests if r.method in ("PATCH", "POST") and "/connect/" not in r.path]
    applied = [r for r in sent if 200 <= r.status < 300]
    refused = len(sent) - len(applied)
    by = {m: sum(1 for r in applied if r.method == m) for m in ("PATCH", "POST")}
    o = s["outbox"]
    psql = f"psql '{url.replace('postgresql+psycopg://', 'postgresql://')}'"
    return [
        "== summary " + "=" * 60,
        f"pushed:     {len(applied)} requests applied by ServiceTitan (PATCH {by['PATCH']}, POST {by['POST']}), "
        f"{refused} answered with an error and retried or dead",
        f"pulled:     {pulled} feed records merged into the mirror",
        f"conflicts:  {s['conflicts']:<4} SELECT entity, st_id, field, local_value, remote_value, outcome "
        "FROM stsync.conflicts;",
        f"dead rows:  {s['dead']:<4} SELECT id, entity, st_id, last_error->>'message' FROM stsync.outbox "
        "WHERE state = 'dead';",
        f"outbox:     {'  '.join(f'{k}={o[k]}' for k in o)}   SELECT state, count(*) FROM stsync.outbox GROUP BY 1;",
        "mirror:     SELECT id, st_id, name, sync_status, sync_error FROM stsync.customers ORDER BY id;",
        f"            (`stsync demo --keep` leaves the database for these: {psql})" if not kept else
        f"            ({psql})",
    ]


def run_demo(database_url: str | None, *, duration: float | None, customers: int, locations: int,
             step_seconds: float = 2.0, say: Printer | None = None, keep: bool = False) -> None:
    printer = say or Printer()
    configure_logging("ERROR", "console")
    with embedded.find_server(database_url) as server:
        name = f"stsync_demo_{uuid.uuid4().hex[:8]}"
        url = embedded.create_database(server.url, name)
        printer("demo", f"database: {server.why}; throwaway database {name}")
        sb = Sandbox(tenant_id=1, rate_limit_per_second=60.0, latency_ms=(20, 80))
        sb.seed(customers=customers, locations=locations, seed=42)
        engine = db.make_engine(url, "stsync")
        kept = False
        try:
            db.upgrade(engine, "stsync")
            with SandboxServer(sb) as srv:
                printer("demo", f"ServiceTitan sandbox at {srv.url} (tenant 1, {customers} customers, "
                                f"{locations} locations); press Ctrl-C to stop")
                pulled = asyncio.run(_main(demo_config(url, srv.url), engine, sb, printer, duration, step_seconds))
            for line in summary(engine, sb, pulled, url, kept=keep):
                click.echo(line, file=printer.stream)
            kept = keep and _keep(server, url, name, printer)
        finally:
            engine.dispose()
            if not kept:
                embedded.drop_database(server.url, name)
                printer("demo", f"stopped; dropped database {name}")


def _keep(server: embedded.Server, url: str, name: str, printer: Printer) -> bool:
    """--keep: a real server keeps the database (True); the embedded one lives until Ctrl-C or SIGTERM, and is
    removed with the server (False: drop it as usual)."""
    psql = f"psql '{url.replace('postgresql+psycopg://', 'postgresql://')}'"
    if not server.why.startswith("embedded"):
        printer("demo", f"kept database {name}: {psql}   (drop it with: DROP DATABASE \"{name}\")")
        return True
    printer("demo", f"kept database {name} on the embedded server: {psql}   (Ctrl-C stops the server and removes "
                    "it)")
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        stop.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return False


async def _main(cfg: Config, engine: Engine, sb: Sandbox, say: Printer, duration: float | None,
                step_seconds: float) -> int:
    daemon = DemoDaemon(cfg, engine, say)
    stop = daemon.stopping
    scenario = Scenario(engine, sb, say)

    async def actor() -> None:
        await asyncio.sleep(step_seconds)
        while not stop.is_set():
            await asyncio.to_thread(scenario.step)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=step_seconds)

    async def timer() -> None:
        if duration is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=duration)
            stop.set()

    tasks = [asyncio.create_task(actor()), asyncio.create_task(_report(engine, sb, say, stop)),
             asyncio.create_task(timer())]
    try:
        await daemon.run_forever()
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    return daemon.pulled
