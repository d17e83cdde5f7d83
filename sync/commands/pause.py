"""`stsync pause` / `stsync resume`: stop sending (every replica) while detect and pull go on, and start again."""

from __future__ import annotations

import getpass
import socket
from typing import Any

from sqlalchemy import Connection

from sync.db import control
from sync.db.engine import notify


def who() -> str:
    """``user@host`` of the operator, recorded with the pause."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def pause(conn: Connection, reason: str | None) -> dict[str, Any]:
    return control.pause(conn, who(), reason)


def resume(conn: Connection) -> dict[str, Any] | None:
    """Resume, and wake the daemons' dispatchers at once (NOTIFY ``resume``)."""
    was = control.resume(conn)
    if was is not None:
        notify(conn, "resume")
    return was
