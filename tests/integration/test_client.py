"""The ServiceTitan client (sync.client): token caching and refresh, headers, 429 pauses, transport failures,
no secrets in logs. HTTP runs in-process against the sandbox simulator (httpx.ASGITransport); a few cases
that need exact control of timing or transport exceptions use httpx.MockTransport."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import io
import logging
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import httpx
import pytest
import structlog

from sync.config import ServiceTitanConfig
from sync.core import openapi
from sync.core.retry import Outcome, classify
from sync.errors import AuthError, ServiceTitanError
from sync.log import configure_logging
from sync.sandbox import Fault, Sandbox, create_app
from sync.servicetitan.client import ApiResponse, ServiceTitanClient, parse_retry_after
from sync.servicetitan.ratelimit import RateLimiter
from tests.conftest import make_config

T = TypeVar("T")
TOKEN = "POST /connect/token"
GET_CUSTOMER = "GET /customers/{id}"
PATCH_CUSTOMER = "PATCH /customers/{id}"
SECRET = "sandbox-secret"
APP_KEY = "sandbox-app-key"


def st_config(**servicetitan: Any) -> ServiceTitanConfig:
    return make_config(servicetitan=servicetitan).servicetitan if servicetitan else make_config().servicetitan


def new_sandbox(**kw: Any) -> Sandbox:
    kw.setdefault("rate_limit_per_second", None)
    return Sandbox(tenant_id=1, client_id="sandbox-client", client_secret=SECRET, app_key=APP_KEY, **kw)


def client(sb: Sandbox, cfg: ServiceTitanConfig | None = None, limiter: RateLimiter | None = None,
           ) -> ServiceTitanClient:
    return ServiceTitanClient(cfg or st_config(), transport=httpx.ASGITransport(app=create_app(sb)),
                              limiter=limiter or RateLimiter(1000))


def mock_client(handler: Callable[[httpx.Request], Any], cfg: ServiceTitanConfig | None = None,
                limiter: RateLimiter | None = None) -> ServiceTitanClient:
    return ServiceTitanClient(cfg or st_config(), transport=httpx.MockTransport(handler),
                              limiter=limiter or RateLimiter(1000))


def run(factory: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await factory()
    return asyncio.run(main())


def api_count(sb: Sandbox, endpoint: str, status: int | None = None) -> int:
    return sb.count_requests(endpoint, status)


def name_patch(name: str, mirror_id: int = 1) -> dict[str, Any]:
    return {"name": name, "externalData": {"patchMode": "Merge", "applicationGuid": st_config().application_guid,
                                           "externalData": [{"key": "mirrorId", "value": str(mirror_id)}]}}


class RecordingLimiter(RateLimiter):
    def __init__(self, rate: float = 1000) -> None:
        super().__init__(rate)
        self.pauses: list[float] = []

    def pause(self, seconds: float, *, capped: bool = True) -> None:
        self.pauses.append(seconds)
        super().pause(seconds, capped=capped)


# ------------------------------------------------------------------------------------------ parse_retry_after


@pytest.mark.parametrize(("value", "expected"), [("7", 7.0), (" 2.5 ", 2.5), ("0", 0.0), ("-3", 0.0)])
def test_retry_after_header_in_seconds(value: str, expected: float) -> None:
    assert parse_retry_after(httpx.Headers({"Retry-After": value}), None) == expected


def test_retry_after_header_as_http_date() -> None:
    when = email.utils.formatdate(time.time() + 10, usegmt=True)
    seconds = parse_retry_after(httpx.Headers({"Retry-After": when}), None)
    assert seconds is not None and 8.5 <= seconds <= 10.0


def test_retry_after_http_date_in_the_past_is_zero() -> None:
    when = email.utils.formatdate(time.time() - 60, usegmt=True)
    assert parse_retry_after(httpx.Headers({"Retry-After": when}), None) == 0.0


@pytest.mark.parametrize("body", [
    {"title": "Rate limit exceeded, try again in 7 seconds", "status": 429},
    {"title": "Too Many Requests", "detail": "Please try again in 7 seconds."},
    "Rate limit exceeded, try again in 7 seconds",
])
def test_retry_after_from_the_body(body: Any) -> None:
    assert parse_retry_after(httpx.Headers(), body) == 7.0


@pytest.mark.parametrize(("headers", "body"), [
    ({}, None), ({}, {"title": "Too Many Requests"}), ({"Retry-After": "soon"}, None), ({}, [1, 2]),
])
def test_retry_after_absent_is_none(headers: dict[str, str], body: Any) -> None:
    assert parse_retry_after(httpx.Headers(headers), body) is None


def test_retry_after_header_wins_over_body() -> None:
    body = {"title": "Rate limit exceeded, try again in 7 seconds"}
    assert parse_retry_after(httpx.Headers({"Retry-After": "3"}), body) == 3.0


def test_unparseable_header_falls_back_to_body() -> None:
    body = {"title": "Rate limit exceeded, try again in 7 seconds"}
    assert parse_retry_after(httpx.Headers({"Retry-After": "later"}), body) == 7.0


@pytest.mark.parametrize("value", ["inf", "Infinity", "nan", "-inf"])
def test_a_non_finite_retry_after_is_ignored(value: str) -> None:
    assert parse_retry_after(httpx.Headers({"Retry-After": value}), None) is None  # as if absent


@pytest.mark.parametrize("value", ["1000000000", "inf"])
def test_a_huge_retry_after_is_capped_and_logged(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A pull or a row must never sleep for 31 years on ServiceTitan's (or a proxy's) word."""
    cfg = st_config(max_retry_after_seconds=2)

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/connect/token"):
            return httpx.Response(200, json={"access_token": "t", "expires_in": 900})
        return httpx.Response(429, headers={"Retry-After": value}, json={"title": "Too Many Requests"})

    resp = run(lambda: mock_client(handler, cfg).get("customers", 1))
    assert resp.status == 429
    if value == "inf":
        assert resp.retry_after_s is None  # nonsense: absent, the caller's default wait applies
    else:
        assert resp.retry_after_s == 2 and "servicetitan.retry_after_capped" in capsys.readouterr().out


