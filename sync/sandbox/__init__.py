"""A ServiceTitan CRM v2 simulator (customers and locations) for tests, benchmarks and the demo.

- :class:`Sandbox` (``state.py``): one in-memory tenant and its Python API: seeding, remote edits, the fault
  plan (:class:`Faults`), counters and the request log.
- :func:`create_app` (``app.py``): the Starlette ASGI app, in-process via ``httpx.ASGITransport`` or served;
  its module docstring lists the API and the ``/_sandbox/...`` admin endpoints.
- :class:`SandboxServer` / :func:`serve` (``server.py``): uvicorn on a background thread or blocking.
- ``seed.py``: deterministic fake records.
"""

from sync.sandbox.app import ConnectionDropped, create_app
from sync.sandbox.errors import ApiError, OAuthError, RecordNotFound
from sync.sandbox.faults import Fault, FaultRule, Faults
from sync.sandbox.model import RequestRecord
from sync.sandbox.server import SandboxServer, serve
from sync.sandbox.state import Sandbox

__all__ = [
    "ApiError",
    "ConnectionDropped",
    "Fault",
    "FaultRule",
    "Faults",
    "OAuthError",
    "RecordNotFound",
    "RequestRecord",
    "Sandbox",
    "SandboxServer",
    "create_app",
    "serve",
]
