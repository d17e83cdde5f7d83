"""Rolling upgrades (docs/deploy.md): a release started against a schema that a newer release migrated, and a
migration that meets an application's idle transaction.

The newer release is built here: a copy of our migrations with one more, later revision (``0099``) that adds a
column, applied with Alembic from that copy; then this release's `stsync` (which does not know 0099) is run.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
import sync.migrations
from alembic import command
from alembic.config import Config as AlembicConfig

from sync.db import engine as db
from tests.e2ekit import Env
from tests.pushkit import link_mirror, rows, sql

FUTURE = '''
"""A later release's additive migration (built by tests/e2e/test_rolling_upgrade.py)."""
from alembic import op

revision = "0099"
down_revision = "{head}"
branch_labels = None
depends_on = None


def upgrade(schema: str) -> None:
    op.execute(f'ALTER TABLE "{{schema}}".customers ADD COLUMN future_note text')
    {mark}


def downgrade(schema: str) -> None:
    op.execute(f'ALTER TABLE "{{schema}}".customers DROP COLUMN future_note')
'''
MARK = ("op.execute(f\"COMMENT ON TABLE \\\"{{schema}}\\\".alembic_version IS "
        "'stsync-compatible revision=0099 oldest={head}'\")")


def migrate_as_a_newer_release(env: Env, tmp: Path, *, compatible: bool) -> None:
    scripts = tmp / "newer-migrations"
    shutil.copytree(Path(sync.migrations.__file__).parent, scripts, ignore=shutil.ignore_patterns("__pycache__"))
    head = db.head_revision()
    (scripts / "versions" / "0099_future.py").write_text(
        FUTURE.format(head=head, mark=MARK.format(head=head) if compatible else "pass"))
    with env.engine.begin() as conn:
        cfg = AlembicConfig()
        cfg.set_main_option("script_location", str(scripts))
        cfg.attributes["connection"] = conn
        cfg.attributes["schema"] = "stsync"
        command.upgrade(cfg, "head")
    with env.engine.connect() as conn:
        assert db.current_revision(conn, "stsync") == "0099"


def said(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if not line.startswith("{")]


def test_an_older_release_against_a_newer_schema_not_marked_compatible_says_so_in_one_line(e2e: Env) -> None:
    migrate_as_a_newer_release(e2e, e2e.tmp, compatible=False)
    head = db.head_revision()
    for command_line in (["once"], ["migrate"], ["status"]):
        r = e2e.stsync(e2e.config(), *command_line)
        assert r.returncode == 1, (command_line, r.stderr)
        assert said(r.stderr) == [
            f'stsync: error: database schema "stsync" is at revision 0099, newer than this stsync ({head}), and not '
            "marked compatible with it: run the release that migrated it (in a rolling upgrade this is an old "
            "replica: replace it)"], command_line
        assert "Can't locate revision" not in r.stderr and "Traceback" not in r.stderr
    with e2e.engine.connect() as conn:
        assert db.current_revision(conn, "stsync") == "0099"  # the old migrate touched nothing


def test_an_older_release_runs_against_a_newer_schema_its_migration_marks_compatible(e2e: Env) -> None:
    e2e.sb.seed(customers=2, locations=1, seed=4)
    ids = link_mirror(e2e.engine, e2e.sb)
    migrate_as_a_newer_release(e2e, e2e.tmp, compatible=True)
    head = db.head_revision()

    r = e2e.stsync(e2e.config(), "migrate")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == (f'schema "stsync" is at revision 0099, newer than this stsync ({head}) and '
                                "compatible with it: nothing to migrate")

    st_id = min(ids)
    sql(e2e.engine, "UPDATE customers SET name = 'Rolled Co' WHERE st_id = :s", s=st_id)
    r = e2e.stsync(e2e.config(), "once")
    assert r.returncode == 0, r.stderr
    assert "daemon.schema_newer_compatible" in r.stderr
    assert e2e.sb.get_customer(st_id)["name"] == "Rolled Co"  # the old release still syncs
    assert rows(e2e.engine, "SELECT future_note FROM customers WHERE st_id = :s", s=st_id) == [(None,)]


def test_a_migration_behind_an_idle_transaction_fails_fast_and_changes_nothing(e2e: Env) -> None:
    db.downgrade(e2e.engine, "stsync", "0009")  # 0010 alters the outbox
    blocker = sa.create_engine(db.normalize_url(e2e.url))
    try:
        with blocker.connect() as idle:
            idle.execute(sa.text("BEGIN"))
            idle.execute(sa.text("SELECT count(*) FROM stsync.outbox"))  # an application's idle transaction
            started = time.monotonic()
            r = e2e.stsync(e2e.config(), "migrate", "--lock-timeout", "1")
            took = time.monotonic() - started
            idle.execute(sa.text("ROLLBACK"))
        assert r.returncode == 1, r.stderr
        assert said(r.stderr) == [
            "stsync: error: migration stopped: a table it changes stayed locked by another session for over 1 s (an "
            "idle transaction? see pg_stat_activity); nothing was changed, run `stsync migrate` again when it has "
            "ended (or raise --lock-timeout)"]
        assert took < 30
        with e2e.engine.connect() as conn:
            assert db.current_revision(conn, "stsync") == "0009"
        assert e2e.stsync(e2e.config(), "migrate").returncode == 0  # once the transaction has ended
        with e2e.engine.connect() as conn:
            assert db.current_revision(conn, "stsync") == db.head_revision()
    finally:
        blocker.dispose()


@pytest.mark.parametrize("text", ["stsync-compatible revision=0098 oldest=0010", "something else", ""])
def test_a_mark_for_another_revision_or_none_is_not_compatibility(e2e: Env, text: str) -> None:
    migrate_as_a_newer_release(e2e, e2e.tmp, compatible=False)
    sql(e2e.engine, f"COMMENT ON TABLE stsync.alembic_version IS '{text}'")
    r = e2e.stsync(e2e.config(), "once")
    assert r.returncode == 1 and "not marked compatible" in r.stderr
