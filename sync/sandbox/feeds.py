"""The read side's query parameters and paging: ``GET /customers`` / ``/locations`` (filter, sort, page), a
record's contacts (``GET /customers/{id}/contacts``: :func:`page_query`, :func:`paginate`) and the export feeds
``GET /export/...`` (continuation tokens, the export delay), each over one :class:`~sync.sandbox.store.Table`
(the contact feeds ``/export/customers/contacts`` and ``/export/locations/contacts`` over a table of contacts).

Each feed is two steps: parse the query string (400 :class:`ApiError` for a bad parameter, no lock needed), then
page over the table, which the caller (``Sandbox.api_list`` / ``api_export``) does while holding the tenant's
lock. Continuation tokens are ``stx1|feed|modified µs|id`` in URL-safe base64 (feed: ``customer``, ``location``,
``customer-contact``, ``location-contact``; a token of one feed is a 400 on another): a position in the feed's
``(modifiedOn, id)`` order, so a record changed after a token was issued comes again after it.
"""

from __future__ import annotations

import bisect
import re
from base64 import urlsafe_b64decode, urlsafe_b64encode
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sync.sandbox.errors import VALIDATION_TITLE, ApiError
from sync.sandbox.model import Entity
from sync.sandbox.store import GUID_PATTERN, Table, ext_list, guid_key

LIST_MAX_PAGE_SIZE = 5000
LIST_DEFAULT_PAGE_SIZE = 50
LOCATION_IDS_MAX = 50
_CONTINUATION_PREFIX = "stx1"
MAX_ID = 2**63 - 1


_FRACTION = re.compile(r"(\.\d{6})\d+")


def parse_when(text: str) -> int:
    """A date or date-time string (ISO 8601; naive means UTC; up to 7 fraction digits as .NET writes them)
    as microseconds since the epoch. Raises ValueError."""
    s = text.strip()
    if not s:
        raise ValueError("empty date")
    if s[-1] in "zZ":
        s = s[:-1] + "+00:00"
    s = _FRACTION.sub(r"\1", s)
    dt = datetime.fromisoformat(s)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    delta = dt - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def encode_continuation(feed: str, ts: int, record_id: int) -> str:
    """A token for the position ``(ts, record_id)`` of ``feed`` (an entity, or ``customer-contact`` /
    ``location-contact`` for the contact feeds)."""
    raw = f"{_CONTINUATION_PREFIX}|{feed}|{ts}|{record_id}".encode()
    return urlsafe_b64encode(raw).decode().rstrip("=")


def decode_continuation(feed: str, token: str) -> tuple[int, int] | None:
    """The ``(modified µs, id)`` position a token encodes; None when ``token`` is not one of ours; 400 ApiError
    for a token of another feed."""
    try:
        raw = urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        return None
    parts = raw.split("|")
    if len(parts) != 4 or parts[0] != _CONTINUATION_PREFIX:
        return None
    if parts[1] != feed:
        raise ApiError(400, VALIDATION_TITLE, {"from": [f"The continuation token belongs to the {parts[1]} feed."]})
    try:
        return int(parts[2]), int(parts[3])
    except ValueError:
        return None


# ------------------------------------------------------------------------------------------------- lists


@dataclass(frozen=True, slots=True)
class ListQuery:
    """The parsed parameters of ``GET /customers`` / ``GET /locations``."""

    page: int
    page_size: int
    include_total: bool
    active: str
    sort_field: str
    descending: bool
    ids: list[int] | None
    bounds: dict[str, int | None]
    customer_id: int | None
    guid: str | None
    ext_key: str | None
    ext_values: set[str]


