"""Outbox: ``operation`` (``create`` | ``update`` | ``delete``) and state ``held`` (waiting for an operator: a mass
delete); the TRUNCATE of a mirror table is recorded (``truncations``), never propagated.

A mirror row inserted without ``st_id`` is created in ServiceTitan (``operation = 'create'``: ``POST /customers``
with its new locations, or ``POST /locations``); a local delete under ``sync.local_deletes: propagate`` is a
``delete`` row (customers and locations: ``PATCH active=false``). A statement-level trigger records every TRUNCATE
of a mirror table in ``truncations`` (not stsync's own, under the bypass of migration 0007); the pull brings
the rows back.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-01
"""

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

_STATES = "'pending', 'in_flight', 'succeeded', 'dead', 'superseded', 'discarded'"


def upgrade(schema: str) -> None:
    s = f'"{schema}"'
    op.execute(f"ALTER TABLE {s}.outbox DROP CONSTRAINT IF EXISTS outbox_state_check")
    op.execute(f"ALTER TABLE {s}.outbox ADD CONSTRAINT outbox_state_check CHECK (state IN ({_STATES}, 'held'))")
    op.execute(f"""ALTER TABLE {s}.outbox ADD COLUMN operation text NOT NULL DEFAULT 'update'
                   CONSTRAINT outbox_operation_check CHECK (operation IN ('create', 'update', 'delete'))""")
    op.execute(f"""
CREATE TABLE {s}.truncations (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    entity text NOT NULL,
    truncated_at timestamptz NOT NULL DEFAULT now(),
    by_user text NOT NULL DEFAULT session_user,
    restored_at timestamptz
)""")
    op.execute(f"""
CREATE FUNCTION {s}.log_truncate() RETURNS trigger LANGUAGE plpgsql
SECURITY DEFINER SET search_path = {s}, pg_temp AS $$
BEGIN
    IF coalesce(current_setting('stsync.bypass', true), '') = 'on'
       AND has_table_privilege(session_user, '{s}.change_log', 'DELETE') THEN
        RETURN NULL;  -- stsync's own (the tests' reset): not an application's
    END IF;
    INSERT INTO {s}.truncations (entity, by_user)
    VALUES (CASE TG_TABLE_NAME WHEN 'customers' THEN 'customer' ELSE 'location' END, session_user);
    PERFORM pg_notify('{schema}_changes', TG_TABLE_NAME);
    RETURN NULL;
END $$""")
    op.execute(f"REVOKE ALL ON FUNCTION {s}.log_truncate() FROM PUBLIC")
    for t in ("customers", "locations"):
        op.execute(f"""CREATE TRIGGER {t}_log_truncate AFTER TRUNCATE ON {s}.{t}
                       FOR EACH STATEMENT EXECUTE FUNCTION {s}.log_truncate()""")


def downgrade(schema: str) -> None:
    s = f'"{schema}"'
    for t in ("customers", "locations"):
        op.execute(f"DROP TRIGGER IF EXISTS {t}_log_truncate ON {s}.{t}")
    op.execute(f"DROP FUNCTION IF EXISTS {s}.log_truncate()")
    op.execute(f"DROP TABLE IF EXISTS {s}.truncations")
    op.execute(f"UPDATE {s}.outbox SET state = 'dead' WHERE state = 'held'")
    op.execute(f"ALTER TABLE {s}.outbox DROP CONSTRAINT IF EXISTS outbox_state_check")
    op.execute(f"ALTER TABLE {s}.outbox ADD CONSTRAINT outbox_state_check CHECK (state IN ({_STATES}))")
    op.execute(f"ALTER TABLE {s}.outbox DROP COLUMN IF EXISTS operation")
