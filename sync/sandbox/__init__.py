"""The ServiceTitan sandbox simulator (see sync.sandbox.app)."""
