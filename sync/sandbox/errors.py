"""ServiceTitan's error answers: RFC 7807 ``ApiErrorResponse`` bodies (:func:`problem`, :class:`ApiError`,
:class:`RecordNotFound`,
:class:`ContactNotFound`), the token endpoint's OAuth2 refusals (:class:`OAuthError`) and the titles used.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Mapping
from typing import Any

from sync.sandbox.model import Entity

PROBLEM_TYPES: dict[int, str] = {
    400: "https://tools.ietf.org/html/rfc7231#section-6.5.1",
    401: "https://tools.ietf.org/html/rfc7235#section-3.1",
    404: "https://tools.ietf.org/html/rfc7231#section-6.5.4",
    405: "https://tools.ietf.org/html/rfc7231#section-6.5.5",
    409: "https://tools.ietf.org/html/rfc7231#section-6.5.8",
    415: "https://tools.ietf.org/html/rfc7231#section-6.5.13",
    429: "https://tools.ietf.org/html/rfc6585#section-4",
    500: "https://tools.ietf.org/html/rfc7231#section-6.6.1",
    502: "https://tools.ietf.org/html/rfc7231#section-6.6.3",
    503: "https://tools.ietf.org/html/rfc7231#section-6.6.4",
    504: "https://tools.ietf.org/html/rfc7231#section-6.6.5",
}
VALIDATION_TITLE = "One or more validation errors occurred."
TITLE_NO_APP_KEY = "Application key not present, check ST-App-Key header value."
TITLE_BAD_APP_KEY = "Application key is not valid, check ST-App-Key header value."
TITLE_NO_BEARER = "Authorization header with a bearer token is required."
TITLE_BAD_BEARER = "The access token is invalid or has expired."
TITLE_WRONG_TENANT = "The access token was not issued for this tenant."


class ApiError(Exception):
    """An answer ServiceTitan would give as an RFC 7807 ``ApiErrorResponse``."""

    def __init__(
        self,
        status: int,
        title: str,
        errors: Mapping[str, list[str]] | None = None,
        data: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(title)
        self.status = status
        self.title = title
        self.errors: dict[str, list[str]] = dict(errors or {})
        self.data: dict[str, Any] = dict(data or {})

    def body(self) -> dict[str, Any]:
        return problem(self.status, self.title, self.errors, self.data)

    def __str__(self) -> str:
        return f"{self.status} {self.title} {self.errors}" if self.errors else f"{self.status} {self.title}"


class RecordNotFound(ApiError, LookupError):
    def __init__(self, entity: Entity, record_id: int) -> None:
        super().__init__(404, f"{entity.capitalize()} with id {record_id} not found.", data={"id": record_id})
        self.entity = entity
        self.record_id = record_id


class ContactNotFound(ApiError, LookupError):
    """A contact id that is unknown, of another record, or deleted (inactive): 404."""

    def __init__(self, entity: Entity, contact_id: int) -> None:
        super().__init__(404, f"Contact with id {contact_id} not found.", data={"id": contact_id})
        self.entity = entity
        self.contact_id = contact_id


class OAuthError(Exception):
    """A token endpoint refusal, answered as ``{"error": code}`` with status 400 (OAuth2, RFC 6749 5.2)."""

    def __init__(self, error: str, description: str | None = None) -> None:
        super().__init__(error)
        self.error = error
        self.description = description

    def body(self) -> dict[str, str]:
        out = {"error": self.error}
        if self.description:
            out["error_description"] = self.description
        return out


def trace_id() -> str:
    return f"00-{uuid.uuid4().hex}-{secrets.token_hex(8)}-00"


def problem(
    status: int, title: str, errors: Mapping[str, list[str]] | None = None, data: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """An ``ApiErrorResponse`` body."""
    return {
        "type": PROBLEM_TYPES.get(status, "https://tools.ietf.org/html/rfc7231"),
        "title": title,
        "status": status,
        "traceId": trace_id(),
        "errors": dict(errors or {}),
        "data": dict(data or {}),
    }

