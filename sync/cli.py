"""The `stsync` command line (click). Errors are one line on stderr with a meaningful exit code."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import wraps
from typing import Any, TypeVar

import click

from sync.commands.health import DEFAULT_URL as HEALTH_URL
from sync.config import Config, checked_database_url, is_loopback_host, load_config
from sync.errors import ConfigError, StsyncError
from sync.log import configure_logging, mask, register_secret

F = TypeVar("F", bound=Callable[..., Any])


def echo(message: str, *, err: bool = False) -> None:
    """Everything the CLI prints goes through here: registered secrets (the client secret, the app key, bearer
    tokens) are masked, whatever ServiceTitan echoed back into an error or a stored row."""
    click.echo(mask(message), err=err)


@dataclass
class Ctx:
    config_path: str | None
    database_url: str | None

    def config(self) -> Config:
        cfg = load_config(self.config_path)
        if self.database_url:
            checked_database_url(self.database_url, "--database-url (or $STSYNC_DATABASE_URL)")
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
            echo(f"stsync: error: {exc}", err=True)
            sys.exit(exc.exit_code)

    return wrapper  # type: ignore[return-value]


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        from sync import build

        echo(f"stsync, version {build.describe()}")
        ctx.exit()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="Show the version and the commit it was built from, and exit.")
@click.option("--config", "-c", "config_path", envvar="STSYNC_CONFIG", metavar="PATH",
              help="YAML configuration file (or $STSYNC_CONFIG).")
@click.option("--database-url", envvar="STSYNC_DATABASE_URL", metavar="URL",
              help="Override database.url from the config.")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, database_url: str | None) -> None:
    """stsync: two-way sync between a PostgreSQL mirror and ServiceTitan CRM (customers, locations).

    \b
    Examples:
      stsync demo                                   # try it: the sandbox, a throwaway database, nothing to set up
      stsync --config stsync.yaml migrate           # once per release
      stsync --config stsync.yaml run               # the daemon
      stsync --config stsync.yaml status
    """
    ctx.obj = Ctx(config_path, database_url)


@cli.command("check-config")
@click.pass_obj
@friendly_errors
def check_config(obj: Ctx) -> None:
    """Validate the configuration and print it with secrets hidden.

    \b
    Example:
      STSYNC_CONFIG=config/example.yaml stsync check-config
    """
    cfg = obj.config()
    st = cfg.servicetitan
    echo(f"configuration OK: tenant {st.tenant_id} ({st.environment}), API {st.api_root}, "
               f"database {cfg.database.safe_url if cfg.database.url else '$DATABASE_URL'} schema {cfg.db_schema}")


@cli.command()
@click.option("--revision", default="head", show_default=True, help="Target revision.")
@click.option("--downgrade", is_flag=True, help="Downgrade to --revision instead (e.g. base).")
@click.option("--wait", "wait_s", type=click.FloatRange(min=0), default=0, metavar="SECONDS",
              help="Wait up to SECONDS for the database to answer first (e.g. a compose file's first start).")
@click.option("--lock-timeout", "lock_timeout_s", type=click.FloatRange(min=0.1), default=10, show_default=True,
              metavar="SECONDS", help="Give up (changing nothing) when a table stays locked by another session longer.")
@click.pass_obj
@friendly_errors
def migrate(obj: Ctx, revision: str, downgrade: bool, wait_s: float, lock_timeout_s: float) -> None:
    """Create or upgrade the mirror schema (alembic upgrade head); a second run is a no-op.

    \b
    Examples:
      stsync migrate                       # before starting (or rolling) the daemons of a release
      stsync migrate --wait 120            # a database that is still starting (compose, a Kubernetes Job)
      stsync migrate --downgrade --revision 0009
    """
    from sync.db import engine as db
    from sync.log import get_logger

    cfg = obj.config()
    engine = db.make_engine(cfg.database_url(), cfg.db_schema)
    log = get_logger("stsync.migrate", schema=cfg.db_schema)
    if wait_s:
        db.wait_until_answers(engine, wait_s, on_wait=lambda exc, pause: log.warning(
            "migrate.waiting_for_database", error=str(exc), retry_in_s=round(pause, 2)))
    said = (db.downgrade(engine, cfg.db_schema, revision, lock_timeout_s=lock_timeout_s) if downgrade
            else db.upgrade(engine, cfg.db_schema, revision, lock_timeout_s=lock_timeout_s))
    if said is not None:
        echo(said)
        return
    with db.connect(engine) as conn:
        current = db.current_revision(conn, cfg.db_schema)
    log.info("migrate.done", revision=current)
    echo(f'schema "{cfg.db_schema}" at revision {current}')


@cli.command()
@click.option("--dry-run", is_flag=True, help="Compute and log the requests that would be sent; send nothing.")
@click.pass_obj
@friendly_errors
def run(obj: Ctx, dry_run: bool) -> None:
    """Run the daemon: pull, detect, dispatch and housekeeping on their schedules, until SIGTERM/SIGINT.

    \b
    Examples:
      stsync --config stsync.yaml run
      stsync --config stsync.yaml run --dry-run     # log the exact requests it would send; send nothing
    """
    from sync.daemon.service import run_daemon

    run_daemon(obj.config(), dry_run=dry_run)


@cli.command()
@click.option("--dry-run", is_flag=True, help="Compute and log the requests that would be sent; send nothing.")
@click.pass_obj
@friendly_errors
def once(obj: Ctx, dry_run: bool) -> None:
    """Run one cycle (pull, detect, dispatch everything due now) and exit.

    \b
    Examples:
      stsync --config stsync.yaml once              # from cron: exit 1 if a step failed, 2 if credentials were refused
      stsync --config stsync.yaml once --dry-run    # print the requests one cycle would send, as JSON
    """
    from sync.daemon.service import run_once

    summary = run_once(obj.config(), dry_run=dry_run)
    echo(json.dumps(summary, sort_keys=True))
    if summary["exit_code"]:  # cron and CI must see a failed cycle (2: credentials refused)
        for err in summary["errors"]:
            echo(f"stsync: error: {err}", err=True)
        sys.exit(summary["exit_code"])


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
@friendly_errors
def status(obj: Ctx, as_json: bool) -> None:
    """Outbox counts, oldest pending age, dead rows, last pull, feed cursors.

    \b
    Examples:
      stsync status
      stsync status --json | jq .outbox
    """
    from sync.commands import status as st
    from sync.db import engine as db

    cfg = obj.config()
    engine = db.make_engine(cfg.database_url(), cfg.db_schema, pool_size=1)
    db.check_current(engine, cfg.db_schema)
    with db.connect(engine) as conn:
        data = st.collect(conn)
    echo(json.dumps(data, indent=2, sort_keys=True) if as_json else st.render(data))


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8765, show_default=True, type=int)
@click.option("--tenant-id", default=1, show_default=True, type=int)
@click.option("--customers", "seed_customers", default=20, show_default=True, type=click.IntRange(min=0),
              help="Seed this many customers (0: start empty).")
@click.option("--locations", "seed_locations", default=30, show_default=True, type=click.IntRange(min=0),
              help="Seed this many locations.")
@click.option("--rate-limit", default=60.0, show_default=True, type=float,
              help="Requests per second per tenant before 429 (0 disables).")
@click.option("--latency-ms", default="0,0", show_default=True, help="Uniform random latency range LO,HI.")
@click.option("--admin-token", envvar="STSYNC_SANDBOX_ADMIN_TOKEN", metavar="TOKEN",
              help="Require this token (header X-Sandbox-Admin-Token) on the /_sandbox/* admin routes; needed to "
                   "listen on anything but loopback.")
@friendly_errors
def sandbox(host: str, port: int, tenant_id: int, seed_customers: int, seed_locations: int,
            rate_limit: float, latency_ms: str, admin_token: str | None) -> None:
    """Serve the built-in ServiceTitan sandbox (a CRM v2 simulator) on HOST:PORT.

    \b
    Examples:
      stsync sandbox --port 8765                    # 20 customers, 30 locations; api_base_url: http://127.0.0.1:8765
      stsync sandbox --customers 0 --locations 0    # empty
    """
    from sync.sandbox import Sandbox
    from sync.sandbox.server import serve

    if not is_loopback_host(host) and not admin_token:
        raise ConfigError(f"the sandbox's admin routes (seed, faults, requests) take no credentials: refusing to "
                          f"listen on {host} without --admin-token (or $STSYNC_SANDBOX_ADMIN_TOKEN)")
    lo, _, hi = latency_ms.partition(",")
    sb = Sandbox(tenant_id=tenant_id, rate_limit_per_second=rate_limit or None,
                 latency_ms=(float(lo), float(hi or lo)), admin_token=admin_token or None)
    if seed_customers or seed_locations:
        sb.seed(customers=seed_customers, locations=seed_locations)
    echo(f"sandbox: tenant {tenant_id} on http://{host}:{port} with {seed_customers} customers and "
         f"{seed_locations} locations (client_id={sb.client_id}, app key and secret: see docs/sandbox.md)", err=True)
    serve(sb, host, port)


@cli.command()
@click.option("--duration", type=float, metavar="SECONDS", help="Stop by itself after this many seconds.")
@click.option("--customers", default=40, show_default=True, type=int)
@click.option("--locations", default=60, show_default=True, type=int)
@click.option("--database-url", "demo_db", envvar="DATABASE_URL", metavar="URL",
              help="Server to create the throwaway database on (default: local, else embedded).")
@click.option("--keep", is_flag=True, help="Leave the database for inspection (on the embedded server: until Ctrl-C).")
@click.pass_obj
@friendly_errors
def demo(obj: Ctx, duration: float | None, customers: int, locations: int, demo_db: str | None, keep: bool) -> None:
    """Run the whole daemon against the built-in ServiceTitan sandbox; nothing to configure.

    \b
    Examples:
      stsync demo                                   # Ctrl-C to stop
      stsync demo --duration 60 --customers 10 --locations 15
      stsync demo --duration 30 --keep              # then look at the tables with the psql line it prints
    """
    from sync.demo import run_demo

    run_demo(demo_db or obj.database_url, duration=duration, customers=customers, locations=locations, keep=keep)


@cli.command()
@click.option("--url", envvar="STSYNC_HEALTH_URL", metavar="URL", show_default=True,
              default=HEALTH_URL, help="What to ask (or $STSYNC_HEALTH_URL).")
@click.option("--timeout", default=3.0, show_default=True, type=click.FloatRange(min=0.1), metavar="SECONDS")
@friendly_errors
def health(url: str, timeout: float) -> None:
    """Exit 0 if a running daemon answers its /healthz with 200, else 1 (a HEALTHCHECK that needs no curl).

    \b
    Example:
      stsync health                                  # the image's observability.listen, 0.0.0.0:9464
      stsync health --url http://127.0.0.1:9464/readyz
    """
    from sync.commands.health import check

    echo(check(url, timeout))


def _engine(obj: Ctx) -> Any:
    from sync.db import engine as db

    cfg = obj.config()
    engine = db.make_engine(cfg.database_url(), cfg.db_schema, pool_size=1)
    db.check_current(engine, cfg.db_schema)
    return engine


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    if not rows:
        return "(none)"
    cells = [[("" if r.get(c) is None else str(r.get(c)))[:60] for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


@cli.group()
def outbox() -> None:
    """Inspect and act on outbox rows (safe while the daemon runs).

    \b
    Examples:
      stsync outbox list --state dead
      stsync outbox show 42
      stsync outbox retry --all-dead
    """


@outbox.command("list")
@click.option("--state", type=click.Choice(["pending", "in_flight", "succeeded", "dead", "superseded", "discarded",
                                            "held"]))
@click.option("--entity", type=click.Choice(["customer", "location"]))
@click.option("--limit", default=50, show_default=True, type=int)
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@friendly_errors
def outbox_list(obj: Ctx, state: str | None, entity: str | None, limit: int, as_json: bool) -> None:
    """Outbox rows, newest first, with their field errors.

    \b
    Examples:
      stsync outbox list --state dead --entity customer
      stsync outbox list --json --limit 500
    """
    from sync.commands import outbox as outbox_admin

    with _engine(obj).connect() as conn:
        rows = outbox_admin.list_rows(conn, state=state, entity=entity, limit=limit)
    echo(json.dumps(rows, indent=2) if as_json else _table(
        rows, ["id", "entity", "mirror_id", "st_id", "state", "attempts", "last_status", "updated_at", "error",
               "fields"]))


@outbox.command("show")
@click.argument("outbox_id", type=int)
@click.pass_obj
@friendly_errors
def outbox_show(obj: Ctx, outbox_id: int) -> None:
    """Payload, diff, and every attempt with its status and error body.

    \b
    Example:
      stsync outbox show 42
    """
    from sync.commands import outbox as outbox_admin

    with _engine(obj).connect() as conn:
        echo(json.dumps(outbox_admin.show(conn, outbox_id), indent=2, default=str))


@outbox.command("retry")
@click.argument("outbox_id", type=int, required=False)
@click.option("--all-dead", is_flag=True, help="Retry every dead row.")
@click.pass_obj
@friendly_errors
def outbox_retry(obj: Ctx, outbox_id: int | None, all_dead: bool) -> None:
    """Send a dead row again (fresh attempts; the body is recomputed from the mirror).

    \b
    Examples:
      stsync outbox retry 42
      stsync outbox retry --all-dead                # after fixing what ServiceTitan refused
    """
    from sync.commands import outbox as outbox_admin

    if (outbox_id is None) == (not all_dead):
        raise click.UsageError("give one outbox ID or --all-dead")
    with _engine(obj).begin() as conn:
        n = outbox_admin.retry(conn, outbox_id, all_dead=all_dead)
    echo(f"{n} row(s) queued again")


@outbox.command("release")
@click.option("--held", is_flag=True, required=True, help="Send every held row (a mass delete the guard stopped).")
@click.pass_obj
@friendly_errors
def outbox_release(obj: Ctx, held: bool) -> None:
    """Send the rows the mass-delete guard holds.

    \b
    Example:
      stsync outbox list --state held && stsync outbox release --held
    """
    from sync.commands import outbox as outbox_admin

    with _engine(obj).begin() as conn:
        n = outbox_admin.release_held(conn)
    echo(f"{n} held row(s) released: they are sent next")


@outbox.command("discard")
@click.argument("outbox_id", type=int, required=False)
@click.option("--held", is_flag=True, help="Drop every held row and put the deleted rows back in the mirror.")
@click.pass_obj
@friendly_errors
def outbox_discard(obj: Ctx, outbox_id: int | None, held: bool) -> None:
    """Close a pending or dead row without sending it (or, with --held, every held row).

    \b
    Examples:
      stsync outbox discard 42
      stsync outbox discard --held                  # the mass delete was a mistake: the rows come back
    """
    from sync.commands import outbox as outbox_admin

    if (outbox_id is None) == (not held):
        raise click.UsageError("give one outbox ID or --held")
    if outbox_id is None:
        with _engine(obj).begin() as conn:
            n = outbox_admin.discard_held(conn)
        echo(f"{n} held row(s) discarded; the deleted rows are back in the mirror")
        return
    with _engine(obj).begin() as conn:
        restored = outbox_admin.discard(conn, outbox_id)
    echo(f"outbox row {outbox_id} discarded"
               + (f"; back to the last-synced value: {', '.join(restored)}" if restored else ""))


@cli.group()
def conflicts() -> None:
    """Fields changed on both sides and how the policy resolved them.

    \b
    Examples:
      stsync conflicts list
      stsync conflicts list --entity location --json
    """


@conflicts.command("list")
@click.option("--entity", type=click.Choice(["customer", "location"]))
@click.option("--limit", default=50, show_default=True, type=int)
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@friendly_errors
def conflicts_list(obj: Ctx, entity: str | None, limit: int, as_json: bool) -> None:
    """Recorded conflicts, newest first.

    \b
    Examples:
      stsync conflicts list
      stsync conflicts list --entity location --json
    """
    from sync.commands import outbox as outbox_admin

    with _engine(obj).connect() as conn:
        rows = outbox_admin.conflicts(conn, limit=limit, entity=entity)
    echo(json.dumps(rows, indent=2) if as_json else _table(
        rows, ["id", "entity", "mirror_id", "st_id", "field", "local_value", "remote_value", "outcome",
               "detected_at"]))


@cli.command()
@click.option("--reason", metavar="TEXT", help="Why (shown by status and in the log).")
@click.pass_obj
@friendly_errors
def pause(obj: Ctx, reason: str | None) -> None:
    """Stop sending to ServiceTitan (every replica, within a second); local edits are still detected and queued,
    and the feeds are still pulled. `stsync resume` sends what queued up.

    \b
    Example:
      stsync pause --reason "ServiceTitan maintenance window"
    """
    from sync.commands import pause as pausing

    with _engine(obj).begin() as conn:
        p = pausing.pause(conn, reason)
    echo(f"paused since {p['paused_at'].isoformat()} by {p['paused_by']}: nothing is sent until `stsync resume`")


@cli.command()
@click.pass_obj
@friendly_errors
def resume(obj: Ctx) -> None:
    """Send again after `stsync pause` (the daemons wake at once).

    \b
    Example:
      stsync resume
    """
    from sync.commands import pause as pausing

    with _engine(obj).begin() as conn:
        was = pausing.resume(conn)
    echo("not paused: nothing to resume" if was is None else
         f"resumed (paused since {was['paused_at'].isoformat()} by {was['paused_by']})")


@cli.command()
@click.argument("entity", required=False, type=click.Choice(["customer", "location"]))
@click.argument("st_ids", nargs=-1, type=int, metavar="[ID]...")
@click.option("--all", "everything", is_flag=True, help="Every feed again from the beginning at the next pull.")
@click.pass_obj
@friendly_errors
def resync(obj: Ctx, entity: str | None, st_ids: tuple[int, ...], everything: bool) -> None:
    """Pull records again into the merge (safe while the daemon runs): unchanged ones change nothing, remote
    changes are taken as a pull takes them, unsent local edits stay.

    \b
    Examples:
      stsync resync customer 1234567 7654321      # ServiceTitan ids, fetched now
      stsync resync --all                         # the feeds from the start, at the next pull (woken at once)
    """
    from sync.daemon import resync as resyncing

    resyncing.check_ids(entity, st_ids, everything)
    cfg = obj.config()
    if everything:
        feeds = resyncing.resync_all(cfg)
        echo(f"feeds {', '.join(feeds)} start again from the beginning at the next pull "
             "(a running daemon pulls now)")
        return
    out = resyncing.resync_records(cfg, "customer" if entity == "customer" else "location", st_ids)
    missing = out["not_found"]
    echo(f"{entity}s: {out['records']} fetched, {out['applied']} changed the mirror, {out['conflicts']} conflicts"
         + (f"; not found in ServiceTitan: {', '.join(map(str, missing))}" if missing else ""))
    if missing:
        sys.exit(1)


@conflicts.command("show")
@click.argument("conflict_id", type=int)
@click.pass_obj
@friendly_errors
def conflicts_show(obj: Ctx, conflict_id: int) -> None:
    """One conflict: the last-synced, local and remote values, the policy, what was kept, and the record's other
    conflicts.

    \b
    Example:
      stsync conflicts show 7
    """
    from sync.commands import outbox as outbox_admin

    with _engine(obj).connect() as conn:
        echo(json.dumps(outbox_admin.conflict(conn, conflict_id), indent=2, default=str))


def main() -> None:
    cli(prog_name="stsync")


if __name__ == "__main__":
    main()
