"""What the sandbox checks a request body against: ServiceTitan's shipped OpenAPI file, read with openapi-core.

Deliberately not the client's validator (``sync/openapi.py``: our own OpenAPI -> JSON-schema translation run
by fastjsonschema/jsonschema). The sandbox uses a second, independent reading of the same file, openapi-core's
OAS 3.0 request-body ("write") validator, so a mistake in our own translation makes the client send bodies the
sandbox refuses instead of being shared by both sides. Nothing here imports the ``sync`` package: the only link is
the location of the spec file, read as package data.

The answers keep ServiceTitan's 400 shape: ``{field path: [messages]}`` with jsonschema's messages for type and
enum errors, "The field X is not a known field." / "The X field is required." for unknown and missing fields.

Built once per process, on first use (about 50 ms for both): the operation's request-body schema is looked up in the
spec by openapi-core's spec path (``paths -> PATCH|POST -> requestBody -> application/json``), its ``$ref``s
inlined through that same path (each ``$ref`` resolved by jsonschema-path, openapi-core's resolver), then
handed to openapi-core's schema-validator factory. Inlining saves a third of the cost per body (no reference
lookups per validation): about 180 µs of CPU for a typical customer PATCH body, where the client's compiled
fastjsonschema gate takes about 15 µs (pure-Python jsonschema walks the schema per value).

One known difference from the client's validator: an integral float (``0.0``, ``1e16``) for an ``integer``
field is refused here (OAS 3.0 uses draft-4 ``integer``, as .NET's ``long`` does) while ``sync/openapi.py``'s
fastjsonschema gate, compiled with its default draft-07 rules, lets it through.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from functools import cache
from importlib import resources
from typing import Any

from jsonschema.exceptions import ValidationError
from jsonschema.validators import extend
from jsonschema_path import SchemaPath
from openapi_core import OpenAPI
from openapi_core.validation.schemas.exceptions import InvalidSchemaValue
from openapi_core.validation.schemas.factories import SchemaValidatorsFactory
from openapi_core.validation.schemas.validators import SchemaValidator
from openapi_schema_validator import OAS30WriteValidator

from sync.sandbox.model import Entity

SPEC_PACKAGE = "sync.spec"
SPEC_FILE = "crm-v2.openapi.json"
PATCH_PATHS: dict[Entity, str] = {
    "customer": "/tenant/{tenant}/customers/{id}",
    "location": "/tenant/{tenant}/locations/{id}",
}
CREATE_PATHS: dict[Entity, str] = {
    "customer": "/tenant/{tenant}/customers",
    "location": "/tenant/{tenant}/locations",
}
CONTACT_PATHS: dict[Entity, str] = {
    "customer": "/tenant/{tenant}/customers/{id}/contacts",
    "location": "/tenant/{tenant}/locations/{id}/contacts",
}
"""``POST``: ``CreateCustomerContactRequest`` / ``LocationContactCreateRequest``."""
CONTACT_ITEM_PATHS: dict[Entity, str] = {
    "customer": "/tenant/{tenant}/customers/{id}/contacts/{contactId}",
    "location": "/tenant/{tenant}/locations/{id}/contacts/{contactId}",
}
"""``PATCH``: ``UpdateCustomerContactRequest`` / ``LocationContactUpdateRequest``."""
_MAX_DEPTH = 64  # the two request schemas are about a dozen steps deep; far deeper means a $ref cycle


@cache
def spec_dict() -> dict[str, Any]:
    """The parsed OpenAPI document shipped with the package (``sync/spec/crm-v2.openapi.json``)."""
    text = resources.files(SPEC_PACKAGE).joinpath(SPEC_FILE).read_text(encoding="utf-8")
    data: dict[str, Any] = json.loads(text)
    return data


@cache
def openapi() -> OpenAPI:
    """openapi-core's view of the spec. The file itself is not re-validated (openapi-spec-validator): that takes
    about a second per process, and the file is ServiceTitan's, shipped as it was downloaded."""
    from openapi_core import Config

    return OpenAPI.from_dict(spec_dict(), config=Config(spec_validator_cls=None))


def _nullable_combinator(name: str) -> Any:
    """``oneOf``/``anyOf``/``allOf`` that let ``null`` through when the same schema says ``nullable: true``.

    ServiceTitan's file (NSwag output) writes a nullable reference as ``{"oneOf": [{"$ref": ..}], "nullable":
    true}`` (``ExternalDataUpdateRequest.patchMode``) and its .NET server accepts null there. OAS 3.0.3 says
    ``nullable`` only counts next to a ``type``, which openapi-schema-validator follows (PR #57), so it refuses
    that null (openapi-core issue #277, open). This keeps ServiceTitan's (and the sandbox's former) answer.
    """
    base = OAS30WriteValidator.VALIDATORS[name]

    def combinator(
        validator: Any, subschemas: Any, instance: Any, schema: Mapping[str, Any]
    ) -> Iterator[ValidationError]:
        if instance is None and schema.get("nullable") is True:
            return
        yield from base(validator, subschemas, instance, schema)

    return combinator


_WriteValidator = extend(
    OAS30WriteValidator, {name: _nullable_combinator(name) for name in ("oneOf", "anyOf", "allOf")}
)
# No format checks: "guid", "int64", "multiline"... are descriptive in this file (ServiceTitan does not refuse
# an id above 2**63 as a format error; it answers that the tag type does not exist).
_FACTORY = SchemaValidatorsFactory(_WriteValidator)


