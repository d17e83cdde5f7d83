"""The change-log triggers' bypass (``stsync.bypass = 'on'``) counts only for a role that may drain the log.

Any role can set a custom setting, so a local application could ``SET LOCAL stsync.bypass = 'on'`` and edit the
mirror with no change-log row (nor, for a DELETE, a tombstone): mirror and ServiceTitan would differ silently.
The bypass is now honoured only when the session's login role may DELETE from ``change_log`` (stsync's own
roles, per docs/deploy.md; an application role has no rights on the log).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

_BYPASS_OLD = "coalesce(current_setting('stsync.bypass', true), '') = 'on'"


def _bypass_new(schema: str) -> str:
    return (f"(coalesce(current_setting('stsync.bypass', true), '') = 'on' "
            f"AND has_table_privilege(session_user, '\"{schema}\".change_log', 'DELETE'))")


def _functions(schema: str, bypass: str) -> None:
    s = f'"{schema}"'
    op.execute(f"""
CREATE OR REPLACE FUNCTION {s}.log_change() RETURNS trigger LANGUAGE plpgsql
SECURITY DEFINER SET search_path = {s}, pg_temp AS $$
DECLARE
    ent text := CASE TG_TABLE_NAME WHEN 'customers' THEN 'customer' ELSE 'location' END;
BEGIN
    IF {bypass} THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'UPDATE' THEN
        IF (to_jsonb(NEW) - ARRAY['sync_status', 'sync_error', 'synced_at'])
           IS NOT DISTINCT FROM (to_jsonb(OLD) - ARRAY['sync_status', 'sync_error', 'synced_at']) THEN
            RETURN NULL;
        END IF;
        INSERT INTO {s}.change_log (entity, mirror_id, op) VALUES (ent, NEW.id, 'U');
    ELSIF TG_OP = 'INSERT' THEN
        INSERT INTO {s}.change_log (entity, mirror_id, op) VALUES (ent, NEW.id, 'I');
    ELSE
        INSERT INTO {s}.change_log (entity, mirror_id, op, old_row) VALUES (ent, OLD.id, 'D', to_jsonb(OLD));
    END IF;
    RETURN NULL;
END $$""")
    op.execute(f"""
CREATE OR REPLACE FUNCTION {s}.notify_change() RETURNS trigger LANGUAGE plpgsql
SECURITY DEFINER SET search_path = {s}, pg_temp AS $$
BEGIN
    IF NOT {bypass} THEN
        PERFORM pg_notify('{schema}_changes', TG_TABLE_NAME);
    END IF;
    RETURN NULL;
END $$""")
    for fn in ("log_change", "notify_change"):
        op.execute(f"REVOKE ALL ON FUNCTION {s}.{fn}() FROM PUBLIC")


def upgrade(schema: str) -> None:
    _functions(schema, _bypass_new(schema))


def downgrade(schema: str) -> None:
    _functions(schema, _BYPASS_OLD)
