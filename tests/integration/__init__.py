"""integration tests (see CONTRIBUTING.md, "Where a test goes")."""
