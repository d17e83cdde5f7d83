"""The NOTIFY listener: wakes detect the moment a local write commits (the job intervals are the safety net)."""

from __future__ import annotations

import threading
from collections.abc import Callable

import psycopg
from sqlalchemy.engine import make_url

from sync.db.engine import normalize_url
from sync.log import get_logger

log = get_logger("stsync.daemon")


class NotifyListener:
    """LISTENs on the schema's change channel in a thread and calls ``on_notify`` (thread-safe) per wake-up, with
    the notification's payload (``""`` for the catch-up after (re)connecting)."""

    def __init__(self, url: str, channel: str, on_notify: Callable[[str], None]) -> None:
        u = make_url(normalize_url(url)).set(drivername="postgresql")
        self._dsn = u.render_as_string(hide_password=False)
        self._channel = channel
        self._on_notify = on_notify
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stsync-listen", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        backoff = 1.0
        while not self._stop.is_set():
            try:
                with psycopg.connect(self._dsn, autocommit=True, connect_timeout=10) as conn:
                    conn.execute(f'LISTEN "{self._channel}"')
                    backoff = 1.0
                    self._on_notify("")  # catch up on anything committed while we were not listening
                    while not self._stop.is_set():
                        # every notification, not only the first: one transaction may send several (an
                        # operator's `outbox retry` NOTIFYs `retry` after its mirror update's `customers`), and
                        # one left in a closed generator is lost (the daemon wakes coalesce them anyway)
                        for note in conn.notifies(timeout=0.5):
                            self._on_notify(note.payload)
            except psycopg.Error as exc:
                log.warning("listen.disconnected", error=str(exc).splitlines()[0] if str(exc) else "",
                            retry_in_s=backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)