class _Trickle(httpx.AsyncByteStream):
    """An answer that arrives one byte every 0.2 s: each read is quick, the whole answer takes 4 s."""

    async def __aiter__(self) -> Any:
        for b in b'{"id": 1, "name": "x"}':
            await asyncio.sleep(0.2)
            yield bytes([b])


def test_a_trickled_answer_ends_at_the_timeout_for_the_whole_answer() -> None:
    cfg = st_config(timeout_seconds=1)

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/connect/token"):
            return httpx.Response(200, json={"access_token": "t", "expires_in": 900})
        return httpx.Response(200, headers={"content-type": "application/json"}, stream=_Trickle())

    started = time.monotonic()
    resp = run(lambda: mock_client(handler, cfg).get("customers", 1))
    assert resp.status == 0 and "no whole answer within 1 s" in (resp.error or "")
    assert time.monotonic() - started < 2.5


def test_a_trickled_token_answer_ends_at_the_timeout_too() -> None:
    cfg = st_config(timeout_seconds=1)

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "application/json"}, stream=_Trickle())

    started = time.monotonic()
    resp = run(lambda: mock_client(handler, cfg).get("customers", 1))
    assert resp.status == 0 and resp.not_sent and "no whole answer within 1 s" in (resp.error or "")
    assert time.monotonic() - started < 2.5


# ------------------------------------------------------------------------------------------------- tokens


def test_token_is_fetched_once_and_cached_across_calls() -> None:
    sb = new_sandbox()
    cid = sb.add_customer(name="Ada")["id"]

    async def scenario() -> list[int]:
        async with client(sb) as st:
            statuses = [(await st.get("customers", cid)).status for _ in range(3)]
            statuses.append((await st.patch("customers", cid, name_patch("Ada K"))).status)
            statuses.append((await st.export("customers", None, include_recent_changes=True)).status)
            return statuses

    assert run(scenario) == [200, 200, 200, 200, 200]
    assert api_count(sb, TOKEN) == 1


