"""Answers that come late, get lost, or are not a record never lose a local write (DESIGN.md invariants 1, 7, 9).

A hypothesis ``RuleBasedStateMachine`` drives the real daemon jobs (pull, detect, dispatch) against a real
database and the in-process sandbox. Its one rule, ``step``, takes a weighted operation (a single rule because
hypothesis's swarm testing would switch whole kinds of operations off per example, and the quick run has few):

- ``Local``: a committed SQL UPDATE of a customer's ``name``, ``do_not_mail`` or ``city`` (the address), the value
  drawn from a pool of three (two for the flag) that starts with the seeded value, so reverts are frequent (an
  UPDATE to the value the row already holds changes nothing the database can see, so it is not a write);
- ``Remote``: the same fields edited inside ServiceTitan (``Sandbox.edit_customer``);
- ``Sync``: the pull job alone, detect alone, detect + dispatch, or a whole cycle (pull, detect, dispatch);
- ``FaultyPush``: detect + dispatch where the first PATCH meets a fault: applied and then a timeout, a dropped
  connection, a 503, or a 2xx that is not a record (``{}``, ``[]``); or not applied: a 503 or a 400 (``dead``);
- ``Answer``: a claimed PATCH is applied by ServiceTitan at once, its answer is held while other steps run
  (edits on both sides, pulls) and is delivered by the next ``Answer``, usually right after a pull;
- ``Discard``: ``stsync outbox discard`` of a pending or dead row;
- ``Settle``: quiesce (below), check, and start a new round of the model from the converged state.

Each example picks one ``sync.conflict_policy`` and the check before sending on or off (``initialize``). Two
customers; retries are tiny; the lease is long so a held claim is never taken back.

**Quiesce** (``Settle``, and at teardown after delivering a held answer): clear faults; repeat {make pending rows
due now; pull, detect, dispatch; an operator ``outbox retry`` of every ``dead`` row} until nothing is pending,
in flight or dead and the change log is empty; then one more pull. Retrying dead rows at quiesce is an operator
action, not a semantic: DESIGN.md invariant 1 lets a change end ``dead`` (with a reason), and after the retry
it must reach ServiceTitan like any other change, so convergence can be asserted for every record.

**Checked after quiescing**

1. Convergence: per customer, the mirror row equals ServiceTitan's record (``record_from_api``) in every column
   but ``external_data`` (read-only ones included); the shadow equals it in every writable column; every mirror
   row is ``synced`` (or ``discarded`` when its latest outbox row is the discarded one); no outbox row is left
   unfinished; and one more detect + dispatch sends nothing (no echo, no no-op).
2. No lost local write, per (customer, field), over the events since the last settle in order: local write L,
   remote write R, recorded conflict C (read from ``conflicts`` after every step and sub-step), discard D (the
   field was put back by ``outbox discard``). The final value (both sides) must always be one of the values
   those events or the last settled state carry; then, by the *last* event:

   - none: the settled value is kept;
   - L: the final value is L's. Exception (three-way merge cannot tell it from "no change"; docs/push.md, detect:
     "an edit reverted before sending sends nothing"): L restored the shadow's value when it was committed; then
     a remote write made before L and not yet pulled may win instead;
   - C: the conflict's winner (its ``local_value`` for outcome ``local``, ``remote_value`` for ``remote``): this
     is DESIGN.md invariant 9's "what a recorded conflict resolved is what both sides end at". Outcomes must
     follow ``remote_wins`` / ``local_wins``; under ``newest_wins`` either is accepted (its timing is tested in
     ``test_convergence.py``);
   - D: the shadow's value it put back, or the value ServiceTitan held at that moment: an attempt of the
     discarded row may already have been applied (a lost answer), and a discard cannot unsend it
     (DESIGN.md only says the change is "never sent with a later edit");
   - R: the remote value, unless (weakest assertion, as documented) one of these holds:
     a PATCH carrying the field reached ServiceTitan after R (ServiceTitan's PATCH has no precondition; docs/push.md
     "The check before sending" narrows that window but leaves the time from the check to the PATCH's arrival);
     R's value equals a value carried by one of our PATCHes since the last settle whose answer was lost, not a
     record, or held (the pull takes a value equal to a possibly applied body, or to the body in flight, for our
     own echo: docs/push.md "Answers lost in transit"); R's value equals the shadow's at R's commit or after a
     later step before the first pull after R (remote ABA: a remote value equal to the base is no remote change).
     Otherwise R must survive: in particular a late answer must not undo a pulled R (invariant 9).

   A local write is therefore only allowed to lose to a later remote write, a recorded conflict, or a discard.
3. Every recorded conflict whose field is not written again after it decides the final value (rule C above).

The quick run (default suite) is deterministic (``derandomize``); ``-m slow`` runs a longer one.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import httpx
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule, run_state_machine_as_test
from sqlalchemy import Engine

from sync.commands import outbox as outbox_admin
from sync.config import Config
from sync.core.fields import BY_COLUMN, FIELDS, equal, record_from_api
from sync.core.merge import POLICIES
from sync.daemon.service import Daemon
from sync.db import mirror as records
from sync.db import shadow
from sync.sandbox import Sandbox, create_app
from sync.servicetitan.client import ApiResponse
from sync.stages.dispatch import Claim
from tests.conftest import make_config, reset_tables
from tests.pushkit import link_mirror, rows, sql

T = TypeVar("T")
CUSTOMERS = 2
SEED = 0  # seed 0: every customer has coordinates (an address PATCH needs them)
EDITED = ("name", "do_not_mail", "city")
"""The mirror columns the machine writes; ``city`` stands for the address (one merge unit, sent whole)."""
OTHER_VALUES: dict[str, tuple[Any, ...]] = {"name": ("Acme", "Birch"), "city": ("Austin", "Boise")}
COMPARED = tuple(f.column for f in FIELDS["customer"] if f.kind != "external_data")
WRITABLE = tuple(f.column for f in FIELDS["customer"] if f.writable and f.kind != "external_data")
UNFINISHED = "SELECT count(*) FROM outbox WHERE state IN ('pending', 'in_flight', 'held', 'dead')"


def api_edit(column: str, value: Any) -> dict[str, Any]:
    """A remote edit of ``column`` in ServiceTitan's field names (a partial address is merged)."""
    if column == "name":
        return {"name": value}
    if column == "do_not_mail":
        return {"doNotMail": value}
    return {"address": {"city": value}}


