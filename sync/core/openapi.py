"""ServiceTitan's own CRM v2 OpenAPI file, shipped as package data, as JSON-schema validators.

stsync validates every PATCH body with it before sending, and the tests check the sandbox's answers with it. The
sandbox validates the requests it receives with a different validator (openapi-core over the same file), so a
bug in this translation is caught there instead of shared.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

import fastjsonschema
from jsonschema import Draft4Validator
from jsonschema.exceptions import ValidationError

SPEC_FILE = "crm-v2.openapi.json"
SCHEMA_PREFIX = "#/components/schemas/"


@cache
def spec() -> dict[str, Any]:
    """The parsed OpenAPI document."""
    text = resources.files("sync.spec").joinpath(SPEC_FILE).read_text(encoding="utf-8")
    data: dict[str, Any] = json.loads(text)
    return data


def _to_json_schema(node: Any, open_objects: bool = False) -> Any:
    """Translate OpenAPI 3.0 schema objects into plain JSON schema (draft 4 semantics).

    `nullable: true` becomes "or null"; `$ref`s keep pointing into the document, which is the root schema.
    ``open_objects`` drops ``additionalProperties: false``: an answer may carry fields the spec does not list yet.
    """
    if isinstance(node, list):
        return [_to_json_schema(n, open_objects) for n in node]
    if not isinstance(node, dict):
        return node
    dropped = ("nullable", "example", "x-enumNames") + (("additionalProperties",) if open_objects else ())
    out = {k: _to_json_schema(v, open_objects) for k, v in node.items() if k not in dropped}
    if node.get("nullable"):
        if "type" in out:
            out["type"] = [out["type"], "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
        if "oneOf" in out:
            out["oneOf"] = [*out["oneOf"], {"type": "null"}]
        if "$ref" in out:
            out = {"anyOf": [{"$ref": out.pop("$ref")}, {"type": "null"}], **out}
    return out


@cache
def _root(open_objects: bool = False) -> dict[str, Any]:
    return {"components": _to_json_schema(spec()["components"], open_objects)}


@cache
def validator(schema_name: str) -> Draft4Validator:
    """A validator for one named component schema, e.g. ``Crm.V2.Customers.UpdateCustomerRequest``."""
    root = _root()
    if schema_name not in root["components"]["schemas"]:
        raise KeyError(f"no schema {schema_name!r} in {SPEC_FILE}")
    schema = {"$ref": SCHEMA_PREFIX + schema_name, "components": root["components"]}
    return Draft4Validator(schema)


@cache
def fast_validator(schema_name: str) -> Any:
    """A compiled validator (fastjsonschema): ~50x faster than jsonschema, used as the gate on hot paths."""
    validator(schema_name)  # same KeyError for an unknown name
    schema = {"$ref": SCHEMA_PREFIX + schema_name, "components": _root()["components"]}
    # formats off, like the jsonschema validator: "guid", "int64"... are descriptive in this spec
    # use_default=False: never write schema defaults into the body being checked
    return fastjsonschema.compile(schema, use_formats=False, use_default=False)


def _path_of(error: ValidationError) -> str:
    parts: list[str] = []
    for p in error.absolute_path:
        if isinstance(p, int):
            parts.append(f"[{p}]")
        else:
            parts.append(("." if parts else "") + str(p))
    return "".join(parts) or "$"


def _leaf_errors(error: ValidationError) -> list[ValidationError]:
    # oneOf/anyOf wrappers (every `$ref` in this spec sits inside a oneOf) hide the useful message.
    if error.context:
        best = [e for e in error.context if e.validator != "type" or not error.context[0].context]
        leaves: list[ValidationError] = []
        for e in best or error.context:
            leaves.extend(_leaf_errors(e))
        # a "None is not of type null" branch only adds noise
        useful = [e for e in leaves if not (e.validator == "type" and e.validator_value == "null")]
        return useful or leaves
    return [error]


def validate(schema_name: str, body: Any) -> dict[str, list[str]]:
    """Validate ``body`` against a component schema; returns ``{field path: [messages]}``, empty when valid.

    The compiled validator decides; jsonschema only explains a body that fails (per-field messages).
    """
    try:
        fast_validator(schema_name)(body)
        return {}
    except fastjsonschema.JsonSchemaException as exc:
        fast_message = str(exc)
    errors: dict[str, list[str]] = {}
    for err in validator(schema_name).iter_errors(body):
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
            if leaf.message not in msgs:
                msgs.append(leaf.message)
    return errors or {"$": [fast_message]}


@cache
def _open_validator(schema_name: str) -> Any:
    validator(schema_name)  # same KeyError for an unknown name
    schema = {"$ref": SCHEMA_PREFIX + schema_name, "components": _root(open_objects=True)["components"]}
    return fastjsonschema.compile(schema, use_formats=False, use_default=False)


def answer_problem(schema_name: str, body: Any) -> str | None:
    """Why an answer is not a ``schema_name`` (required fields and their types), or None when it is one.
    Properties the spec does not list are tolerated: ServiceTitan adds fields over time."""
    try:
        _open_validator(schema_name)(body)
        return None
    except fastjsonschema.JsonSchemaException as exc:
        return str(exc)


UPDATE_SCHEMAS = {
    "customer": "Crm.V2.Customers.UpdateCustomerRequest",
    "location": "Crm.V2.Locations.UpdateLocationRequest",
}
RESPONSE_SCHEMAS = {
    "customer": "Crm.V2.Customers.CustomerResponse",
    "location": "Crm.V2.Locations.LocationResponse",
}
