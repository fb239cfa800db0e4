"""`python -m engine run --config FILE [--from STEP] [--until STEP] [--only STEP[,STEP]] [--force]`.

Runs the pipeline's steps in order: 0 audit, 1 select, 2 prototype (of the strongest selected
feature by |Cohen's d|), 3 pathways, 4 tokens, 5 integrate. Before a step runs, the
fingerprints of its inputs and the hash of the config sections it reads are taken
(`engine.manifest.step_fingerprints`) and, once it succeeds, stored in its manifest entry. A
step whose recorded fingerprints equal the current ones is skipped; a step that is not
done (changed input or config, missing output, failed, never run) runs, and so does every
step after it. `--force` runs every chosen step. `--from/--until/--only` choose the steps;
the skip rule still applies to them. A failed step stops the run with its message; the
steps that finished keep their outputs and manifest entries.

Steps run in this process by default (each with its own peak-memory window); `--subprocess`
runs each as `python -m engine <step>` with a snapshot of the effective config, and
`--nproc N` (N > 1) runs pathways under torch's launcher,
`python -m torch.distributed.run --standalone --nproc_per_node N -m engine pathways ...`.
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib
import importlib.util
import math
import os
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from engine.config import Config
from engine.errors import UserError, write_traceback

STEP_MODULES: dict[str, str] = {
    "audit": "engine.audit",
    "select": "engine.select",
    "prototype": "engine.prototype",
    "pathways": "engine.pathways",
    "tokens": "engine.tokens",
    "integrate": "engine.integrate",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    steps = ", ".join(STEP_MODULES)
    p.add_argument("--from", dest="from_step", default=None, metavar="STEP", help=f"first step to consider ({steps})")
    p.add_argument("--until", dest="until_step", default=None, metavar="STEP", help="last step to consider")
    p.add_argument("--only", default=None, metavar="STEP[,STEP]", help="consider only these steps")
    p.add_argument("--force", action="store_true", help="run the chosen steps even when they are up to date")
    p.add_argument("--checkpoints", default=None, help="overrides data.checkpoints_dir")
    p.add_argument("--responses", default=None, help="overrides data.responses_dir")
    p.add_argument("--subprocess", action="store_true",
                   help="run each step as its own `python -m engine <step>` process")
    p.add_argument("--nproc", type=int, default=1,
                   help="processes for pathways (N > 1 runs it under torch.distributed.run, one GPU each)")
    p.add_argument("--dry-run", action="store_true", help="print what would run, and why, without running it")


# ---------------------------------------------------------------------------
# Which steps
# ---------------------------------------------------------------------------


def _check_step(name: str, flag: str) -> str:
    if name not in STEP_MODULES:
        raise UserError(f"{flag} {name!r} is not a step: choose from {', '.join(STEP_MODULES)}")
    return name


def choose_steps(from_step: str | None = None, until_step: str | None = None, only: str | list[str] | None = None) -> list[str]:
    order = list(STEP_MODULES)
    if only:
        names = [s.strip() for s in (only.split(",") if isinstance(only, str) else only) if s.strip()]
        if from_step or until_step:
            raise UserError("--only cannot be combined with --from or --until")
        chosen = {_check_step(n, "--only") for n in names}
        return [s for s in order if s in chosen]
    lo = order.index(_check_step(from_step, "--from")) if from_step else 0
    hi = order.index(_check_step(until_step, "--until")) if until_step else len(order) - 1
    if lo > hi:
        raise UserError(f"--from {from_step} comes after --until {until_step}")
    return order[lo:hi + 1]


def strongest_feature(cfg: Config) -> str | None:
    from engine.schema import CAUSAL_FEATURES, FeatureId, read_artifact

    sel = read_artifact(cfg.cache / CAUSAL_FEATURES, "causal feature selection",
                        rebuild="python -m engine select --config FILE")
    best, best_d = None, -1.0
    feats = sel.get("features")
    for i, rec in enumerate(feats if isinstance(feats, list) else []):
        if not isinstance(rec, dict) or "feature" not in rec:
            continue
        d = rec.get("cohen_d")
        try:
            d = abs(float(d)) if isinstance(d, (int, float)) and not isinstance(d, bool) and d == d else 0.0
        except OverflowError:  # an integer beyond float range
            d = math.inf
        if d > best_d:
            try:
                fid = FeatureId.parse(rec["feature"])
            except UserError as exc:
                raise UserError(f"causal feature selection {cfg.cache / CAUSAL_FEATURES}: record {i}: {exc}; "
                                f"rebuild it with `python -m engine select --config FILE`") from None
            best, best_d = str(fid), d
    return best


# ---------------------------------------------------------------------------
# Memory windows per step
# ---------------------------------------------------------------------------


def reset_peak_memory(device: str) -> None:
    """Start a new peak-memory window: CUDA's peak counter, and on Linux the process's peak
    RSS (writing 5 to /proc/self/clear_refs resets VmHWM and ru_maxrss)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass
    if device.startswith("cuda") or device == "auto":
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()


