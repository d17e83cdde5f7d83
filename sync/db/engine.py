"""The database itself: engines with the stsync schema on the search path, connections, migrations, the trigger
bypass and the wake-up channel."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError

import sync.migrations
from sync.errors import DatabaseAccessError, DatabaseError, MigrationRequiredError


def normalize_url(url: str) -> str:
    """Accept postgres:// and postgresql:// URLs; always use the psycopg 3 driver."""
    u = make_url(url.replace("postgres://", "postgresql://", 1) if url.startswith("postgres://") else url)
    if u.drivername in ("postgresql", "postgresql+psycopg2"):
        u = u.set(drivername="postgresql+psycopg")
    return u.render_as_string(hide_password=False)


def notify_channel(schema: str) -> str:
    return f"{schema}_changes"


def make_engine(url: str, schema: str, pool_size: int = 5, application_name: str = "stsync") -> Engine:
    """An engine whose connections have ``search_path`` = the stsync schema, then public."""
    engine = create_engine(
        normalize_url(url),
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        connect_args={"application_name": application_name, "connect_timeout": 10},
    )

    @event.listens_for(engine, "connect")
    def _set_search_path(dbapi_conn, _record):  # type: ignore[no-untyped-def]
        with dbapi_conn.cursor() as cur:
            cur.execute(f'SET search_path TO "{schema}", public')
        dbapi_conn.commit()

    return engine


def notify(conn: Connection, payload: str) -> None:
    """Wake the daemons listening on this schema's channel (delivered when the transaction commits)."""
    conn.execute(text("SELECT pg_notify(current_schema() || '_changes', :p)"), {"p": payload})


def ping(conn: Connection) -> None:
    """A round trip: raises when the database does not answer."""
    conn.execute(text("SELECT 1"))


def bypass_triggers(conn: Connection) -> None:
    """Mark the current transaction as stsync's own write: the change-log triggers skip it."""
    conn.execute(text("SELECT set_config('stsync.bypass', 'on', true)"))


@contextmanager
def connect(engine: Engine) -> Iterator[Connection]:
    """A connection, with connection failures turned into a one-line DatabaseError."""
    try:
        with engine.connect() as conn:
            yield conn
    except OperationalError as exc:
        where = engine.url.render_as_string()
        if refused(exc):
            raise DatabaseAccessError(f"the database at {where} refused stsync: {_first_line(exc)}: check the user, "
                                      "password and database name of database.url (or DATABASE_URL)") from exc
        raise DatabaseError(f"database unreachable at {where}: {_first_line(exc)}") from exc
    except DBAPIError as exc:  # e.g. a role without the rights this command needs (docs/deploy.md)
        raise DatabaseError(f"database error at {engine.url.render_as_string()}: {_first_line(exc)}") from exc


_REFUSALS = ("password authentication failed", "does not exist", "no pg_hba.conf entry",
             "permission denied for database", "authentication failed for user", "role is not permitted to log in")
"""What a server says, once it answered, that waiting will not cure (the SQLSTATE of a refused connection does
not reach psycopg: libpq gives only the server's words). 'the database system is starting up' and 'too many
clients' are not here: they pass."""


def refused(exc: BaseException) -> bool:
    """True for a connection the server answered and refused for good (a configuration error, not an outage)."""
    orig = getattr(exc, "orig", None) or exc
    text = str(orig)
    return "FATAL" in text and any(words in text for words in _REFUSALS)


def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    lines = str(orig).strip().splitlines()
    return " ".join(lines[0].split()) if lines else exc.__class__.__name__


def wait_until_answers(engine: Engine, seconds: float, *,
                       on_wait: Callable[[DatabaseError, float], None] | None = None) -> None:
    """Connect, trying again for up to ``seconds`` while the database does not answer (a database still starting,
    as in a compose file's first run); a refusal (DatabaseAccessError) is raised at once, and when the time is up
    the last reason is raised as one line."""
    deadline = time.monotonic() + seconds
    pause = 0.5
    while True:
        try:
            with connect(engine) as conn:
                ping(conn)
            return
        except DatabaseAccessError:
            raise
        except DatabaseError as exc:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DatabaseError(f"no answer within {seconds:g} s (--wait): {exc}") from exc
            if on_wait is not None:
                on_wait(exc, min(pause, left))
            time.sleep(min(pause, left))
            pause = min(pause * 2, 5.0)


# ---------------------------------------------------------------------------------------------- migrations


def _alembic_config(conn: Connection, schema: str) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(Path(sync.migrations.__file__).parent))
    cfg.attributes["connection"] = conn
    cfg.attributes["schema"] = schema
    return cfg


def head_revision() -> str:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(Path(sync.migrations.__file__).parent))
    head = ScriptDirectory.from_config(cfg).get_current_head()
    assert head is not None
    return head


def current_revision(conn: Connection, schema: str) -> str | None:
    ctx = MigrationContext.configure(conn, opts={"version_table_schema": schema})
    return ctx.get_current_revision()


def upgrade(engine: Engine, schema: str, revision: str = "head") -> None:
    """`alembic upgrade` on the schema; idempotent."""
    with connect(engine) as conn, conn.begin():
        # one migrator at a time when several replicas start together
        conn.execute(text("SELECT pg_advisory_xact_lock(hashtext(:k))"), {"k": f"stsync-migrate-{schema}"})
        command.upgrade(_alembic_config(conn, schema), revision)


def downgrade(engine: Engine, schema: str, revision: str) -> None:
    with connect(engine) as conn, conn.begin():
        command.downgrade(_alembic_config(conn, schema), revision)


def check_current(engine: Engine, schema: str) -> None:
    """Raise MigrationRequiredError unless the schema is at this version's head."""
    with connect(engine) as conn:
        current = current_revision(conn, schema)
    head = head_revision()
    if current != head:
        state = "not migrated" if current is None else f"at revision {current}"
        raise MigrationRequiredError(
            f'database schema "{schema}" is {state}, this stsync needs {head}: run `stsync migrate`'
        )
