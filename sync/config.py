"""YAML configuration: loading, ``${VAR}`` / ``${VAR:-default}`` interpolation, validation.

Every problem becomes one ``ConfigError`` line naming the file, the key and what is wrong. Secrets are
``SecretStr`` (and the database URL is shown with its password hidden), so ``repr`` and logs never carry them.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from sync.core.plan import PatchSettings
from sync.errors import ConfigError

ENV_CONFIG = "STSYNC_CONFIG"


def is_loopback_host(host: str) -> bool:
    """A loopback IP address, or the name ``localhost`` exactly (``127.0.0.1.attacker.example`` is a name)."""
    host = host.lower()
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
ENV_DATABASE_URL = "DATABASE_URL"

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_IDENT = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")

PRODUCTION_API = "https://api.servicetitan.io"
PRODUCTION_AUTH = "https://auth.servicetitan.io/connect/token"
INTEGRATION_API = "https://api-integration.servicetitan.io"
INTEGRATION_AUTH = "https://auth-integration.servicetitan.io/connect/token"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_POSTGRES_SCHEMES = ("postgresql://", "postgresql+psycopg://", "postgres://")


def database_url_problem(url: str) -> str | None:
    """Why ``url`` is not a PostgreSQL URL stsync can use (never quoting it: it may hold a password), or None."""
    if not url.startswith(_POSTGRES_SCHEMES):
        scheme = url.split("://", 1)[0] if "://" in url else None
        found = f"a {scheme}:// URL" if scheme and scheme.replace("+", "").isalnum() else "not a URL"
        return f"must be a postgresql:// or postgresql+psycopg:// URL ({found})"
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        make_url(url)
    except (ArgumentError, ValueError):
        return "is not a valid postgresql:// URL (check the host, the port and the quoting of the password)"
    return None


def checked_database_url(url: str, source: str) -> str:
    """``url`` from ``source`` (a flag or an environment variable), held to the same rule as ``database.url``."""
    problem = database_url_problem(url)
    if problem is not None:
        raise ConfigError(f"{source}: {problem}")
    return url


class DatabaseConfig(_Section):
    url: str | None = Field(default=None, repr=False)
    """SQLAlchemy URL (psycopg driver). Falls back to $DATABASE_URL."""
    schema_: str = Field(default="stsync", alias="schema")
    pool_size: int = Field(default=5, ge=1, le=100)

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("schema_")
    @classmethod
    def _schema_is_identifier(cls, v: str) -> str:
        if not _IDENT.match(v):
            raise ValueError("must be a lower-case SQL identifier (letters, digits, _)")
        return v

    @field_validator("url")
    @classmethod
    def _url_is_postgres(cls, v: str | None) -> str | None:
        problem = None if v is None else database_url_problem(v)
        if problem is not None:
            raise ValueError(problem)
        return v

    @property
    def safe_url(self) -> str:
        from sqlalchemy.engine import make_url

        return "<unset>" if self.url is None else make_url(self.url).render_as_string(hide_password=True)

    def __repr_args__(self) -> Any:
        yield "url", self.safe_url
        yield "schema", self.schema_
        yield "pool_size", self.pool_size


class ServiceTitanConfig(_Section):
    environment: Literal["production", "integration"] = "integration"
    api_base_url: str | None = None
    """API host root override, e.g. http://127.0.0.1:8765 for the sandbox."""
    auth_url: str | None = None
    """Full token URL override."""
    tenant_id: int = Field(gt=0)
    client_id: str = Field(min_length=1)
    client_secret: SecretStr
    app_key: SecretStr
    application_guid: str = Field(min_length=1)
    mirror_id_key: str = Field(default="mirrorId", min_length=1)
    requests_per_second: float = Field(default=60.0, gt=0, le=10_000)
    max_concurrency: int = Field(default=32, ge=1, le=1000)
    timeout_seconds: float = Field(default=30.0, gt=0)
    max_answer_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    """An answer larger than this is not read into memory (a failed attempt; an export page: an error)."""
    max_retry_after_seconds: float = Field(default=120.0, gt=0, le=3600)
    """The longest a 429's Retry-After is obeyed (a larger one is capped and logged; ``inf``/``nan`` are ignored)."""

    @field_validator("api_base_url", "auth_url")
    @classmethod
    def _https_unless_loopback(cls, v: str | None) -> str | None:
        """Secrets and tokens never travel unencrypted: http:// is allowed only to this machine (the sandbox)."""
        if v is None:
            return v
        from urllib.parse import urlsplit

        parts = urlsplit(v)
        if parts.scheme == "https":
            return v
        if parts.scheme == "http" and is_loopback_host(parts.hostname or ""):
            return v
        raise ValueError("must be an https:// URL (plain http:// is allowed only for 127.0.0.1/localhost)")

    @property
    def api_root(self) -> str:
        root = self.api_base_url or (PRODUCTION_API if self.environment == "production" else INTEGRATION_API)
        return root.rstrip("/")

    @property
    def token_url(self) -> str:
        if self.auth_url:
            return self.auth_url
        if self.api_base_url:  # the sandbox serves the token endpoint on the same host
            return self.api_root + "/connect/token"
        return PRODUCTION_AUTH if self.environment == "production" else INTEGRATION_AUTH