def _free_memory() -> None:
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------
# Running one step
# ---------------------------------------------------------------------------


@dataclass
class StepResult:
    step: str
    ran: bool
    rc: int = 0
    error: str | None = None
    seconds: float = 0.0
    reason: str = ""


def nothing_to_do(cfg: Config, step: str) -> str | None:
    """Why a step that works on the selected features has nothing to do, or None."""
    if step not in ("prototype", "pathways"):
        return None  # tokens and integrate write their (empty) tables themselves
    from engine.schema import CAUSAL_FEATURES, read_artifact

    sel = read_artifact(cfg.cache / CAUSAL_FEATURES, "causal feature selection",
                        rebuild="python -m engine select --config FILE")
    return None if sel.get("features") else "no causal features were selected"


def step_argv(cfg: Config, step: str) -> list[str]:
    if step == "prototype":
        feature = strongest_feature(cfg)
        return ["--feature", feature] if feature else []
    return []


def _run_in_process(step: str, mod, cfg: Config, argv: list[str]) -> tuple[int, str | None]:
    from engine.cli import add_common_arguments

    parser = argparse.ArgumentParser(prog=f"python -m engine {step}")
    add_common_arguments(parser)
    mod.add_arguments(parser)
    try:
        ns = parser.parse_args(argv)
    except SystemExit as exc:
        return 2, f"arguments {argv} rejected by {step} (exit {exc.code})"
    try:
        return int(mod.main(ns, copy.deepcopy(cfg)) or 0), None
    except UserError as exc:
        return exc.exit_code, str(exc)
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        if os.environ.get("ENGINE_DEBUG") == "1":
            raise
        log = write_traceback(traceback.format_exc(), cfg.cache, step)
        where = f"; traceback in {log}" if log else ""
        return 1, f"internal error: {type(exc).__name__}: {exc}{where}"


def _run_subprocess(step: str, cfg: Config, argv: list[str], snapshot: Path, nproc: int,
                    progress_file: str | None) -> tuple[int, str | None]:
    root = Path(__file__).resolve().parents[1]
    common = ["--config", str(snapshot), "--cache", str(cfg.cache)]
    if progress_file:
        common += ["--progress-file", progress_file]
    if step == "pathways" and nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "engine", step, *common, *argv]
    else:
        cmd = [sys.executable, "-m", "engine", step, *common, *argv]
    env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    print(f"  $ {' '.join(cmd)}", flush=True)
    proc = subprocess.Popen(cmd, cwd=str(root), env=env, stderr=subprocess.PIPE)
    tail = bytearray()

    def relay():
        assert proc.stderr is not None
        while True:
            chunk = proc.stderr.read1(4096) if hasattr(proc.stderr, "read1") else proc.stderr.read(4096)
            if not chunk:
                break
            sys.stderr.buffer.write(chunk)
            sys.stderr.flush()
            tail.extend(chunk)
            del tail[:-8192]

    t = threading.Thread(target=relay, daemon=True)
    t.start()
    try:
        rc = proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait()
        raise
    t.join()
    if rc == 0:
        return 0, None
    lines = [l.strip() for l in tail.decode("utf-8", "replace").replace("\r", "\n").splitlines() if l.strip()]
    msg = next((l for l in reversed(lines) if l.startswith(("error:", "internal error:"))), None)
    if msg and msg.startswith("error: "):
        msg = msg[len("error: "):]
    return rc, msg or (lines[-1] if lines else f"exit code {rc}")