def carried(body: Any, column: str) -> tuple[bool, Any]:
    """Whether a PATCH body carries ``column``, and its value."""
    if not isinstance(body, dict):
        return False, None
    if column == "city":
        address = body.get("address")
        return (True, address.get("city")) if isinstance(address, dict) else (False, None)
    key = "name" if column == "name" else "doNotMail"
    return (key in body), body.get(key)


def conflict_value(column: str, value: Any) -> Any:
    """A ``conflicts`` value (JSON) of the unit that holds ``column``: the address is a JSON object."""
    return value.get("city") if column == "city" and isinstance(value, dict) else value


# ------------------------------------------------------------------------------------------------ transport

Inner = Callable[[httpx.Request], Awaitable[httpx.Response]]
"""the sandbox's real answer to a request (the request is applied)"""
Action = Callable[[httpx.Request, Inner], Awaitable[httpx.Response]]


def _raw(status: int, content: bytes) -> httpx.Response:
    return httpx.Response(status, content=content, headers={"content-type": "application/json"})


async def _timeout_after_apply(request: httpx.Request, inner: Inner) -> httpx.Response:
    await inner(request)
    raise httpx.ReadTimeout("timed out waiting for the answer", request=request)


async def _dropped_after_apply(request: httpx.Request, inner: Inner) -> httpx.Response:
    await inner(request)
    raise httpx.RemoteProtocolError("peer closed connection without sending complete message body",
                                    request=request)


