"""What an attempt with an unknown outcome sent, so the pull can recognise it as our own late echo.

A timeout, a dropped connection or a 5xx may come after ServiceTitan applied the PATCH. The row goes back to
pending; when the next pull sees those values it must not take them for a remote edit.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade(schema: str) -> None:
    op.execute(f'ALTER TABLE "{schema}".outbox ADD COLUMN unconfirmed jsonb')


def downgrade(schema: str) -> None:
    op.execute(f'ALTER TABLE "{schema}".outbox DROP COLUMN IF EXISTS unconfirmed')
