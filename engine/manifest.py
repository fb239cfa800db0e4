"""The cache manifest: per step, when it ran, how long, peak memory, and what it read.

Every step command records itself here (not only the orchestrator), so `python -m engine
status` and the explorer's home page can say which steps are done, failed, stale or
missing. Inputs are fingerprinted by (relative path, size, mtime_ns) for files and
folders (hashing 1 GB of JSON for every status check would be too slow), and the config
by the hash of the sections the step reads.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from engine.schema import MANIFEST, SCHEMA_VERSION, atomic_write_json, read_json


def fingerprint(paths: Iterable[str | os.PathLike | None], patterns: Iterable[str] = ("*",)) -> str:
    """Hash of (path, size, mtime_ns) of every file under the given files/folders."""
    h = hashlib.sha256()
    patterns = tuple(patterns)
    for p in paths:
        if p is None:
            h.update(b"<none>")
            continue
        p = Path(p)
        if p.is_file():
            files = [p]
        elif p.is_dir():
            files = sorted({f for pat in patterns for f in p.rglob(pat) if f.is_file() and not f.name.startswith(".")})
        else:
            h.update(f"<missing {p}>".encode())
            continue
        for f in files:
            st = f.stat()
            h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def read_manifest(cache: str | os.PathLike) -> dict:
    path = Path(cache) / MANIFEST
    if not path.is_file():
        return {"schema_version": SCHEMA_VERSION, "steps": {}}
    try:
        data = read_json(path, "manifest")
    except Exception:
        return {"schema_version": SCHEMA_VERSION, "steps": {}, "corrupt": True}
    if not isinstance(data, dict) or not isinstance(data.get("steps"), dict):
        return {"schema_version": SCHEMA_VERSION, "steps": {}, "corrupt": True}
    return data


@contextmanager
def _locked(cache: Path) -> Iterator[None]:
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".manifest.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def update_step(cache: str | os.PathLike, step: str, entry: dict) -> None:
    """Read-modify-write the manifest under a lock; the write itself is atomic."""
    cache = Path(cache)
    with _locked(cache):
        data = read_manifest(cache)
        data.pop("corrupt", None)
        data["schema_version"] = SCHEMA_VERSION
        data["steps"][step] = entry
        atomic_write_json(cache / MANIFEST, data)


@contextmanager
def record_step(cache: str | os.PathLike, step: str, *, device: str = "cpu", inputs: dict[str, str] | None = None,
                config_hash: str | None = None, command: str | None = None) -> Iterator[dict]:
    """Time a step and record it; the yielded dict may receive `outputs` and `summary`."""
    from engine.resources import peak_memory_gb

    info: dict = {"outputs": [], "summary": {}}
    started = time.time()
    t0 = time.perf_counter()
    status, error = "done", None
    try:
        yield info
    except BaseException as exc:
        status, error = "failed", f"{type(exc).__name__}: {exc}"
        raise
    finally:
        try:
            peak = peak_memory_gb(device)
        except Exception:
            peak = None
        update_step(
            cache,
            step,
            {
                "status": status,
                "error": error,
                "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
                "seconds": round(time.perf_counter() - t0, 3),
                "peak_memory_gb": round(peak, 4) if peak is not None else None,
                "memory_kind": "cuda_max_memory_allocated" if device.startswith("cuda") else "peak_rss",
                "device": device,
                "inputs": inputs or {},
                "config_hash": config_hash,
                "command": command,
                "outputs": [str(o) for o in info.get("outputs", [])],
                "summary": info.get("summary", {}),
            },
        )
