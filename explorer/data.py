"""Cache readers for the explorer: cached on (path, mtime, size), tolerant of bad files.

Every loader either returns data or raises `CacheProblem`, whose message names the file
and whose `command` rebuilds it; pages show both and never a traceback. The caches are
process-wide `functools.lru_cache`s keyed on the file's stamp, so a rewritten file is
re-read on the next script run and an unchanged one costs one `stat`. Returned objects
are shared between sessions: callers must not mutate them.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from engine import schema
from engine.errors import UserError
from explorer.context import AppContext, engine_command

try:  # orjson reads the 1,550 pathway files about 3x faster than json
    import orjson

    def _loads(raw: bytes) -> Any:
        return orjson.loads(raw)
except ImportError:  # pragma: no cover
    import json

    def _loads(raw: bytes) -> Any:
        return json.loads(raw.decode("utf-8-sig"))


class CacheProblem(Exception):
    """A cache file that is missing, empty, corrupt, stale or has the wrong schema."""

    def __init__(self, message: str, command: str | None = None, kind: str = "missing"):
        super().__init__(message)
        self.message = message
        self.command = command
        self.kind = kind


Stamp = tuple[int, int]


def stamp(path: str | os.PathLike) -> Stamp | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size)


def relpath(ctx: AppContext, path: Path) -> str:
    """A path inside the cache, relative to it (for messages)."""
    try:
        return str(Path(path).relative_to(ctx.cache))
    except ValueError:
        return str(path)


# ---------------------------------------------------------------------------
# Shapes of the JSON artifacts, as far as the pages read them
# ---------------------------------------------------------------------------

NUM, TEXT, INT, BOOL, ANY = "number", "text", "integer", "true/false", "any"
NUMBER = "number (not null)"


_LEAF = {
    NUM: lambda v: v is None or (isinstance(v, (int, float))),
    NUMBER: lambda v: isinstance(v, (int, float)),
    TEXT: lambda v: v is None or isinstance(v, str),
    INT: lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool)),
    BOOL: lambda v: v is None or isinstance(v, (bool, int)),
    ANY: lambda v: True,
}


def shape_problem(obj: Any, spec: Any, where: str = "") -> str | None:
    """Where `obj` departs from `spec` (a dict of key specs, ("list", spec), ("map", spec) or a
    leaf kind); None when it fits. Absent keys and None values are allowed (pages show "–")."""
    if isinstance(spec, str):
        if not _LEAF[spec](obj):
            return f"`{where}` is {_shown(obj)}, not {'an' if spec == INT else 'a'} {spec}"
        return None
    if obj is None:
        return None
    if isinstance(spec, dict):
        if not isinstance(obj, dict):
            return f"`{where or 'the file'}` is {_shown(obj)}, not an object"
        for key, sub in spec.items():
            if key in obj:
                bad = shape_problem(obj[key], sub, f"{where}.{key}" if where else key)
                if bad:
                    return bad
        return None
    kind, sub = spec
    if kind == "list":
        if not isinstance(obj, list):
            return f"`{where}` is {_shown(obj)}, not a list"
        for i, item in enumerate(obj):
            bad = shape_problem(item, sub, f"{where}[{i}]")
            if bad:
                return bad
        return None
    if not isinstance(obj, dict):  # "map"
        return f"`{where}` is {_shown(obj)}, not an object"
    for key, item in obj.items():
        bad = shape_problem(item, sub, f"{where}.{key}")
        if bad:
            return bad
    return None


def _shown(v: Any) -> str:
    try:
        text = repr(v)
    except (RecursionError, ValueError):
        text = f"<{type(v).__name__}>"
    text = " ".join(text.split())
    return text if len(text) <= 40 else text[:37] + "..."


_NODE = {"id": ANY, "layer": INT, "feature_id": INT, "is_target": BOOL, "activation": NUM, "attribution": NUM,
         "replay_delta": NUM, "patch_delta": NUM, "validated": BOOL, "positions": ("list", INT),
         "position_activations": ("list", NUM), "position_attributions": ("list", NUM)}
_EDGE = {"source": ANY, "target": ANY, "weight": NUM, "raw": NUM, "validated": BOOL}
PATHWAY_SHAPE = {"feature": TEXT, "prompts": ("map", {
    "nodes": ("list", _NODE), "edges": ("list", _EDGE), "tokens": ("list", TEXT), "target_position": INT,
    "target_activation": NUM, "target_pre_activation": NUM, "agreement": ("map", ANY), "coverage": ("map", ANY)})}
_TOKEN_ROW = {"tokens": ("list", TEXT), "activations": ("list", NUM), "max": NUM, "argmax_position": INT,
              "n_active": INT, "last_token_activation": NUM}
_LENS_ROW = {"token": ANY, "value": NUMBER}
TOKENS_SHAPE = {
    "activation_stats": ("map", ANY),
    "prompt_activations": ("map", _TOKEN_ROW),
    "behavioural_words": ("list", {"significant": BOOL}),
    "logit_lens": {"promoted": ("list", _LENS_ROW), "suppressed": ("list", _LENS_ROW),
                   "decision_summary": ("list", ("map", ANY))},
    "top_activating": ("list", {"context_tokens": ("list", TEXT), "context_activations": ("list", NUM),
                                "activation": NUM, "prompt": TEXT, "condition": ANY, "trial": ANY}),
}
PROTOTYPE_SHAPE = {"prompts": ("map", {"target_activation": NUM, "target_pre_activation": NUM, "target_rank": ANY,
                                       "n_tokens": ANY, "sae_stats": ("map", ("map", ANY))}),
                   "upstream_candidates": ("list", ("map", ANY))}


# ---------------------------------------------------------------------------
# Raw readers (cached)
# ---------------------------------------------------------------------------


@lru_cache(maxsize=256)
def _json_file(path: str, st: Stamp) -> Any:
    with open(path, "rb") as fh:
        raw = fh.read()
    if not raw.strip():
        raise ValueError("the file is empty")
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    return _loads(raw)


def read_artifact(ctx: AppContext, rel: str | Path, what: str, command: str | None) -> dict:
    """A schema-checked JSON artifact, or CacheProblem naming the file and the fix."""
    path = ctx.cache / rel
    st = stamp(path)
    if st is None:
        raise CacheProblem(f"{what} not found: `{relpath(ctx, path)}` is missing from the cache.", command, "missing")
    if not _regular(path):  # a folder or FIFO under an artifact's name (a FIFO would block the read)
        raise CacheProblem(f"{what} `{relpath(ctx, path)}` is not a regular file.", command, "corrupt")
    try:
        obj = _json_file(str(path), st)
    except ValueError as exc:
        kind = "empty" if "empty" in str(exc) else "corrupt"
        raise CacheProblem(f"{what} `{relpath(ctx, path)}` is {'empty' if kind == 'empty' else 'not valid JSON'} "
                           f"({_short_exc(exc)}).", command, kind) from None
    except OSError as exc:
        raise CacheProblem(f"{what} `{relpath(ctx, path)}` cannot be read ({exc.strerror}).", command, "corrupt") from None
    except RecursionError:
        raise CacheProblem(f"{what} `{relpath(ctx, path)}` is not valid JSON (nested too deeply).", command,
                           "corrupt") from None
    if not isinstance(obj, dict):
        raise CacheProblem(f"{what} `{relpath(ctx, path)}` is not a JSON object.", command, "schema")
    version = obj.get("schema_version")
    expected = schema.schema_version_for(path)
    if version != expected:
        raise CacheProblem(
            f"{what} `{relpath(ctx, path)}` has schema_version {version!r}; this explorer reads "
            f"{expected}.", command, "schema")
    return obj


def _regular(path: Path) -> bool:
    import stat as stat_

    try:
        return stat_.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def _short_exc(exc: Exception) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:160]


@lru_cache(maxsize=32)
def _parquet(path: str, st: Stamp, columns: tuple[str, ...] | None) -> pd.DataFrame:
    import pyarrow.parquet as pq

    if columns is not None:
        have = set(pq.read_schema(path).names)
        columns = tuple(c for c in columns if c in have)
    return pq.read_table(path, columns=list(columns) if columns is not None else None).to_pandas()


def read_table(ctx: AppContext, rel: str, what: str, command: str | None,
               columns: tuple[str, ...] | None = None) -> pd.DataFrame:
    path = ctx.cache / rel
    st = stamp(path)
    if st is None:
        raise CacheProblem(f"{what} not found: `{rel}` is missing from the cache.", command, "missing")
    if st[1] == 0:
        raise CacheProblem(f"{what} `{rel}` is empty.", command, "empty")
    if not _regular(path):
        raise CacheProblem(f"{what} `{rel}` is not a regular file.", command, "corrupt")
    try:
        return _parquet(str(path), st, columns)
    except Exception as exc:  # pyarrow raises several types for damaged files
        raise CacheProblem(f"{what} `{rel}` is not a readable Parquet file ({_short_exc(exc)}).",
                           command, "corrupt") from None


# ---------------------------------------------------------------------------
# Manifest and step status (home page)
# ---------------------------------------------------------------------------

#: Steps whose outputs a step reads: a step that ran before one of these is stale.
UPSTREAM: dict[str, tuple[str, ...]] = {
    "audit": (),
    "select": ("audit",),
    "prototype": (),
    "pathways": ("select",),
    "tokens": ("select",),
    "integrate": ("select", "pathways", "tokens"),
}

STEP_TITLES = {
    "audit": "0 · Audit",
    "select": "1 · Select causal features",
    "prototype": "2 · Prototype",
    "pathways": "3 · Pathways",
    "tokens": "4 · Tokens",
    "integrate": "5 · Integrate",
}


@dataclass
class StepStatus:
    step: str
    status: str  # done | stale | failed | missing
    artifact: str
    started: str | None = None
    seconds: float | None = None
    peak_memory_gb: float | None = None
    memory_kind: str | None = None
    device: str | None = None
    error: str | None = None
    command: str | None = None
    note: str | None = None
    summary: dict = field(default_factory=dict)


def manifest(ctx: AppContext) -> dict:
    path = ctx.cache / schema.MANIFEST
    st = stamp(path)
    if st is None:
        return {"steps": {}}
    from engine.manifest import clean_manifest

    if not _regular(path):
        return {"steps": {}, "problem": f"`{schema.MANIFEST}` is not a regular file"}
    try:
        data = _json_file(str(path), st)
    except (ValueError, OSError, RecursionError) as exc:
        return {"steps": {}, "problem": f"`{schema.MANIFEST}` is not valid JSON ({_short_exc(exc)})"}
    hit = _MANIFEST_MEMO.get((str(path), st))
    if hit is None:
        hit = clean_manifest(data, schema.MANIFEST)  # wrong-typed entries and fields named, the rest kept
        if hit.get("corrupt"):
            hit = {"steps": {}, "problem": f"`{schema.MANIFEST}` has no `steps` mapping"}
        elif hit.get("problems"):
            more = len(hit["problems"]) - 1
            hit["problem"] = (f"has damaged fields, ignored: {hit['problems'][0].split(': ', 1)[1]}"
                              + (f" (and {more} more)" if more else ""))
        _MANIFEST_MEMO.clear()
        _MANIFEST_MEMO[(str(path), st)] = hit
    return hit


_MANIFEST_MEMO: dict = {}


def _artifact_present(ctx: AppContext, step: str) -> bool:
    path = ctx.cache / schema.STEP_OUTPUTS[step]
    if path.is_dir():
        return any(True for _ in schema.iter_feature_files(path))
    st = stamp(path)
    return st is not None and st[1] > 0


def _finished(entry: dict) -> float | None:
    try:
        start = time.mktime(time.strptime(entry["started"], "%Y-%m-%dT%H:%M:%S"))
    except (KeyError, TypeError, ValueError, OverflowError):
        return None
    return start + float(entry.get("seconds") or 0.0)


def _started(entry: dict) -> float | None:
    try:
        return time.mktime(time.strptime(entry["started"], "%Y-%m-%dT%H:%M:%S"))
    except (KeyError, TypeError, ValueError, OverflowError):
        return None


_STATUS_MEMO: dict = {}


def step_statuses(ctx: AppContext) -> list[StepStatus]:
    """Each pipeline step: done, stale, failed or missing, with the command that makes it.

    Uses the engine's own verdict (`engine.status.pipeline_status`: input fingerprints and
    config hashes recorded in the manifest), so the home page agrees with `python -m engine
    status`. It stats every input file, so the answer is reused for 10 s."""
    key = (str(ctx.cache), ctx.config_path, stamp(ctx.cache / schema.MANIFEST), int(time.time() // 10))
    hit = _STATUS_MEMO.get(key)
    if hit is None:
        try:
            hit = _engine_statuses(ctx)
        except Exception:  # noqa: BLE001  (an older engine or an unreadable input: fall back)
            hit = _simple_statuses(ctx)
        _STATUS_MEMO.clear()
        _STATUS_MEMO[key] = hit
    return hit


def _engine_statuses(ctx: AppContext) -> list[StepStatus]:
    import dataclasses

    from engine.status import pipeline_status

    cfg = dataclasses.replace(ctx.cfg, cache_dir=str(ctx.cache))
    m = manifest(ctx)
    out = []
    for r in pipeline_status(cfg, {"steps": m.get("steps", {})}):
        step = r["step"]
        s = StepStatus(step=step, status=r["status"], artifact=schema.STEP_OUTPUTS.get(step, ""),
                       started=r.get("started"), seconds=r.get("seconds"), peak_memory_gb=r.get("peak_memory_gb"),
                       memory_kind=r.get("memory_kind"), device=r.get("device"), error=r.get("error"),
                       command=r.get("command"), note=r.get("reason") or None)
        entry = m.get("steps", {}).get(step)
        if isinstance(entry, dict) and isinstance(entry.get("summary"), dict):
            s.summary = entry["summary"]
        out.append(s)
    return out


def _simple_statuses(ctx: AppContext) -> list[StepStatus]:
    """Without engine.status: done when the output exists, stale when a step it reads ran after it."""
    steps = manifest(ctx).get("steps", {})
    out = []
    for step in schema.STEPS:
        entry = steps.get(step) if isinstance(steps.get(step), dict) else {}
        present = _artifact_present(ctx, step)
        extra = ("--feature", "L12-3456") if step == "prototype" else ()
        s = StepStatus(step=step, status="missing", artifact=schema.STEP_OUTPUTS[step],
                       command=engine_command(ctx, step, *extra))
        for key in ("started", "seconds", "peak_memory_gb", "memory_kind", "device", "error"):
            setattr(s, key, entry.get(key))
        s.summary = entry.get("summary") if isinstance(entry.get("summary"), dict) else {}
        if entry.get("status") == "failed":
            s.status = "failed"
        elif present:
            s.status = "done"
            if not entry:
                s.note = "output present, run not recorded in the manifest"
            started = _started(entry) if entry else None
            for up in UPSTREAM[step]:
                up_entry = steps.get(up)
                up_done = _finished(up_entry) if isinstance(up_entry, dict) and up_entry.get("status") == "done" else None
                if started is not None and up_done is not None and up_done > started + 1:
                    s.status = "stale"
                    s.note = f"`{up}` ran after it: rerun to bring it up to date"
                    break
        elif entry.get("status") == "done":
            s.note = "recorded as done but its output is gone"
        out.append(s)
    return out


def stale_note(ctx: AppContext, step: str) -> StepStatus | None:
    for s in step_statuses(ctx):
        if s.step == step and s.status == "stale":
            return s
    return None


# ---------------------------------------------------------------------------
# Step 1: causal features (+ pathway summary from the index)
# ---------------------------------------------------------------------------

FEATURE_COLUMNS = ("feature", "layer", "feature_id", "direction", "cohen_d")


@lru_cache(maxsize=8)
def _feature_frame(path: str, st: Stamp) -> tuple[dict, pd.DataFrame]:
    obj = _json_file(path, st)
    feats = obj.get("features")
    if not isinstance(feats, list):
        raise ValueError("it has no `features` list")
    df = pd.DataFrame.from_records(feats)
    if len(df) == 0:
        df = pd.DataFrame(columns=list(FEATURE_COLUMNS))
    missing = [c for c in ("feature", "direction") if c not in df.columns]
    if missing:
        raise ValueError(f"its feature records lack {', '.join(missing)}")
    parsed = []
    for i, f in enumerate(df["feature"]):
        try:
            parsed.append(schema.FeatureId.parse(str(f)))
        except UserError:
            raise ValueError(f"record {i} has a malformed feature id {f!r}") from None
    df["layer"] = [p.layer for p in parsed]
    df["feature_id"] = [p.feature_id for p in parsed]
    df["cohen_d"] = pd.to_numeric(df.get("cohen_d", pd.Series([math.nan] * len(df))), errors="coerce")
    df["abs_d"] = df["cohen_d"].abs()
    df["direction"] = df["direction"].fillna("mixed").astype(str)
    if "n_trials" not in df.columns:
        df["n_trials"] = pd.NA
    df = df.sort_values(["layer", "feature_id"], kind="stable").reset_index(drop=True)
    meta = {k: v for k, v in obj.items() if k != "features"}
    return meta, df


def causal_features(ctx: AppContext) -> tuple[dict, pd.DataFrame]:
    """(metadata, one row per selected causal feature, sorted by layer and index)."""
    cmd = engine_command(ctx, "select")
    read_artifact(ctx, schema.CAUSAL_FEATURES, "The causal feature list", cmd)  # existence and version
    path = ctx.cache / schema.CAUSAL_FEATURES
    try:
        return _feature_frame(str(path), stamp(path))
    except Exception as exc:  # noqa: BLE001  (whatever the records hold, the file is the problem)
        raise CacheProblem(f"The causal feature list `{schema.CAUSAL_FEATURES}` is malformed: {_short_exc(exc)}.",
                           cmd, "schema") from None


INDEX_FIELDS = ("n_nodes", "n_edges", "n_layers", "validated_fraction", "pearson_r", "sign_agreement",
                "target_activation")


@lru_cache(maxsize=8)
def _index_frame(path: str, st: Stamp) -> pd.DataFrame:
    obj = _json_file(path, st)
    rows = []
    for t in obj.get("targets") or []:
        for prompt, rec in (t.get("prompts") or {}).items():
            rows.append({"feature": t.get("feature"), "prompt": prompt,
                         **{k: (rec or {}).get(k) for k in INDEX_FIELDS}})
    df = pd.DataFrame.from_records(rows, columns=["feature", "prompt", *INDEX_FIELDS])
    for k in INDEX_FIELDS:
        df[k] = pd.to_numeric(df[k], errors="coerce")
    return df


def pathway_index(ctx: AppContext) -> pd.DataFrame:
    """One row per (target feature, prompt) from pathways/index.json; empty when absent."""
    path = ctx.cache / schema.PATHWAYS_INDEX
    if stamp(path) is None:
        return pd.DataFrame(columns=["feature", "prompt", *INDEX_FIELDS])
    cmd = engine_command(ctx, "pathways")
    read_artifact(ctx, schema.PATHWAYS_INDEX, "The pathway index", cmd)
    try:
        return _index_frame(str(path), stamp(path))
    except Exception as exc:  # noqa: BLE001
        raise CacheProblem(f"The pathway index `{schema.PATHWAYS_INDEX}` is malformed: {_short_exc(exc)}.",
                           cmd, "schema") from None


def _join_overview(feats: pd.DataFrame, index: pd.DataFrame, files: set[str]) -> pd.DataFrame:
    df = feats.copy()
    if len(index):
        g = index.groupby("feature")
        summary = pd.DataFrame({
            "nodes": g["n_nodes"].max(),
            "edges": g["n_edges"].max(),
            "validated": g["validated_fraction"].mean(),
            "agreement_r": g["pearson_r"].mean(),
        })
        for prompt in ("safe", "risky"):
            sub = index[index["prompt"] == prompt].drop_duplicates("feature").set_index("feature")
            summary[f"act_{prompt}"] = sub["target_activation"]
        df = df.join(summary, on="feature")
    for col in ("nodes", "edges", "validated", "agreement_r", "act_safe", "act_risky"):
        if col not in df.columns:
            df[col] = math.nan
    df["has_pathway"] = df["feature"].isin(files)
    return df


_OVERVIEW: dict[tuple, pd.DataFrame] = {}


def feature_overview(ctx: AppContext) -> pd.DataFrame:
    """Causal features joined with their pathway summary (nodes, validated share, agreement).

    A damaged pathways/index.json leaves the summary columns empty; its CacheProblem's fields
    (message, command, kind) are in `.attrs["problem"]`."""
    _, feats = causal_features(ctx)
    problem = None
    try:
        index = pathway_index(ctx)
    except CacheProblem as exc:  # a damaged index must not hide the features: list them without its numbers
        index, problem = pd.DataFrame(columns=["feature", "prompt", *INDEX_FIELDS]), exc
    files = pathway_features(ctx)
    key = (str(ctx.cache), stamp(ctx.cache / schema.CAUSAL_FEATURES), stamp(ctx.cache / schema.PATHWAYS_INDEX),
           stamp(ctx.cache / schema.PATHWAYS_DIR), len(files))
    hit = _OVERVIEW.get(key)
    if hit is None:
        if len(_OVERVIEW) >= 8:
            _OVERVIEW.clear()
        hit = _OVERVIEW[key] = _join_overview(feats, index, set(files))
        # plain values: Streamlit serialises a frame's attrs as JSON when it shows the frame
        hit.attrs["problem"] = (None if problem is None else
                                {"message": problem.message, "command": problem.command, "kind": problem.kind})
    return hit


# ---------------------------------------------------------------------------
# Step 3: pathways
# ---------------------------------------------------------------------------


@lru_cache(maxsize=16)
def _feature_files(folder: str, st: Stamp) -> tuple[str, ...]:
    return tuple(str(f) for f, _ in schema.iter_feature_files(Path(folder)))


def features_in(ctx: AppContext, rel: str) -> list[str]:
    """Features with an `L<l>-<i>.json` file in a cache folder, by layer then index."""
    folder = ctx.cache / rel
    st = stamp(folder)
    return list(_feature_files(str(folder), st)) if st else []


def pathway_features(ctx: AppContext) -> list[str]:
    return features_in(ctx, schema.PATHWAYS_DIR)


def pathway_command(ctx: AppContext, feature: str) -> str:
    return engine_command(ctx, "pathways", "--features", feature)


def pathway(ctx: AppContext, feature: str) -> dict:
    """One target's pathway file, checked enough that the page can draw it."""
    fid = schema.FeatureId.parse(feature)
    rel = Path(schema.PATHWAYS_DIR) / schema.safe_feature_filename(fid)
    cmd = pathway_command(ctx, str(fid))
    obj = read_artifact(ctx, rel, f"The pathway of {fid}", cmd)
    problem = check_pathway(obj, str(fid))
    if problem:
        raise CacheProblem(f"The pathway file `{rel}` is malformed: {problem}.", cmd, "schema")
    return obj


