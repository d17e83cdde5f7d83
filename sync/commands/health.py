"""`stsync health`: ask a running daemon's /healthz (or /readyz), for a container HEALTHCHECK that needs no curl."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from urllib.parse import urlsplit

from sync.errors import StsyncError

DEFAULT_URL = "http://127.0.0.1:9464/healthz"
"""The image's `observability.listen` (0.0.0.0:9464), asked from inside the container."""


class Unhealthy(StsyncError):
    """The daemon did not answer, or answered that it is not healthy (exit 1)."""


def check(url: str, timeout: float) -> str:
    """One line saying what the daemon answered; raises Unhealthy (one line) unless it answered 200."""
    if urlsplit(url).scheme not in ("http", "https"):
        raise Unhealthy(f"{url}: not an http:// URL")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:  # noqa: S310 - http(s) only, checked above
            body = answer.read(65536)
            return f"{url}: {answer.status} {_said(body)}"
    except urllib.error.HTTPError as err:
        raise Unhealthy(f"{url}: {err.code} {_said(err.read(65536))}") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise Unhealthy(f"{url}: no answer ({reason}); is `stsync run` up with observability.listen set?") from None


def _said(body: bytes) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace").strip().splitlines()[0][:200] if body.strip() else ""
    return json.dumps(data, separators=(",", ":"))[:300]