def test_token_request_is_a_client_credentials_form() -> None:
    sb = new_sandbox()
    run(lambda: _fetch_token(sb))
    first = sb.requests[0]
    assert (first.method, first.path, first.status) == ("POST", "/connect/token", 200)
    assert first.body == {"grant_type": "client_credentials", "client_id": "sandbox-client"}


async def _fetch_token(sb: Sandbox) -> str:
    async with client(sb) as st:
        return await st.token()


def test_concurrent_first_calls_share_one_token_fetch() -> None:
    sb = new_sandbox()
    cid = sb.add_customer(name="Ada")["id"]
    sb.faults.add(Fault.slow(50), endpoint=TOKEN)  # a slow token endpoint: every caller arrives during the fetch

    async def scenario() -> list[int]:
        async with client(sb) as st:
            return [r.status for r in await asyncio.gather(*(st.get("customers", cid) for _ in range(20)))]

    assert run(scenario) == [200] * 20
    assert api_count(sb, TOKEN) == 1
    assert api_count(sb, GET_CUSTOMER, 200) == 20


def test_token_is_refreshed_shortly_before_it_expires() -> None:
    sb = new_sandbox(token_ttl_seconds=1)  # the client refreshes after half of a short lifetime
    cid = sb.add_customer(name="Ada")["id"]

    async def scenario() -> None:
        async with client(sb) as st:
            assert (await st.get("customers", cid)).status == 200
            await asyncio.sleep(0.6)
            assert (await st.get("customers", cid)).status == 200

    run(scenario)
    assert api_count(sb, TOKEN) == 2
    assert api_count(sb, GET_CUSTOMER, 401) == 0  # refreshed before ServiceTitan refused it


def test_every_api_call_carries_the_app_key_and_the_bearer_token() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/connect/token":
            return httpx.Response(200, json={"access_token": "tok-abc-123", "expires_in": 900})
        seen.append(request)
        return httpx.Response(200, json={"id": 5})

    async def scenario() -> None:
        async with mock_client(handler) as st:
            await st.get("customers", 5)
            await st.patch("locations", 6, {"name": "x"})
            await st.export("customers", "tok", include_recent_changes=False)
            await st.request("GET", "/customers", params={"page": 1})

    run(scenario)
    assert len(seen) == 4
    for request in seen:
        assert request.headers["ST-App-Key"] == APP_KEY
        assert request.headers["Authorization"] == "Bearer tok-abc-123"
        assert str(request.url).startswith("http://127.0.0.1:9/crm/v2/tenant/1/")


def test_patch_sends_the_json_body_to_the_record_path() -> None:
    sb = new_sandbox()
    cid = sb.add_customer(name="Ada")["id"]

    async def scenario() -> ApiResponse:
        async with client(sb) as st:
            return await st.patch("customers", cid, name_patch("Ada King", mirror_id=77))

    resp = run(scenario)
    assert resp.ok and resp.status == 200
    assert resp.body["name"] == "Ada King"
    assert resp.body["externalData"] == [{"key": "mirrorId", "value": "77"}]
    assert openapi.validate(openapi.RESPONSE_SCHEMAS["customer"], resp.body) == {}
    last = sb.requests[-1]
    assert (last.method, last.path, last.body) == ("PATCH", f"/crm/v2/tenant/1/customers/{cid}",
                                                   name_patch("Ada King", mirror_id=77))
    assert sb.get_customer(cid)["name"] == "Ada King"


