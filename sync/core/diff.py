"""Local diff: which writable fields of a mirror record differ from the last-synced shadow. Pure."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sync.core.fields import Entity, equal, writable_fields

Diff = dict[str, list[Any]]
"""{column: [shadow value, mirror value]} (lists, so the diff is JSON as stored in outbox.diff)."""


def _same(kind: Any, a: Any, b: Any) -> bool:
    try:
        return equal(kind, a, b)
    except (TypeError, ValueError, AttributeError):
        return False  # a malformed local value is a change; request building reports it on its column


def sent_values(diff: Any, local: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A stored diff ({column: [shadow value, mirror value]}, outbox.diff) as {column: value being sent}; an
    entry not in that form takes ``local``'s value for the column. A create's ``locations`` (what it carried of
    each new location: ``sync.core.create.create_diff``) is passed through."""
    if not isinstance(diff, Mapping):
        return {}
    local = local or {}
    return {c: (v[1] if isinstance(v, list) and len(v) == 2
                else v if c == "locations" and isinstance(v, Mapping) else local.get(c)) for c, v in diff.items()}


def unconfirmed_versions(stored: Any) -> list[dict[str, Any]]:
    """outbox.unconfirmed as a list of bodies ({column: value} each): a JSON array of them, one per attempt
    whose answer was lost (migration 0004 rows may hold a single object)."""
    items = stored if isinstance(stored, list) else [stored]
    return [dict(v) for v in items if isinstance(v, dict) and v]


def strip_key(data: Any, key: str) -> Any:
    """external_data without stsync's own mirror-id key (it is managed by stsync, never diffed)."""
    if isinstance(data, Mapping) and key in data:
        return {k: v for k, v in data.items() if k != key}
    return data


def local_diff(entity: Entity, mirror: Mapping[str, Any], shadow: Mapping[str, Any], *, sync_active: bool = True,
               mirror_id_key: str = "mirrorId") -> Diff:
    """Fields whose mirror value differs from the shadow. Empty: nothing to send."""
    out: Diff = {}
    for f in writable_fields(entity, sync_active=sync_active):
        local, base = mirror.get(f.column), shadow.get(f.column)
        if f.kind == "external_data":
            local, base = strip_key(local, mirror_id_key), strip_key(base, mirror_id_key)
        if not _same(f.kind, local, base):
            out[f.column] = [base, local]
    return out
