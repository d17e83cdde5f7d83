"""The long-running process: the scheduler, the NOTIFY listener, metrics and health endpoints."""