def test_export_passes_the_continuation_token_and_recent_changes_flag() -> None:
    sb = new_sandbox()
    sb.add_customer(name="Ada")

    async def scenario() -> tuple[ApiResponse, ApiResponse]:
        async with client(sb) as st:
            first = await st.export("customers", None, include_recent_changes=True)
            second = await st.export("customers", first.body["continueFrom"], include_recent_changes=False)
            return first, second

    first, second = run(scenario)
    assert first.status == 200 and [r["name"] for r in first.body["data"]] == ["Ada"]
    assert second.status == 200 and second.body["data"] == []
    queries = [r.query for r in sb.requests if r.endpoint == "GET /export/customers"]
    assert queries[0] == "includeRecentChanges=true"
    assert queries[1] == f"from={first.body['continueFrom']}"


# --------------------------------------------------------------------------------------------------- 401


def test_a_401_refreshes_the_token_once_and_resends() -> None:
    sb = new_sandbox()
    cid = sb.add_customer(name="Ada")["id"]

    async def scenario() -> tuple[str, str, ApiResponse]:
        async with client(sb) as st:
            old = await st.token()
            sb.expire_tokens()  # revoked / expired at ServiceTitan before our own expiry
            resp = await st.patch("customers", cid, name_patch("Ada K"))
            return old, await st.token(), resp

    old, new, resp = run(scenario)
    assert resp.status == 200 and resp.body["name"] == "Ada K"
    assert new != old
    assert api_count(sb, TOKEN) == 2
    assert sb.counters[PATCH_CUSTOMER] == {401: 1, 200: 1}
    bodies = [r.body for r in sb.requests if r.endpoint == PATCH_CUSTOMER]
    assert bodies == [name_patch("Ada K"), name_patch("Ada K")]  # the very same request, resent


def test_a_401_a_fresh_token_does_not_cure_is_an_auth_error_not_a_loop() -> None:
    sb = new_sandbox()
    cid = sb.add_customer(name="Ada")["id"]
    cfg = st_config(app_key="not-the-app-key")

    async def scenario() -> ApiResponse:
        async with client(sb, cfg) as st:
            return await st.get("customers", cid)

    with pytest.raises(AuthError) as info:
        run(scenario)
    message = str(info.value)
    assert message.startswith("authentication failed: ServiceTitan answered 401 to GET /customers/")
    assert "Application key is not valid" in message and "servicetitan.app_key" in message
    assert "not-the-app-key" not in message and info.value.exit_code == 2
    assert api_count(sb, TOKEN) == 2
    assert sb.counters[GET_CUSTOMER] == {401: 2}


def test_concurrent_401s_for_the_same_token_share_one_refresh() -> None:
    tokens: list[str] = []
    n = 3

    async def scenario() -> list[int]:
        turn = [asyncio.Event() for _ in range(n + 1)]
        turn[0].set()
        all_sent = asyncio.Event()
        in_flight: list[int] = []

        async def handler(request: httpx.Request) -> httpx.Response:
            if request.url.path == "/connect/token":
                tokens.append(f"tok{len(tokens) + 1}")
                return httpx.Response(200, json={"access_token": tokens[-1], "expires_in": 900})
            i = int(request.url.path.rsplit("/", 1)[1])
            if request.headers["Authorization"] == "Bearer tok1":
                in_flight.append(i)
                if len(in_flight) == n:
                    all_sent.set()
                await all_sent.wait()  # all n requests are out with tok1 ...
                await turn[i].wait()  # ... and their 401s come back one after another
                return httpx.Response(401, json={"title": "The access token is invalid or has expired."})
            turn[i + 1].set()
            return httpx.Response(200, json={"id": i})

        async with mock_client(handler) as st:
            await st.token()
            return [r.status for r in await asyncio.gather(*(st.get("customers", i) for i in range(n)))]

    assert run(scenario) == [200] * n
    assert tokens == ["tok1", "tok2"]  # one refresh for one rejected token


# ------------------------------------------------------------------------------------------ wrong credentials


