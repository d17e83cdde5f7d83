"""Export feed answers: a page, and its records as canonical records (what is missing, what cannot be stored).
Pure; the pull (sync.stages.pull) fetches the pages and applies the records."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

from sync.core import openapi
from sync.core.fields import FIELDS, NOT_NULL_BOOLS, Entity, parse_timestamp
from sync.errors import ServiceTitanError


@dataclass(frozen=True)
class Page:
    has_more: bool
    continue_from: str | None
    data: list[Any]


def parse_page(feed: str, body: Any) -> Page:
    """An export answer as a Page; ServiceTitanError (one line) when it is not ``{hasMore, continueFrom, data}``."""
    if not (isinstance(body, dict) and isinstance(body.get("hasMore"), bool) and isinstance(body.get("data"), list)
            and isinstance(body.get("continueFrom"), str | None) and "continueFrom" in body):
        got = sorted(body)[:6] if isinstance(body, dict) else type(body).__name__
        raise ServiceTitanError(f"GET /export/{feed} answered a body that is not {{hasMore, continueFrom, data}} "
                                f"(got {got})", body=body if isinstance(body, dict) else None)
    if body["hasMore"] and not body["continueFrom"]:
        raise ServiceTitanError(f"GET /export/{feed} answered hasMore=true without a continueFrom token")
    return Page(body["hasMore"], body["continueFrom"] or None, body["data"])


def normalise(rec: dict[str, Any]) -> dict[str, Any]:
    """Missing NOT NULL flags take the mirror's defaults (mirror and shadow alike: never a local diff)."""
    for column, default in NOT_NULL_BOOLS.items():
        if column in rec and rec[column] is None:
            rec[column] = default
    return rec


@cache
def required_fields(entity: Entity) -> tuple[frozenset[str], frozenset[str]]:
    """Synced top-level fields and address parts the export schema marks required (absent is not null)."""
    schemas = openapi.spec()["components"]["schemas"]
    name = "Crm.V2.ExportCustomerResponse" if entity == "customer" else "Crm.V2.ExportLocationsResponse"
    required = set(schemas[name].get("required", []))
    synced = {f.api for f in FIELDS[entity] if not f.address} | {"address"}
    address_required = set(schemas["Crm.V2.Customers.CustomerAddress"].get("required", []))
    return frozenset(required & synced - {"externalData"}), frozenset(address_required)


def missing_fields(entity: Entity, raw: Mapping[str, Any]) -> list[str]:
    top, address = required_fields(entity)
    missing = sorted(k for k in top if k not in raw)
    addr = raw.get("address")
    if isinstance(addr, Mapping):
        missing += sorted(f"address.{k}" for k in address if k not in addr)
    return missing


def without_nul(raw: Any) -> tuple[Any, bool]:
    """Strings PostgreSQL cannot store (U+0000) lose that character instead of failing the page transaction on
    every pull (which would block the whole feed). Returns (cleaned value, whether anything was removed)."""
    found = False

    def clean(v: Any) -> Any:
        nonlocal found
        if isinstance(v, str):
            if "\x00" in v:
                found = True
                return v.replace("\x00", "")
            return v
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v

    out = clean(raw)
    return out, found


def newer(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """``a`` is strictly newer than ``b`` by modifiedOn (later in the page wins ties)."""
    try:
        return bool(a.get("modified_on") and b.get("modified_on")
                    and parse_timestamp(a["modified_on"]) > parse_timestamp(b["modified_on"]))
    except ValueError:
        return False




BIGINT_MAX = 2**63 - 1


def unstorable(raw: Any) -> str | None:
    """Why PostgreSQL could not store this record (a value out of bigint range, a float that is not finite, a
    string that is not valid Unicode such as a lone UTF-16 surrogate), or None. Checked before writing, so one
    such record is quarantined instead of failing its whole page."""

    def why(v: Any, path: str) -> str | None:
        if isinstance(v, bool) or v is None:
            return None
        if isinstance(v, int):
            return f"{path}: {v} is out of the 64-bit integer range" if not -BIGINT_MAX - 1 <= v <= BIGINT_MAX \
                else None
        if isinstance(v, float):
            return None if math.isfinite(v) else f"{path}: {v} is not a finite number"
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return f"{path}: not valid Unicode (a lone surrogate)"
            return None
        if isinstance(v, dict):
            for k, x in v.items():
                found = why(k, f"{path}.<key>") or why(x, f"{path}.{k}")
                if found:
                    return found
        if isinstance(v, list):
            for i, x in enumerate(v):
                found = why(x, f"{path}[{i}]")
                if found:
                    return found
        return None

    return why(raw, "record")
