"""The HTTP edge: ServiceTitan's API as Python calls (OAuth token, rate limiter, answers as data)."""