@pytest.mark.parametrize("override", [{"client_secret": "wrong-secret-9f8e7d"}, {"client_id": "nobody"}])
def test_wrong_credentials_raise_auth_error_naming_the_settings_without_secrets(override: dict[str, str]) -> None:
    sb = new_sandbox()
    cid = sb.add_customer(name="Ada")["id"]
    cfg = st_config(**override)

    async def scenario() -> None:
        async with client(sb, cfg) as st:
            await st.get("customers", cid)

    with pytest.raises(AuthError) as info:
        run(scenario)
    message = str(info.value)
    for setting in ("servicetitan.client_id", "client_secret", "tenant_id", "environment"):
        assert setting in message
    assert info.value.status == 400
    assert "invalid_client" in message
    for secret in (cfg.client_secret.get_secret_value(), APP_KEY):
        assert secret not in message
        assert secret not in repr(info.value.args)
    assert api_count(sb, GET_CUSTOMER) == 0  # nothing was sent without a token


def test_unreachable_token_endpoint_raises_from_token_naming_the_url() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    async def scenario() -> None:
        async with mock_client(handler) as st:
            await st.token()

    with pytest.raises(ServiceTitanError) as info:
        run(scenario)
    assert not isinstance(info.value, AuthError)
    assert "http://127.0.0.1:9/connect/token" in str(info.value)
    assert SECRET not in str(info.value)


def test_unreachable_token_endpoint_comes_back_from_request_as_status_0() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    async def scenario() -> ApiResponse:
        async with mock_client(handler) as st:
            return await st.patch("customers", 1, {"name": "x"})

    resp = run(scenario)
    assert resp.status == 0
    assert resp.error is not None and "connect/token" in resp.error
    assert classify(resp.status, resp.body) is Outcome.RETRY


def test_an_unreachable_token_endpoint_stops_every_sender_for_the_full_token_retry() -> None:
    # (regression: the pause was cut to the 429 cap, so every sender retried the token endpoint 4x a second)
    from sync.servicetitan.client import SHARED_PAUSE_MAX_S, TOKEN_RETRY_S

    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    async def scenario() -> float:
        async with ServiceTitanClient(st_config(), transport=httpx.MockTransport(handler)) as st:
            assert st.limiter.max_pause == SHARED_PAUSE_MAX_S < TOKEN_RETRY_S  # the production limiter
            await st.patch("customers", 1, {"name": "x"})
            return st.limiter._paused_until - time.monotonic()

    assert run(scenario) == pytest.approx(TOKEN_RETRY_S, abs=0.5)


def test_token_endpoint_answer_without_a_token_is_a_service_titan_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"token_type": "Bearer"})

    async def scenario() -> None:
        async with mock_client(handler) as st:
            await st.token()

    with pytest.raises(ServiceTitanError, match="without an access_token"):
        run(scenario)


# --------------------------------------------------------------------------------------------------- 429


@pytest.mark.parametrize(("style", "low", "high"), [("seconds", 2.0, 2.0), ("http-date", 0.5, 2.0),
                                                    ("body", 2.0, 2.0)])
def test_a_429_with_a_retry_hint_pauses_the_shared_limiter(style: str, low: float, high: float) -> None:
    sb = new_sandbox()
    cid = sb.add_customer(name="Ada")["id"]
    sb.faults.add(Fault.rate_limited(2, style), endpoint=GET_CUSTOMER)  # type: ignore[arg-type]
    limiter = RecordingLimiter()

    async def scenario() -> ApiResponse:
        async with client(sb, limiter=limiter) as st:
            return await st.get("customers", cid)

    resp = run(scenario)
    assert resp.status == 429
    assert classify(resp.status, resp.body) is Outcome.RATE_LIMITED
    assert resp.retry_after_s is not None and low <= resp.retry_after_s <= high
    assert limiter.pauses == [resp.retry_after_s]
    if style != "body":
        assert "retry-after" in resp.headers


