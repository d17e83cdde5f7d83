"""The pipeline's stages: each reads (sync.db), decides (sync.core) and writes (sync.db). Independent of
one another: what two stages share lives in the core or the database layer."""