def _record_outcome(cfg: Config, step: str, pre: dict, t_start: float, seconds: float, rc: int, error: str | None,
                    device: str, in_process: bool) -> None:
    """Attach the pre-run fingerprints to the step's own entry, or write an entry if it made none."""
    from engine.manifest import read_manifest, record_pipeline, update_step
    from engine.resources import peak_memory_gb

    if rc == 0 and record_pipeline(cfg.cache, step, pre, started_after=t_start):
        return
    entry = (read_manifest(cfg.cache).get("steps") or {}).get(step) or {}
    fresh = False
    try:
        fresh = time.mktime(time.strptime(entry.get("started", ""), "%Y-%m-%dT%H:%M:%S")) >= int(t_start) - 1
    except (TypeError, ValueError):
        pass
    if rc != 0 and fresh and entry.get("status") == "failed":
        return  # the step recorded its own failure
    peak = None
    if in_process:
        try:
            peak = round(peak_memory_gb(device), 4)
        except Exception:
            peak = None
    update_step(cfg.cache, step, {
        "status": "done" if rc == 0 else "failed",
        "error": None if rc == 0 else (error or f"exit code {rc}"),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t_start)),
        "seconds": round(seconds, 3),
        "peak_memory_gb": peak,
        "memory_kind": "cuda_max_memory_allocated" if device.startswith("cuda") else "peak_rss",
        "device": device,
        "inputs": pre["inputs"],
        "config_hash": pre["config_hash"],
        "command": f"python -m engine run --only {step}",
        "outputs": [],
        "summary": {"recorded_by": "orchestrator"},
        **({"pipeline": pre} if rc == 0 else {}),
    })


# ---------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------


def run_pipeline(cfg: Config, steps: list[str] | None = None, force: bool = False, *, subprocess_mode: bool = False,
                 nproc: int = 1, dry_run: bool = False, progress_file: str | None = None,
                 modules: dict | None = None, out=print) -> tuple[int, list[StepResult]]:
    """Run the chosen steps in order; returns (exit code, one StepResult per chosen step).

    `modules` maps step names to objects with add_arguments/main (tests inject their own).
    Only one run at a time works on a cache: a second one (another process) is refused with a
    UserError naming the pid that holds the cache's run lock; --dry-run takes no lock."""
    from engine.schema import RUN_LOCK, LockHeld, exclusive_lock

    cache = Path(cfg.cache)
    if dry_run:  # reads only
        return _run_pipeline(cfg, steps, force, subprocess_mode=subprocess_mode, nproc=nproc, dry_run=True,
                             progress_file=progress_file, modules=modules, out=out)
    cache.mkdir(parents=True, exist_ok=True)
    holder = f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}"
    try:
        with exclusive_lock(cache / RUN_LOCK, holder):
            return _run_pipeline(cfg, steps, force, subprocess_mode=subprocess_mode, nproc=nproc, dry_run=False,
                                 progress_file=progress_file, modules=modules, out=out)
    except LockHeld as exc:
        raise UserError(f"another `engine run` is already running on cache {cache} ({exc.holder or 'pid unknown'}); "
                        f"wait for it to finish, "
                        f"or give this run another --cache") from None