def test_a_429_without_a_hint_pauses_one_second() -> None:
    sb = new_sandbox()
    cid = sb.add_customer(name="Ada")["id"]
    sb.faults.add(Fault.rate_limited(2, "none"), endpoint=GET_CUSTOMER)
    limiter = RecordingLimiter()

    async def scenario() -> ApiResponse:
        async with client(sb, limiter=limiter) as st:
            return await st.get("customers", cid)

    resp = run(scenario)
    assert resp.status == 429 and resp.retry_after_s is None
    assert limiter.pauses == [1.0]


def test_after_a_429_the_next_request_waits_for_retry_after() -> None:
    sent: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/connect/token":
            return httpx.Response(200, json={"access_token": "t0k3n-xyz", "expires_in": 900})
        sent.append(time.monotonic())
        if len(sent) == 1:
            return httpx.Response(429, headers={"Retry-After": "0.3"}, json={"title": "Too Many Requests"})
        return httpx.Response(200, json={"id": 1})

    async def scenario() -> list[int]:
        async with mock_client(handler) as st:
            first = await st.get("customers", 1)
            others = await asyncio.gather(*(st.get("customers", 1) for _ in range(3)))
            return [first.status, *(r.status for r in others)]

    assert run(scenario) == [429, 200, 200, 200]
    assert all(t - sent[0] >= 0.29 for t in sent[1:])  # every caller, not just the one that got the 429


# ---------------------------------------------------------------------------------------- transport failures


@pytest.mark.parametrize(("exc", "prefix"), [
    (httpx.ReadTimeout("read timed out"), "timeout (ReadTimeout)"),
    (httpx.ConnectTimeout("connect timed out"), "timeout (ConnectTimeout)"),
    (httpx.ConnectError("All connection attempts failed"), "connection error: ConnectError: All connection attempts "
                                                           "failed"),
    (httpx.RemoteProtocolError("server disconnected"), "connection error: 127.0.0.1:9 closed the connection without "
                                                       "a whole answer"),
])
def test_a_timeout_or_connection_error_comes_back_as_status_0(exc: Exception, prefix: str) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/connect/token":
            return httpx.Response(200, json={"access_token": "t0k3n-xyz", "expires_in": 900})
        raise exc

    async def scenario() -> ApiResponse:
        async with mock_client(handler) as st:
            return await st.patch("customers", 1, {"name": "x"})

    resp = run(scenario)
    assert resp.status == 0 and resp.body is None and not resp.ok
    assert resp.error == prefix
    assert classify(resp.status, resp.body) is Outcome.RETRY


def test_a_dropped_connection_from_the_sandbox_comes_back_as_status_0() -> None:
    sb = new_sandbox()
    cid = sb.add_customer(name="Ada")["id"]
    sb.faults.add(Fault.dropped(), endpoint=PATCH_CUSTOMER)

    async def scenario() -> ApiResponse:
        async with client(sb) as st:
            return await st.patch("customers", cid, name_patch("Ada K"))

    resp = run(scenario)
    assert resp.status == 0
    assert resp.error is not None and resp.error.startswith("connection error")


def test_a_5xx_html_page_comes_back_as_text() -> None:
    sb = new_sandbox()
    cid = sb.add_customer(name="Ada")["id"]
    sb.faults.add(Fault.server_error(502, html=True), endpoint=GET_CUSTOMER)

    async def scenario() -> ApiResponse:
        async with client(sb) as st:
            return await st.get("customers", cid)

    resp = run(scenario)
    assert resp.status == 502 and isinstance(resp.body, str) and "Bad Gateway" in resp.body
    assert not resp.ok and resp.trace_id is None
    assert classify(resp.status, resp.body) is Outcome.RETRY


def test_a_2xx_with_a_garbage_body_is_not_ok() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/connect/token":
            return httpx.Response(200, json={"access_token": "t0k3n-xyz", "expires_in": 900})
        return httpx.Response(200, content=b"<html>oops</html>")

    async def scenario() -> ApiResponse:
        async with mock_client(handler) as st:
            return await st.get("customers", 1)

    resp = run(scenario)
    assert resp.status == 200 and resp.body == "<html>oops</html>" and not resp.ok
    assert classify(resp.status, resp.body) is Outcome.RETRY


