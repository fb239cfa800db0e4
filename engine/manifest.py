"""The cache manifest: per step, when it ran, how long, peak memory, and what it read.

Every step command records itself here (not only the orchestrator), so `python -m engine
status` and the explorer's home page can say which steps are done, failed, stale or
missing. Inputs are fingerprinted by (relative path, size, mtime_ns) for files and
folders (hashing 1 GB of JSON for every status check would be too slow), and the config
by the hash of the sections the step reads, with local paths left out (their contents are
the inputs), so a moved cache is still up to date.
"""

from __future__ import annotations

import hashlib
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from engine.errors import shown_value
from engine.schema import MANIFEST, SCHEMA_VERSION, atomic_write_json, file_lock, read_json


def fingerprint(paths: Iterable[str | os.PathLike | None], patterns: Iterable[str] = ("*",)) -> str:
    """Hash of (relative path, size, mtime_ns) of every file under the given files/folders.

    Paths are relative to each given folder (a file counts by its name), so a cache or a study
    folder that is moved, or copied with its times kept (`cp -a`, `rsync -a`), keeps its
    fingerprints."""
    h = hashlib.sha256()
    patterns = tuple(patterns)
    for i, p in enumerate(paths):
        h.update(f"<input {i}>".encode())
        if p is None:
            h.update(b"<none>")
            continue
        p = Path(p)
        if p.is_file():
            h.update(b"<file>")
            files = [(p, p.name)]
        elif p.is_dir():
            h.update(b"<folder>")
            try:
                found = sorted({f for pat in patterns for f in p.rglob(pat) if f.is_file() and not f.name.startswith(".")})
            except OSError as exc:  # a folder that cannot be listed: status says "changed", never crashes
                h.update(f"<unlistable: {exc.strerror}>".encode())
                continue
            files = [(f, f.relative_to(p).as_posix()) for f in found]
        else:
            h.update(b"<missing>")
            continue
        for f, name in files:
            try:
                st = f.stat()
            except OSError:  # removed or unreadable since it was listed: part of the fingerprint too
                h.update(os.fsencode(name) + b"|<gone>\n")
                continue
            # fsencode: a name that is not UTF-8 (surrogate-escaped) hashes as its bytes
            h.update(os.fsencode(name) + f"|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def read_manifest(cache: str | os.PathLike) -> dict:
    """The manifest with every entry checked (`clean_manifest`); never raises.

    An unreadable file gives no steps and `corrupt: True` with `problem` saying why; a readable
    one with damaged fields gives the usable rest and `problems`, one line per damaged field."""
    from engine.errors import UserError

    path = Path(cache) / MANIFEST
    if not os.path.lexists(path):
        return {"schema_version": SCHEMA_VERSION, "steps": {}}
    try:
        data = read_json(path, "manifest")
    except UserError as exc:
        return {"schema_version": SCHEMA_VERSION, "steps": {}, "corrupt": True, "problem": str(exc)}
    return clean_manifest(data, str(path))


#: Manifest entry fields and what they must be; a field of another type is dropped (and reported).
_TEXT_FIELDS = ("status", "error", "started", "memory_kind", "device", "command", "config_hash")
_NUMBER_FIELDS = ("seconds", "peak_memory_gb")


def _text_map(value) -> bool:
    return isinstance(value, dict) and all(isinstance(v, str) for v in value.values())


def clean_manifest(data, where: str = MANIFEST) -> dict:
    """Check a parsed manifest: keep the entries and fields of the right types, report the rest.

    Readers (status, run, the explorer) may then use every field without type checks."""
    import math

    if not isinstance(data, dict) or not isinstance(data.get("steps"), dict):
        what = "not a JSON object" if not isinstance(data, dict) else "without a `steps` mapping"
        return {"schema_version": SCHEMA_VERSION, "steps": {}, "corrupt": True,
                "problem": f"manifest {where} is {what}"}
    problems: list[str] = []
    steps: dict[str, dict] = {}
    for step, entry in data["steps"].items():
        if not isinstance(entry, dict):
            problems.append(f"steps.{step} is {shown_value(entry)}, not an object")
            continue
        clean = dict(entry)
        for key in _TEXT_FIELDS:
            if clean.get(key) is not None and not isinstance(clean[key], str):
                problems.append(f"steps.{step}.{key} is {shown_value(clean[key])}, not text")
                clean[key] = None
        for key in _NUMBER_FIELDS:
            v = clean.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                                  or not math.isfinite(v) or v < 0):
                problems.append(f"steps.{step}.{key} is {shown_value(v)}, not a number of 0 or more")
                clean[key] = None
        for key, ok, default in (("summary", lambda v: isinstance(v, dict), {}),
                                 ("inputs", _text_map, {}),
                                 ("outputs", lambda v: isinstance(v, list), [])):
            if key in clean and not ok(clean[key]):
                problems.append(f"steps.{step}.{key} is {shown_value(clean[key])}, not the expected "
                                f"{'list' if key == 'outputs' else 'object'}")
                clean[key] = default
        rec = clean.get("pipeline")
        if rec is not None:
            bad = None
            if not isinstance(rec, dict):
                bad = "not an object"
            elif not _text_map(rec.get("inputs")):
                bad = "inputs are not a map of fingerprints"
            elif not isinstance(rec.get("config_hash"), str):
                bad = "config_hash is not text"
            elif "config_sections" in rec and not _text_map(rec["config_sections"]):
                bad = "config_sections are not a map of hashes"
            if bad:
                # without usable fingerprints the step shows as stale, which reruns it: safe
                problems.append(f"steps.{step}.pipeline: {bad}")
                clean.pop("pipeline")
        steps[step] = clean
    out = {**data, "steps": steps}
    out.pop("corrupt", None)
    out.pop("problem", None)
    out.pop("problems", None)
    if problems:
        out["problems"] = [f"manifest {where}: {p}" for p in problems]
    return out