async def _503_after_apply(request: httpx.Request, inner: Inner) -> httpx.Response:
    await inner(request)
    return _raw(503, b'{"title": "Service Unavailable"}')


async def _empty_200_after_apply(request: httpx.Request,
                                 inner: Inner) -> httpx.Response:
    await inner(request)
    return _raw(200, b"{}")


async def _list_200_after_apply(request: httpx.Request,
                                inner: Inner) -> httpx.Response:
    await inner(request)
    return _raw(200, b"[]")


async def _503_not_applied(request: httpx.Request, inner: Inner) -> httpx.Response:
    return _raw(503, b'{"title": "Service Unavailable"}')


async def _400_not_applied(request: httpx.Request, inner: Inner) -> httpx.Response:
    return _raw(400, json.dumps({"type": "https://tools.ietf.org/html/rfc7231#section-6.5.1",
                                 "title": "One or more validation errors occurred.", "status": 400,
                                 "errors": {"name": ["Rejected by the test."]}}).encode())


FAULTS: dict[str, Action] = {
    "timeout_after_apply": _timeout_after_apply,
    "dropped_after_apply": _dropped_after_apply,
    "503_after_apply": _503_after_apply,
    "empty_200_after_apply": _empty_200_after_apply,
    "list_200_after_apply": _list_200_after_apply,
    "503_not_applied": _503_not_applied,
    "400_not_applied": _400_not_applied,
}


CUSTOMER_PATH = re.compile(r"/customers/\d+$")


class FaultyTransport(httpx.AsyncBaseTransport):
    """The in-process sandbox; ``arm(action)`` makes the next customer PATCH meet ``action``."""

    def __init__(self, sb: Sandbox) -> None:
        self.inner = httpx.ASGITransport(app=create_app(sb))
        self.fault: Action | None = None
        self.uncertain: list[Any] = []
        """bodies of the PATCHes whose answer the client did not get as a record (all faults but the 400)"""

    def arm(self, action: Action) -> None:
        self.fault = action

    def clear(self) -> None:
        self.fault = None

    async def _real(self, request: httpx.Request) -> httpx.Response:
        resp = await self.inner.handle_async_request(request)
        await resp.aread()
        return resp

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.fault is not None and request.method == "PATCH" and CUSTOMER_PATH.search(request.url.path):
            action, self.fault = self.fault, None
            if action is not _400_not_applied:
                self.uncertain.append(json.loads(request.content))
            return await action(request, self._real)
        return await self._real(request)


# ------------------------------------------------------------------------------------------------ operations


def _pools() -> list[dict[str, tuple[Any, ...]]]:
    """Per customer and edited column: the seeded value first (so an edit can revert to it), then the others."""
    sb = Sandbox(tenant_id=1, rate_limit_per_second=None)
    sb.seed(customers=CUSTOMERS, locations=0, seed=SEED)
    out = []
    for c in sorted(sb.customers(), key=lambda c: c["id"]):
        rec = record_from_api("customer", c)
        pool: dict[str, tuple[Any, ...]] = {k: (rec[k], *OTHER_VALUES[k]) for k in ("name", "city")}
        pool["do_not_mail"] = (rec["do_not_mail"], not rec["do_not_mail"])
        out.append(pool)
    return out


POOLS = _pools()
SYNC_MODES: dict[str, tuple[str, ...]] = {"pull": ("pull",), "detect": ("detect",), "push": ("detect", "dispatch"),
                                          "cycle": ("pull", "detect", "dispatch")}


@dataclass(frozen=True)
class Local:
    """A local application's committed UPDATE of one column."""

    customer: int
    column: str
    value: Any


@dataclass(frozen=True)
class Remote:
    """An edit made inside ServiceTitan."""

    customer: int
    column: str
    value: Any


