"""/readyz says why it is not ready, in words (issue 18), never a class name."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from prometheus_client import CollectorRegistry

from sync.daemon.health import Probes, create_app
from sync.errors import AuthError


def test_readyz_names_the_reason_of_each_failed_check() -> None:
    def database() -> None:
        raise OSError('connection to server at "db.internal" (10.0.0.5), port 5432 failed: Connection refused')

    async def token() -> Any:
        raise AuthError("ServiceTitan refused the credentials (401 invalid_client): check servicetitan.client_id "
                        "and client_secret")

    app = create_app(Probes(worker="w1", database=database, token=token, scheduler=lambda: "ok",
                            registry=CollectorRegistry()))

    async def ask() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://stsync") as client:
            return await client.get("/readyz")

    answer = asyncio.run(ask())
    assert answer.status_code == 503
    checks = answer.json()["checks"]
    assert checks["database"].startswith('error: connection to server at "db.internal"')
    assert "Connection refused" in checks["database"]
    assert checks["servicetitan_token"].startswith("error: ServiceTitan refused the credentials (401")
    assert checks["scheduler"] == "ok"