def check_pathway(obj: dict, feature: str) -> str | None:
    bad = shape_problem(obj, PATHWAY_SHAPE)
    if bad:
        return bad
    if obj.get("feature") not in (None, feature):
        return f"it describes {obj.get('feature')!r}, not {feature}"
    prompts = obj.get("prompts")
    if not isinstance(prompts, dict) or not prompts:
        return "it has no `prompts`"
    for name, rec in prompts.items():
        if not isinstance(rec, dict) or not isinstance(rec.get("nodes"), list) or not isinstance(rec.get("edges"), list):
            return f"prompt {name!r} lacks `nodes` or `edges` lists"
        for i, n in enumerate(rec["nodes"]):
            if not isinstance(n, dict) or "id" not in n or "layer" not in n:
                return f"prompt {name!r} node {i} lacks `id` or `layer`"
        for i, e in enumerate(rec["edges"]):
            if not isinstance(e, dict) or not {"source", "target", "weight"} <= set(e):
                return f"prompt {name!r} edge {i} lacks `source`, `target` or `weight`"
    return None


def pathway_export(ctx: AppContext, feature: str, prompt: str) -> bytes | None:
    """The circuit-tracer-shaped JSON of one prompt's graph, written by the pathways step."""
    try:
        return schema.pathway_export_path(ctx.cache, feature, prompt).read_bytes() or None
    except (OSError, UserError):
        return None


