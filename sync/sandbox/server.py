"""Serving the sandbox over HTTP with uvicorn: in a background thread (tests, demo) or blocking (CLI)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from types import TracebackType

import structlog
import uvicorn

from sync.sandbox.app import create_app
from sync.sandbox.state import Sandbox

log = structlog.get_logger("sync.sandbox")


def _bind(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _config(sandbox: Sandbox, log_level: str) -> uvicorn.Config:
    return uvicorn.Config(
        create_app(sandbox),
        log_level=log_level,
        log_config=None,  # leave the process's logging configuration alone
        access_log=False,
        lifespan="off",
        timeout_keep_alive=5,
        timeout_graceful_shutdown=3,
    )


class SandboxServer:
    """uvicorn serving ``sandbox`` on a background thread; ``port=0`` picks a free port.

    >>> with SandboxServer(Sandbox()) as server:
    ...     httpx.post(server.url + "/connect/token", data={...})
    """

    def __init__(
        self, sandbox: Sandbox | None = None, host: str = "127.0.0.1", port: int = 0, *, log_level: str = "warning"
    ) -> None:
        self.sandbox = sandbox if sandbox is not None else Sandbox()
        self.host = host
        self.port = port
        self.log_level = log_level
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._url: str | None = None

    @property
    def url(self) -> str:
        """``http://host:port`` (available once started)."""
        if self._url is None:
            raise RuntimeError("the sandbox server is not started")
        return self._url

    def start(self, timeout: float = 10.0) -> SandboxServer:
        if self._thread is not None:
            raise RuntimeError("the sandbox server is already started")
        sock = _bind(self.host, self.port)
        self._url = _url(sock)
        server = uvicorn.Server(_config(self.sandbox, self.log_level))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="stsync-sandbox", daemon=True)
        self._server, self._thread = server, thread
        thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                sock.close()
                raise RuntimeError("the sandbox server did not start")
            time.sleep(0.005)
        log.debug("sandbox_started", url=self._url)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        server.should_exit = True
        thread.join(timeout)
        if thread.is_alive():
            server.force_exit = True
            thread.join(timeout)
        self._server = self._thread = None
        log.debug("sandbox_stopped", url=self._url)

    def __enter__(self) -> SandboxServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def serve(
    sandbox: Sandbox,
    host: str = "127.0.0.1",
    port: int = 8765,
    *,
    log_level: str = "info",
    ready: Callable[[str], None] | None = None,
) -> None:
    """Serve until interrupted (SIGINT/SIGTERM). ``ready`` is called with the URL once the socket is bound."""
    sock = _bind(host, port)
    url = _url(sock)
    server = uvicorn.Server(_config(sandbox, log_level))
    log.info("sandbox_listening", url=url, tenant_id=sandbox.tenant_id)
    if ready is not None:
        ready(url)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
