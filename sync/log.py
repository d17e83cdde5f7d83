"""structlog, configured once: JSON lines or console output, secrets redacted, context bound per call site."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any

import structlog

_SECRET_KEYS = re.compile(r"(secret|password|token|authorization|app_key|api_key)", re.IGNORECASE)
_REDACTED = "***"
_secret_values: set[str] = set()


def register_secret(value: str | None) -> None:
    """Mask this exact value wherever it appears in a log line, in command output and in what stsync stores,
    whatever key carries it and however deep (the client secret, the app key, every bearer token)."""
    if value and len(value) >= 4:
        _secret_values.add(value)


def mask(text: str) -> str:
    """``text`` with every registered secret replaced by ``***``."""
    for s in _secret_values:
        if s in text:
            text = text.replace(s, _REDACTED)
    return text


def redact(value: Any) -> Any:
    """A copy of ``value`` (str, or JSON-like dicts and lists, any depth) with every registered secret masked."""
    if not _secret_values:
        return value
    if isinstance(value, str):
        return mask(value)
    if isinstance(value, Mapping):
        return {redact(k) if isinstance(k, str) else k: redact(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    return value


def _redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in list(event.items()):
        if _SECRET_KEYS.search(key) and value is not None and key != "event":
            event[key] = _REDACTED
        elif _secret_values and not isinstance(value, int | float | bool | type(None)):
            event[key] = redact(value if isinstance(value, str | Mapping | list | tuple) else str(value))
    return event


class _MaskingFormatter(logging.Formatter):
    """stdlib log records (libraries: uvicorn, apscheduler), tracebacks included, with secrets masked."""

    def format(self, record: logging.LogRecord) -> str:
        return mask(super().format(record))


def _masking_excepthook(kind: type[BaseException], exc: BaseException, tb: Any) -> None:
    """An uncaught exception's traceback, with secrets masked, on stderr."""
    import traceback

    sys.stderr.write(mask("".join(traceback.format_exception(kind, exc, tb))))


def configure_logging(level: str = "INFO", fmt: str = "json", stream: Any = None) -> None:
    """Configure structlog (and the stdlib root logger it may receive from libraries)."""
    out = stream or sys.stderr
    numeric = logging.getLevelName(level.upper())
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,  # the traceback as text first, so that _redact masks it too
        _redact,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer(sort_keys=False)
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=out.isatty() if hasattr(out, "isatty") else False)
    )
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
    root = logging.getLogger()
    others = [h for h in root.handlers if not getattr(h, "stsync", False)]
    if not others:  # as logging.basicConfig would (a host such as pytest keeps its own handlers and level)
        handler = logging.StreamHandler(out)
        handler.setFormatter(_MaskingFormatter("%(name)s %(levelname)s %(message)s"))
        handler.stsync = True  # type: ignore[attr-defined]
        root.handlers = [handler]
        root.setLevel(max(numeric, logging.WARNING))
    sys.excepthook = _masking_excepthook
    for noisy in ("httpx", "httpcore", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # "skipped: maximum number of running instances reached" is how a coalesced wake-up looks: not a problem
    logging.getLogger("apscheduler").setLevel(logging.ERROR)


def get_logger(name: str | None = None, **context: Any) -> Any:
    return structlog.get_logger(name).bind(**context) if context else structlog.get_logger(name)
