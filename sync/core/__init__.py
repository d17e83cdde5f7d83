"""The pure core: what is synced and every decision over plain data (diff, request bodies, merge, retry,
schema validation). No I/O: nothing here imports a database driver, an HTTP client or a logger."""