class SyncConfig(_Section):
    push_interval_seconds: float = Field(default=5.0, gt=0)
    pull_interval_seconds: float = Field(default=300.0, gt=0)
    conflict_policy: Literal["remote_wins", "local_wins", "newest_wins"] = "remote_wins"
    sync_active: bool = True
    """Push the ``active`` flag (ServiceTitan's docs and spec disagree on whether PATCH may change it)."""
    include_recent_changes: bool = True
    check_before_send: bool = True
    """List the records of each claimed batch (one ``GET ?ids=`` per 50) and merge any changed in ServiceTitan
    since their shadow before sending (docs/push.md, "The check before sending")."""
    check_min_interval_seconds: float = Field(default=0.6, ge=0, le=60)
    """At most one such check per this many seconds: 0.6 keeps checks under 3% of a 60 requests/s budget."""
    local_deletes: Literal["keep", "propagate"] = "keep"
    """A row deleted from the mirror: ``keep`` (a tombstone, nothing sent) or ``propagate`` (the customer or
    location is deactivated in ServiceTitan with ``PATCH active=false``; docs/push.md, "Local deletes")."""
    max_deletes_per_cycle: int = Field(default=50, ge=0)
    """The mass-delete guard: more deletes than this found in one detect cycle are all held for an operator
    (``stsync outbox release --held`` / ``stsync outbox discard --held``), none sent."""
    pull_max_seconds_per_run: float = Field(default=900.0, ge=1)
    """One feed's pull stops after this long (the next run continues from the stored cursor)."""
    initial_from: str | None = None
    """Start the initial load from this date (YYYY-MM-DD) instead of the beginning of the feed."""
    batch_size: int = Field(default=500, ge=1, le=10_000)
    lease_seconds: float = Field(default=30.0, ge=5, le=600)
    shutdown_grace_seconds: float = Field(default=20.0, ge=0, le=600)
    """On SIGTERM: how long in-flight requests may finish before their rows are released."""


class RetryConfig(_Section):
    max_attempts: int = Field(default=8, ge=1, le=100)
    base_delay_seconds: float = Field(default=1.0, gt=0)
    max_delay_seconds: float = Field(default=300.0, gt=0)
    in_doubt_seconds: float = Field(default=60.0, ge=0)
    """After a request whose outcome is unknown (timeout, dropped connection), its record waits this long
    before another body is sent: ServiceTitan may still apply the abandoned request, and it must not land
    after a newer one."""


class HousekeepingConfig(_Section):
    retain_days: float = Field(default=14.0, gt=0)
    """Succeeded and superseded outbox rows (and their attempts) older than this are deleted."""
    interval_seconds: float = Field(default=3600.0, gt=0)


class ObservabilityConfig(_Section):
    listen: str | None = None
    """host:port for /healthz, /readyz and /metrics (e.g. 127.0.0.1:9464); unset: no listener."""

    @field_validator("listen")
    @classmethod
    def _host_port(cls, v: str | None) -> str | None:
        if v is not None:
            _, sep, port = v.rpartition(":")
            if not sep or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError("must be host:port, e.g. 127.0.0.1:9464")
        return v


