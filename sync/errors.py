"""The exception hierarchy. Every message is one line a user can act on."""

from __future__ import annotations


class StsyncError(Exception):
    """Base of every error stsync raises on purpose."""

    exit_code = 1


class ConfigError(StsyncError):
    """The configuration file or environment is wrong; the message names file, key and problem."""

    exit_code = 2


class DatabaseError(StsyncError):
    """The database is unreachable, or its schema is not what this version of stsync expects."""


class DatabaseAccessError(DatabaseError):
    """The database answered and refused: no such role, a wrong password, no such database, no pg_hba entry.
    A configuration error: exit 2, not waited out (waiting would never cure it)."""

    exit_code = 2


class MigrationRequiredError(DatabaseError):
    """The schema is behind (or ahead of) this version of stsync."""


class SchemaNewerError(MigrationRequiredError):
    """The schema was migrated by a newer release that did not mark itself compatible with this one."""


class ServiceTitanError(StsyncError):
    """ServiceTitan answered something we cannot work with."""

    def __init__(self, message: str, status: int | None = None, body: object = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = body


class AuthError(ServiceTitanError):
    """Credentials were refused: by ServiceTitan's token endpoint, or a 401 that a fresh token does not cure
    (wrong app key or tenant). A configuration error: exit 2, nothing retried (docs/contract.md, failure classes)."""

    exit_code = 2
