"""Finding a PostgreSQL server for the demo and the tests, and starting an embedded one when none answers.

Only the demo and the test suite use this; `stsync run`/`once` always use the configured database.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import psycopg

DEFAULT_LOCAL_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
ENV_FORCE_EMBEDDED = "STSYNC_EMBEDDED_PG"


@dataclass(frozen=True)
class Server:
    url: str
    """Admin URL (a maintenance database on that server)."""
    why: str
    """One line: which server and why it was chosen."""


def answers(url: str, timeout: int = 2) -> bool:
    try:
        with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"), connect_timeout=timeout):
            return True
    except psycopg.Error:
        return False


@contextmanager
def embedded_server() -> Iterator[Server]:
    """Start a throwaway PostgreSQL 16 from the `pgserver` wheel; its data directory is removed on exit."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs warns about XDG_RUNTIME_DIR on import
            import pgserver
    except ImportError as exc:  # pragma: no cover - depends on the install
        from sync.errors import DatabaseError

        raise DatabaseError(
            "no PostgreSQL answers and the embedded server is not installed: "
            "pip install 'stsync[embedded]', or set DATABASE_URL"
        ) from exc
    data_dir = tempfile.mkdtemp(prefix="stsync-pg-")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        server = pgserver.get_server(data_dir, cleanup_mode="delete")  # type: ignore[attr-defined]
    try:
        yield Server(server.get_uri(), f"embedded PostgreSQL 16 in {data_dir} (removed on exit)")
    finally:
        server.cleanup()
        shutil.rmtree(data_dir, ignore_errors=True)


@contextmanager
def find_server(configured: str | None = None) -> Iterator[Server]:
    """The configured URL if given; else the local server if it answers; else an embedded one.

    Setting STSYNC_EMBEDDED_PG=1 skips the first two (CI uses it to prove the embedded path).
    """
    if os.environ.get(ENV_FORCE_EMBEDDED) == "1":
        with embedded_server() as s:
            yield Server(s.url, s.why.replace("embedded", f"embedded ({ENV_FORCE_EMBEDDED}=1)", 1))
        return
    if configured:
        yield Server(configured, "DATABASE_URL / the configured database")
        return
    if answers(DEFAULT_LOCAL_URL):
        yield Server(DEFAULT_LOCAL_URL, "the local PostgreSQL at 127.0.0.1:5432")
        return
    with embedded_server() as s:
        yield Server(s.url, s.why + ": no DATABASE_URL and nothing answers at 127.0.0.1:5432")


def create_database(admin_url: str, name: str) -> str:
    """Create database ``name`` on the server of ``admin_url``; returns its URL."""
    from sqlalchemy.engine import make_url

    with psycopg.connect(admin_url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    return make_url(admin_url).set(database=name).render_as_string(hide_password=False)


def drop_database(admin_url: str, name: str) -> None:
    with psycopg.connect(admin_url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
