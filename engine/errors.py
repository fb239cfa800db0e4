"""Errors that reach the user as one clear line (exit code 2), never as a traceback."""

from __future__ import annotations

import os
from pathlib import Path


class UserError(Exception):
    """Bad input or environment: the message names the file, record or value."""

    exit_code = 2


def shown_value(value) -> str:
    """A value as it reads in a one-line message: JSON, cut at 40 characters."""
    import json

    try:
        text = json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        text = type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def one_line(exc: BaseException, limit: int = 240) -> str:
    """An exception's message on one line, cut at `limit` characters."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def write_traceback(text: str, cache: str | os.PathLike | None, label: str) -> Path | None:
    """Keep an internal error's traceback in a new per-run file and return its path.

    Under the cache: `<cache>/logs/error-<label>-<time>-<pid>-<random>.txt`, created with
    O_EXCL and O_NOFOLLOW inside a logs folder opened without following a symlink, so a link
    planted at that name (or at logs/) is never written through. Without a usable cache
    folder: a fresh private file from mkstemp in the temporary folder. None when neither works."""
    import re
    import secrets
    import tempfile
    import time

    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", label)[:40] or "engine"
    name = f"error-{safe}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{secrets.token_hex(3)}.txt"
    data = text.encode("utf-8", "replace")
    if cache is not None:
        logs = Path(cache) / "logs"
        dir_fd = None
        try:
            logs.mkdir(parents=True, exist_ok=True)
            dir_fd = os.open(logs, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=dir_fd)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            return logs / name
        except OSError:
            pass
        finally:
            if dir_fd is not None:
                os.close(dir_fd)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f"engine-error-{safe}-", suffix=".txt")  # O_EXCL, 0600
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        return Path(tmp)
    except OSError:
        return None
