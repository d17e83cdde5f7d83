"""The `stsync` command line (click). Errors are one line on stderr with a meaningful exit code."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import wraps
from typing import Any, TypeVar

import click

from sync import __version__
from sync.config import Config, load_config
from sync.errors import StsyncError
from sync.log import configure_logging, register_secret

F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class Ctx:
    config_path: str | None
    database_url: str | None

    def config(self) -> Config:
        cfg = load_config(self.config_path)
        if self.database_url:
            cfg = cfg.model_copy(update={"database": cfg.database.model_copy(update={"url": self.database_url})})
        st = cfg.servicetitan
        register_secret(st.client_secret.get_secret_value())
        register_secret(st.app_key.get_secret_value())
        configure_logging(cfg.logging.level, cfg.logging.format)
        return cfg


def friendly_errors(fn: F) -> F:
    """Turn StsyncError into `stsync: error: ...` and its exit code (2 for configuration problems)."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except StsyncError as exc:
            click.echo(f"stsync: error: {exc}", err=True)
            sys.exit(exc.exit_code)

    return wrapper  # type: ignore[return-value]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="stsync")
@click.option("--config", "-c", "config_path", envvar="STSYNC_CONFIG", metavar="PATH",
              help="YAML configuration file (or $STSYNC_CONFIG).")
@click.option("--database-url", envvar="STSYNC_DATABASE_URL", metavar="URL",
              help="Override database.url from the config.")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, database_url: str | None) -> None:
    """stsync: two-way sync between a PostgreSQL mirror and ServiceTitan CRM (customers, locations)."""
    ctx.obj = Ctx(config_path, database_url)


@cli.command("check-config")
@click.pass_obj
@friendly_errors
def check_config(obj: Ctx) -> None:
    """Validate the configuration and print it with secrets hidden."""
    cfg = obj.config()
    st = cfg.servicetitan
    click.echo(f"configuration OK: tenant {st.tenant_id} ({st.environment}), API {st.api_root}, "
               f"database {cfg.database.safe_url if cfg.database.url else '$DATABASE_URL'} schema {cfg.db_schema}")


@cli.command()
@click.option("--revision", default="head", show_default=True, help="Target revision.")
@click.option("--downgrade", is_flag=True, help="Downgrade to --revision instead (e.g. base).")
@click.pass_obj
@friendly_errors
def migrate(obj: Ctx, revision: str, downgrade: bool) -> None:
    """Create or upgrade the mirror schema (alembic upgrade head); a second run is a no-op."""
    from sync import db
    from sync.log import get_logger

    cfg = obj.config()
    engine = db.make_engine(cfg.database_url(), cfg.db_schema)
    log = get_logger("stsync.migrate", schema=cfg.db_schema)
    if downgrade:
        db.downgrade(engine, cfg.db_schema, revision)
    else:
        db.upgrade(engine, cfg.db_schema, revision)
    with db.connect(engine) as conn:
        current = db.current_revision(conn, cfg.db_schema)
    log.info("migrate.done", revision=current)
    click.echo(f'schema "{cfg.db_schema}" at revision {current}')


@cli.command()
@click.option("--dry-run", is_flag=True, help="Compute and log the requests that would be sent; send nothing.")
@click.pass_obj
@friendly_errors
def run(obj: Ctx, dry_run: bool) -> None:
    """Run the daemon: pull, detect, dispatch and housekeeping on their schedules, until SIGTERM/SIGINT."""
    from sync.daemon import run_daemon

    run_daemon(obj.config(), dry_run=dry_run)


@cli.command()
@click.option("--dry-run", is_flag=True, help="Compute and log the requests that would be sent; send nothing.")
@click.pass_obj
@friendly_errors
def once(obj: Ctx, dry_run: bool) -> None:
    """Run one cycle (pull, detect, dispatch everything due now) and exit."""
    from sync.daemon import run_once

    summary = run_once(obj.config(), dry_run=dry_run)
    click.echo(json.dumps(summary, sort_keys=True))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
@friendly_errors
def status(obj: Ctx, as_json: bool) -> None:
    """Outbox counts, oldest pending age, dead rows, last pull, feed cursors."""
    from sync import db
    from sync import status as st

    cfg = obj.config()
    engine = db.make_engine(cfg.database_url(), cfg.db_schema, pool_size=1)
    db.check_current(engine, cfg.db_schema)
    with db.connect(engine) as conn:
        data = st.collect(conn)
    click.echo(json.dumps(data, indent=2, sort_keys=True) if as_json else st.render(data))


def main() -> None:
    cli(prog_name="stsync")


if __name__ == "__main__":
    main()
