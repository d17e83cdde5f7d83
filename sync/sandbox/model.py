"""The sandbox's vocabulary: the two entities, what a request addresses (``Route``) and what was logged of it.

Shared by the tenant (``state.py``, ``store.py``), the fault plan (``faults.py``) and the ASGI layers
(``gateway.py``, ``app.py``); depends on nothing else in the sandbox.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

Entity = Literal["customer", "location"]
ENTITIES: tuple[Entity, ...] = ("customer", "location")
COLLECTIONS: dict[Entity, str] = {"customer": "customers", "location": "locations"}
ENTITY_OF_COLLECTION: dict[str, Entity] = {"customers": "customer", "locations": "location"}


RouteKind = Literal["token", "api", "admin", "other"]


@dataclass(frozen=True, slots=True)
class Route:
    """What a request addresses, as the gateway classified it."""

    kind: RouteKind
    method: str
    endpoint: str
    """Counter key, e.g. ``PATCH /customers/{id}``, ``GET /export/locations``, ``POST /connect/token``,
    ``PATCH /customers/{id}/contacts/{contactId}``, ``GET /export/locations/contacts``."""
    entity: Entity | None = None
    """The record's entity; for a record's contacts, the owner's (``customer`` for ``/customers/{id}/contacts``)."""
    record_id: int | None = None
    """The record's id; for a record's contacts, the owner's (not the contact's)."""
    tenant: str | None = None


@dataclass(slots=True)
class RequestRecord:
    """One request the sandbox received (API and token calls; admin calls are not logged)."""

    method: str
    path: str
    query: str
    body: Any
    """Parsed JSON body (PATCH, POST), the token form without the secret, or None."""
    status: int
    """HTTP status answered; 0 when the connection was dropped without an answer."""
    time: float
    """Sandbox clock (epoch seconds) when the request arrived."""
    duration_ms: float
    endpoint: str
    entity: Entity | None
    record_id: int | None
    fault: str | None
    """``rate_limit``/``server_error``/``drop``/``slow`` (injected), ``limiter`` (enforced limit), or None."""
    applied: bool
    """A write (PATCH, or a create POST) was applied (even if its answer was then replaced by a fault)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

