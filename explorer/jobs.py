"""Live jobs started by the explorer: `python -m engine prototype ...` (and optionally
`python -m engine pathways --features ...`) in a subprocess, tracked on disk.

A job is a folder `<cache>/jobs/<job-id>/` holding `job.json` (request, commands, state),
`progress.json` (written by the engine through `--progress-file`), `log.txt` (stdout and
stderr of every command) and `result.json` (the prototype). The commands run under a
small runner process (`python -m explorer.jobs run DIR`, its own session) that records
the final state, so a job survives page reloads and other tabs see it; cancelling sends
SIGTERM to the runner's process group. The UI process never imports torch.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path

from engine import schema
from engine.config import Config
from engine.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
JOB_FILE = "job.json"
ACTIVE = ("starting", "running")
PROMPT_CHOICES = ("safe", "risky", "both", "custom")

#: Processes this server started (reaped with poll() so finished ones do not linger as zombies).
_PROCS: dict[str, subprocess.Popen] = {}


@dataclass(frozen=True)
class JobRequest:
    feature: str
    prompt: str = "both"  # safe | risky | both | custom
    prompt_text: str | None = None
    device: str = "cpu"
    with_pathway: bool = False


@dataclass(frozen=True)
class InterventionRequest:
    """`python -m engine intervene`: set `features` (comma-separated) to 0 or `value`."""
    features: str
    mode: str = "ablate"  # ablate | clamp
    value: float | None = None
    n: int = 50
    prompt: str = "both"  # safe | risky | both
    seed: int = 0
    device: str = "cpu"
    max_new_tokens: int = 32

    @property
    def feature(self) -> str:
        """The job's key: the features joined by '+' (one job per set)."""
        return "+".join(self.features.split(","))


KINDS = ("prototype", "intervention")


@dataclass
class JobStatus:
    job_id: str
    folder: Path
    feature: str
    state: str  # starting | running | done | failed | cancelled
    request: dict = field(default_factory=dict)
    started: float | None = None
    finished: float | None = None
    step: str | None = None
    step_index: int = 0
    n_steps: int = 1
    stage: str | None = None
    done: int | None = None
    total: int | None = None
    rate: float | None = None
    eta_s: float | None = None
    error: str | None = None
    result_path: Path | None = None
    kind: str = "prototype"

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    @property
    def elapsed(self) -> float | None:
        if self.started is None:
            return None
        return (self.finished or time.time()) - self.started

    @property
    def fraction(self) -> float:
        """Overall progress in [0, 1] over all steps of the job."""
        if self.state == "done":
            return 1.0
        inner = (self.done / self.total) if (self.done is not None and self.total) else 0.0
        return max(0.0, min(1.0, (self.step_index + min(inner, 1.0)) / max(self.n_steps, 1)))


# ---------------------------------------------------------------------------
# Validation (before anything starts)
# ---------------------------------------------------------------------------

#: Known shapes of hub sources, used when the files are not on this machine.
KNOWN_DEPTH = {"meta-llama/Llama-3.1-8B": 32, "meta-llama/Meta-Llama-3.1-8B": 32}
KNOWN_WIDTH = {"fnlp/Llama3_1-8B-Base-LXR-8x": 32768, "fnlp/Llama3_1-8B-Base-LXR-32x": 131072}


def _positive_int(v) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


def model_depth(cfg: Config) -> int | None:
    src = Path(cfg.model.name_or_path).expanduser()
    if (src / "config.json").is_file():
        conf, _ = _read_object(src / "config.json")
        return _positive_int((conf or {}).get("num_hidden_layers"))  # the engine names a bad config itself
    return KNOWN_DEPTH.get(cfg.model.name_or_path)


def sae_width(cfg: Config, layer: int) -> int | None:
    from engine.sae import is_local_source, layer_folder

    if is_local_source(cfg.sae.source):
        hp = Path(cfg.sae.source).expanduser() / layer_folder(cfg.sae, layer) / cfg.sae.hyperparams_file
        if not hp.is_file():
            raise UserError(f"no SAE for layer {layer}: {hp} not found")
        obj, _ = _read_object(hp)
        return _positive_int((obj or {}).get("d_sae"))
    return KNOWN_WIDTH.get(cfg.sae.source)