def _inline(path: SchemaPath, depth: int = 0) -> Any:
    """The schema at ``path`` with every ``$ref`` replaced by its target (resolved by jsonschema-path)."""
    if depth > _MAX_DEPTH:
        raise ValueError(f"schema nested too deep (a $ref cycle?) at {path}")
    with path.resolve() as resolved:
        contents = resolved.contents
    if isinstance(contents, Mapping):
        return {key: _inline(path / key, depth + 1) for key in contents}
    if isinstance(contents, list):
        return [_inline(path / i, depth + 1) for i in range(len(contents))]
    return contents


def _request_schema(entity: Entity, method: str = "patch") -> SchemaPath:
    return _request_schema_at(PATCH_PATHS[entity] if method == "patch" else CREATE_PATHS[entity], method)


def _request_schema_at(path: str, method: str) -> SchemaPath:
    content = openapi().spec / "paths" / path / method / "requestBody" / "content"
    return content / "application/json" / "schema"


def _body_validator(entity: Entity, method: str) -> SchemaValidator:
    return _validator_at(PATCH_PATHS[entity] if method == "patch" else CREATE_PATHS[entity], method)


@cache
def _validator_at(path: str, method: str) -> SchemaValidator:
    inlined = SchemaPath.from_dict(_inline(_request_schema_at(path, method)))
    return _FACTORY.create(inlined, inlined, format_validators={})


def _validate_at(path: str, method: str, body: Any) -> dict[str, list[str]]:
    try:
        _validator_at(path, method).validate(body)
        return {}
    except InvalidSchemaValue as exc:
        return _errors(exc.schema_errors)


def validate_contact_create(entity: Entity, body: Any) -> dict[str, list[str]]:
    """Check a ``POST /customers/{id}/contacts`` (``CreateCustomerContactRequest``) or ``POST /locations/{id}/
    contacts`` (``LocationContactCreateRequest``) body; ``{field path: [messages]}``, empty when valid."""
    return _validate_at(CONTACT_PATHS[entity], "post", body)


def validate_contact_update(entity: Entity, body: Any) -> dict[str, list[str]]:
    """Check a ``PATCH .../contacts/{contactId}`` body (``UpdateCustomerContactRequest`` /
    ``LocationContactUpdateRequest``); ``{field path: [messages]}``, empty when valid."""
    return _validate_at(CONTACT_ITEM_PATHS[entity], "patch", body)


def update_validator(entity: Entity) -> SchemaValidator:
    """openapi-core's validator for the PATCH body of ``entity`` (built once)."""
    return _body_validator(entity, "patch")


def create_validator(entity: Entity) -> SchemaValidator:
    """openapi-core's validator for the POST (create) body of ``entity``: ``CreateCustomerRequest`` (with its
    ``NewLocation`` items) or ``CreateLocationRequest`` (built once)."""
    return _body_validator(entity, "post")


@cache
def update_fields(entity: Entity) -> frozenset[str]:
    """The field names a PATCH body of ``entity`` may carry."""
    with _request_schema(entity).resolve() as resolved:
        return frozenset(resolved.contents["properties"])


def validate_update(entity: Entity, body: Any) -> dict[str, list[str]]:
    """Check a PATCH body of ``entity``; ``{field path: [messages]}``, empty when valid."""
    try:
        update_validator(entity).validate(body)
        return {}
    except InvalidSchemaValue as exc:
        return _errors(exc.schema_errors)


def validate_create(entity: Entity, body: Any) -> dict[str, list[str]]:
    """Check a POST (create) body of ``entity``; ``{field path: [messages]}``, empty when valid. A missing
    required field is "The X field is required." under its path (``locations[0].address``)."""
    try:
        create_validator(entity).validate(body)
        return {}
    except InvalidSchemaValue as exc:
        return _errors(exc.schema_errors)


# ------------------------------------------------------------------------------------------------- messages


def _path_of(error: ValidationError) -> str:
    parts: list[str] = []
    for p in error.absolute_path:
        if isinstance(p, int):
            parts.append(f"[{p}]")
        else:
            parts.append(("." if parts else "") + str(p))
    return "".join(parts) or "$"


def _is_noise(error: ValidationError) -> bool:
    # openapi-schema-validator reports a null twice: "None for not nullable" and "None is not of type 'x'"
    return bool(error.validator == "type" and error.message == "None for not nullable")


def _leaf_errors(error: ValidationError) -> list[ValidationError]:
    # oneOf wrappers (every `$ref` in this spec sits inside one) hide the useful message.
    context = [e for e in error.context or () if not _is_noise(e)]
    if context:
        best = [e for e in context if e.validator != "type" or not context[0].context]
        leaves: list[ValidationError] = []
        for e in best or context:
            leaves.extend(_leaf_errors(e))
        return leaves
    return [error]


def _message(error: ValidationError) -> str:
    if error.validator == "type" and error.schema.get("nullable") is True:
        # a nullable field: name null among the types allowed, as ServiceTitan's JSON schema would
        return f"{error.instance!r} is not of type {error.validator_value!r}, 'null'"
    return str(error.message)


def _errors(schema_errors: Any) -> dict[str, list[str]]:
    errors: dict[str, list[str]] = {}
    for err in schema_errors:
        if _is_noise(err):
            continue
        for leaf in _leaf_errors(err):
            path = _path_of(leaf)
            if leaf.validator == "additionalProperties":
                extra = sorted(set(leaf.instance) - set(leaf.schema.get("properties", {})))
                for name in extra:
                    key = f"{path}.{name}" if path != "$" else name
                    errors.setdefault(key, []).append(f"The field {name} is not a known field.")
                continue
            if leaf.validator == "required":
                missing = leaf.message.split("'")[1] if "'" in leaf.message else leaf.message
                key = f"{path}.{missing}" if path != "$" else missing
                errors.setdefault(key, []).append(f"The {missing} field is required.")
                continue
            msgs = errors.setdefault(path, [])
            message = _message(leaf)
            if message not in msgs:
                msgs.append(message)
    return errors