def update_step(cache: str | os.PathLike, step: str, entry: dict) -> None:
    """Read-modify-write the manifest under a lock; the write itself is atomic."""
    cache = Path(cache)
    with file_lock(cache / ".manifest.lock"):
        data = read_manifest(cache)
        _keep_corrupt_copy(cache, data)
        _drop_read_notes(data)
        data["schema_version"] = SCHEMA_VERSION
        data["steps"][step] = entry
        atomic_write_json(cache / MANIFEST, data)


def _drop_read_notes(data: dict) -> None:
    for key in ("corrupt", "problem", "problems"):
        data.pop(key, None)


def _keep_corrupt_copy(cache: Path, data: dict) -> None:
    """Before an unreadable manifest is replaced, keep it as manifest.json.corrupt-<time> for a look."""
    if not data.get("corrupt"):
        return
    src = cache / MANIFEST
    try:
        if src.is_file() and not src.is_symlink():
            os.replace(src, cache / f"{MANIFEST}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
    except OSError:
        pass


@contextmanager
def record_step(cache: str | os.PathLike, step: str, *, device: str = "cpu", inputs: dict[str, str] | None = None,
                config_hash: str | None = None, command: str | None = None, cfg=None) -> Iterator[dict]:
    """Time a step and record it; the yielded dict may receive `outputs` and `summary`.

    With `cfg`, the pipeline fingerprints of the step's inputs and config (`step_fingerprints`)
    are taken before the step runs and recorded under "pipeline", so `engine run` and
    `engine status` can tell whether it is up to date."""
    from engine.resources import peak_memory_gb

    info: dict = {"outputs": [], "summary": {}}
    if cfg is not None and step in PIPELINE_STEPS:
        info["pipeline"] = pipeline_record(cfg, step)
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
                **({"pipeline": info["pipeline"]} if info.get("pipeline") else {}),
            },
        )


# ---------------------------------------------------------------------------
# Pipeline fingerprints: what each step reads, and whether it is up to date.
# Used by `engine run` (skip unchanged steps) and `engine status`.
# ---------------------------------------------------------------------------

PIPELINE_STEPS: tuple[str, ...] = ("audit", "select", "prototype", "pathways", "tokens", "integrate")

#: Config sections each step's results depend on (model.device is left out: moving a step
#: between CPU and GPU does not make its results stale).
STEP_CONFIG_SECTIONS: dict[str, tuple[str, ...]] = {
    "audit": ("data", "audit"),
    "select": ("audit", "select"),
    "prototype": ("model", "sae", "prompts", "prototype"),
    "pathways": ("model", "sae", "prompts", "pathways"),
    "tokens": ("model", "sae", "prompts", "tokens"),
    "integrate": ("integrate",),
}


