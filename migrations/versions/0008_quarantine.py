"""Quarantine: feed records that cannot be stored (or lack required fields), kept with their raw JSON and why.

One bad record used to roll back its whole page, on every pull, for ever: the cursor never moved and the good
records behind it were never pulled. Now it is put aside here and the rest of the page applies; it is tried
again whenever it comes back (a new version in the feed, or the pull's fetch by id of quarantined records).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01
"""

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade(schema: str) -> None:
    s = f'"{schema}"'
    op.execute(f"""
CREATE TABLE {s}.quarantine (
    entity text NOT NULL,
    record_key text NOT NULL,
    st_id bigint,
    raw text NOT NULL,
    reason text NOT NULL,
    first_seen timestamptz NOT NULL DEFAULT now(),
    last_seen timestamptz NOT NULL DEFAULT now(),
    times_seen integer NOT NULL DEFAULT 1,
    PRIMARY KEY (entity, record_key)
)""")
    op.execute(f"COMMENT ON TABLE {s}.quarantine IS 'Feed records stsync could not store: raw JSON (as text) and why'")


def downgrade(schema: str) -> None:
    op.execute(f'DROP TABLE IF EXISTS "{schema}".quarantine')