def _run_pipeline(cfg: Config, steps: list[str] | None, force: bool, *, subprocess_mode: bool, nproc: int,
                  dry_run: bool, progress_file: str | None, modules: dict | None, out) -> tuple[int, list[StepResult]]:
    from engine import progress
    from engine.config import dump_config_yaml
    from engine.manifest import pipeline_record, read_manifest, step_state
    from engine.schema import CONFIG_SNAPSHOT, atomic_write_text

    steps = steps or list(STEP_MODULES)
    gc.freeze()  # what is alive now (imported modules) is never garbage: later collections skip it
    cache = Path(cfg.cache)
    cache.mkdir(parents=True, exist_ok=True)
    snapshot = cache / CONFIG_SNAPSHOT
    if not dry_run:
        atomic_write_text(snapshot, dump_config_yaml(cfg))
    device = cfg.model.device
    out(f"run: cache {cache}" + (f", config {cfg.source_path}" if cfg.source_path else "")
        + f"; steps {', '.join(steps)}" + (" (forced)" if force else ""))
    results: list[StepResult] = []
    cascade: str | None = None
    t_all = time.perf_counter()
    for i, step in enumerate(steps, start=1):
        state, reason = step_state(cfg, step, read_manifest(cache))
        tag = f"[{i}/{len(steps)}] {step}"
        if force:
            why = "forced"
        elif cascade is not None:
            why = f"{cascade} ran before it"
        elif state != "done":
            why = f"{state}: {reason}"
        else:
            out(f"{tag}: up to date, skipped")
            results.append(StepResult(step, ran=False, reason="up to date"))
            continue
        if dry_run:
            out(f"{tag}: would run ({why})")
            results.append(StepResult(step, ran=False, reason=f"would run: {why}"))
            cascade = cascade or step
            continue
        mod = (modules or {}).get(step)
        if mod is None and not subprocess_mode:
            modname = STEP_MODULES[step]
            if importlib.util.find_spec(modname) is None:
                msg = (f"step {step} is not available in this checkout: module {modname} was not found "
                       f"(earlier steps are intact; run again once it exists)")
                out(f"{tag}: {msg}")
                results.append(StepResult(step, ran=False, rc=2, error=msg))
                return 2, results
            mod = importlib.import_module(modname)
        elif mod is None and importlib.util.find_spec(STEP_MODULES[step]) is None:
            msg = f"step {step} is not available in this checkout: module {STEP_MODULES[step]} was not found"
            out(f"{tag}: {msg}")
            results.append(StepResult(step, ran=False, rc=2, error=msg))
            return 2, results
        out(f"{tag}: running ({why})")
        progress.report("run", i - 1, len(steps), message=f"{step}: running")
        pre = pipeline_record(cfg, step)
        argv = []
        try:
            argv = step_argv(cfg, step)
        except UserError as exc:
            argv = None
            err = str(exc)
        idle = nothing_to_do(cfg, step) if argv is not None else None
        if idle:
            # An empty selection is a result, not an error: record the step as done with nothing to do.
            from engine.manifest import update_step

            update_step(cache, step, {"status": "done", "error": None,
                                      "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": 0.0,
                                      "peak_memory_gb": None, "memory_kind": None, "device": device,
                                      "inputs": pre["inputs"], "config_hash": pre["config_hash"],
                                      "command": f"python -m engine run --only {step}", "outputs": [],
                                      "summary": {"nothing_to_do": idle}, "pipeline": pre})
            out(f"{tag}: nothing to do ({idle})")
            results.append(StepResult(step, ran=True, reason=idle))
            cascade = cascade or step
            continue
        t_start = time.time()
        t0 = time.perf_counter()
        if argv is None:
            rc, error = 2, err
        elif subprocess_mode or (step == "pathways" and nproc > 1):
            rc, error = _run_subprocess(step, cfg, argv, snapshot, nproc, progress_file)
        else:
            reset_peak_memory(device)
            rc, error = _run_in_process(step, mod, cfg, argv)
        seconds = time.perf_counter() - t0
        _record_outcome(cfg, step, pre, t_start, seconds, rc, error, device, in_process=not subprocess_mode)
        _free_memory()
        results.append(StepResult(step, ran=True, rc=rc, error=error, seconds=seconds, reason=why))
        if rc != 0:
            out(f"{tag}: FAILED after {seconds:.1f} s: {error}")
            out(f"run stopped at {step}; finished steps are kept. Fix the problem and run again "
                f"(`python -m engine run --from {step}`).")
            progress.report("run", i - 1, len(steps), state="failed", message=f"{step}: {error}")
            return rc, results
        out(f"{tag}: done in {seconds:.1f} s")
        cascade = cascade or step
    ran = sum(r.ran for r in results)
    verb = "would run" if dry_run else "ran"
    out(f"run: {verb} {sum(1 for r in results if r.ran or r.reason.startswith('would'))} step(s), "
        f"skipped {sum(1 for r in results if r.reason == 'up to date')} in {time.perf_counter() - t_all:.1f} s"
        + ("" if dry_run else "; see `python -m engine status`"))
    progress.report("run", len(steps), len(steps), message=f"{ran} step(s) ran")
    return 0, results


def main(args: argparse.Namespace, cfg: Config) -> int:
    if args.checkpoints:
        cfg.data.checkpoints_dir = str(Path(args.checkpoints).expanduser().resolve())
    if args.responses:
        cfg.data.responses_dir = str(Path(args.responses).expanduser().resolve())
    if args.nproc < 1:
        raise UserError(f"--nproc must be at least 1, got {args.nproc}")
    steps = choose_steps(args.from_step, args.until_step, args.only)
    rc, results = run_pipeline(cfg, steps, force=args.force, subprocess_mode=args.subprocess, nproc=args.nproc,
                               dry_run=args.dry_run, progress_file=args.progress_file)
    if rc != 0:
        failed = results[-1]
        # one line on stderr with the failing step, as every command does
        print(f"error: step {failed.step} failed: {failed.error}", file=sys.stderr)
    return rc