def list_query(entity: Entity, params: Mapping[str, str]) -> ListQuery:
    """Parse a list's query string; 400 ApiError naming every bad parameter."""
    errors: dict[str, list[str]] = {}
    page = _int_param(params, "page", 1, errors, minimum=1)
    page_size = min(_int_param(params, "pageSize", LIST_DEFAULT_PAGE_SIZE, errors, minimum=1),
                    LIST_MAX_PAGE_SIZE)
    include_total = _bool_param(params, "includeTotal", errors)
    active = (params.get("active") or "True").strip().lower()
    if active not in ("true", "false", "any"):
        errors["active"] = [f"The value '{params.get('active')}' is not valid. Values: True, Any, False."]
    sort_field, descending = "id", False
    sort = (params.get("sort") or "").strip()
    if sort:
        descending = sort.startswith("-")
        name = sort.lstrip("+-").strip().lower()
        if name not in ("id", "modifiedon", "createdon"):
            errors["sort"] = [f"Sorting by '{sort}' is not supported. Available fields: Id, ModifiedOn, CreatedOn."]
        sort_field = name
    ids: list[int] | None = None
    if params.get("ids"):
        try:
            ids = [int(p) for p in params["ids"].split(",") if p.strip()]
        except ValueError:
            errors["ids"] = ["The ids parameter must be a comma-separated list of integers."]
        if ids is not None and entity == "location" and len(ids) > LOCATION_IDS_MAX:
            errors["ids"] = [f"At most {LOCATION_IDS_MAX} ids are allowed."]
    bounds = {k: _when_param(params, k, errors)
              for k in ("modifiedOnOrAfter", "modifiedBefore", "createdOnOrAfter", "createdBefore")}
    customer_id: int | None = None
    if entity == "location" and params.get("customerId"):
        customer_id = _int_param(params, "customerId", 0, errors)
    guid = params.get("externalDataApplicationGuid") or None
    ext_key = params.get("externalDataKey") or None
    ext_values = {v.strip() for v in (params.get("externalDataValues") or "").split(",") if v.strip()}
    if guid is not None and not GUID_PATTERN.match(guid):
        errors["externalDataApplicationGuid"] = [f"The value '{guid}' is not valid."]
    if errors:
        raise ApiError(400, VALIDATION_TITLE, errors)
    return ListQuery(page, page_size, include_total, active, sort_field, descending, ids, bounds, customer_id, guid,
                     ext_key, ext_values)


def list_page(table: Table, query: ListQuery) -> dict[str, Any]:
    """One page of ``table``'s records for ``query`` (the caller holds the tenant's lock)."""
    page, page_size, include_total, active = query.page, query.page_size, query.include_total, query.active
    sort_field, descending, ids, bounds = query.sort_field, query.descending, query.ids, query.bounds
    customer_id, guid, ext_key, ext_values = query.customer_id, query.guid, query.ext_key, query.ext_values
    records, ts_of = table.records, table.ts
    m_lo, m_hi = bounds["modifiedOnOrAfter"], bounds["modifiedBefore"]
    if ids is not None:
        rows = [records[i] for i in sorted(set(ids)) if i in records]
    elif m_lo is not None or m_hi is not None:
        lo = bisect.bisect_left(table.order, (m_lo, -1)) if m_lo is not None else 0
        hi = bisect.bisect_left(table.order, (m_hi, -1)) if m_hi is not None else len(table.order)
        rows = [records[rid] for _, rid in table.order[lo:hi]]
        if sort_field == "id":
            rows.sort(key=lambda r: r["id"])
    else:
        rows = list(records.values())  # id order: ids only grow
    if m_lo is not None:
        rows = [r for r in rows if ts_of[r["id"]] >= m_lo]
    if m_hi is not None:
        rows = [r for r in rows if ts_of[r["id"]] < m_hi]
    if active != "any":
        want = active == "true"
        rows = [r for r in rows if r["active"] is want]
    c_lo, c_hi = bounds["createdOnOrAfter"], bounds["createdBefore"]
    if c_lo is not None or c_hi is not None:
        rows = [r for r in rows if _in_range(parse_when(r["createdOn"]), c_lo, c_hi)]
    if customer_id is not None:
        rows = [r for r in rows if r["customerId"] == customer_id]
    ext_key_guid = guid_key(guid) if guid else None
    if ext_key_guid and ext_key:
        rows = [r for r in rows
                if table.ext.get(r["id"], {}).get(ext_key_guid, {}).get(ext_key) in ext_values]
    if sort_field == "modifiedon":
        rows.sort(key=lambda r: (ts_of[r["id"]], r["id"]), reverse=descending)
    elif sort_field == "createdon":
        rows.sort(key=lambda r: (r["createdOn"], r["id"]), reverse=descending)
    elif descending:
        rows.reverse()
    total = len(rows)
    start = (page - 1) * page_size
    data = rows[start:start + page_size]
    if guid:
        data = [{**r, "externalData": ext_list(table, r["id"], guid)} for r in data]
    return {
        "page": page,
        "pageSize": page_size,
        "hasMore": start + page_size < total,
        "totalCount": total if include_total else None,
        "data": data,
    }


