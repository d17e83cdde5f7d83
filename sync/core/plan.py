"""What a record's change becomes: its diff and PATCH body (or nothing to send), and the words for a change that
ends dead (rejected before sending, or by ServiceTitan). Pure; detect and dispatch both decide with it."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sync.core import openapi
from sync.core.diff import Diff, local_diff
from sync.core.fields import FIELDS, Entity, equal, writable_fields
from sync.core.request import Patch, api_to_column, build_patch


@dataclass(frozen=True)
class PatchSettings:
    """The configuration a PATCH body depends on (``sync.config.Config.patch_settings``)."""

    application_guid: str
    mirror_id_key: str = "mirrorId"
    sync_active: bool = True


def plan_record(settings: PatchSettings, entity: Entity, mirror_id: int, record: Mapping[str, Any],
                shadow: Mapping[str, Any],
                unconfirmed: Sequence[Mapping[str, Any]] = ()) -> tuple[Diff, Patch | None]:
    """(diff, patch) for one record: patch is None when there is nothing to send.

    ``unconfirmed``: bodies of attempts whose answers were lost (possibly applied by ServiceTitan). A column one
    of them carried whose mirror value differs from it is sent too, even when the mirror equals the shadow: a
    revert after a lost answer must reach ServiceTitan, which may hold the reverted value.
    """
    diff = local_diff(entity, record, shadow, sync_active=settings.sync_active, mirror_id_key=settings.mirror_id_key)
    writable = {f.column: f for f in writable_fields(entity, sync_active=settings.sync_active)}
    for body in unconfirmed:
        for column, sent in body.items():
            f = writable.get(column)
            if f is None or column in diff or f.kind == "external_data":
                continue
            try:
                same = equal(f.kind, record.get(column), sent)
            except (TypeError, ValueError, AttributeError):
                same = False
            if not same:
                diff[column] = [shadow.get(column), record.get(column)]
    if not diff:
        return diff, None
    patch = build_patch(entity, record, shadow, diff, mirror_id=mirror_id,
                        application_guid=settings.application_guid, mirror_id_key=settings.mirror_id_key)
    merged_into = shadow.get("merged_to_id")
    if merged_into is not None:
        # ServiceTitan merged this record into another: an edit of it would land on a record nobody uses any
        # more, and sending it to the survivor could overwrite the survivor's own values. Not sent; the
        # operator re-applies it on the survivor (docs/push.md, "Merged records")
        patch = Patch(patch.body, {"merged_to_id": [
            f"merged into {entity} {merged_into} in ServiceTitan: not sent; make this edit on that {entity}"]},
            reason="merged")
    return diff, patch


def deactivation(settings: PatchSettings, entity: Entity, mirror_id: int) -> Patch:
    """A propagated local delete of a customer or location: ``PATCH active=false`` (ServiceTitan has no delete
    for them), with our ``externalData`` as every PATCH carries it; validated like any body."""
    body = {"active": False, "externalData": {"patchMode": "Merge", "applicationGuid": settings.application_guid,
                                              "externalData": [{"key": settings.mirror_id_key,
                                                                "value": str(mirror_id)}]}}
    problems = {api_to_column(entity, path): msgs
                for path, msgs in openapi.validate(openapi.UPDATE_SCHEMAS[entity], body).items()}
    return Patch(body, problems)


def sync_error(problem: str, **extra: Any) -> str:
    """A mirror row's ``sync_error`` (JSON text): the problem in words, and what to look at."""
    return json.dumps({"message": problem, **extra})


def rejection(patch: Patch) -> tuple[str, dict[str, Any]]:
    """A body that fails ServiceTitan's schema: (message, the outbox row's ``last_error``)."""
    if patch.reason == "merged":
        message = "not sent: " + " ".join(patch.problems["merged_to_id"])
        return message, {"message": message, "merged_to_id": patch.problems}
    message = "request body fails ServiceTitan's schema: " + patch.problem_line()
    return message, {"message": message, "validation": patch.problems}


LOCAL_ONLY_ERROR = sync_error(
    "st_id is set but this record was never pulled from ServiceTitan: nothing is sent until the pull brings it "
    "(a row inserted without st_id is created in ServiceTitan instead; leave st_id empty for that)")

WAITING_FOR_LOCATION = sync_error(
    "waiting for a location: ServiceTitan creates a customer only together with one; insert a locations row "
    "with customer_id = this row's id and both are created in one request")

def dead_answer(entity: Entity, status: int, attempt: int, error_body: Any, error: str | None, outbox_id: int) -> str:
    """The mirror row's ``sync_error`` when ServiceTitan's answers end a change dead (status 0: no answer)."""
    errors = error_body.get("errors") if isinstance(error_body, dict) else None
    columns = sorted({api_to_column(entity, k[:1].lower() + k[1:]) for k in errors}) \
        if isinstance(errors, dict) else []
    if 200 <= status < 300:
        message = (f"ServiceTitan answered {status} with a body that is not a {entity} record, "
                   f"on every one of {attempt} attempts")
    elif status == 404:
        message = "record not found in ServiceTitan (deleted or merged there)"
    elif status == 400:
        title = error_body.get("title") if isinstance(error_body, dict) else None
        message = f"ServiceTitan rejected the update: {title or 'validation failed'}"
    elif status:
        message = f"ServiceTitan answered {status} on every one of {attempt} attempts"
    else:
        message = f"no answer from ServiceTitan in {attempt} attempts: {error}"
    return sync_error(message, status=status or None, columns=columns, errors=errors, outbox_id=outbox_id)


def not_a_record(entity: Entity, st_id: int, body: Any) -> str | None:
    """Why a 2xx answer to a PATCH of record ``st_id`` is not that record (docs/contract.md failure classes: such an
    answer is a failed attempt, never applied), or None when it is."""
    if not isinstance(body, dict):
        return f"not a {entity} record: a JSON {type(body).__name__}"
    problem = openapi.answer_problem(openapi.RESPONSE_SCHEMAS[entity], body)
    if problem is not None:
        return f"not a {entity} record: {problem}"
    if body.get("id") != st_id:
        return f"not a {entity} record: it is record {body.get('id')!r}, not {st_id}"
    return None


def read_only_edits(entity: Entity, record: Mapping[str, Any], shadow: Mapping[str, Any]) -> list[str]:
    """Read-only columns (``balance``, ``modified_on``...) whose mirror value differs from the last-synced one: a
    local edit that is never sent (docs/contract.md: flagged, counted, and put back by the next pull)."""
    out = []
    for f in FIELDS[entity]:
        if f.writable:
            continue
        try:
            same = equal(f.kind, record.get(f.column), shadow.get(f.column))
        except (TypeError, ValueError, AttributeError):
            same = False
        if not same:
            out.append(f.column)
    return out


def read_only_error(columns: list[str]) -> str:
    """The mirror row's ``sync_error`` for local edits of read-only columns."""
    return sync_error(f"read-only column(s) edited locally, never sent: {', '.join(columns)}; the next pull puts "
                      "ServiceTitan's value back", read_only_columns=columns)
