"""Every file format the project reads or writes, defined once.

Cache artifacts carry `schema_version`; readers refuse other versions with a message
that names the file and the command that rebuilds it. Every cache write goes through
`atomic_write_*` (temporary name in the same folder, fsync, rename), so a killed run
never leaves a half-written file behind.

This module imports only the standard library (plus orjson when present), so the
explorer and the engine share it without pulling in torch.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from engine.errors import UserError

SCHEMA_VERSION = 1
#: Per-target pathway files (pathways/L<l>-<i>.json). 2: exact first-order edge weights, SAE
#: error and bias nodes ("kind": "feature" | "error" | "bias"), out-shares, and replay verdicts
#: split into linear_confirmed / changes_target_activation (docs/cache_format.md).
PATHWAY_SCHEMA_VERSION = 2

# ---------------------------------------------------------------------------
# Feature ids: "L12-3456" (layer 12, SAE feature 3456), no zero padding.
# ---------------------------------------------------------------------------

# re.ASCII: without it \d (and int()) accept other scripts' digits, so "L١-٣" would name L1-3.
FEATURE_ID_RE = re.compile(r"^L(\d{1,3})-(\d{1,7})$", re.ASCII)


@dataclass(frozen=True, order=True)
class FeatureId:
    layer: int
    feature_id: int

    def __str__(self) -> str:
        return f"L{self.layer}-{self.feature_id}"

    @classmethod
    def parse(cls, text: str) -> "FeatureId":
        """Parse "L12-3456"; raises UserError naming the bad value."""
        if not isinstance(text, str):
            raise UserError(f"feature id must be a string like L12-3456, got {text!r}")
        m = FEATURE_ID_RE.match(text.strip())
        if not m:
            shown = text if len(text) <= 40 else text[:37] + "..."
            raise UserError(f"malformed feature id {shown!r}: expected L<layer>-<index> in ASCII digits, e.g. L12-3456")
        return cls(int(m.group(1)), int(m.group(2)))


def parse_feature_list(text: str) -> list[FeatureId]:
    """Parse "L3-17,L5-2" into ids, keeping order and dropping repeats."""
    out: list[FeatureId] = []
    for part in text.split(","):
        if part.strip():
            fid = FeatureId.parse(part)
            if fid not in out:
                out.append(fid)
    return out


def safe_feature_filename(feature: str | FeatureId, suffix: str = ".json") -> str:
    """File name for a feature's artifact; the id is validated before it touches a path."""
    fid = feature if isinstance(feature, FeatureId) else FeatureId.parse(feature)
    return f"{fid}{suffix}"


# ---------------------------------------------------------------------------
# Experiment inputs (the study's files; see shared reference experiment_data.md)
# ---------------------------------------------------------------------------

#: The six conditions the study really logged.
REAL_CONDITIONS: tuple[str, ...] = (
    "safe_baseline",
    "safe_with_safe_patch",
    "safe_with_risky_patch",
    "risky_baseline",
    "risky_with_safe_patch",
    "risky_with_risky_patch",
)
#: The list in implementation plan V4 (two `*_amplification` conditions never existed).
PLAN_CONDITIONS: tuple[str, ...] = (
    "safe_baseline",
    "safe_with_risky_patch",
    "risky_baseline",
    "risky_with_safe_patch",
    "safe_amplification",
    "risky_amplification",
)
CONDITION_SETS = {"real": REAL_CONDITIONS, "plan": PLAN_CONDITIONS}

#: checkpoint_L{a}_{b}_{process_id}_{YYYYMMDD_HHMMSS}.json (process_id may hold underscores)
CHECKPOINT_NAME_RE = re.compile(r"^checkpoint_L(\d+)_(\d+)_(.+)_(\d{8})_(\d{6})\.json$")
#: responses_L{a}_{b}_{process_id}_{YYYYMMDD_HHMMSS}.json
RESPONSES_NAME_RE = re.compile(r"^responses_L(\d+)_(\d+)_(.+)_(\d{8})_(\d{6})\.json$")
DEFAULT_CHECKPOINT_PATTERNS: tuple[str, ...] = (
    "checkpoint_L*_*.json",
    "comprehensive_patching_checkpoint_*.json",
)
DEFAULT_RESPONSE_PATTERNS: tuple[str, ...] = ("*.json",)