def _read_object(path: Path) -> tuple[dict | None, str | None]:
    """(the JSON object in `path`, None) or (None, why it is unusable); never raises."""
    try:
        obj = json.loads(Path(path).read_bytes().decode("utf-8-sig"))
    except FileNotFoundError:
        return None, f"{path} is missing"
    except OSError as exc:
        return None, f"{path} cannot be read ({exc.strerror or type(exc).__name__})"
    except (ValueError, RecursionError) as exc:  # JSON, UTF-8, nesting
        text = " ".join(str(exc).split())[:120] or type(exc).__name__
        return None, f"{path} is not valid JSON ({text})"
    if not isinstance(obj, dict):
        return None, f"{path} is not a JSON object"
    return obj, None


def cuda_visible() -> bool:
    """Whether an NVIDIA GPU is visible, without importing torch in the UI process."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return Path("/dev/nvidiactl").exists() or shutil.which("nvidia-smi") is not None


def pathways_available() -> bool:
    return find_spec("engine.pathways") is not None


def validate_request(cfg: Config, req: JobRequest) -> JobRequest:
    """Normalised request, or UserError with one line saying what is wrong."""
    fid = schema.FeatureId.parse(req.feature)
    depth = model_depth(cfg)
    if depth is not None and not 0 <= fid.layer < depth:
        raise UserError(f"feature {fid}: layer {fid.layer} is outside the model (layers 0..{depth - 1})")
    width = sae_width(cfg, fid.layer)
    if width is not None and not 0 <= fid.feature_id < width:
        raise UserError(f"feature {fid}: index {fid.feature_id} is outside the SAE (0..{width - 1})")
    if req.prompt not in PROMPT_CHOICES:
        raise UserError(f"prompt must be one of {', '.join(PROMPT_CHOICES)}, got {req.prompt!r}")
    text = None
    if req.prompt == "custom":
        text = req.prompt_text or ""
        if not text.strip():
            raise UserError("the custom prompt is empty")
        limit = cfg.app.max_custom_prompt_chars
        if len(text) > limit:
            raise UserError(f"the custom prompt has {len(text)} characters; the limit is {limit} (app.max_custom_prompt_chars)")
    elif req.prompt in ("safe", "risky") and req.prompt not in cfg.prompts:
        raise UserError(f"the config has no {req.prompt!r} prompt")
    if req.device not in ("cpu", "cuda"):
        raise UserError(f"device must be cpu or cuda, got {req.device!r}")
    if req.device == "cuda" and not cuda_visible():
        raise UserError("no CUDA GPU is visible on this machine; choose cpu")
    if req.with_pathway and req.prompt == "custom":
        raise UserError("pathways run on the configured prompts; untick the pathway option for a custom prompt")
    if req.with_pathway and not pathways_available():
        raise UserError("this checkout has no pathways step (engine/pathways) yet")
    return JobRequest(str(fid), req.prompt, text, req.device, req.with_pathway)


def validate_intervention(cfg: Config, req: InterventionRequest) -> InterventionRequest:
    """Normalised intervention request, or UserError with one line saying what is wrong."""
    import math

    from engine.intervene import MAX_N, check_request

    feats = schema.parse_feature_list(req.features or "")
    for fid in feats:
        validate_request(cfg, JobRequest(str(fid), "both", None, "cpu"))
    value = None if req.value is None else float(req.value)
    if req.mode == "ablate":
        value = None
    try:
        n = int(req.n)
    except (TypeError, ValueError):
        raise UserError(f"the number of decisions must be a whole number, got {req.n!r}") from None
    check_request(feats, req.mode, value, n, req.prompt)
    if req.prompt != "both" and req.prompt not in cfg.prompts:
        raise UserError(f"the config has no {req.prompt!r} prompt")
    if req.device not in ("cpu", "cuda"):
        raise UserError(f"device must be cpu or cuda, got {req.device!r}")
    if req.device == "cuda" and not cuda_visible():
        raise UserError("no CUDA GPU is visible on this machine; choose cpu")
    if not isinstance(req.seed, int) or req.seed < 0:
        raise UserError(f"the seed must be a whole number >= 0, got {req.seed!r}")
    if not isinstance(req.max_new_tokens, int) or not 1 <= req.max_new_tokens <= 400:
        raise UserError(f"tokens per reply must be between 1 and 400, got {req.max_new_tokens!r}")
    assert n <= MAX_N and (value is None or math.isfinite(value))
    return InterventionRequest(",".join(str(f) for f in feats), req.mode, value, n, req.prompt, int(req.seed),
                               req.device, req.max_new_tokens)


# ---------------------------------------------------------------------------
# Starting, reading and cancelling
# ---------------------------------------------------------------------------


def jobs_dir(cache: Path) -> Path:
    return Path(cache) / schema.JOBS_DIR


def commands(config_path: str | None, cache: Path, req: JobRequest, folder: Path) -> list[dict]:
    base = [sys.executable, "-m", "engine"]
    common = (["--config", str(config_path)] if config_path else []) + [
        "--cache", str(cache), "--device", req.device, "--progress-file", str(folder / schema.JOB_PROGRESS)]
    proto = [*base, "prototype", *common, "--feature", req.feature, "--out", str(folder / schema.JOB_RESULT)]
    proto += ["--prompt-text", req.prompt_text or ""] if req.prompt == "custom" else ["--prompt", req.prompt]
    out = [{"name": "prototype", "argv": proto}]
    if req.with_pathway:
        out.append({"name": "pathways", "argv": [*base, "pathways", *common, "--features", req.feature]})
    return out


def intervention_commands(config_path: str | None, cache: Path, req: InterventionRequest, folder: Path) -> list[dict]:
    argv = [sys.executable, "-m", "engine", "intervene"] + (["--config", str(config_path)] if config_path else []) + [
        "--cache", str(cache), "--device", req.device, "--progress-file", str(folder / schema.JOB_PROGRESS),
        "--features", req.features, "--mode", req.mode, "--n", str(req.n), "--prompt", req.prompt,
        "--seed", str(req.seed), "--max-new-tokens", str(req.max_new_tokens), "--out", str(folder / schema.JOB_RESULT)]
    if req.mode == "clamp":
        argv += ["--value", repr(float(req.value))]
    return [{"name": "intervene", "argv": argv}]


def start_job(cfg: Config, config_path: str | None, cache: Path, req: JobRequest | InterventionRequest) -> JobStatus:
    """Validate, refuse a second job for the same feature (or feature set), then start the runner."""
    kind = "intervention" if isinstance(req, InterventionRequest) else "prototype"
    req = validate_intervention(cfg, req) if kind == "intervention" else validate_request(cfg, req)
    cache = Path(cache)
    with schema.file_lock(jobs_dir(cache) / ".lock"):
        running = active_job(cache, req.feature, kind)
        if running is not None:
            what = "an intervention" if kind == "intervention" else "a job"
            raise UserError(f"{what} for {req.feature} is already running ({running.job_id}); wait or cancel it")
        prefix = "intervene-" if kind == "intervention" else ""
        job_id = f"{prefix}{req.feature}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
        folder = jobs_dir(cache) / job_id
        folder.mkdir(parents=True)
        steps = (intervention_commands if kind == "intervention" else commands)(config_path, cache, req, folder)
        job = {"job_id": job_id, "kind": kind, "feature": req.feature, "state": "starting", "created": time.time(),
               "request": req.__dict__, "steps": steps, "step_index": 0}
        schema.atomic_write_json(folder / JOB_FILE, job)
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "ENGINE_NO_PROGRESS": "1", "PYTHONUNBUFFERED": "1"}
        with open(folder / schema.JOB_LOG, "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "explorer.jobs", "run", str(folder)], cwd=str(ROOT),
                                    env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        _PROCS[str(folder)] = proc
        job["pid"] = proc.pid
        _update(folder, pid=proc.pid)
    return read_job(folder)


def _update(folder: Path, **changes) -> dict:
    path = folder / JOB_FILE
    job = _read_object(path)[0] or {}
    job.update(changes)
    schema.atomic_write_json(path, job)
    return job


def reap() -> list[int]:
    """Collect every finished process this server started (no defunct children left behind);
    returns their pids."""
    done = []
    for key, proc in list(_PROCS.items()):
        if proc.poll() is not None:
            _PROCS.pop(key, None)
            done.append(proc.pid)
    return done


def _alive(pid: int | None) -> bool:
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    reap()
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _is_runner(pid: int, folder: Path) -> bool:
    """Whether `pid` is this job's runner (`python -m explorer.jobs run FOLDER`): a pid read from a
    damaged or planted job.json must never get a signal meant for the runner's process group."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"explorer.jobs" in args and os.fsencode(str(folder)) in args