def test_an_error_body_exposes_its_trace_id() -> None:
    sb = new_sandbox()

    async def scenario() -> ApiResponse:
        async with client(sb) as st:
            return await st.get("customers", 424242)

    resp = run(scenario)
    assert resp.status == 404 and not resp.ok
    assert resp.trace_id == resp.body["traceId"] and resp.trace_id
    assert classify(resp.status, resp.body) is Outcome.DEAD


# --------------------------------------------------------------------------------------------------- logs


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    stream = io.StringIO()
    configure_logging("DEBUG", "json", stream=stream)
    yield stream
    structlog.configure(**saved)
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)


def test_secrets_never_appear_in_logs(log_stream: io.StringIO, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    sb = new_sandbox()
    cid = sb.add_customer(name="Ada")["id"]
    issued: list[str] = []

    async def scenario() -> None:
        async with client(sb) as st:
            issued.append(await st.token())
            await st.get("customers", cid)
            sb.expire_tokens()
            await st.patch("customers", cid, name_patch("Ada K"))  # 401 -> refresh -> resend
            issued.append(await st.token())
            sb.faults.add(Fault.rate_limited(0, "seconds"), endpoint=GET_CUSTOMER)
            await st.get("customers", cid)
            sb.faults.add(Fault.dropped(), endpoint=GET_CUSTOMER)
            await st.get("customers", cid)
        async with client(sb, st_config(client_secret="wrong-secret-9f8e7d")) as bad:
            with pytest.raises(AuthError):
                await bad.token()

    run(scenario)
    out = log_stream.getvalue() + caplog.text
    assert "auth.token_fetched" in out and "auth.token_rejected" in out  # the logs were captured at all
    assert len(issued) == 2 and issued[0] != issued[1]
    for secret in (SECRET, "wrong-secret-9f8e7d", APP_KEY, *issued):
        assert secret not in out


@contextlib.contextmanager
def plain_tcp_server() -> Iterator[int]:
    """A loopback port that answers anything with plain HTTP, so that a TLS handshake with it fails."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.2)
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                conn, _ = srv.accept()
            except (TimeoutError, OSError):
                continue
            with conn:
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield int(srv.getsockname()[1])
    finally:
        done.set()
        t.join(2)
        srv.close()


@pytest.mark.parametrize("where", ["refused", "dns", "tls"])
def test_servicetitan_unreachable_says_why_in_words(where: str) -> None:
    with plain_tcp_server() as tls_port:
        base = {"refused": "http://127.0.0.1:1", "dns": "https://no-such-host.invalid",
                "tls": f"https://127.0.0.1:{tls_port}"}[where]
        cfg = st_config(api_base_url=base, auth_url=f"{base}/connect/token", timeout_seconds=5)

        async def scenario() -> ApiResponse:
            async with ServiceTitanClient(cfg, limiter=RateLimiter(1000)) as st:
                return await st.get("customers", 1)

        resp = run(scenario)
    assert resp.status == 0 and resp.not_sent
    expected = {
        "refused": "token endpoint http://127.0.0.1:1/connect/token unreachable: connection refused by 127.0.0.1:1 "
                   "(nothing listens there)",
        # (a machine without a resolver says "DNS lookup of no-such-host.invalid failed for now")
        "dns": "token endpoint https://no-such-host.invalid/connect/token unreachable: DNS ",
        "tls": f"token endpoint https://127.0.0.1:{tls_port}/connect/token unreachable: TLS error with "
               f"127.0.0.1:{tls_port} (WRONG_VERSION_NUMBER)",
    }[where]
    assert resp.error == expected if where != "dns" else resp.error.startswith(expected), resp.error
    assert where != "dns" or "no-such-host.invalid" in resp.error.removeprefix(expected)
