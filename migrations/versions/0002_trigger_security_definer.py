"""Change-log trigger functions run as their owner, so local applications need rights on the mirror only.

Without SECURITY DEFINER, every role that edits customers/locations would also need INSERT on change_log.
The search_path is pinned, as SECURITY DEFINER functions require.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade(schema: str) -> None:
    for fn in ("log_change", "notify_change"):
        op.execute(f'ALTER FUNCTION "{schema}".{fn}() SECURITY DEFINER SET search_path = "{schema}", pg_temp')
        op.execute(f'REVOKE ALL ON FUNCTION "{schema}".{fn}() FROM PUBLIC')


def downgrade(schema: str) -> None:
    for fn in ("log_change", "notify_change"):
        op.execute(f'ALTER FUNCTION "{schema}".{fn}() SECURITY INVOKER RESET search_path')
        op.execute(f'GRANT EXECUTE ON FUNCTION "{schema}".{fn}() TO PUBLIC')