# ---------------------------------------------------------------------------
# Step 2 and live jobs: prototype results
# ---------------------------------------------------------------------------


def prototype_features(ctx: AppContext) -> list[str]:
    return features_in(ctx, schema.PROTOTYPE_DIR)


def prototype(ctx: AppContext, feature: str) -> dict | None:
    rel = Path(schema.PROTOTYPE_DIR) / schema.safe_feature_filename(feature)
    if stamp(ctx.cache / rel) is None:
        return None
    obj = read_artifact(ctx, rel, f"The prototype of {feature}", engine_command(ctx, "prototype", "--feature", feature))
    if not isinstance(obj.get("prompts"), dict):
        raise CacheProblem(f"The prototype file `{rel}` has no `prompts`.",
                           engine_command(ctx, "prototype", "--feature", feature), "schema")
    bad = shape_problem(obj, PROTOTYPE_SHAPE)
    if bad:
        raise CacheProblem(f"The prototype file `{rel}` is malformed: {bad}.",
                           engine_command(ctx, "prototype", "--feature", feature), "schema")
    return obj


# ---------------------------------------------------------------------------
# Step 4: tokens
# ---------------------------------------------------------------------------


def token_features(ctx: AppContext) -> list[str]:
    return features_in(ctx, schema.TOKENS_DIR)


