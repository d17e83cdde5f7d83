"""Outbox: state ``discarded`` (an operator closed the row: its fields went back to the last-synced values), and
per claim a fencing token (``claim_token``) and the time its request went out (``sent_at``).

A send checks, just before the request goes out, that its claim (token) is still held; a reclaimed row is not
sent again before the dead worker's request could still land (``sent_at`` + the client timeout).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_STATES = "'pending', 'in_flight', 'succeeded', 'dead', 'superseded'"


def upgrade(schema: str) -> None:
    s = f'"{schema}"'
    op.execute(f"ALTER TABLE {s}.outbox DROP CONSTRAINT IF EXISTS outbox_state_check")
    op.execute(f"ALTER TABLE {s}.outbox ADD CONSTRAINT outbox_state_check CHECK (state IN ({_STATES}, 'discarded'))")
    op.execute(f"ALTER TABLE {s}.outbox ADD COLUMN claim_token bigint, ADD COLUMN sent_at timestamptz")


def downgrade(schema: str) -> None:
    s = f'"{schema}"'
    op.execute(f"UPDATE {s}.outbox SET state = 'superseded' WHERE state = 'discarded'")
    op.execute(f"ALTER TABLE {s}.outbox DROP CONSTRAINT IF EXISTS outbox_state_check")
    op.execute(f"ALTER TABLE {s}.outbox ADD CONSTRAINT outbox_state_check CHECK (state IN ({_STATES}))")
    op.execute(f"ALTER TABLE {s}.outbox DROP COLUMN IF EXISTS claim_token, DROP COLUMN IF EXISTS sent_at")
