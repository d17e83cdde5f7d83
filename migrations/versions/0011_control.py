"""Control: one row that says whether sending is paused (`stsync pause` / `stsync resume`), seen by every replica.

While paused, the dispatcher claims nothing (``sync/db/outbox.py`` ``claim_due``): local edits are still detected
and queued, and the feeds are still pulled, but no request changes ServiceTitan until `stsync resume`.

The first migration marked compatible with the release before it (docs/deploy.md, "Rolling upgrades"): a table
the previous release never reads, so its replicas may keep running while this one rolls out.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-01
"""

from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade(schema: str) -> None:
    s = f'"{schema}"'
    op.execute(f"""
CREATE TABLE {s}.control (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    paused_at timestamptz,
    paused_by text,
    reason text
)""")
    op.execute(f"INSERT INTO {s}.control DEFAULT VALUES")
    op.execute(f"COMMENT ON TABLE {s}.control IS 'paused_at set: stsync sends nothing (stsync pause / resume)'")
    op.execute(f"COMMENT ON TABLE {s}.alembic_version IS 'stsync-compatible revision=0011 oldest=0010'")


def downgrade(schema: str) -> None:
    op.execute(f'DROP TABLE IF EXISTS "{schema}".control')
    op.execute(f'COMMENT ON TABLE "{schema}".alembic_version IS NULL')