def log_tail(folder: Path, n_lines: int = 20, max_bytes: int = 16384) -> str:
    path = Path(folder) / schema.JOB_LOG
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            raw = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    lines = [seg.split("\r")[-1] for seg in raw.split("\n")]  # keep the last state of \r progress bars
    return "\n".join([line for line in lines if line.strip()][-n_lines:])


_ERROR_RE = re.compile(r"^(error|internal error): ")


def error_line(folder: Path) -> str | None:
    """The one-line error the engine printed (`error: ...`), if any."""
    for line in reversed(log_tail(folder, 200).splitlines()):
        if _ERROR_RE.match(line.strip()):
            return line.strip()
    return None


def _typed(d: dict, key: str, kinds, problems: list[str], where: str):
    """d[key] when it has one of `kinds` (bool never counts as a number), else None and a problem."""
    v = d.get(key)
    if v is None:
        return None
    if isinstance(v, kinds) and not isinstance(v, bool):
        return v
    problems.append(f"{where}: {key} is {repr(v)[:40]}")
    return None


def read_job(folder: Path) -> JobStatus:
    """The job's state from its files; a damaged job.json or progress.json makes this job
    failed (or its progress unknown) with the file and key named, and never raises."""
    folder = Path(folder)
    problems: list[str] = []
    job, why = _read_object(folder / JOB_FILE)
    if job is None:
        job = {"state": "failed", "error": f"{why}; the job cannot be followed"}
    prog, _ = _read_object(folder / schema.JOB_PROGRESS)  # absent until the engine reports
    prog = prog or {}
    upd, began = prog.get("updated"), job.get("step_started")
    if (isinstance(upd, (int, float)) and isinstance(began, (int, float)) and not isinstance(upd, bool)
            and upd < began):
        prog = {}  # written by an earlier step of this job: not this step's progress
    jf, pf = f"{folder.name}/{JOB_FILE}", f"{folder.name}/{schema.JOB_PROGRESS}"
    state = _typed(job, "state", str, problems, jf) or "failed"
    if state not in (*ACTIVE, "done", "failed", "cancelled"):
        problems.append(f"{jf}: state is {state[:40]!r}")
        state = "failed"
    steps = job.get("steps") if isinstance(job.get("steps"), list) and job.get("steps") else [{}]
    steps = [s if isinstance(s, dict) else {} for s in steps]
    idx = _typed(job, "step_index", int, problems, jf) or 0
    idx = max(0, min(idx, len(steps) - 1))
    name = steps[idx].get("name")
    st = JobStatus(
        job_id=_typed(job, "job_id", str, problems, jf) or folder.name, folder=folder,
        feature=_typed(job, "feature", str, problems, jf) or "?", state=state,
        request=job.get("request") if isinstance(job.get("request"), dict) else {},
        started=_typed(job, "created", (int, float), problems, jf),
        finished=_typed(job, "finished", (int, float), problems, jf),
        step=name if isinstance(name, str) else None, step_index=idx, n_steps=len(steps),
        stage=_typed(prog, "stage", str, problems, pf), done=_typed(prog, "done", int, problems, pf),
        total=_typed(prog, "total", int, problems, pf), rate=_typed(prog, "rate", (int, float), problems, pf),
        eta_s=_typed(prog, "eta_s", (int, float), problems, pf), error=_typed(job, "error", str, problems, jf),
        kind=_typed(job, "kind", str, problems, jf) or "prototype",
    )
    if st.active and not _alive(job.get("pid")):
        # The runner is gone without recording an end (killed, machine restarted).
        st.state = "failed"
        st.error = error_line(folder) or "the job stopped unexpectedly; see its log"
    if problems and not st.error:
        st.error = "damaged job record: " + "; ".join(problems[:3])
        if st.state in ("done",) and any(p.startswith(jf) for p in problems):
            st.state = "failed"
    if st.state == "failed" and not st.error:
        message = prog.get("message")
        st.error = error_line(folder) or (message if isinstance(message, str) else None) or "failed"
    result = folder / schema.JOB_RESULT
    st.result_path = result if result.is_file() else None
    return st


