"""When the local edit a pending/in-flight row carries was made (newest_wins compares it with modifiedOn).

updated_at moves whenever stsync touches the row (coalescing, claims, retries, reclaims), so it says nothing
about when the user edited.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23
"""

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade(schema: str) -> None:
    op.execute(f'ALTER TABLE "{schema}".outbox ADD COLUMN local_changed_at timestamptz')


def downgrade(schema: str) -> None:
    op.execute(f'ALTER TABLE "{schema}".outbox DROP COLUMN IF EXISTS local_changed_at')
