"""The check before sending: which records about to be PATCHed changed in ServiceTitan since their shadow. Pure.

ServiceTitan's PATCH has no precondition, so a remote edit the mirror has not seen yet would be overwritten
without a conflict. The dispatcher (``sync.stages.dispatch``) lists the records of each claimed batch with one
``GET /customers?ids=...`` (or ``/locations``) just before sending them; a record whose ``modifiedOn`` is newer
than its shadow's is merged first (the pull's reconciler) and its body recomputed. ``docs/push.md`` has the
window this leaves and what it costs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sync.core.fields import parse_timestamp


def changed_since(data: Any, known: Mapping[int, Any]) -> dict[int, dict[str, Any]]:
    """The records of a list answer's ``data`` whose ``modifiedOn`` is later than ``known[id]`` (the shadow's
    ``modified_on``), by id. A record not asked for, without a usable ``modifiedOn``, or whose known version is
    unknown, is left out: it is sent as planned (the check narrows a window, it never blocks a send)."""
    out: dict[int, dict[str, Any]] = {}
    if not isinstance(data, list):
        return out
    for rec in data:
        if not isinstance(rec, dict):
            continue
        st_id = rec.get("id")
        if not isinstance(st_id, int) or isinstance(st_id, bool) or known.get(st_id) is None:
            continue
        try:
            if parse_timestamp(rec.get("modifiedOn")) > parse_timestamp(known[st_id]):
                out[st_id] = rec
        except (TypeError, ValueError):
            continue
    return out