def step_config_sections(cfg, step: str) -> dict[str, str]:
    """Hash of each config section the step reads."""
    import json

    from engine.config import MAYBE_PATH_KEYS, PATH_KEYS

    d = cfg.to_dict()
    # where a local file or folder lies is not a result: its contents are the step's input
    # fingerprints, so a moved cache or study folder stays done; a hub id stays in the hash
    for keys in PATH_KEYS | MAYBE_PATH_KEYS:
        if len(keys) == 2 and isinstance(d.get(keys[0]), dict):
            v = d[keys[0]].get(keys[1])
            if v and (keys in PATH_KEYS or Path(v).expanduser().exists()):
                d[keys[0]][keys[1]] = "<local path>"
    out = {}
    for sec in STEP_CONFIG_SECTIONS[step]:
        v = d.get(sec)
        if sec == "model" and isinstance(v, dict):
            v = {k: x for k, x in v.items() if k != "device"}
        out[sec] = hashlib.sha256(json.dumps(v, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return out


def step_input_paths(cfg, step: str) -> dict[str, tuple[list, tuple[str, ...]]]:
    """Named inputs of a step: (files or folders, glob patterns for folders)."""
    from engine.schema import (AUDIT_DIR, AUDIT_TRIALS, CAUSAL_FEATURES, FEATURES_DIR, PATHWAYS_DIR, PATHWAYS_NODES,
                               TOKENS_DIR)

    cache = Path(cfg.cache)
    every = ("*",)

    def local(value):  # a hub id is not a path: its revision is in the config hash
        return [Path(value).expanduser()] if value and Path(value).expanduser().exists() else [None]

    model = (local(cfg.model.name_or_path), every)
    sae = (local(cfg.sae.source), every)
    selection = ([cache / CAUSAL_FEATURES], every)
    if step == "audit":
        ck = cfg.data.checkpoints_dir
        rs = cfg.data.responses_dir
        if not rs and ck and (Path(ck) / "response_logs").is_dir():
            rs = str(Path(ck) / "response_logs")  # the audit's default: the study's layout
        return {
            "checkpoints": ([ck and Path(ck)], tuple(cfg.data.checkpoint_patterns)),
            "responses": ([rs and Path(rs)], tuple(cfg.data.response_patterns)),
        }
    if step == "select":
        return {"audit": ([cache / AUDIT_DIR], every)}
    if step in ("prototype", "pathways"):
        return {"selection": selection, "model": model, "sae": sae}
    if step == "tokens":
        patch = getattr(cfg.tokens, "patch_values_file", None)
        out = {"selection": selection, "trials": ([cache / AUDIT_TRIALS], every), "model": model, "sae": sae,
               "graph_nodes": ([cache / PATHWAYS_NODES], every)}  # every pathway node gets its views too
        if patch:
            out["patch_values"] = ([Path(patch)], every)
        return out
    if step == "integrate":
        return {"features": ([cache / FEATURES_DIR], every), "audit": ([cache / AUDIT_DIR], every),
                "pathways": ([cache / PATHWAYS_DIR], every), "tokens": ([cache / TOKENS_DIR], every)}
    raise KeyError(f"unknown step {step!r}")


def step_fingerprints(cfg, step: str) -> tuple[dict[str, str], str]:
    """(fingerprint per named input, hash of the step's config sections)."""
    inputs = {name: fingerprint(paths, patterns) for name, (paths, patterns) in step_input_paths(cfg, step).items()}
    sections = step_config_sections(cfg, step)
    blob = "|".join(f"{k}={v}" for k, v in sorted(sections.items()))
    return inputs, hashlib.sha256(blob.encode()).hexdigest()[:16]


def pipeline_record(cfg, step: str) -> dict:
    inputs, config_hash = step_fingerprints(cfg, step)
    return {"inputs": inputs, "config_hash": config_hash, "config_sections": step_config_sections(cfg, step)}


def record_pipeline(cache: str | os.PathLike, step: str, record: dict, started_after: float | None = None) -> bool:
    """Attach pipeline fingerprints (taken before the step ran) to the step's manifest entry.

    With `started_after` (a time.time()), only an entry the step wrote during this run is
    touched. Returns whether the entry was updated."""
    cache = Path(cache)
    with file_lock(cache / ".manifest.lock"):
        data = read_manifest(cache)
        entry = data["steps"].get(step)
        if not isinstance(entry, dict):
            return False
        if started_after is not None:
            try:
                started = time.mktime(time.strptime(entry.get("started", ""), "%Y-%m-%dT%H:%M:%S"))
            except (TypeError, ValueError):
                return False
            if started < int(started_after) - 1:
                return False
        entry["pipeline"] = record
        _drop_read_notes(data)
        atomic_write_json(cache / MANIFEST, data)
    return True


def step_state(cfg, step: str, manifest: dict | None = None) -> tuple[str, str]:
    """(status, reason) of one step: done, stale, missing or failed (not counting earlier steps)."""
    from engine.schema import STEP_OUTPUTS

    manifest = manifest if manifest is not None else read_manifest(cfg.cache)
    entry = manifest.get("steps", {}).get(step)
    if not isinstance(entry, dict):
        return "missing", "never run"
    if entry.get("status") == "failed":
        return "failed", str(entry.get("error") or "failed")
    out = Path(cfg.cache) / STEP_OUTPUTS[step]
    if not out.exists() and not (entry.get("summary") or {}).get("nothing_to_do"):
        return "missing", f"{out} is missing"
    rec = entry.get("pipeline")
    if not isinstance(rec, dict):
        return "stale", "recorded without pipeline fingerprints, so changes cannot be ruled out"
    inputs, config_hash = step_fingerprints(cfg, step)
    old_inputs = rec.get("inputs") or {}
    changed = sorted(k for k in set(inputs) | set(old_inputs) if inputs.get(k) != old_inputs.get(k))
    reasons = []
    if changed:
        reasons.append("input changed: " + ", ".join(changed))
    if rec.get("config_hash") != config_hash:
        now = step_config_sections(cfg, step)
        old = rec.get("config_sections") or {}
        secs = sorted(k for k in now if now.get(k) != old.get(k)) or ["?"]
        reasons.append("config changed: " + ", ".join(secs))
    if reasons:
        return "stale", "; ".join(reasons)
    return "done", ""