#: Checkpoint record schemas, detected per record.
CHECKPOINT_SCHEMA_PLAN = "plan"  # feature, layer, feature_id, is_causal, cohen_d
CHECKPOINT_SCHEMA_FLAT = "run_a_flat"  # is_causal, classified_as, *_stop_delta, *_bet_delta, *_p_value
CHECKPOINT_SCHEMA_NESTED = "run_b_nested"  # causality{is_causal_safe, ...}

# ---------------------------------------------------------------------------
# Cache layout (relative to the cache folder)
# ---------------------------------------------------------------------------

MANIFEST = "manifest.json"
RUN_LOCK = ".run.lock"  # held by `engine run` while it runs steps on this cache
CONFIG_SNAPSHOT = "config.snapshot.yaml"

AUDIT_DIR = "audit"
AUDIT_VALIDATION = "audit/data_validation.json"
AUDIT_PROBLEMS = "audit/problems.parquet"
AUDIT_TRIALS = "audit/trials.parquet"
AUDIT_FEATURE_CONDITIONS = "audit/feature_conditions.parquet"
AUDIT_FEATURE_EFFECTS = "audit/feature_effects.parquet"
AUDIT_CHECKPOINT_RECORDS = "audit/checkpoint_records.parquet"
AUDIT_COMPLETE = "audit/complete.json"  # written last, in the folder swapped in whole

FEATURES_DIR = "features"
CAUSAL_FEATURES = "features/causal_features.json"
CAUSAL_FEATURES_PARQUET = "features/causal_features.parquet"

PROTOTYPE_DIR = "prototype"

PATHWAYS_DIR = "pathways"
PATHWAYS_INDEX = "pathways/index.json"
PATHWAYS_EDGES = "pathways/edges.parquet"
PATHWAYS_NODES = "pathways/nodes.parquet"
PATHWAYS_EXPORT_DIR = "pathways/circuit_tracer"
# circuit-tracer's local viewer lists the graphs of a folder from this file ({"graphs": [metadata, ...]})
PATHWAYS_EXPORT_LISTING = "pathways/circuit_tracer/graph-metadata.json"
PATHWAYS_SHARED = "pathways/shared"  # per-(prompt, node) work reused across targets

TOKENS_DIR = "tokens"
TOKENS_LOGIT_LENS = "tokens/logit_lens.parquet"
TOKENS_PROMPT_ACTIVATIONS = "tokens/prompt_activations.parquet"
TOKENS_TOP_ACTIVATING = "tokens/top_activating.parquet"
TOKENS_BEHAVIOURAL_WORDS = "tokens/behavioural_words.parquet"
TOKENS_DECISION_TOKENS = "tokens/decision_tokens.parquet"
TOKENS_INDEX = "tokens/index.json"
TOKENS_NODES_DIR = "tokens/nodes"  # the lighter views of every other pathway-graph node

INTEGRATED_DIR = "integrated"
INTEGRATED_FEATURES = "integrated/features.parquet"
INTEGRATED_FEATURES_JSON = "integrated/features.json"
INTEGRATED_UNION_GRAPH = "integrated/union_graph.json"
INTEGRATED_REPORT = "integrated/report.md"
INTEGRATED_FIGURES_DIR = "integrated/figures"

INTERVENTIONS_DIR = "interventions"  # saved intervention runs (python -m engine intervene), one JSON each
INTERVENTION_NAME_RE = re.compile(r"^[A-Za-z0-9_+.-]{1,160}$")

JOBS_DIR = "jobs"
JOB_PROGRESS = "progress.json"
JOB_LOG = "log.txt"
JOB_RESULT = "result.json"

#: Researchers' notes on one feature's graph (pins, supernodes, labels, notes), written by the
#: explorer: annotations/L12-3456.json, {"schema_version": ANNOTATIONS_SCHEMA_VERSION, "feature",
#: "pinned": [node id], "supernodes": [{"name", "members": [node id]}], "labels": {node id: text},
#: "notes": {node id: text}, "updated"}. Its own version, so it can change without the engine's.
ANNOTATIONS_DIR = "annotations"
ANNOTATIONS_SCHEMA_VERSION = 1

DEMO_DIR = "demo"  # the embedded demo's model, SAEs and experiment data
DEMO_MARKER = "demo/DEMO.json"

