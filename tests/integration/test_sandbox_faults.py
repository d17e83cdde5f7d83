"""The sandbox's fault injection, enforced rate limit and latency, in-process and on a real socket (uvicorn).

Responses are checked against ServiceTitan's OpenAPI file like in tests/test_sandbox.py (``Api.call``).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from email.utils import parsedate_to_datetime

import httpx
import pytest

from sync.sandbox import ConnectionDropped, Fault, Faults, Sandbox, SandboxServer, create_app
from tests.integration.test_sandbox import CREDENTIALS, ROOT, Api, check_against_spec


@pytest.fixture
def sb() -> Sandbox:
    s = Sandbox(rate_limit_per_second=None)
    s.seed(customers=6, locations=6, seed=1)
    return s


@pytest.fixture
def api(sb: Sandbox) -> Api:
    return Api(sb)


def cid_of(sb: Sandbox, n: int = 0) -> int:
    return int(sb.customers()[n]["id"])


# ------------------------------------------------------------------------------------------------- scheduled faults


def test_429_with_retry_after_in_seconds(api: Api, sb: Sandbox) -> None:
    sb.faults.add(Fault.rate_limited(2.5, "seconds"))
    resp = api.get(f"/customers/{cid_of(sb)}")
    assert resp.status_code == 429 and resp.headers["retry-after"] == "3"
    assert api.get(f"/customers/{cid_of(sb)}").status_code == 200  # times=1: once only


def test_429_with_retry_after_as_an_http_date(api: Api, sb: Sandbox) -> None:
    sb.faults.add(Fault.rate_limited(30, "http-date"))
    resp = api.get(f"/customers/{cid_of(sb)}")
    assert resp.status_code == 429
    wait = parsedate_to_datetime(resp.headers["retry-after"]).timestamp() - time.time()
    assert 25 < wait <= 31


def test_429_with_the_wait_only_in_the_body_title(api: Api, sb: Sandbox) -> None:
    sb.faults.add(Fault.rate_limited(4, "body"))
    resp = api.get(f"/customers/{cid_of(sb)}")
    assert resp.status_code == 429 and "retry-after" not in resp.headers
    assert "try again in 4 seconds" in resp.json()["title"]


def test_429_without_any_hint(api: Api, sb: Sandbox) -> None:
    sb.faults.add(Fault.rate_limited(4, "none"))
    resp = api.get(f"/customers/{cid_of(sb)}")
    assert resp.status_code == 429 and "retry-after" not in resp.headers
    assert not any(ch.isdigit() for ch in resp.json()["title"])


@pytest.mark.parametrize(("status", "html"), [(500, False), (502, True), (503, False), (504, False)])
def test_server_errors_leave_the_record_unchanged(api: Api, sb: Sandbox, status: int, html: bool) -> None:
    cid = cid_of(sb)
    before = sb.get_customer(cid)
    sb.faults.add(Fault.server_error(status, html=html), method="PATCH")
    resp = api.patch(f"/customers/{cid}", {"name": "Never stored"})
    assert resp.status_code == status
    if html:
        assert resp.headers["content-type"].startswith("text/html") and "<html>" in resp.text
    else:
        assert resp.json()["status"] == status
    assert sb.get_customer(cid) == before
    assert sb.requests[-1].applied is False and sb.requests[-1].fault == "server_error"


def test_a_server_error_after_apply_has_changed_the_record(api: Api, sb: Sandbox) -> None:
    cid = cid_of(sb)
    sb.faults.add(Fault.server_error(502, after_apply=True))
    resp = api.patch(f"/customers/{cid}", {"name": "Stored anyway"})
    assert resp.status_code == 502
    assert sb.get_customer(cid)["name"] == "Stored anyway"
    assert sb.requests[-1].applied is True


def test_a_rule_targets_one_record_and_can_let_requests_pass_first(api: Api, sb: Sandbox) -> None:
    target, other = cid_of(sb, 0), cid_of(sb, 1)
    rule = sb.faults.add(Fault.server_error(503), times=2, skip=1, entity="customer", record_id=target)
    statuses = [api.get(f"/customers/{cid}").status_code for cid in (other, target, other, target, target, target)]
    assert statuses == [200, 200, 200, 503, 503, 200]
    assert rule.hits == 2 and rule.exhausted and sb.faults.rules == []


def test_token_endpoint_faults_only_when_a_rule_names_it(api: Api, sb: Sandbox) -> None:
    sb.faults.rate_limit_probability = 1.0
    assert api.call("POST", "/connect/token", data=CREDENTIALS).status_code == 200
    sb.faults.rate_limit_probability = 0.0
    sb.faults.add(Fault.server_error(503), endpoint="POST /connect/token")
    assert api.call("POST", "/connect/token", data=CREDENTIALS).status_code == 503


# ------------------------------------------------------------------------------------------------- random faults


def statuses_under(faults: Faults, n: int = 60) -> list[int]:
    sb = Sandbox(rate_limit_per_second=None, faults=faults)
    sb.seed(3, 3, seed=1)
    api = Api(sb)
    cid = sb.customers()[0]["id"]
    out = []
    for i in range(n):
        try:
            out.append(api.patch(f"/customers/{cid}", {"name": f"n{i}"}).status_code)
        except ConnectionDropped:
            out.append(0)
    return out


def test_random_faults_are_reproducible_from_the_seed() -> None:
    def plan(seed: int) -> Faults:
        return Faults(seed, rate_limit_probability=0.2, server_error_probability=0.2, drop_probability=0.1)

    first, again, other = statuses_under(plan(7)), statuses_under(plan(7)), statuses_under(plan(8))
    assert first == again != other
    assert {429, 0, 200} <= set(first) and set(first) & {500, 502, 503}


def test_random_faults_can_be_limited_to_endpoints_and_records(api: Api, sb: Sandbox) -> None:
    sb.faults.configure(server_error_probability=1.0, endpoints=["PATCH /customers/{id}"], record_ids=[cid_of(sb)])
    assert api.get(f"/customers/{cid_of(sb)}").status_code == 200
    assert api.patch(f"/customers/{cid_of(sb, 1)}", {"doNotMail": True}).status_code == 200
    assert api.patch(f"/customers/{cid_of(sb)}", {"doNotMail": True}).status_code >= 500


def test_short_aliases_set_the_probabilities() -> None:
    faults = Faults()
    faults.rate_429, faults.rate_5xx, faults.rate_drop, faults.rate_slow = 0.1, 0.2, 0.3, 0.4
    faults.slow_seconds = 1.5
    assert (faults.rate_limit_probability, faults.server_error_probability, faults.drop_probability,
            faults.slow_probability, faults.slow_ms) == (0.1, 0.2, 0.3, 0.4, (1500.0, 1500.0))


# ------------------------------------------------------------------------------------------------- latency, limiter


def timed_concurrent_gets(sb: Sandbox, n: int) -> tuple[list[httpx.Response], float]:
    app = create_app(sb)
    cid = sb.customers()[0]["id"]

    async def go() -> tuple[list[httpx.Response], float]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sb") as client:
            token = (await client.post("/connect/token", data=CREDENTIALS)).json()["access_token"]
            headers = {"Authorization": f"Bearer {token}", "ST-App-Key": sb.app_key}
            start = time.perf_counter()
            responses = await asyncio.gather(*(client.get(f"{ROOT}/customers/{cid}", headers=headers)
                                               for _ in range(n)))
            return list(responses), time.perf_counter() - start

    return asyncio.run(go())


def test_latency_delays_every_call_and_concurrent_calls_overlap(sb: Sandbox) -> None:
    sb.latency_ms = (150, 150)
    responses, elapsed = timed_concurrent_gets(sb, 8)
    assert all(r.status_code == 200 for r in responses)
    assert 0.15 <= elapsed < 0.6
    assert all(r.duration_ms >= 150 for r in sb.requests if r.endpoint == "GET /customers/{id}")


def test_a_slow_fault_adds_its_delay_and_then_answers(api: Api, sb: Sandbox) -> None:
    sb.faults.add(Fault.slow(250))
    start = time.perf_counter()
    assert api.get(f"/customers/{cid_of(sb)}").status_code == 200
    assert time.perf_counter() - start >= 0.25
    assert sb.requests[-1].fault == "slow"


def test_the_rate_limit_answers_429_past_the_limit_with_retry_after(sb: Sandbox) -> None:
    sb.rate_limit_per_second = 5
    responses, _ = timed_concurrent_gets(sb, 8)
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * 5 + [429] * 3
    limited = [r for r in responses if r.status_code == 429]
    assert all(r.headers["retry-after"] == "1" for r in limited)
    for r in limited:
        check_against_spec("GET", str(r.request.url.path), r)
    assert sb.count_requests("GET /customers/{id}", 429) == 3
    assert {r.fault for r in sb.requests if r.status == 429} == {"limiter"}
    time.sleep(1.05)
    assert Api(sb).get(f"/customers/{cid_of(sb)}").status_code == 200  # the window has slid


def test_the_rate_limit_can_be_disabled(sb: Sandbox) -> None:
    sb.rate_limit_per_second = None
    responses, _ = timed_concurrent_gets(sb, 70)
    assert {r.status_code for r in responses} == {200}


def test_the_rate_limit_is_on_by_default_at_60_per_second() -> None:
    sb = Sandbox()
    sb.seed(2, 2)
    responses, elapsed = timed_concurrent_gets(sb, 70)
    assert elapsed < 1.0
    assert sorted(r.status_code for r in responses) == [200] * 60 + [429] * 10


# ------------------------------------------------------------------------------------------------- dropped connections


def test_a_dropped_connection_in_process_raises_remote_protocol_error(api: Api, sb: Sandbox) -> None:
    sb.faults.add(Fault.dropped())
    with pytest.raises(httpx.RemoteProtocolError):
        api.get(f"/customers/{cid_of(sb)}")
    assert sb.counters["GET /customers/{id}"] == {0: 1}
    assert sb.requests[-1].status == 0 and sb.requests[-1].fault == "drop"


# ------------------------------------------------------------------------------------------------- socket


@contextmanager
def socket_client(server: SandboxServer) -> Iterator[tuple[httpx.Client, dict[str, str]]]:
    with httpx.Client(base_url=server.url, timeout=5) as client:
        token = client.post("/connect/token", data=CREDENTIALS).json()["access_token"]
        yield client, {"Authorization": f"Bearer {token}", "ST-App-Key": server.sandbox.app_key}


def checked(resp: httpx.Response) -> httpx.Response:
    check_against_spec(resp.request.method, resp.request.url.path, resp)
    return resp


def test_the_same_app_serves_a_real_socket_and_stops_cleanly(sb: Sandbox) -> None:
    with SandboxServer(sb) as server:
        assert server.url.startswith("http://127.0.0.1:") and server.sandbox is sb
        with socket_client(server) as (client, headers):
            cid = cid_of(sb)
            got = checked(client.get(f"{ROOT}/customers/{cid}", headers=headers))
            assert got.json() == sb.get_customer(cid)
            sb.edit_customer(cid, name="Edited from the test thread")
            patched = checked(client.patch(f"{ROOT}/customers/{cid}", headers=headers, json={"doNotMail": True}))
            assert patched.json()["name"] == "Edited from the test thread" and patched.json()["doNotMail"] is True
            page = checked(client.get(f"{ROOT}/export/locations", headers=headers)).json()
            assert len(page["data"]) == len(sb.locations())
            assert client.get("/_sandbox/counters").json()["PATCH /customers/{id}"] == {"200": 1}
        port = int(server.url.rsplit(":", 1)[1])
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass


@pytest.mark.parametrize("after_apply", [False, True])
def test_a_dropped_connection_on_a_socket_is_a_client_connection_error(
        sb: Sandbox, after_apply: bool, caplog: pytest.LogCaptureFixture) -> None:
    cid = cid_of(sb)
    with SandboxServer(sb) as server, socket_client(server) as (client, headers):
        client.post("/_sandbox/faults", json={"rules": [
            {"fault": {"kind": "drop", "after_apply": after_apply}, "method": "PATCH", "record_id": cid}]})
        with caplog.at_level(logging.WARNING), pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
            client.patch(f"{ROOT}/customers/{cid}", headers=headers, json={"name": "Dropped"})
        assert (sb.get_customer(cid)["name"] == "Dropped") is after_apply
        assert client.get(f"{ROOT}/customers/{cid}", headers=headers).status_code == 200  # next call is fine
    assert not [r for r in caplog.records if r.name.startswith("uvicorn")], caplog.text
    assert sb.counters["PATCH /customers/{id}"] == {0: 1}


def test_ports_are_free_ones_and_servers_run_side_by_side() -> None:
    a, b = Sandbox(), Sandbox()
    with SandboxServer(a) as one, SandboxServer(b) as two:
        assert one.url != two.url
        for server in (one, two):
            assert httpx.get(server.url + "/_sandbox/health").json()["status"] == "ok"


def test_server_url_needs_a_started_server() -> None:
    with pytest.raises(RuntimeError):
        _ = SandboxServer(Sandbox()).url


def test_a_late_answer_is_applied_at_once_and_answered_later() -> None:
    """``late_answer``: the PATCH is applied when it arrives; its answer (the record as it was then) comes later,
    so an edit made meanwhile is not in it."""
    import asyncio

    import httpx

    from sync.sandbox import Fault, Sandbox, create_app

    sb = Sandbox(tenant_id=1, rate_limit_per_second=None)
    sb.seed(customers=1, locations=1, seed=3)
    (cust,) = sb.customers()
    sb.faults.add(Fault.late_answer(400), method="PATCH")

    async def go() -> tuple[httpx.Response, str, float]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(sb)),
                                     base_url="https://sandbox") as http:
            token = (await http.post("/connect/token", data={"grant_type": "client_credentials",
                                                                "client_id": "sandbox-client",
                                                                "client_secret": "sandbox-secret"})).json()
            headers = {"Authorization": f"Bearer {token['access_token']}", "ST-App-Key": "sandbox-app-key"}
            started = asyncio.get_running_loop().time()
            task = asyncio.create_task(http.patch(f"/crm/v2/tenant/1/customers/{cust['id']}",
                                                  json={"name": "Applied Early"}, headers=headers))
            await asyncio.sleep(0.15)
            seen = sb.get_customer(cust["id"])["name"]
            sb.edit_customer(cust["id"], doNotMail=not cust["doNotMail"])
            resp = await task
            return resp, seen, asyncio.get_running_loop().time() - started

    resp, seen, took = asyncio.run(go())
    assert seen == "Applied Early"  # applied before the answer left
    assert resp.status_code == 200 and resp.json()["name"] == "Applied Early"
    assert resp.json()["doNotMail"] == cust["doNotMail"]  # the record as it was when applied
    assert took >= 0.4
    assert [r.fault for r in sb.requests if r.method == "PATCH"] == ["late_answer"]
