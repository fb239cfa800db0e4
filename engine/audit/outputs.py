"""All-or-nothing audit outputs: a full audit writes into a temporary folder beside
`<cache>/audit` and swaps it in only once every table and `complete.json` are written.

A failed or killed audit therefore leaves the previous audit as it was (its temporary folder
is removed, or cleared by the next audit). `complete.json` lists the tables with their sizes;
`engine select` refuses an audit folder without it, or whose tables do not match it (one
written by an older version, or a folder someone half-copied).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
from pathlib import Path

from engine.schema import (AUDIT_CHECKPOINT_RECORDS, AUDIT_COMPLETE, AUDIT_DIR, AUDIT_FEATURE_CONDITIONS,
                           AUDIT_FEATURE_EFFECTS, AUDIT_PROBLEMS, AUDIT_TRIALS, atomic_write_json, with_schema)

TABLES = (AUDIT_TRIALS, AUDIT_FEATURE_CONDITIONS, AUDIT_FEATURE_EFFECTS, AUDIT_CHECKPOINT_RECORDS, AUDIT_PROBLEMS)
_TMP_PREFIX = ".audit-tmp-"
_OLD_PREFIX = ".audit-old-"


def _rel(path: str) -> str:
    return path.split("/", 1)[1]  # "audit/x.parquet" -> "x.parquet"


def staging_dir(cache: Path) -> Path:
    """A fresh temporary audit folder for this process, after clearing what killed audits left."""
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    recover(cache)
    work = cache / f"{_TMP_PREFIX}{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    return work


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover(cache: Path) -> None:
    """Undo what a killed audit left: put back a previous audit moved aside by an unfinished
    swap; remove temporary folders of processes that no longer run."""
    cache = Path(cache)
    final = cache / AUDIT_DIR
    for p in sorted(cache.glob(_OLD_PREFIX + "*")) + sorted(cache.glob(_TMP_PREFIX + "*")):
        try:
            pid = int(p.name.rsplit("-", 1)[1])
        except ValueError:
            continue
        if pid != os.getpid() and _alive(pid):
            continue
        if p.name.startswith(_OLD_PREFIX) and not final.exists():
            os.rename(p, final)  # the swap stopped half-way: the previous audit comes back
        else:
            shutil.rmtree(p, ignore_errors=True)


def mark_complete(folder: Path, summary: dict | None = None) -> Path:
    """Write `complete.json` (the last file of an audit folder): the tables and their sizes."""
    folder = Path(folder)
    tables = {}
    for t in TABLES:
        f = folder / _rel(t)
        if f.is_file():
            tables[_rel(t)] = f.stat().st_size
    body = {"tables": tables}
    if summary:
        body.update({k: summary[k] for k in ("created", "mode", "validated", "valid_unique_trials") if k in summary})
    return atomic_write_json(folder / _rel(AUDIT_COMPLETE), with_schema(body))


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    rc = fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def swap_in(work: Path, cache: Path) -> Path:
    """Make the finished `work` folder `<cache>/audit`, replacing the previous one in one step."""
    cache = Path(cache)
    final = cache / AUDIT_DIR
    if not final.exists():
        os.rename(work, final)
    elif _exchange(work, final):
        shutil.rmtree(work, ignore_errors=True)  # now the previous audit
    else:  # two renames; a kill between them is undone by `recover`
        old = cache / f"{_OLD_PREFIX}{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(work, final)
        shutil.rmtree(old, ignore_errors=True)
    return final


def incomplete_reason(cache: Path) -> str | None:
    """Why the audit folder cannot be used by the next steps, or None when it is complete."""
    cache = Path(cache)
    marker = cache / AUDIT_COMPLETE
    if not marker.is_file():
        return (f"the audit in {cache / AUDIT_DIR} did not finish (no {marker.name}; it was stopped, failed, "
                "or written by an older version)")
    try:
        body = json.loads(marker.read_bytes())
        tables = body["tables"]
        assert isinstance(tables, dict)
    except Exception:  # noqa: BLE001 - any damage means the same thing here
        return f"the audit's {marker} is damaged"
    for t in (AUDIT_FEATURE_EFFECTS, AUDIT_FEATURE_CONDITIONS):
        f = cache / t
        want = tables.get(_rel(t))
        if want is None or not f.is_file() or f.stat().st_size != want:
            return f"{f} does not belong to the audit recorded in {marker} (a mix of two audits)"
    return None