class LoggingConfig(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["json", "console"] = "json"

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, v: Any) -> Any:
        return v.upper() if isinstance(v, str) else v


class Config(_Section):
    database: DatabaseConfig = DatabaseConfig()
    servicetitan: ServiceTitanConfig
    sync: SyncConfig = SyncConfig()
    retry: RetryConfig = RetryConfig()
    housekeeping: HousekeepingConfig = HousekeepingConfig()
    observability: ObservabilityConfig = ObservabilityConfig()
    logging: LoggingConfig = LoggingConfig()

    @property
    def db_schema(self) -> str:
        return self.database.schema_

    def patch_settings(self) -> PatchSettings:
        """What a PATCH body depends on (sync.core.plan)."""
        st = self.servicetitan
        return PatchSettings(application_guid=st.application_guid, mirror_id_key=st.mirror_id_key,
                             sync_active=self.sync.sync_active)

    def database_url(self, source: str = "the config") -> str:
        """The configured database URL, or a ConfigError saying which setting is missing."""
        url = self.database.url or os.environ.get(ENV_DATABASE_URL)
        if url and not self.database.url:
            checked_database_url(url, f"${ENV_DATABASE_URL}")
        if not url:
            raise ConfigError(
                f"{source}: database.url: no database configured; set database.url in the config "
                f"or the {ENV_DATABASE_URL} environment variable"
            )
        return url


# ------------------------------------------------------------------------------------------------- loading


def _interpolate(node: Any, where: str, file: str, env: dict[str, str]) -> Any:
    if isinstance(node, dict):
        return {k: _interpolate(v, f"{where}.{k}" if where else str(k), file, env) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, f"{where}[{i}]", file, env) for i, v in enumerate(node)]
    if not isinstance(node, str):
        return node

    def repl(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, default = m.group(1), m.group(2)
        value = env.get(name)
        if value is None or (value == "" and default is not None):
            if default is None:
                raise ConfigError(
                    f"{file}: {where}: environment variable {name} is not set "
                    f"(export it, or write ${{{name}:-default}})"
                )
            return default
        return value

    return _VAR.sub(repl, node)


def _describe(err: dict[str, Any]) -> str:
    loc = ".".join("schema" if p == "schema_" else str(p) for p in err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"{loc}: unknown key (check the spelling; see config/example.yaml)"
    if kind == "missing":
        return f"{loc}: required key is missing"
    msg = str(err["msg"])
    if kind.endswith("_type") or kind.endswith("_parsing"):
        got = err.get("input")
        shown = "<secret>" if any(s in loc for s in ("secret", "app_key", "url")) else repr(got)
        return f"{loc}: {msg.lower()}, got {shown}"
    msg = msg.removeprefix("Value error, ")
    return f"{loc}: {msg[:1].lower()}{msg[1:]}"


def parse_config(data: Any, file: str = "<config>", env: dict[str, str] | None = None) -> Config:
    """Validate already-parsed YAML data; raises ConfigError with a one-line message."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: the top level must be a mapping of sections (database, servicetitan, ...)")
    data = _interpolate(data, "", file, dict(os.environ) if env is None else env)
    # a section present with every key commented out is an empty section, not an error
    data = {k: ({} if v is None else v) for k, v in data.items()}
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        # an unknown key is usually a typo that also makes a required key "missing": report it first
        errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
        first = _describe(dict(errors[0]))
        more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
        raise ConfigError(f"{file}: {first}{more}") from None


def config_path(path: str | os.PathLike[str] | None) -> Path:
    chosen = path or os.environ.get(ENV_CONFIG)
    if not chosen:
        raise ConfigError(f"no configuration file: pass --config PATH or set {ENV_CONFIG}")
    return Path(chosen)


def load_config(path: str | os.PathLike[str] | None = None, env: dict[str, str] | None = None) -> Config:
    """Read, interpolate and validate the YAML file at ``path`` (or $STSYNC_CONFIG)."""
    p = config_path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{p}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: cannot read the file ({exc.__class__.__name__}: {exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{p}: invalid YAML: {where}{problem}") from None
    return parse_config(data, str(p), env)