@dataclass(frozen=True)
class Sync:
    mode: str
    """``pull`` (the pull job alone), ``detect``, ``push`` (detect + dispatch), ``cycle`` (pull, detect, dispatch)"""


@dataclass(frozen=True)
class FaultyPush:
    fault: str
    """what the first PATCH of a detect + dispatch meets (``FAULTS``)"""


@dataclass(frozen=True)
class Answer:
    """With no answer held: detect, claim one row and send it; ServiceTitan applies it now, its answer is held
    back. With one held: it arrives now (after a pull when ``pull_first``)."""

    pull_first: bool


@dataclass(frozen=True)
class Discard:
    """``stsync outbox discard`` of the ``pick``-th pending or dead row (modulo their number)."""

    pick: int


@dataclass(frozen=True)
class Settle:
    """Quiesce and check (see the module docstring)."""


Op = Local | Remote | Sync | FaultyPush | Answer | Discard | Settle


def _edit(kind: type[Local] | type[Remote]) -> st.SearchStrategy[Op]:
    """Customer 0 and its name are edited most, so both sides often touch one field between two syncs. Built
    with ``st.builds`` (no lambdas) so that hypothesis prints a failing step as ``Local(customer=0, ...)``."""
    hot = [(0, "name")] * 3 + [(0, "city"), (0, "do_not_mail"), (1, "name"), (1, "city"), (1, "do_not_mail")]
    return st.one_of([st.builds(kind, st.just(i), st.just(c), st.sampled_from(POOLS[i][c])) for i, c in hot])


_KINDS: list[tuple[int, st.SearchStrategy[Op]]] = [
    (6, _edit(Local)),
    (4, _edit(Remote)),
    (3, st.builds(Sync, st.sampled_from(sorted(SYNC_MODES)))),
    (3, st.builds(FaultyPush, st.sampled_from(sorted(FAULTS)))),
    (4, st.builds(Answer, st.sampled_from((True, True, False)))),
    (1, st.builds(Discard, st.integers(0, 3))),
    (1, st.just(Settle())),
]
OPS: st.SearchStrategy[Op] = st.one_of([strategy for weight, strategy in _KINDS for _ in range(weight)])
"""Nearly half the steps are edits; one in five holds or delivers an answer (mostly after a pull)."""


# ------------------------------------------------------------------------------------------------ model


@dataclass
class LocalWrite:
    seq: int
    value: Any
    aba: frozenset[Any] = frozenset()
    """L restored the shadow's value: these (unpulled remote writes made before it) may win instead"""


@dataclass
class RemoteWrite:
    seq: int
    value: Any
    log_at: int
    """length of the sandbox's request log when R was made: later PATCHes came after it"""
    pulled: bool = False
    """a pull has run since R"""
    shadows: set[Any] = field(default_factory=set)
    """the shadow's values of the field from R's commit until the first pull after it (remote ABA: a pull, or a
    pre-send look, that compares R with a shadow holding R's value sees no remote change)"""


@dataclass
class Recorded:
    seq: int
    outcome: str
    local: Any
    remote: Any

    @property
    def winner(self) -> Any:
        return self.local if self.outcome == "local" else self.remote


@dataclass
class Discarded:
    seq: int
    restored: Any
    remote_then: Any


Event = LocalWrite | RemoteWrite | Recorded | Discarded


@dataclass
class FieldModel:
    settled: Any
    events: list[Event] = field(default_factory=list)


@dataclass
class Held:
    claim: Claim
    response: ApiResponse
    started: float


# ------------------------------------------------------------------------------------------------ machine