def tokens_command(ctx: AppContext, feature: str) -> str:
    return engine_command(ctx, "tokens", "--features", feature)


def tokens(ctx: AppContext, feature: str) -> dict | None:
    """tokens/<feature>.json, or None when the tokens step has not covered this feature."""
    rel = Path(schema.TOKENS_DIR) / schema.safe_feature_filename(feature)
    if stamp(ctx.cache / rel) is None:
        return None
    obj = read_artifact(ctx, rel, f"The token views of {feature}", tokens_command(ctx, feature))
    bad = shape_problem(obj, TOKENS_SHAPE)
    if bad:
        raise CacheProblem(f"The token file `{rel}` is malformed: {bad}.", tokens_command(ctx, feature), "schema")
    return obj


def node_tokens(ctx: AppContext, feature: str) -> dict | None:
    """tokens/nodes/<feature>.json (a pathway-graph node's lighter views), or None."""
    rel = Path(schema.TOKENS_NODES_DIR) / schema.safe_feature_filename(feature)
    if stamp(ctx.cache / rel) is None:
        return None
    return read_artifact(ctx, rel, f"The token views of graph node {feature}",
                         engine_command(ctx, "tokens"))


def node_meaning(ctx: AppContext, feature: str) -> tuple[dict | None, str | None]:
    """What the tokens step wrote about a feature: (doc, "full") for a selected feature,
    (doc, "node") for another graph node, (None, None) when it has not covered it or the node
    is not a feature (a layer's SAE-error or bias node)."""
    if not schema.FEATURE_ID_RE.fullmatch(feature):
        return None, None
    doc = tokens(ctx, feature)
    if doc is not None:
        return doc, "full"
    doc = node_tokens(ctx, feature)
    return (doc, "node") if doc is not None else (None, None)


