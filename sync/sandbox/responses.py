"""JSON answers as the sandbox writes them (compact ASCII JSON, as .NET's System.Text.Json does by default) and
the endpoint type shared by ``app.py`` and ``admin.py``."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from sync.sandbox.errors import ApiError

JSON_TYPE = "application/json"

Endpoint = Callable[[Request], Awaitable[Response]]


def dumps(obj: Any) -> bytes:
    # ASCII with \u escapes, as .NET's System.Text.Json writes by default (and faster to encode here)
    return json.dumps(obj, separators=(",", ":"), allow_nan=False, check_circular=False).encode("ascii")


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(dumps(obj), status_code=status, media_type=JSON_TYPE, headers=headers)


def error_response(exc: ApiError) -> Response:
    return json_response(exc.body(), exc.status)