def list_jobs(cache: Path, feature: str | None = None, kind: str | None = "prototype") -> list[JobStatus]:
    """Jobs in the cache (of one kind unless kind is None), newest first."""
    reap()
    folder = jobs_dir(cache)
    if not folder.is_dir():
        return []
    prefix = "" if feature is None else ("intervene-" if kind == "intervention" else "") + f"{feature}-"
    out = []
    for d in folder.iterdir():
        if d.is_dir() and (d / JOB_FILE).is_file() and d.name.startswith(prefix):
            j = read_job(d)  # never raises: one damaged job does not hide the others
            if kind is None or j.kind == kind:
                out.append(j)
    out.sort(key=lambda j: j.started if isinstance(j.started, (int, float)) else 0, reverse=True)
    return out


def active_job(cache: Path, feature: str, kind: str = "prototype") -> JobStatus | None:
    for j in list_jobs(cache, feature, kind):
        if j.active and j.feature == feature:
            return j
    return None


def cancel_job(folder: Path) -> None:
    folder = Path(folder)
    job = _read_object(folder / JOB_FILE)[0]
    if job is None:
        return
    pid = job.get("pid")
    if job.get("state") in ACTIVE and _alive(pid) and _is_runner(pid, folder):
        try:
            os.killpg(pid, signal.SIGTERM)  # the runner leads its own session: this reaches the engine too
        except ProcessLookupError:
            pass
    if job.get("state") in ACTIVE:
        _update(folder, state="cancelled", finished=time.time(), error="cancelled by the user")


