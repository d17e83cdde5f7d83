"""The optional HTTP listener (``observability.listen``): /healthz, /readyz and Prometheus /metrics.

It knows the daemon only through ``Probes``: what to check and what to serve, handed over by the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sync.errors import ConfigError
from sync.log import mask


@dataclass(frozen=True)
class Probes:
    worker: str
    database: Callable[[], None]
    """Raises when the database does not answer (run in a thread)."""
    token: Callable[[], Awaitable[Any]]
    """Raises when no ServiceTitan token can be had."""
    scheduler: Callable[[], str]
    """``ok``, or why the jobs are not running (``not started: waiting for the database: ...``, ``stopping``)."""
    registry: CollectorRegistry


def create_app(probes: Probes) -> Starlette:
    async def healthz(_: Request) -> Response:
        return JSONResponse({"status": "alive", "worker": probes.worker})

    async def readyz(_: Request) -> Response:
        checks: dict[str, Any] = {}
        try:
            await asyncio.wait_for(asyncio.to_thread(probes.database), timeout=5)
            checks["database"] = "ok"
        except Exception as exc:
            checks["database"] = f"error: {_why(exc, 'the database did not answer within 5 s')}"
        try:
            await asyncio.wait_for(probes.token(), timeout=10)
            checks["servicetitan_token"] = "ok"  # noqa: S105
        except Exception as exc:
            checks["servicetitan_token"] = f"error: {_why(exc, 'no token within 10 s')}"
        checks["scheduler"] = probes.scheduler()
        ready = all(v == "ok" for v in checks.values())
        return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)

    async def metrics(_: Request) -> Response:
        started = time.perf_counter()
        body = await asyncio.to_thread(generate_latest, probes.registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST,
                        headers={"X-Scrape-Ms": f"{(time.perf_counter() - started) * 1000:.1f}"})

    return Starlette(routes=[Route("/healthz", healthz), Route("/readyz", readyz), Route("/metrics", metrics)])


def _why(exc: BaseException, on_timeout: str) -> str:
    """A failed readiness check in words: the error's first line, registered secrets masked."""
    if isinstance(exc, TimeoutError):
        return on_timeout
    orig = getattr(exc, "orig", None)  # SQLAlchemy wraps the driver's error
    text = str(orig if orig is not None else exc).strip().splitlines()
    return mask(text[0][:300]) if text else type(exc).__name__


def bind(listen: str) -> socket.socket:
    """The listening socket for ``observability.listen``, bound before anything else starts, so that an address
    in use or one this machine does not have is one line (ConfigError, exit 2), never a server's traceback."""
    host, _, port = listen.rpartition(":")
    host = (host or "127.0.0.1").strip("[]")
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"observability.listen: cannot listen on {listen}: {_reason(exc)}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"observability.listen: cannot listen on {listen}: {_reason(exc)}") from None
    return sock


def _reason(exc: BaseException) -> str:
    if isinstance(exc, socket.gaierror):
        return "no such host or address"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower() + ("; stop the other process or choose another port"
                                       if exc.errno == errno.EADDRINUSE else "")
    return str(exc) or type(exc).__name__


async def serve(probes: Probes, listen: str | socket.socket, stopping: asyncio.Event) -> None:
    """Serve until ``stopping`` is set (on ``listen``: a socket from ``bind``, or the address to bind)."""
    import uvicorn

    sock = listen if isinstance(listen, socket.socket) else bind(listen)
    server = uvicorn.Server(uvicorn.Config(create_app(probes), log_level="warning", access_log=False,
                                           lifespan="off"))
    # the daemon owns SIGTERM/SIGINT (graceful stop); uvicorn must not take them over
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
    task = asyncio.create_task(server.serve(sockets=[sock]))
    await stopping.wait()
    server.should_exit = True
    await task
