"""Secrets never leave the process in clear (issue 16, 8): log values at any depth, tracebacks (structlog's, the
stdlib's and an uncaught exception's) and what `redact` returns for storage."""

from __future__ import annotations

import io
import logging
import sys
import uuid
from collections.abc import Iterator

import pytest
import structlog

from sync import log as stlog


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """configure_logging changes process-wide state: put it back for the tests that follow."""
    root = logging.getLogger()
    handlers, level, hook = list(root.handlers), root.level, sys.excepthook
    yield
    structlog.reset_defaults()
    root.handlers, sys.excepthook = handlers, hook
    root.setLevel(level)


@pytest.fixture
def secret() -> str:
    value = f"tok-{uuid.uuid4().hex}"
    stlog.register_secret(value)
    return value


def test_a_secret_nested_in_a_log_value_is_masked(secret: str) -> None:
    out = io.StringIO()
    stlog.configure_logging("INFO", "json", stream=out)
    stlog.get_logger("t").warning("outbox.send_failed", body={"request": {"headers": {"Authorization": f"Bearer "
                                                                                      f"{secret}"}}},
                                  items=[f"x{secret}y"])
    assert secret not in out.getvalue() and "***" in out.getvalue()


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_a_secret_in_a_traceback_is_masked(secret: str, fmt: str) -> None:
    out = io.StringIO()
    stlog.configure_logging("INFO", fmt, stream=out)
    try:
        raise RuntimeError(f"ServiceTitan said: invalid token {secret}")
    except RuntimeError:
        stlog.get_logger("t").exception("job.failed")
    assert "RuntimeError" in out.getvalue() and secret not in out.getvalue()


def test_a_secret_in_a_library_log_record_and_an_uncaught_exception_is_masked(secret: str,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    handler = logging.StreamHandler(io.StringIO())
    handler.setFormatter(stlog._MaskingFormatter("%(message)s"))
    record = logging.LogRecord("uvicorn", logging.ERROR, __file__, 1, "token %s", (secret,), None)
    assert secret not in handler.format(record)
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    try:
        raise ValueError(secret)
    except ValueError as exc:
        stlog._masking_excepthook(ValueError, exc, exc.__traceback__)
    assert "ValueError" in err.getvalue() and secret not in err.getvalue()


def test_redact_masks_values_for_storage_and_keeps_their_shape(secret: str) -> None:
    body = {"title": "Unauthorized", "request": {"headers": {"ST-App-Key": secret}}, "n": 3, "list": [secret, 1]}
    assert stlog.redact(body) == {"title": "Unauthorized", "request": {"headers": {"ST-App-Key": "***"}}, "n": 3,
                                  "list": ["***", 1]}