# ---------------------------------------------------------------------------
# Step 0: audit
# ---------------------------------------------------------------------------


def audit_validation(ctx: AppContext) -> dict:
    return read_artifact(ctx, schema.AUDIT_VALIDATION, "The audit summary", engine_command(ctx, "audit"))


def audit_problems(ctx: AppContext) -> pd.DataFrame:
    path = ctx.cache / schema.AUDIT_PROBLEMS
    if stamp(path) is None:
        return pd.DataFrame(columns=["kind", "severity", "file", "record", "field", "message"])
    return read_table(ctx, schema.AUDIT_PROBLEMS, "The audit problem list", engine_command(ctx, "audit"))


def audit_feature_conditions(ctx: AppContext) -> pd.DataFrame | None:
    path = ctx.cache / schema.AUDIT_FEATURE_CONDITIONS
    if stamp(path) is None:
        return None
    return read_table(ctx, schema.AUDIT_FEATURE_CONDITIONS, "The per feature x condition table",
                      engine_command(ctx, "audit"))


#: Trial columns the audit page summarises (the 1.8M-row table is read column-wise).
TRIAL_COLUMNS = ("feature", "layer", "condition", "run_id", "study_valid", "study_action", "study_bet", "valid",
                 "action", "bet", "our_valid", "our_action")


def audit_trials(ctx: AppContext) -> pd.DataFrame | None:
    path = ctx.cache / schema.AUDIT_TRIALS
    if stamp(path) is None:
        return None
    return read_table(ctx, schema.AUDIT_TRIALS, "The trial table", engine_command(ctx, "audit"),
                      columns=TRIAL_COLUMNS)


def node_auto_labels(ctx: AppContext, ids: Iterable[str]) -> dict[str, str]:
    """Short auto-labels (figures.auto_label) of the graph nodes the tokens step covered;
    a node without a readable token file gets none (its label is then its id alone)."""
    from explorer.figures import auto_label

    have = set(token_features(ctx))
    out: dict[str, str] = {}
    for n in ids:
        if n not in have:
            continue
        try:
            label = auto_label(tokens(ctx, n))
        except (CacheProblem, UserError):
            continue
        if label:
            out[n] = label
    return out
