"""Alembic environment: stsync passes the connection and the target schema in ``config.attributes``."""

from __future__ import annotations

from alembic import context
from sqlalchemy import text

config = context.config
connection = config.attributes.get("connection")
schema = config.attributes.get("schema", "stsync")

if connection is None:  # pragma: no cover - only via `stsync migrate`, which always passes a connection
    raise SystemExit("run migrations with `stsync migrate`, which passes the database connection and schema")

connection.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
context.configure(
    connection=connection,
    version_table_schema=schema,
    transaction_per_migration=False,
)
with context.begin_transaction():
    context.run_migrations(schema=schema)
