"""A mirror row's ``st_id`` cannot be changed once set (only stsync's own writes could).

``st_id`` says which ServiceTitan record every later PATCH of the row goes to: an application that changed it
would aim its edits (and the mirror id written into ``externalData``) at another customer or location. Setting
it where it is NULL stays allowed; changing or clearing it raises an error, unless the write is stsync's own
(the change-log bypass of migration 0007, honoured for its roles only).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01
"""

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade(schema: str) -> None:
    s = f'"{schema}"'
    op.execute(f"""
CREATE FUNCTION {s}.guard_st_id() RETURNS trigger LANGUAGE plpgsql
SECURITY DEFINER SET search_path = {s}, pg_temp AS $$
BEGIN
    IF OLD.st_id IS NOT NULL AND NEW.st_id IS DISTINCT FROM OLD.st_id
       AND NOT (coalesce(current_setting('stsync.bypass', true), '') = 'on'
                AND has_table_privilege(session_user, '{s}.change_log', 'DELETE')) THEN
        RAISE EXCEPTION 'stsync: %.st_id is ServiceTitan''s id of row % and cannot be changed (% -> %)',
            TG_TABLE_NAME, OLD.id, OLD.st_id, coalesce(NEW.st_id::text, 'NULL')
            USING ERRCODE = 'check_violation',
                  HINT = 'edit the other columns; to point a row at another ServiceTitan record, delete it and '
                         'let the pull bring that record';
    END IF;
    RETURN NEW;
END $$""")
    op.execute(f"REVOKE ALL ON FUNCTION {s}.guard_st_id() FROM PUBLIC")
    for t in ("customers", "locations"):
        op.execute(f"""CREATE TRIGGER {t}_guard_st_id BEFORE UPDATE OF st_id ON {s}.{t}
                       FOR EACH ROW EXECUTE FUNCTION {s}.guard_st_id()""")


def downgrade(schema: str) -> None:
    s = f'"{schema}"'
    for t in ("customers", "locations"):
        op.execute(f"DROP TRIGGER IF EXISTS {t}_guard_st_id ON {s}.{t}")
    op.execute(f"DROP FUNCTION IF EXISTS {s}.guard_st_id()")