def page_query(params: Mapping[str, str]) -> tuple[int, int, bool]:
    """``page``, ``pageSize`` and ``includeTotal`` of a plain paginated list (a record's contacts); 400
    ApiError naming every bad parameter."""
    errors: dict[str, list[str]] = {}
    page = _int_param(params, "page", 1, errors, minimum=1)
    page_size = min(_int_param(params, "pageSize", LIST_DEFAULT_PAGE_SIZE, errors, minimum=1),
                    LIST_MAX_PAGE_SIZE)
    include_total = _bool_param(params, "includeTotal", errors)
    if errors:
        raise ApiError(400, VALIDATION_TITLE, errors)
    return page, page_size, include_total


def paginate(rows: list[dict[str, Any]], page: int, page_size: int, include_total: bool) -> dict[str, Any]:
    """A ``PaginatedResponse`` of ``rows`` (already filtered and sorted)."""
    start = (page - 1) * page_size
    return {
        "page": page,
        "pageSize": page_size,
        "hasMore": start + page_size < len(rows),
        "totalCount": len(rows) if include_total else None,
        "data": rows[start:start + page_size],
    }


# ------------------------------------------------------------------------------------------------- exports


def export_start(feed: str, params: Mapping[str, str]) -> tuple[tuple[int, int], bool]:
    """Where an export request starts (``(modified µs, id)`` from a token, a date, or the beginning) and whether
    it asked for ``includeRecentChanges``; 400 ApiError for a bad parameter."""
    errors: dict[str, list[str]] = {}
    include_recent = _bool_param(params, "includeRecentChanges", errors)
    raw_from = params.get("from")
    pos: tuple[int, int] = (-1, -1)
    if raw_from:
        decoded = decode_continuation(feed, raw_from)
        if decoded is not None:
            pos = decoded
        else:
            try:
                pos = (parse_when(raw_from) - 1, MAX_ID)  # everything modified on or after that time
            except ValueError:
                errors["from"] = [f"The value '{raw_from}' is neither a continuation token nor a date."]
    if errors:
        raise ApiError(400, VALIDATION_TITLE, errors)
    return pos, include_recent


def export_page(table: Table, feed: str, pos: tuple[int, int], size: int, cutoff_us: int | None) -> dict[str, Any]:
    """Up to ``size`` records after ``pos`` in the feed's order, none modified after ``cutoff_us`` (None: no
    export delay); the caller holds the tenant's lock."""
    order = table.order
    start = bisect.bisect_right(order, pos)
    limit = len(order) if cutoff_us is None else bisect.bisect_right(order, (cutoff_us, MAX_ID))
    end = max(start, min(start + size, limit))
    window = order[start:end]
    records = table.records
    data = [records[rid] for _, rid in window]
    last = window[-1] if window else pos
    return {
        "hasMore": end < limit,
        "continueFrom": encode_continuation(feed, *last),
        "data": data,
    }


# ------------------------------------------------------------------------------------------------- parameters


def _in_range(value: int, lo: int | None, hi: int | None) -> bool:
    return (lo is None or value >= lo) and (hi is None or value < hi)


def _int_param(
    params: Mapping[str, str], name: str, default: int, errors: dict[str, list[str]], minimum: int | None = None
) -> int:
    raw = params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        errors[name] = [f"The value '{raw}' is not valid for {name}."]
        return default
    if minimum is not None and value < minimum:
        errors[name] = [f"{name} must be at least {minimum}."]
        return default
    return value


def _bool_param(params: Mapping[str, str], name: str, errors: dict[str, list[str]]) -> bool:
    raw = params.get(name)
    if raw is None or raw == "":
        return False
    low = raw.strip().lower()
    if low not in ("true", "false"):
        errors[name] = [f"The value '{raw}' is not valid for {name}."]
        return False
    return low == "true"


def _when_param(params: Mapping[str, str], name: str, errors: dict[str, list[str]]) -> int | None:
    raw = params.get(name)
    if raw is None or raw == "":
        return None
    try:
        return parse_when(raw)
    except ValueError:
        errors[name] = [f"The value '{raw}' is not a valid date-time."]
        return None

