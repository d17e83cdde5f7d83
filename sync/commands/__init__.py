"""Operator commands behind the CLI (status, outbox and conflict tools): read and write through sync.db."""
