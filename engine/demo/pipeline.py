"""Running the tool's pipeline (audit .. integrate) on the demo's config.

Through the orchestrator (`python -m engine run`) when it exists; otherwise every step
module that exists, in order, and "not available yet" for the others. Steps run in this
process through `engine.cli.main` (importing torch and transformers once, not six times);
a failing step is recorded with its error and the next steps still run.
"""

from __future__ import annotations

import importlib
import io
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path

from engine.errors import UserError
from engine.schema import STEPS

STEP_MODULES = {
    "audit": "engine.audit", "select": "engine.select", "prototype": "engine.prototype",
    "pathways": "engine.pathways", "tokens": "engine.tokens", "integrate": "engine.integrate",
}
ORCHESTRATOR = "engine.orchestrator"
NOT_AVAILABLE = "not available yet"


def step_available(module: str) -> bool:
    """A step exists when its module imports and has the step interface."""
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module.startswith(exc.name):
            return False
        raise
    return callable(getattr(mod, "add_arguments", None)) and callable(getattr(mod, "main", None))


def _run_cli(argv: list[str]) -> tuple[int, str | None, str]:
    """engine.cli.main in this process: (exit code, error line, captured stdout)."""
    from engine import cli

    buf = io.StringIO()
    try:
        with redirect_stdout(buf):
            rc = int(cli.main(argv) or 0)
        return rc, None if rc == 0 else f"exit code {rc}", buf.getvalue()
    except UserError as exc:
        return 2, str(exc), buf.getvalue()
    except SystemExit as exc:  # argparse rejected the arguments
        code = exc.code if isinstance(exc.code, int) else 2
        return code, f"arguments rejected (exit {code})", buf.getvalue()
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # another engineer's step failing must not lose the demo
        return 1, f"{type(exc).__name__}: {exc}", buf.getvalue()


def step_args(step: str, config_path: str, feature: str | None) -> list[str]:
    argv = [step, "--config", config_path]
    if step == "prototype" and feature:
        argv += ["--feature", feature]
    return argv


def run_pipeline(config_path: str | Path, cache: Path, feature: str | None, log=print) -> dict:
    """Run every step; returns {"via": ..., "steps": {step: {status, seconds, error}}}."""
    from engine.manifest import read_manifest

    config_path = str(config_path)
    steps: dict[str, dict] = {}
    if step_available(ORCHESTRATOR):
        log("pipeline: python -m engine run")
        t0 = time.perf_counter()
        rc, err, _ = _run_cli(["run", "--config", config_path])
        manifest = read_manifest(cache).get("steps", {})
        for step in STEPS:
            m = manifest.get(step)
            if m is not None:
                steps[step] = {"status": m.get("status"), "seconds": m.get("seconds"), "error": m.get("error")}
            elif not step_available(STEP_MODULES[step]):
                steps[step] = {"status": NOT_AVAILABLE, "seconds": None, "error": None}
            else:
                steps[step] = {"status": "not run", "seconds": None, "error": err}
        extra = {}
        # The orchestrator prototypes the selected feature with the largest |d|; the demo's strongest
        # feature (largest causal effect) gets one too.
        from engine.schema import prototype_path

        if feature and step_available(STEP_MODULES["prototype"]) and not prototype_path(cache, feature).is_file():
            extra["prototype"] = {"feature": feature, **_one_step("prototype", config_path, feature, log)}
        return {"via": "orchestrator", "exit_code": rc, "error": err,
                "seconds": round(time.perf_counter() - t0, 2), "steps": steps, "extra": extra}
    for step in STEPS:
        if not step_available(STEP_MODULES[step]):
            log(f"pipeline: {step}: {NOT_AVAILABLE}")
            steps[step] = {"status": NOT_AVAILABLE, "seconds": None, "error": None}
            continue
        steps[step] = _one_step(step, config_path, feature, log)
    return {"via": "steps", "steps": steps}


def _one_step(step: str, config_path: str, feature: str | None, log) -> dict:
    if step == "prototype" and not feature:
        return {"status": "skipped", "seconds": None, "error": "no feature to prototype"}
    t0 = time.perf_counter()
    rc, err, _ = _run_cli(step_args(step, config_path, feature))
    sec = round(time.perf_counter() - t0, 2)
    status = "done" if rc == 0 else "failed"
    log(f"pipeline: {step}: {status} in {sec:.1f}s" + (f" ({err})" if err else ""))
    if err:
        print(f"demo: step {step} failed: {err}", file=sys.stderr)
    return {"status": status, "seconds": sec, "error": err}
