"""Migrations: up is idempotent, down/up round-trips, triggers log local edits and skip stsync's own."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, inspect, text

from sync.db import engine as db
from sync.errors import MigrationRequiredError

CONTRACT_CUSTOMER_COLUMNS = {
    "id", "st_id", "name", "type", "street", "unit", "city", "state", "zip", "country", "latitude", "longitude",
    "active", "do_not_mail", "do_not_service", "tag_type_ids", "custom_fields", "external_data", "balance",
    "tax_exempt", "created_on", "created_by_id", "modified_on", "merged_to_id", "sync_status", "sync_error",
    "synced_at",
}
CONTRACT_LOCATION_COLUMNS = {
    "id", "st_id", "customer_id", "name", "street", "unit", "city", "state", "zip", "country", "latitude",
    "longitude", "active", "tax_zone_id", "tag_type_ids", "custom_fields", "external_data", "zone_id",
    "tax_exempt", "created_on", "created_by_id", "modified_on", "merged_to_id", "sync_status", "sync_error",
    "synced_at",
}


@pytest.fixture
def scratch(database_url: str) -> Iterator[tuple[Engine, str]]:
    schema = "scratch_mig"
    engine = db.make_engine(database_url, schema)
    with engine.begin() as conn:
        conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    yield engine, schema
    with engine.begin() as conn:
        conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    engine.dispose()


def test_migrate_creates_contract_tables_and_second_run_is_noop(scratch: tuple[Engine, str]) -> None:
    engine, schema = scratch
    with pytest.raises(MigrationRequiredError, match="stsync migrate"):
        db.check_current(engine, schema)
    db.upgrade(engine, schema)
    insp = inspect(engine)
    tables = set(insp.get_table_names(schema=schema))
    assert {"customers", "locations", "outbox", "outbox_attempts", "conflicts"} <= tables
    assert {c["name"] for c in insp.get_columns("customers", schema=schema)} == CONTRACT_CUSTOMER_COLUMNS
    assert {c["name"] for c in insp.get_columns("locations", schema=schema)} == CONTRACT_LOCATION_COLUMNS
    db.check_current(engine, schema)
    with engine.connect() as conn:
        before = conn.execute(text("SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                                   "WHERE n.nspname = :s"), {"s": schema}).scalar()
    db.upgrade(engine, schema)
    with engine.connect() as conn:
        after = conn.execute(text("SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                                  "WHERE n.nspname = :s"), {"s": schema}).scalar()
        assert db.current_revision(conn, schema) == db.head_revision()
    assert before == after


def test_downgrade_then_upgrade_round_trips(scratch: tuple[Engine, str]) -> None:
    engine, schema = scratch
    db.upgrade(engine, schema)
    db.downgrade(engine, schema, "base")
    assert "customers" not in inspect(engine).get_table_names(schema=schema)
    with engine.connect() as conn:
        assert db.current_revision(conn, schema) is None
    db.upgrade(engine, schema)
    assert "customers" in inspect(engine).get_table_names(schema=schema)


def changes(engine: Engine) -> list[tuple[str, int, str]]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text("SELECT entity, mirror_id, op FROM change_log ORDER BY id"))]


def test_triggers_log_local_inserts_updates_deletes(engine: Engine) -> None:
    with engine.begin() as conn:
        cid = conn.execute(text("INSERT INTO customers (st_id, name) VALUES (10, 'A') RETURNING id")).scalar_one()
        lid = conn.execute(text("INSERT INTO locations (st_id, customer_id, name) VALUES (20, :c, 'L') RETURNING id"),
                           {"c": cid}).scalar_one()
    with engine.begin() as conn:
        conn.execute(text("UPDATE customers SET name = 'B' WHERE id = :i"), {"i": cid})
        conn.execute(text("DELETE FROM locations WHERE id = :i"), {"i": lid})
    assert changes(engine) == [("customer", cid, "I"), ("location", lid, "I"), ("customer", cid, "U"),
                               ("location", lid, "D")]
    with engine.connect() as conn:
        old = conn.execute(text("SELECT old_row FROM change_log WHERE op = 'D'")).scalar_one()
    assert old["st_id"] == 20 and old["name"] == "L"


def test_triggers_skip_stsync_own_writes_and_bookkeeping_and_no_ops(engine: Engine) -> None:
    with engine.begin() as conn:
        db.bypass_triggers(conn)
        cid = conn.execute(text("INSERT INTO customers (st_id, name) VALUES (10, 'A') RETURNING id")).scalar_one()
        conn.execute(text("UPDATE customers SET name = 'pulled' WHERE id = :i"), {"i": cid})
    with engine.begin() as conn:
        conn.execute(text("UPDATE customers SET sync_status = 'synced', synced_at = now() WHERE id = :i"), {"i": cid})
        conn.execute(text("UPDATE customers SET name = name WHERE id = :i"), {"i": cid})
    assert changes(engine) == []
    # the bypass is transaction-local: the next local write is logged again
    with engine.begin() as conn:
        conn.execute(text("UPDATE customers SET city = 'Austin' WHERE id = :i"), {"i": cid})
    assert changes(engine) == [("customer", cid, "U")]


def test_local_write_sends_notify(engine: Engine, database_url: str) -> None:
    import psycopg

    with psycopg.connect(database_url.replace("+psycopg", ""), autocommit=True) as listener:
        listener.execute(f'LISTEN "{db.notify_channel("stsync")}"')
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO customers (name) VALUES ('x'), ('y')"))
        got = [n.payload for n in listener.notifies(timeout=2.0, stop_after=1)]
    assert got == ["customers"]


def test_local_apps_need_privileges_on_the_mirror_tables_only(engine: Engine, database_url: str) -> None:
    import uuid

    import psycopg
    from sqlalchemy.engine import make_url

    role = f"stsync_test_app_{uuid.uuid4().hex[:8]}"  # roles are cluster-wide: never collide with another run
    admin = database_url.replace("+psycopg", "")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"DROP ROLE IF EXISTS {role}")
        conn.execute(f"CREATE ROLE {role} LOGIN")
        conn.execute(f"GRANT USAGE ON SCHEMA stsync TO {role}")
        conn.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON stsync.customers, stsync.locations TO {role}")
    try:
        app = make_url(database_url).set(drivername="postgresql", username=role, password=None)
        with psycopg.connect(app.render_as_string(hide_password=False), autocommit=True) as conn:
            conn.execute("INSERT INTO stsync.customers (name) VALUES ('by app')")
            conn.execute("UPDATE stsync.customers SET name = 'edited by app'")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("SELECT * FROM stsync.change_log")
        assert [op for (_, _, op) in changes(engine)] == ["I", "U"]
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"DROP OWNED BY {role}")
            conn.execute(f"DROP ROLE {role}")


def test_an_application_role_cannot_switch_change_capture_off(engine: Engine, database_url: str) -> None:
    """``SET LOCAL stsync.bypass = 'on'`` is stsync's own marker; from a role with no rights on the change log
    (an application, docs/deploy.md) it is ignored: the edit is logged, a delete too (its tombstone comes from it)."""
    import uuid

    import psycopg
    from sqlalchemy.engine import make_url

    role = f"stsync_test_app_{uuid.uuid4().hex[:8]}"
    admin = database_url.replace("+psycopg", "")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN")
        conn.execute(f"GRANT USAGE ON SCHEMA stsync TO {role}")
        conn.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON stsync.customers, stsync.locations TO {role}")
        conn.execute("INSERT INTO stsync.customers (name) VALUES ('before')")
    before = len(changes(engine))
    try:
        app = make_url(database_url).set(drivername="postgresql", username=role, password=None)
        with psycopg.connect(app.render_as_string(hide_password=False)) as conn:
            with conn.transaction():
                conn.execute("SET LOCAL stsync.bypass = 'on'")
                conn.execute("UPDATE stsync.customers SET name = 'sneaky' WHERE name = 'before'")
            with conn.transaction():
                conn.execute("SELECT set_config('stsync.bypass', 'on', true)")
                conn.execute("DELETE FROM stsync.customers WHERE name = 'sneaky'")
        assert [op for (_, _, op) in changes(engine)[before:]] == ["U", "D"]
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"DROP OWNED BY {role}")
            conn.execute(f"DROP ROLE {role}")


def test_an_application_cannot_point_a_mirror_row_at_another_servicetitan_record(engine: Engine) -> None:
    """``st_id`` aims every later PATCH: once set it cannot be changed or cleared (NULL -> an id stays allowed)."""
    from sqlalchemy.exc import IntegrityError

    with engine.begin() as conn:
        mid = conn.execute(text("INSERT INTO customers (name) VALUES ('linked') RETURNING id")).scalar_one()
        conn.execute(text("UPDATE customers SET st_id = 111 WHERE id = :m"), {"m": mid})  # linking: allowed
    for new in ("222", "NULL"):
        with pytest.raises(IntegrityError, match="st_id is ServiceTitan's id"), engine.begin() as conn:
            conn.execute(text(f"UPDATE customers SET st_id = {new} WHERE id = :m"), {"m": mid})
    with engine.begin() as conn:
        conn.execute(text("UPDATE customers SET name = 'still editable' WHERE id = :m"), {"m": mid})
        assert conn.execute(text("SELECT st_id FROM customers WHERE id = :m"), {"m": mid}).scalar_one() == 111
