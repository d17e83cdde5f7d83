"""What build this process is: the version, and the commit it was built from (``--version``, ``stsync_build_info``).

The commit is ``$STSYNC_COMMIT`` when set (the image sets it from its build argument: the image has no .git), else
what ``git`` says of the source tree this package runs from (an editable install), else ``unknown``.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from pathlib import Path

from sync import __version__

ENV_COMMIT = "STSYNC_COMMIT"


@functools.cache
def commit() -> str:
    given = os.environ.get(ENV_COMMIT, "").strip()
    if given:
        return given[:40]
    source = Path(__file__).resolve().parent.parent
    git = shutil.which("git")
    if git is None or not (source / ".git").exists():
        return "unknown"
    try:
        argv = [git, "-C", str(source), "rev-parse", "--short=12", "HEAD"]  # git, on our own tree
        out = subprocess.run(argv, capture_output=True, text=True, timeout=5, check=True)  # noqa: S603
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def version() -> str:
    return __version__


def describe() -> str:
    """``0.1.0 (commit 8a2d83a1b2c3)``."""
    return f"{__version__} (commit {commit()})"