class AnswersMachine(RuleBasedStateMachine):
    ENGINE: ClassVar[Engine]
    DATABASE_URL: ClassVar[str]

    def __init__(self) -> None:
        super().__init__()
        self.engine = self.ENGINE
        reset_tables(self.engine)
        self.sb = Sandbox(tenant_id=1, rate_limit_per_second=None)
        self.sb.seed(customers=CUSTOMERS, locations=0, seed=SEED)
        linked = link_mirror(self.engine, self.sb)
        self.st_ids = sorted(linked)
        self.mids = [linked[s] for s in self.st_ids]
        self.loop = asyncio.new_event_loop()
        self.transport = FaultyTransport(self.sb)
        self.cfg: Config | None = None
        self.daemon: Daemon | None = None
        self.policy = ""
        self.seq = 0
        self.trace: list[str] = []
        self.held: Held | None = None
        self.last_conflict = 0
        self.in_flight: list[Any] = []
        """bodies of the held PATCHes since the last settle"""
        self.model: dict[tuple[int, str], FieldModel] = {}
        for i in range(CUSTOMERS):
            st_rec = self.st_record(i)
            for column in EDITED:
                assert st_rec[column] == POOLS[i][column][0]
                self.model[i, column] = FieldModel(settled=st_rec[column])

    # -------------------------------------------------------------------------------------------- plumbing

    @property
    def d(self) -> Daemon:
        assert self.daemon is not None, "initialize did not run"
        return self.daemon

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def note(self, line: str) -> None:
        self.seq += 1
        self.trace.append(f"{self.seq}: {line}")

    def st_record(self, i: int) -> dict[str, Any]:
        return record_from_api("customer", self.sb.get_customer(self.st_ids[i]))

    def shadows(self) -> dict[int, dict[str, Any]]:
        with self.engine.connect() as conn:
            return shadow.load_shadows(conn, "customer", self.mids)

    def mirror_rows(self) -> dict[int, dict[str, Any]]:
        with self.engine.connect() as conn:
            return {m: r.record for m, r in records.load_mirror(conn, "customer", self.mids).items()}

    def job(self, name: str) -> dict[str, Any]:
        jobs = {"pull": self.d.pull_job, "detect": self.d.detect_job, "dispatch": self.d.dispatch_job}
        result = self.run(jobs[name]())
        assert not result.get("error"), f"{name} job failed: {self.d.errors[-1:]!r}\n" + self.history()
        if name == "pull":
            for m in self.model.values():
                for e in m.events:
                    if isinstance(e, RemoteWrite):
                        e.pulled = True
        self.observe(name)
        return result

    def observe(self, after: str) -> None:
        """After every step and sub-step: new conflicts join the model; shadows are noted (remote ABA)."""
        new = rows(self.engine, """SELECT id, mirror_id, field, local_value, remote_value, outcome, policy
                                   FROM conflicts WHERE id > :i ORDER BY id""", i=self.last_conflict)
        for cid, mid, unit, local, remote, outcome, policy in new:
            self.last_conflict = cid
            i = self.mids.index(mid)
            column = "city" if unit == "address" else unit
            self.note(f"  conflict ({after}) customer {i} {unit}: local {local!r} remote {remote!r} -> {outcome}")
            assert column in EDITED, f"conflict on {unit}, which nobody edited\n" + self.history()
            assert policy == self.policy
            expected = {"remote_wins": {"remote"}, "local_wins": {"local"}}.get(self.policy, {"local", "remote"})
            assert outcome in expected, f"outcome {outcome} under {self.policy}\n" + self.history()
            self.model[i, column].events.append(
                Recorded(self.seq, outcome, conflict_value(column, local), conflict_value(column, remote)))
        base = self.shadows()
        for (i, column), m in self.model.items():
            for e in m.events:
                if isinstance(e, RemoteWrite) and not e.pulled:
                    e.shadows.add(base[self.mids[i]][column])

    def history(self) -> str:
        return "\n".join(self.trace)

    # -------------------------------------------------------------------------------------------- rules

    @initialize(policy=st.sampled_from(POLICIES), check=st.booleans())
    def start(self, policy: str, check: bool) -> None:
        """``check``: the check before sending (docs/push.md) on or off; off, the answers alone must do."""
        self.policy = policy
        self.cfg = make_config(self.DATABASE_URL, sync={"conflict_policy": policy, "lease_seconds": 600,
                                                        "check_before_send": check},
                               retry={"base_delay_seconds": 0.01, "max_delay_seconds": 0.05, "max_attempts": 3,
                                      "in_doubt_seconds": 0})
        self.daemon = Daemon(self.cfg, engine=self.engine, transport=self.transport)
        self.note(f"policy {policy}")

    @rule(op=OPS)
    def step(self, op: Op) -> None:
        """One operation (see the module docstring for why one weighted rule rather than one rule each)."""
        if isinstance(op, Local):
            self.local_edit(op)
        elif isinstance(op, Remote):
            self.remote_edit(op)
        elif isinstance(op, Sync):
            self.sync(op.mode)
        elif isinstance(op, FaultyPush):
            self.faulty_push(op.fault)
        elif isinstance(op, Answer):
            if self.held is None:
                self.hold_answer()
            else:
                self.deliver(op.pull_first)
        elif isinstance(op, Discard):
            self.discard(op.pick)
        else:
            self.settle()

    def local_edit(self, op: Local) -> None:
        i, column, value = op.customer, op.column, op.value
        (before,) = rows(self.engine, f"SELECT {column} FROM customers WHERE id = :m", m=self.mids[i])[0]
        sql(self.engine, f"UPDATE customers SET {column} = :v WHERE id = :m", v=value, m=self.mids[i])
        if before == value:
            # a save that changes nothing: the database sees no write (the trigger logs none), so it cannot
            # outrank a remote write made before it that has not been pulled yet
            self.note(f"local customer {i} {column} = {value!r} (no change: not a write)")
            return
        self.note(f"local customer {i} {column} = {value!r}")
        m = self.model[i, column]
        aba: frozenset[Any] = frozenset()
        if self.shadows()[self.mids[i]][column] == value:
            aba = frozenset(e.value for e in m.events if isinstance(e, RemoteWrite) and not e.pulled)
        m.events.append(LocalWrite(self.seq, value, aba))

    def remote_edit(self, op: Remote) -> None:
        i, column, value = op.customer, op.column, op.value
        base = self.shadows()[self.mids[i]][column]
        self.sb.edit_customer(self.st_ids[i], **api_edit(column, value))
        self.note(f"remote customer {i} {column} = {value!r}")
        self.model[i, column].events.append(RemoteWrite(self.seq, value, len(self.sb.requests), shadows={base}))

    def sync(self, mode: str) -> None:
        """The pull job alone, detect alone, detect + dispatch, or a whole cycle (pull, detect, dispatch)."""
        self.note(mode)
        for name in SYNC_MODES[mode]:
            self.job(name)

    def faulty_push(self, kind: str) -> None:
        """detect + dispatch; the first PATCH meets ``kind``."""
        self.note(f"push, first PATCH: {kind}")
        self.transport.arm(FAULTS[kind])
        try:
            self.job("detect")
            self.job("dispatch")
        finally:
            self.transport.clear()

    def hold_answer(self) -> None:
        """detect, claim one row, send it (ServiceTitan applies it now) and keep the answer for later."""
        self.job("detect")
        claims = self.run(asyncio.to_thread(self.d.dispatcher.claim, 1))
        if not claims:
            self.note("hold: nothing to claim")
            return
        (c,) = claims
        started = time.time()

        async def send() -> ApiResponse:
            async def before_send() -> bool:
                return await asyncio.to_thread(self.d.dispatcher.still_claimed, c)

            return await self.d.client.patch("customers", c.st_id, c.body, before_send=before_send)

        resp = self.run(send())
        self.held = Held(c, resp, started)
        self.in_flight.append(c.body)
        i = self.mids.index(c.mirror_id)
        sent = {k: v for k, v in c.body.items() if k != "externalData"}
        self.note(f"hold: PATCH customer {i} {sent} applied (status {resp.status}), answer held")

    def deliver(self, pull_first: bool) -> None:
        held, self.held = self.held, None
        assert held is not None
        if pull_first:
            self.note("pull (before the held answer)")
            self.job("pull")
        outcome = self.run(asyncio.to_thread(self.d.dispatcher.complete, held.claim, held.response, held.started))
        self.note(f"held answer delivered: {outcome.value}")
        self.observe("answer")

    def discard(self, pick: int) -> None:
        candidates = rows(self.engine, "SELECT id, mirror_id, state FROM outbox WHERE state IN ('pending', 'dead') "
                                       "ORDER BY id")
        if not candidates:
            self.note("discard: no pending or dead row")
            return
        oid, mid, state = candidates[pick % len(candidates)]
        i = self.mids.index(mid)
        with self.engine.begin() as conn:
            restored = outbox_admin.discard(conn, oid)
        self.note(f"discard outbox {oid} ({state}) of customer {i}: restored {restored}")
        now_mirror, now_remote = self.mirror_rows()[mid], self.st_record(i)
        for column in EDITED:
            if column in restored:
                self.model[i, column].events.append(Discarded(self.seq, now_mirror[column], now_remote[column]))
        self.observe("discard")

    def settle(self) -> None:
        """Deliver a held answer (after a pull), quiesce, check every invariant, and start the model again from
        the converged state."""
        if self.held is not None:
            self.deliver(pull_first=True)
        self.quiesce()
        self.check()

    def teardown(self) -> None:
        try:
            if self.daemon is not None:
                self.settle()
        finally:
            if self.daemon is not None:
                self.run(self.daemon.close())
            self.loop.close()

    # -------------------------------------------------------------------------------------------- quiesce

    def quiesce(self) -> None:
        self.transport.clear()
        self.note("quiesce")
        for _ in range(12):
            sql(self.engine, "UPDATE outbox SET next_attempt_at = now() WHERE state = 'pending'")
            for name in ("pull", "detect", "dispatch"):
                self.job(name)
            if rows(self.engine, "SELECT count(*) FROM outbox WHERE state = 'dead'")[0][0]:
                with self.engine.begin() as conn:
                    n = outbox_admin.retry(conn, all_dead=True)
                self.note(f"  operator: outbox retry --all-dead ({n})")
                continue
            logged = rows(self.engine, "SELECT count(*) FROM change_log")[0][0]
            if not rows(self.engine, UNFINISHED)[0][0] and not logged:
                break
        else:
            raise AssertionError("did not quiesce: " + repr(rows(self.engine, "SELECT id, state, last_error FROM "
                                                                 "outbox WHERE state <> 'succeeded'")) + "\n"
                                 + self.history())
        self.note("  final pull")
        self.job("pull")

    # -------------------------------------------------------------------------------------------- checks

    def check(self) -> None:
        trace = self.history()
        mirror_now, base = self.mirror_rows(), self.shadows()
        statuses = dict(rows(self.engine, "SELECT id, sync_status FROM customers"))
        latest = dict(rows(self.engine, "SELECT DISTINCT ON (mirror_id) mirror_id, state FROM outbox "
                                        "ORDER BY mirror_id, id DESC"))
        unfinished = rows(self.engine, UNFINISHED)[0][0]
        assert unfinished == 0, f"{unfinished} outbox rows unfinished after quiescing\n{trace}"
        for i, mid in enumerate(self.mids):
            remote, local = self.st_record(i), mirror_now[mid]
            diffs = {c: (local.get(c), remote.get(c)) for c in COMPARED
                     if not equal(BY_COLUMN["customer"][c].kind, local.get(c), remote.get(c))}
            assert not diffs, f"customer {i}: mirror != ServiceTitan (mirror, ST): {diffs}\n{trace}"
            stale = {c: (base[mid].get(c), remote.get(c)) for c in WRITABLE
                     if not equal(BY_COLUMN["customer"][c].kind, base[mid].get(c), remote.get(c))}
            assert not stale, f"customer {i}: shadow != ServiceTitan (shadow, ST): {stale}\n{trace}"
            status = statuses[mid]
            assert status == "synced" or (status == "discarded" and latest.get(mid) == "discarded"), \
                f"customer {i}: sync_status {status!r} (latest outbox row {latest.get(mid)!r})\n{trace}"
            for column in EDITED:
                self.check_field(i, column, remote[column], trace)
        sent_before = len(self.sb.requests)
        self.job("detect")
        self.job("dispatch")
        extra = [(r.path, r.body) for r in self.sb.requests[sent_before:] if r.method == "PATCH"]
        assert not extra, f"quiet, yet a push sent {extra}\n{trace}"
        # a new round of the model, from the converged state
        for (i, column), m in self.model.items():
            m.settled, m.events = mirror_now[self.mids[i]][column], []
        self.in_flight, self.transport.uncertain = [], []
        self.note("settled: converged, nothing lost")

    def check_field(self, i: int, column: str, final: Any, trace: str) -> None:
        m = self.model[i, column]
        where = f"customer {i} {column}: final {final!r}, settled {m.settled!r}, events {m.events}"
        seen: set[Any] = {m.settled}
        for e in m.events:
            if isinstance(e, LocalWrite | RemoteWrite):
                seen.add(e.value)
            elif isinstance(e, Recorded):
                seen |= {e.local, e.remote}
            else:
                seen |= {e.restored, e.remote_then}
        assert final in seen, f"{where}: a value neither side wrote\n{trace}"
        if not m.events:
            assert final == m.settled, f"{where}: changed though nobody wrote it\n{trace}"
            return
        last = m.events[-1]
        if isinstance(last, LocalWrite):
            assert final == last.value or final in last.aba, f"{where}: the last local write was lost\n{trace}"
        elif isinstance(last, Recorded):
            assert final == last.winner, f"{where}: not the recorded conflict's outcome ({last.outcome})\n{trace}"
        elif isinstance(last, Discarded):
            assert final in (last.restored, last.remote_then), f"{where}: not what the discard put back\n{trace}"
        elif not self.remote_may_lose(column, last):
            assert final == last.value, f"{where}: the last remote write was lost\n{trace}"

    def remote_may_lose(self, column: str, r: RemoteWrite) -> bool:
        """The acknowledged window, our own possibly applied values, or remote ABA (see the module docstring)."""
        if r.value in r.shadows:
            return True
        for body in self.transport.uncertain + self.in_flight:
            has, value = carried(body, column)
            if has and value == r.value:
                return True
        for req in self.sb.requests[r.log_at:]:
            if req.method == "PATCH" and req.applied and carried(req.body, column)[0]:
                return True
        return False


# ------------------------------------------------------------------------------------------------ tests

_HEALTH = [HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large]


def _run(engine: Engine, database_url: str, **profile: Any) -> None:
    machine = type("AnswersMachineOn", (AnswersMachine,), {"ENGINE": engine, "DATABASE_URL": database_url})
    run_state_machine_as_test(machine, settings=settings(deadline=None, derandomize=True, database=None,
                                                         suppress_health_check=_HEALTH, **profile))


def test_answers_never_lose_a_local_write(migrated_engine: Engine, database_url: str) -> None:
    _run(migrated_engine, database_url, max_examples=40, stateful_step_count=12)


@pytest.mark.slow
def test_answers_never_lose_a_local_write_slow(migrated_engine: Engine, database_url: str) -> None:
    _run(migrated_engine, database_url, max_examples=400, stateful_step_count=20)