#: Pipeline steps in order, with the artifact whose presence marks them done.
STEPS: tuple[str, ...] = ("audit", "select", "prototype", "pathways", "tokens", "integrate")
STEP_OUTPUTS: dict[str, str] = {
    "audit": AUDIT_VALIDATION,
    "select": CAUSAL_FEATURES,
    "prototype": PROTOTYPE_DIR,
    "pathways": PATHWAYS_INDEX,
    "tokens": TOKENS_INDEX,
    "integrate": INTEGRATED_FEATURES_JSON,
}


def prototype_path(cache: Path, feature: str | FeatureId) -> Path:
    return Path(cache) / PROTOTYPE_DIR / safe_feature_filename(feature)


def pathway_path(cache: Path, feature: str | FeatureId) -> Path:
    return Path(cache) / PATHWAYS_DIR / safe_feature_filename(feature)


PROMPT_NAME_RE = re.compile(r"^[A-Za-z0-9_]{1,40}$")


def pathway_export_slug(feature: str | FeatureId, prompt: str) -> str:
    """The graph's slug in circuit-tracer's viewer, e.g. L3-17.safe; its file is `<slug>.json`
    (the viewer fetches exactly that name)."""
    if not PROMPT_NAME_RE.match(prompt):
        raise UserError(f"prompt name {prompt!r} must be letters, digits or _")
    return safe_feature_filename(feature, f".{prompt}")


def pathway_export_path(cache: Path, feature: str | FeatureId, prompt: str) -> Path:
    """circuit-tracer JSON of one prompt's graph: pathways/circuit_tracer/L3-17.safe.json."""
    return Path(cache) / PATHWAYS_EXPORT_DIR / f"{pathway_export_slug(feature, prompt)}.json"


def annotations_path(cache: Path, feature: str | FeatureId) -> Path:
    """annotations/L12-3456.json; the id is validated before it touches a path."""
    return Path(cache) / ANNOTATIONS_DIR / safe_feature_filename(feature)


def intervention_path(cache: Path, name: str) -> Path:
    """interventions/<name>.json (name: a job id such as intervene-L3-17-20261207-0712-ab12)."""
    if not INTERVENTION_NAME_RE.match(name) or name.startswith("."):
        raise UserError(f"intervention name {name!r} must be letters, digits, +, -, _ or .")
    return Path(cache) / INTERVENTIONS_DIR / f"{name}.json"


def tokens_path(cache: Path, feature: str | FeatureId) -> Path:
    return Path(cache) / TOKENS_DIR / safe_feature_filename(feature)


def tokens_node_path(cache: Path, feature: str | FeatureId) -> Path:
    """tokens/nodes/<feature>.json: logit lens, histogram, distinct top contexts of a graph node."""
    return Path(cache) / TOKENS_NODES_DIR / safe_feature_filename(feature)


# ---------------------------------------------------------------------------
# Atomic writes and checked reads
# ---------------------------------------------------------------------------


def _json_default(obj: Any) -> Any:
    # numpy scalars and arrays, Paths, sets
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 0) == 0:
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _finite(obj: Any) -> Any:
    """Replace NaN/inf floats by None so the JSON stays standard."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def dumps_json_bytes(obj: Any, indent: int | None = 1) -> bytes:
    """Standard JSON (NaN and inf become null), UTF-8; orjson when installed, else the stdlib."""
    try:
        import orjson
    except ImportError:  # pragma: no cover - orjson is in requirements.txt
        return (json.dumps(_finite(obj), indent=indent, default=_json_default, ensure_ascii=False,
                           allow_nan=False) + "\n").encode("utf-8")
    opts = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS | orjson.OPT_APPEND_NEWLINE
    if indent:
        opts |= orjson.OPT_INDENT_2
    return orjson.dumps(obj, default=_json_default, option=opts)


def dumps_json(obj: Any, indent: int | None = 1) -> str:
    return dumps_json_bytes(obj, indent).decode("utf-8").rstrip("\n")


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_FILE_MODE = _umask_mode()


def atomic_write_bytes(path: str | os.PathLike, data: bytes, fsync: bool = True) -> Path:
    """Write to a temporary name in the same folder, then rename over `path`.

    fsync=False skips the flush to disk: still atomic against a killed process (the rename
    is), only not against power loss; bulk writers whose readers recompute unreadable files use it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _FILE_MODE)  # mkstemp makes 0600; cache files are ordinary files
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str, fsync: bool = True) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)


@contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """An exclusive advisory lock on `path` (created with its folder) for a read-modify-write
    across processes; released when the block ends, or by the OS if the process dies."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class LockHeld(Exception):
    """`exclusive_lock` found the lock taken; `holder` is what its holder wrote in the file."""

    def __init__(self, path: Path, holder: str):
        super().__init__(f"{path} is held by {holder or 'another process'}")
        self.path = path
        self.holder = holder


@contextmanager
def exclusive_lock(path: str | os.PathLike, holder: str) -> Iterator[None]:
    """Take an exclusive advisory lock on `path` without waiting, or raise LockHeld.

    While held, the file says who holds it (`holder`, e.g. pid and command), so the one
    refused can tell the user; the OS drops the lock if the holder dies."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
            raise LockHeld(path, " ".join(info.split())) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode("utf-8", "replace") + b"\n", 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 1, fsync: bool = True) -> Path:
    return atomic_write_bytes(path, dumps_json_bytes(obj, indent=indent), fsync=fsync)


def atomic_write_parquet(path: str | os.PathLike, frame: Any) -> Path:
    """Write a pandas DataFrame as Parquet atomically."""
    import io

    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    return atomic_write_bytes(path, buf.getvalue())


@dataclass
class AtomicFile:
    """Context manager yielding a temporary path that replaces `path` on success.

    For writers that need a file name (Parquet row-group writers, safetensors)."""

    path: Path

    def __enter__(self) -> Path:
        self.path = Path(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        os.fchmod(fd, _FILE_MODE)
        os.close(fd)
        self._tmp = Path(tmp)
        return self._tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            os.replace(self._tmp, self.path)
        else:
            self._tmp.unlink(missing_ok=True)


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """Read JSON with a clear error naming the file; never a raw traceback."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            return json.loads(fh.read().decode("utf-8-sig"))
    except FileNotFoundError:
        raise UserError(f"{what} not found: {path}") from None
    except OSError as exc:  # a folder, a FIFO's open error, no permission
        raise UserError(f"{what} {path} cannot be read ({exc.strerror or type(exc).__name__})") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{what} {path} is not valid JSON (not UTF-8: byte 0x{exc.object[exc.start]:02x} "
                        f"at offset {exc.start})") from None
    except RecursionError:
        raise UserError(f"{what} {path} is not valid JSON (nested too deeply)") from None
    except ValueError as exc:  # JSONDecodeError, or an integer of more than 4300 digits
        raise UserError(f"{what} {path} is not valid JSON ({' '.join(str(exc).split())[:200]})") from None


def schema_version_for(path: str | os.PathLike) -> int:
    """The schema version a cache file must carry: PATHWAY_SCHEMA_VERSION for a per-target
    pathway file (pathways/L<l>-<i>.json), SCHEMA_VERSION for everything else."""
    p = Path(path)
    if p.parent.name == PATHWAYS_DIR and FEATURE_ID_RE.match(p.stem) and p.suffix == ".json":
        return PATHWAY_SCHEMA_VERSION
    return SCHEMA_VERSION


def read_artifact(path: str | os.PathLike, what: str, rebuild: str | None = None) -> dict:
    """Read a cache artifact and check its schema version (schema_version_for)."""
    expected = schema_version_for(path)
    hint = f"; rebuild it with `{rebuild}`" if rebuild else ""
    try:
        obj = read_json(path, what)
    except UserError as exc:
        raise UserError(f"{exc}{hint}") from None
    if not isinstance(obj, dict):
        raise UserError(f"{what} {path} is not a JSON object{hint}")
    version = obj.get("schema_version")
    if version != expected:
        raise UserError(
            f"{what} {path} has schema_version {version!r}, this tool reads {expected}{hint}"
        )
    return obj


def with_schema(obj: dict, version: int = SCHEMA_VERSION) -> dict:
    """Return obj with schema_version first."""
    return {"schema_version": version, **{k: v for k, v in obj.items() if k != "schema_version"}}


def iter_feature_files(folder: Path) -> Iterable[tuple[FeatureId, Path]]:
    """Yield (feature, path) for every `L<l>-<i>.json` in folder, ignoring other names."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for p in sorted(folder.glob("L*-*.json")):
        m = FEATURE_ID_RE.match(p.stem)
        if m:
            yield FeatureId(int(m.group(1)), int(m.group(2))), p