def _save(status: JobStatus, out: Path, what: str) -> Path:
    if status.result_path is None:
        raise UserError(f"job {status.job_id} has no result to save")
    schema.atomic_write_json(out, schema.read_artifact(status.result_path, what))
    return out


def save_result(cache: Path, status: JobStatus) -> Path:
    """Copy a finished prototype into the cache as prototype/<feature>.json."""
    return _save(status, schema.prototype_path(cache, status.feature), "job result")


def save_intervention(cache: Path, status: JobStatus) -> Path:
    """Copy a finished intervention into the cache as interventions/<job id>.json."""
    return _save(status, schema.intervention_path(cache, status.job_id), "intervention result")


# ---------------------------------------------------------------------------
# The runner (a subprocess of the UI, in its own session)
# ---------------------------------------------------------------------------


def run(folder: Path) -> int:
    folder = Path(folder)
    job = _update(folder, state="running", pid=os.getpid(), started=time.time())
    child: dict[str, subprocess.Popen | None] = {"proc": None}
    cancelled = threading.Event()

    def on_term(signum, frame):  # cancel: stop the engine; the main loop records it
        cancelled.set()
        proc = child["proc"]
        if proc is None:
            _update(folder, state="cancelled", finished=time.time(), error="cancelled by the user")
            os._exit(143)
        _signal_quietly(proc.pid, signal.SIGTERM)
        killer = threading.Timer(10.0, _signal_quietly, (proc.pid, signal.SIGKILL))  # if it ignores SIGTERM
        killer.daemon = True
        killer.start()

    signal.signal(signal.SIGTERM, on_term)
    for i, step in enumerate(job.get("steps", [])):
        if cancelled.is_set():
            break
        (folder / schema.JOB_PROGRESS).unlink(missing_ok=True)  # the previous step's progress is not this one's
        _update(folder, step_index=i, step_started=time.time())
        with open(folder / schema.JOB_LOG, "ab") as log:
            log.write(f"$ {shlex.join(step['argv'])}\n".encode())  # the whole command, interpreter included
            log.flush()
            proc = subprocess.Popen(step["argv"], cwd=str(ROOT), stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT)
            child["proc"] = proc
            rc = proc.wait()
        if cancelled.is_set():
            break
        if rc != 0:
            _update(folder, state="failed", finished=time.time(), returncode=rc,
                    error=error_line(folder) or f"{step['name']} exited with code {rc}")
            return rc
    if cancelled.is_set():
        _update(folder, state="cancelled", finished=time.time(), error="cancelled by the user")
        return 143
    _update(folder, state="done", finished=time.time(), returncode=0)
    return 0


def _signal_quietly(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "run":
        sys.exit(run(Path(sys.argv[2])))
    print("usage: python -m explorer.jobs run JOB_DIR", file=sys.stderr)
    sys.exit(2)
