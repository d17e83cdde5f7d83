"""Live daemons, so replicas can share ServiceTitan's per-tenant rate limit.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade(schema: str) -> None:
    op.execute(f"""
CREATE TABLE "{schema}".workers (
    id text PRIMARY KEY,
    started_at timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now()
)""")


def downgrade(schema: str) -> None:
    op.execute(f'DROP TABLE IF EXISTS "{schema}".workers')
