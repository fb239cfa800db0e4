"""Finding the study's files, ordering them by time, and telling runs apart.

Checkpoints and logs carry their save time in the name (`..._{YYYYMMDD_HHMMSS}.json`);
files without one are ordered by mtime (and reported). The study wrote two runs with the same
names into one folder, Oct and Nov 2025: files whose times are more than `run_gap_days`
apart start a new run, named `{first YYYYMMDD}-{last YYYYMMDD}`.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from engine.audit.problems import clean_text, problem
from engine.errors import UserError
from engine.schema import CHECKPOINT_NAME_RE, RESPONSES_NAME_RE

TS_RE = re.compile(r"(\d{8})_(\d{6})")


@dataclass
class DataFile:
    path: Path
    role: str  # checkpoint | responses
    timestamp: dt.datetime
    ts_source: str  # name | mtime
    size: int
    layer_range: tuple[int, int] | None = None
    process_id: str | None = None
    run_id: str = ""

    @property
    def name(self) -> str:
        """The file name as shown in reports (bytes that are not UTF-8 shown as U+FFFD)."""
        return clean_text(self.path.name)

    @property
    def ts_text(self) -> str:
        return self.timestamp.strftime("%Y%m%d_%H%M%S")


@dataclass
class Run:
    run_id: str
    first: dt.datetime
    last: dt.datetime
    files: list[DataFile] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "run_id": self.run_id,
            "first": self.first.isoformat(),
            "last": self.last.isoformat(),
            "checkpoint_files": sum(f.role == "checkpoint" for f in self.files),
            "response_files": sum(f.role == "responses" for f in self.files),
        }


def _file(path: Path, role: str, st: os.stat_result) -> DataFile:
    rx = CHECKPOINT_NAME_RE if role == "checkpoint" else RESPONSES_NAME_RE
    m = rx.match(path.name)
    lr = pid = None
    if m:
        lr, pid = (int(m.group(1)), int(m.group(2))), m.group(3)
    ts = None
    hits = TS_RE.findall(path.name)
    if hits:
        try:
            ts = dt.datetime.strptime("_".join(hits[-1]), "%Y%m%d_%H%M%S")
        except ValueError:
            ts = None
    if ts is None:
        return DataFile(path, role, dt.datetime.fromtimestamp(st.st_mtime).replace(microsecond=0), "mtime",
                        st.st_size, lr, pid)
    return DataFile(path, role, ts, "name", st.st_size, lr, pid)


def discover(folder: str | Path | None, patterns: list[str], role: str,
             exclude_patterns: list[str] | None = None, problems: list | None = None) -> list[DataFile]:
    """Files directly in `folder` matching any pattern (not recursive), oldest first. An entry
    with a matching name that is not a regular file (a folder, FIFO, socket, dangling link,
    symlink loop) is reported in `problems` as `not_a_file` instead of being skipped silently."""
    if folder is None:
        return []
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{role} folder not found: {folder}")
    out = []
    try:
        entries = sorted(folder.iterdir())
    except OSError as exc:
        raise UserError(f"cannot list the {role} folder {folder}: {exc}") from None
    for p in entries:
        if p.name.startswith("."):
            continue
        if not any(fnmatch.fnmatchcase(p.name, pat) for pat in patterns):
            continue
        if exclude_patterns and any(fnmatch.fnmatchcase(p.name, pat) for pat in exclude_patterns):
            continue
        try:
            st = p.stat()  # follows links: a dangling link or a loop raises
        except OSError as exc:
            what = "a symlink loop" if getattr(exc, "errno", None) == 40 else \
                "a dangling link" if p.is_symlink() else "not readable"
            if problems is not None:
                problems.append(problem("not_a_file", clean_text(p.name), message=f"{what} ({exc.strerror}); not read"))
            continue
        if not stat.S_ISREG(st.st_mode):
            what = "a folder" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode) else \
                "a socket" if stat.S_ISSOCK(st.st_mode) else "a device" if stat.S_ISCHR(st.st_mode) or \
                stat.S_ISBLK(st.st_mode) else "not a regular file"
            if problems is not None:
                problems.append(problem("not_a_file", clean_text(p.name), message=f"{what} named like a {role} file; not read"))
            continue
        out.append(_file(p, role, st))
    out.sort(key=lambda f: (f.timestamp, f.name))
    return out


def detect_runs(files: list[DataFile], gap_days: float) -> list[Run]:
    ordered = sorted(files, key=lambda f: (f.timestamp, f.name))
    runs: list[Run] = []
    gap = dt.timedelta(days=gap_days)
    for f in ordered:
        if not runs or f.timestamp - runs[-1].last > gap:
            runs.append(Run("", f.timestamp, f.timestamp))
        runs[-1].files.append(f)
        runs[-1].last = f.timestamp
    for r in runs:
        r.run_id = f"{r.first:%Y%m%d}-{r.last:%Y%m%d}"
        for f in r.files:
            f.run_id = r.run_id
    return runs


def parse_time(text: str, end: bool = False) -> dt.datetime:
    """YYYYMMDD, YYYYMMDD_HHMMSS or an ISO date/time; a bare date used as `until` means its end."""
    t = str(text).strip()
    for fmt in ("%Y%m%d_%H%M%S", "%Y%m%d", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S", "%Y-%m-%d"):
        try:
            v = dt.datetime.strptime(t, fmt)
        except ValueError:
            continue
        if end and fmt in ("%Y%m%d", "%Y-%m-%d"):
            v = v + dt.timedelta(days=1) - dt.timedelta(seconds=1)
        return v
    raise UserError(f"cannot read the time {text!r}: use YYYYMMDD, YYYYMMDD_HHMMSS or YYYY-MM-DD")


def select(files: list[DataFile], runs: list[Run], run: str | None, since: str | None,
           until: str | None) -> tuple[list[DataFile], list[DataFile], Run | None]:
    """(kept, skipped, chosen run) for a run id (or its first date, or its 1-based number)
    and a time window."""
    chosen = None
    if run:
        r = str(run).strip()
        for i, cand in enumerate(runs, start=1):
            if r in (cand.run_id, cand.run_id.split("-")[0], str(i)):
                chosen = cand
        if chosen is None:
            listed = ", ".join(f"{i}: {c.run_id}" for i, c in enumerate(runs, start=1)) or "none"
            raise UserError(f"no run {run!r} in the data; runs found: {listed}")
    lo = parse_time(since) if since else None
    hi = parse_time(until, end=True) if until else None
    kept, skipped = [], []
    for f in files:
        ok = (chosen is None or f.run_id == chosen.run_id) and (lo is None or f.timestamp >= lo) \
            and (hi is None or f.timestamp <= hi)
        (kept if ok else skipped).append(f)
    return kept, skipped, chosen
