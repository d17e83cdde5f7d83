"""e2e tests (see CONTRIBUTING.md, "Where a test goes")."""
