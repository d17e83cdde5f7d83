"""The database itself: engines with the stsync schema on the search path, connections, migrations, the trigger
bypass and the wake-up channel."""

from __future__ import annotations

import re
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
from sync.errors import DatabaseAccessError, DatabaseError, MigrationRequiredError, SchemaNewerError


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


def _scripts() -> ScriptDirectory:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(Path(sync.migrations.__file__).parent))
    return ScriptDirectory.from_config(cfg)


def head_revision() -> str:
    head = _scripts().get_current_head()
    assert head is not None
    return head


def known_revisions() -> set[str]:
    """Every revision this release's migrations know (a schema at any other one is newer than this stsync)."""
    return {script.revision for script in _scripts().walk_revisions()}


_COMPATIBLE = re.compile(r"stsync-compatible revision=(\S+) oldest=(\S+)")
"""How a migration marks itself compatible with older releases, as the comment of the version table:
``COMMENT ON TABLE <schema>.alembic_version IS 'stsync-compatible revision=0012 oldest=0010'`` (only additive
changes: new tables, nullable or defaulted columns, nothing an older release reads or writes changes meaning;
docs/deploy.md, "Rolling upgrades"). The revision is named so that a later migration that does not say so is
never taken as compatible."""


def compatible_from(conn: Connection, schema: str, revision: str) -> str | None:
    """The oldest release head that may run against the schema at ``revision``, if its migration says so."""
    said = conn.execute(text("SELECT obj_description(to_regclass(:t), 'pg_class')"),
                        {"t": f'"{schema}".alembic_version'}).scalar()
    m = _COMPATIBLE.fullmatch(str(said or "").strip())
    return m.group(2) if m and m.group(1) == revision else None


def _ahead(conn: Connection, schema: str, current: str | None) -> bool:
    """True when the schema is at a revision newer than this release and marked compatible with it; raises
    SchemaNewerError when it is newer and not marked; False when this release knows the revision (or none)."""
    if current is None or current in known_revisions():
        return False
    why = _newer_schema(conn, schema, current)
    if why is not None:
        raise SchemaNewerError(why)
    return True


def _newer_schema(conn: Connection, schema: str, current: str) -> str | None:
    """None when this release may run against the newer schema at ``current``; else why not, in one line."""
    head = head_revision()
    oldest = compatible_from(conn, schema, current)
    if oldest is not None and oldest in known_revisions():
        return None
    return (f'database schema "{schema}" is at revision {current}, newer than this stsync ({head}), and not marked '
            "compatible with it: run the release that migrated it (in a rolling upgrade this is an old replica: "
            "replace it)")


def current_revision(conn: Connection, schema: str) -> str | None:
    ctx = MigrationContext.configure(conn, opts={"version_table_schema": schema})
    return ctx.get_current_revision()


DEFAULT_LOCK_TIMEOUT_S = 10.0


def upgrade(engine: Engine, schema: str, revision: str = "head", *,
            lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S) -> str | None:
    """`alembic upgrade` on the schema; idempotent. Returns a line to show when there was nothing to do because the
    schema is newer than this release and compatible with it (raises SchemaNewerError when it is not)."""
    return _migrate(engine, schema, lambda cfg: command.upgrade(cfg, revision), lock_timeout_s)


def downgrade(engine: Engine, schema: str, revision: str, *,
              lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S) -> str | None:
    return _migrate(engine, schema, lambda cfg: command.downgrade(cfg, revision), lock_timeout_s)


def _migrate(engine: Engine, schema: str, run: Callable[[AlembicConfig], None], lock_timeout_s: float) -> str | None:
    with connect(engine) as conn, conn.begin():
        # one migrator at a time when several replicas start together (waits as long as the other one takes)
        conn.execute(text("SELECT pg_advisory_xact_lock(hashtext(:k))"), {"k": f"stsync-migrate-{schema}"})
        current = current_revision(conn, schema)
        if _ahead(conn, schema, current):
            return (f'schema "{schema}" is at revision {current}, newer than this stsync ({head_revision()}) '
                    "and compatible with it: nothing to migrate")
        # then no statement waits longer than this for a table lock: an application's idle transaction
        # must not queue every write behind a migration that waits for it
        conn.execute(text("SELECT set_config('lock_timeout', :t, true)"), {"t": f"{int(lock_timeout_s * 1000)}ms"})
        try:
            run(_alembic_config(conn, schema))
        except DBAPIError as exc:
            if getattr(exc.orig, "sqlstate", None) == "55P03":  # lock_not_available
                raise DatabaseError(
                    f"migration stopped: a table it changes stayed locked by another session for over "
                    f"{lock_timeout_s:g} s (an idle transaction? see pg_stat_activity); nothing was changed, run "
                    "`stsync migrate` again when it has ended (or raise --lock-timeout)") from exc
            raise
    return None


def check_current(engine: Engine, schema: str) -> str | None:
    """Raise MigrationRequiredError unless this release may run against the schema: at its head, or newer and
    marked compatible (then returns a line to log)."""
    with connect(engine) as conn:
        current = current_revision(conn, schema)
        head = head_revision()
        if current == head:
            return None
        if _ahead(conn, schema, current):
            return (f'database schema "{schema}" is at revision {current}, newer than this stsync ({head}), and '
                    "marked compatible with it")
    state = "not migrated" if current is None else f"at revision {current}"
    raise MigrationRequiredError(
        f'database schema "{schema}" is {state}, this stsync needs {head}: run `stsync migrate`'
    )
