"""A ServiceTitan CRM v2 simulator (customers, locations and their contacts) for tests, benchmarks and the demo.

It imports nothing from ``sync`` outside ``sync.sandbox``; its only link to the rest is the OpenAPI file it
reads as package data (``sync/spec/crm-v2.openapi.json``).

- :class:`Sandbox` (``state.py``): one in-memory tenant and its Python API: seeding, remote edits, the fault
  plan (:class:`Faults`), counters and the request log. Built from ``store.py`` (records, PATCH semantics),
  ``contacts.py`` (the records' contacts: their endpoints, feeds' tables and remote edits), ``creates.py``
  (``POST /customers`` / ``POST /locations`` and remote creations), ``feeds.py`` (list and export paging),
  ``validation.py`` (request bodies checked with openapi-core against the OpenAPI file), ``faults.py``,
  ``errors.py`` (ServiceTitan's error answers) and ``model.py`` (entities, routes, the request log's records).
- :func:`create_app` (``app.py``): the Starlette ASGI app, in-process via ``httpx.ASGITransport`` or served;
  its module docstring lists the API and the ``/_sandbox/...`` admin endpoints (``admin.py``). In front of
  it, ``gateway.py``: auth, rate limit, faults, latency, counters and the request log.
- :class:`SandboxServer` / :func:`serve` (``server.py``): uvicorn on a background thread or blocking.
- ``seed.py``: deterministic fake records.
"""

from sync.sandbox.app import create_app
from sync.sandbox.errors import ApiError, ContactNotFound, OAuthError, RecordNotFound
from sync.sandbox.faults import Fault, FaultRule, Faults
from sync.sandbox.gateway import ConnectionDropped
from sync.sandbox.model import RequestRecord
from sync.sandbox.server import SandboxServer, serve
from sync.sandbox.state import Sandbox

__all__ = [
    "ApiError",
    "ConnectionDropped",
    "ContactNotFound",
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
