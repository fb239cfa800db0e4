"""Progress reporting: a terminal bar with rate and ETA, and an optional progress file.

The explorer starts engine subprocesses with `--progress-file PATH`; every update is
also written there atomically as JSON so a polling fragment can draw its own bar.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator, TypeVar

from engine.schema import atomic_write_json

T = TypeVar("T")

_progress_file: Path | None = None
_job_state: dict = {}


def set_progress_file(path: str | os.PathLike | None) -> None:
    global _progress_file
    _progress_file = Path(path) if path else None
    _job_state.clear()


def report(stage: str, done: int | None = None, total: int | None = None, *, state: str = "running",
           message: str | None = None, **extra) -> None:
    """Write the current stage to the progress file (if one is set)."""
    if _progress_file is None:
        return
    now = time.time()
    _job_state.setdefault("started", now)
    _job_state.update(
        {
            "state": state,
            "stage": stage,
            "done": done,
            "total": total,
            "message": message,
            "updated": now,
            "pid": os.getpid(),
            **extra,
        }
    )
    try:
        atomic_write_json(_progress_file, _job_state, indent=None)
    except OSError:
        pass  # progress is advisory; never fail the work because of it


class Progress:
    """A tqdm bar on stderr that also reports to the progress file, with ETA."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", disable: bool | None = None):
        from tqdm import tqdm

        self.total = total
        self.desc = desc
        self.done = 0
        self._start = time.time()
        if disable is None:
            disable = os.environ.get("ENGINE_NO_PROGRESS") == "1"
        self._bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=disable,
                         dynamic_ncols=True, mininterval=0.5)
        self._last_report = 0.0
        report(desc, 0, total)

    def update(self, n: int = 1) -> None:
        self.done += n
        self._bar.update(n)
        now = time.time()
        if now - self._last_report > 0.3 or (self.total is not None and self.done >= self.total):
            self._last_report = now
            elapsed = now - self._start
            rate = self.done / elapsed if elapsed > 0 else None
            eta = (self.total - self.done) / rate if (rate and self.total is not None) else None
            report(self.desc, self.done, self.total, rate=rate, eta_s=eta, elapsed_s=elapsed)

    def set_postfix(self, **kw) -> None:
        self._bar.set_postfix(**kw)

    def write(self, text: str) -> None:
        self._bar.write(text, file=sys.stderr)

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def track(items: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    if total is None:
        try:
            total = len(items)  # type: ignore[arg-type]
        except TypeError:
            total = None
    with Progress(total, desc, unit) as bar:
        for item in items:
            yield item
            bar.update(1)
