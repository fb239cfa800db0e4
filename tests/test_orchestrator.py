"""`python -m engine run`: order, skip-if-unchanged, cascade, failures, missing steps, launch.sh.

The orchestration logic is exercised with small step doubles (they write each step's
documented marker artifact and record themselves through the real manifest), so every
scenario runs in well under a second; the real steps run in the end-to-end test."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from engine import orchestrator as orch
from engine.config import load_config
from engine.errors import UserError
from engine.manifest import read_manifest, record_step
from engine.schema import atomic_write_json, atomic_write_text, with_schema
from helpers import ROOT, run_cli

STEPS = ["audit", "select", "prototype", "pathways", "tokens", "integrate"]


class Step:
    """A step double: add_arguments/main like a real step module."""

    def __init__(self, name: str, log: list, write, record: bool = True):
        self.name, self.log, self.write, self.record = name, log, write, record
        self.fail: str | None = None
        self.allocate_mb = 0

    def add_arguments(self, p):
        if self.name == "prototype":
            p.add_argument("--feature", required=True)

    def main(self, args, cfg):
        self.log.append((self.name, getattr(args, "feature", None)))
        if self.fail:
            with record_step(cfg.cache, self.name, cfg=cfg):
                raise UserError(self.fail)
        if not self.record:
            self.write(cfg, args)
            return 0
        with record_step(cfg.cache, self.name, device="cpu", cfg=cfg, command=f"python -m engine {self.name}"):
            if self.allocate_mb:
                block = np.ones(self.allocate_mb * 2 ** 20 // 8)
                block += 1  # touch every page
            self.write(cfg, args)
        return 0


def _audit(cfg, args):
    n = len(list(Path(cfg.data.checkpoints_dir).glob("checkpoint_*.json")))
    atomic_write_json(cfg.cache / "audit" / "data_validation.json", with_schema({"files": n}))


def _select(cfg, args):
    feats = json.loads((Path(cfg.data.checkpoints_dir) / "checkpoint_L1_3_a_20251101_000000.json").read_text())
    atomic_write_json(cfg.cache / "features" / "causal_features.json", with_schema({"features": feats}))


def _prototype(cfg, args):
    atomic_write_json(cfg.cache / "prototype" / f"{args.feature}.json", with_schema({"feature": args.feature}))


def _pathways(cfg, args):
    atomic_write_json(cfg.cache / "pathways" / "index.json", with_schema({"targets": []}))


def _tokens(cfg, args):
    atomic_write_json(cfg.cache / "tokens" / "index.json", with_schema({"features": []}))


def _integrate(cfg, args):
    atomic_write_json(cfg.cache / "integrated" / "features.json", with_schema({"features": []}))


WRITERS = dict(audit=_audit, select=_select, prototype=_prototype, pathways=_pathways, tokens=_tokens,
               integrate=_integrate)


@pytest.fixture
def pipe(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    feats = [{"feature": "L1-3", "layer": 1, "feature_id": 3, "cohen_d": 0.4},
             {"feature": "L2-8", "layer": 2, "feature_id": 8, "cohen_d": -1.3},
             {"feature": "L3-1", "layer": 3, "feature_id": 1, "cohen_d": 1.1}]
    (data / "checkpoint_L1_3_a_20251101_000000.json").write_text(json.dumps(feats))
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(f"data:\n  checkpoints_dir: data\n  responses_dir: data\ncache_dir: cache\n"
                        f"model:\n  device: cpu\n")
    log: list = []
    mods = {s: Step(s, log, WRITERS[s]) for s in STEPS}

    def run(steps=None, force=False, overrides=None, **kw):
        cfg = load_config(cfg_path, overrides or {})
        log.clear()
        lines: list[str] = []
        rc, res = orch.run_pipeline(cfg, steps, force, modules=mods, out=lines.append, **kw)
        return rc, [name for name, _ in log], lines

    return {"run": run, "log": log, "mods": mods, "data": data, "cache": tmp_path / "cache", "cfg_path": cfg_path}


def bump(path: Path) -> None:
    """Change a file's modification time (what editing it would do), keeping its content."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))


def test_first_run_runs_everything_in_order_then_skips(pipe):
    rc, ran, lines = pipe["run"]()
    assert rc == 0 and ran == STEPS
    assert pipe["log"][2] == ("prototype", "L2-8")  # the strongest selected feature by |d|
    m = read_manifest(pipe["cache"])
    for s in STEPS:
        e = m["steps"][s]
        assert e["status"] == "done" and e["pipeline"]["inputs"] and e["pipeline"]["config_hash"]
        assert e["seconds"] >= 0 and e["peak_memory_gb"] > 0
    assert (pipe["cache"] / "config.snapshot.yaml").is_file()
    rc, ran, lines = pipe["run"]()
    assert rc == 0 and ran == []
    assert all("up to date, skipped" in l for l in lines[1:-1])


def test_a_changed_input_reruns_its_step_and_every_later_one(pipe):
    pipe["run"]()
    bump(pipe["cache"] / "features" / "causal_features.json")  # select's output, prototype's first input
    rc, ran, lines = pipe["run"]()
    assert ran == ["prototype", "pathways", "tokens", "integrate"]
    assert any("prototype: running (stale: input changed: selection)" in l for l in lines)
    assert any("pathways: running (prototype ran before it)" in l for l in lines)
    pipe["run"]()
    bump(pipe["data"] / "checkpoint_L1_3_a_20251101_000000.json")  # the experiment data itself
    assert pipe["run"]()[1] == STEPS
    (pipe["data"] / "checkpoint_L9_9_b_20251102_000000.json").write_text("[]")  # a new file in the folder
    assert pipe["run"]()[1] == STEPS
    assert pipe["run"]()[1] == []


def test_config_changes_rerun_from_the_first_step_that_reads_them(pipe):
    pipe["run"]()
    assert pipe["run"](overrides={"tokens.top_n": 7})[1] == ["tokens", "integrate"]
    assert pipe["run"](overrides={"tokens.top_n": 7})[1] == []
    assert pipe["run"](overrides={"tokens.top_n": 7, "pathways.n_replay": 3})[1] == ["pathways", "tokens", "integrate"]
    # the device is not a result: moving to another device does not make anything stale
    assert pipe["run"](overrides={"tokens.top_n": 7, "pathways.n_replay": 3, "model.device": "auto"})[1] == []


def test_force_only_from_until(pipe):
    pipe["run"]()
    assert pipe["run"](["tokens"], force=True)[1] == ["tokens"]
    assert pipe["run"]()[1] == ["integrate"]  # tokens' output changed, so integrate is stale
    assert pipe["run"](orch.choose_steps(from_step="pathways"), force=True)[1] == ["pathways", "tokens", "integrate"]
    assert orch.choose_steps(until_step="prototype") == ["audit", "select", "prototype"]
    assert orch.choose_steps(only="integrate,audit") == ["audit", "integrate"]
    with pytest.raises(UserError, match="'tokenz' is not a step"):
        orch.choose_steps(only="tokenz")
    with pytest.raises(UserError, match="comes after"):
        orch.choose_steps(from_step="tokens", until_step="select")
    with pytest.raises(UserError, match="cannot be combined"):
        orch.choose_steps(from_step="tokens", only="tokens")


def test_dry_run_changes_nothing(pipe):
    rc, ran, lines = pipe["run"](dry_run=True)
    assert rc == 0 and ran == [] and not (pipe["cache"] / "manifest.json").exists()
    assert lines[1] == "[1/6] audit: would run (missing: never run)"
    assert lines[2] == "[2/6] select: would run (audit ran before it)"


def test_a_failed_step_stops_the_run_and_keeps_finished_steps(pipe):
    pipe["mods"]["pathways"].fail = "pathways: target L3-1 has no SAE file"
    rc, ran, lines = pipe["run"]()
    assert rc == 2 and ran == ["audit", "select", "prototype", "pathways"]
    assert any("pathways: FAILED" in l and "has no SAE file" in l for l in lines)
    assert any("python -m engine run --from pathways" in l for l in lines)
    m = read_manifest(pipe["cache"])
    assert [m["steps"][s]["status"] for s in ("audit", "select", "prototype", "pathways")] == ["done"] * 3 + ["failed"]
    assert "has no SAE file" in m["steps"]["pathways"]["error"]
    assert "tokens" not in m["steps"] and (pipe["cache"] / "prototype" / "L2-8.json").is_file()
    pipe["mods"]["pathways"].fail = None
    assert pipe["run"]()[1] == ["pathways", "tokens", "integrate"]  # resumes where it failed


def test_an_empty_selection_leaves_prototype_and_pathways_nothing_to_do(pipe):
    (pipe["data"] / "checkpoint_L1_3_a_20251101_000000.json").write_text("[]")
    rc, ran, lines = pipe["run"]()
    assert rc == 0 and ran == ["audit", "select", "tokens", "integrate"]  # the doubles of 2 and 3 were not called
    assert "[3/6] prototype: nothing to do (no causal features were selected)" in lines
    assert "[4/6] pathways: nothing to do (no causal features were selected)" in lines
    m = read_manifest(pipe["cache"])["steps"]
    assert m["pathways"]["status"] == "done" and m["pathways"]["summary"]["nothing_to_do"]
    assert pipe["run"]()[1] == []  # and that is up to date
    (pipe["data"] / "checkpoint_L1_3_a_20251101_000000.json").write_text(
        json.dumps([{"feature": "L1-3", "layer": 1, "feature_id": 3, "cohen_d": 0.4}]))
    assert pipe["run"]()[1] == STEPS


def test_a_missing_step_module_is_named(pipe, monkeypatch):
    monkeypatch.setitem(orch.STEP_MODULES, "tokens", "engine.not_built_yet")
    mods = {k: v for k, v in pipe["mods"].items() if k != "tokens"}
    cfg = load_config(pipe["cfg_path"])
    lines: list[str] = []
    rc, res = orch.run_pipeline(cfg, modules=mods, out=lines.append)
    assert rc == 2 and res[-1].step == "tokens"
    assert "step tokens is not available in this checkout: module engine.not_built_yet was not found" in lines[-1]
    assert read_manifest(pipe["cache"])["steps"]["pathways"]["status"] == "done"


def test_a_step_that_does_not_record_itself_is_recorded_by_the_orchestrator(pipe):
    pipe["mods"]["pathways"].record = False
    pipe["run"]()
    e = read_manifest(pipe["cache"])["steps"]["pathways"]
    assert e["status"] == "done" and e["summary"] == {"recorded_by": "orchestrator"} and e["pipeline"]["inputs"]
    assert pipe["run"]()[1] == []


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS reset needs Linux")
def test_each_step_gets_its_own_peak_memory_window(pipe):
    pipe["mods"]["pathways"].allocate_mb = 400
    pipe["run"]()
    m = read_manifest(pipe["cache"])["steps"]
    # tokens ran after pathways in the same process, yet its peak does not include pathways' 400 MB
    assert m["pathways"]["peak_memory_gb"] > m["tokens"]["peak_memory_gb"] + 0.3


def test_cli_run_subprocess_mode_with_the_real_integrate_step(tmp_path, capsys):
    from engine.cli import main as cli_main
    from test_integrate import SELECTION

    cache = tmp_path / "cache"
    atomic_write_json(cache / "features" / "causal_features.json", with_schema({"features": SELECTION}))
    cfg = tmp_path / "c.yaml"
    atomic_write_text(cfg, "cache_dir: cache\nmodel: {device: cpu}\n")
    r = run_cli("run", "--config", str(cfg), "--only", "integrate", "--subprocess", "--set", "integrate.top_hubs=3")
    assert r.returncode == 0, r.stderr
    assert "[1/1] integrate: running (missing: never run)" in r.stdout
    assert f"wrote {cache / 'integrated' / 'report.md'}" in r.stdout  # the child's own output
    e = read_manifest(cache)["steps"]["integrate"]
    assert e["status"] == "done" and e["pipeline"]["config_sections"]["integrate"]
    snap = (cache / "config.snapshot.yaml").read_text()
    assert "top_hubs: 3" in snap  # the child read the effective config, overrides included
    # the same command line in this process: up to date; a step that cannot run: one error line
    assert cli_main(["run", "--config", str(cfg), "--only", "integrate", "--set", "integrate.top_hubs=3"]) == 0
    assert "integrate: up to date, skipped" in capsys.readouterr().out
    rc = cli_main(["run", "--config", str(cfg), "--only", "prototype,integrate"])
    err = capsys.readouterr().err
    assert rc == 2 and "error: step prototype failed:" in err and "Traceback" not in err


def test_launch_script_picks_gpus_and_pathway_ranks(tmp_path):
    script = ROOT / "scripts" / "launch.sh"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "2,5", "PYTHON": "python"}
    r = subprocess.run(["bash", str(script), "--dry-run", "--config", "x.yaml", "--from", "pathways"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "CUDA_VISIBLE_DEVICES=2,5" in r.stdout
    assert "-m engine run --device cuda --nproc 2 --config x.yaml --from pathways" in r.stdout
    r = subprocess.run(["bash", str(script), "--dry-run", "--gpus", "0", "--config", "x.yaml"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert "CUDA_VISIBLE_DEVICES=0" in r.stdout and "--nproc 1" in r.stdout
    r = subprocess.run(["bash", str(script), "--dry-run", "--cpu", "--config", "x.yaml"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert "--device cpu --nproc 1" in r.stdout


@pytest.mark.slow
def test_end_to_end_small_experiment_on_the_fixture_model(fixture_dir, tmp_path):
    """`engine run` with the real steps 0-5 on a `small` experiment drawn for the fixture model."""
    import pandas as pd

    from engine.experiment_data import generate
    from engine.schema import (AUDIT_TRIALS, AUDIT_VALIDATION, CAUSAL_FEATURES, INTEGRATED_FEATURES,
                               INTEGRATED_FEATURES_JSON, INTEGRATED_REPORT, INTEGRATED_UNION_GRAPH, PATHWAYS_EDGES,
                               PATHWAYS_INDEX, PATHWAYS_NODES, TOKENS_BEHAVIOURAL_WORDS, TOKENS_DECISION_TOKENS,
                               TOKENS_INDEX, TOKENS_LOGIT_LENS, TOKENS_PROMPT_ACTIVATIONS, TOKENS_TOP_ACTIVATING)

    generate(tmp_path / "data", "small", seed=0, config=fixture_dir / "config.yaml")
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(f"model: {{name_or_path: {fixture_dir / 'model'}, dtype: float32, device: cpu}}\n"
                        f"sae: {{source: {fixture_dir / 'saes'}}}\n"
                        f"data: {{checkpoints_dir: data}}\ncache_dir: cache\n"
                        f"tokens: {{sample_size: 24}}\npathways: {{n_replay: 5}}\n")
    cfg = load_config(cfg_path)
    lines: list[str] = []
    rc, results = orch.run_pipeline(cfg, out=lines.append)
    assert rc == 0, "\n".join(lines)
    assert [r.step for r in results if r.ran] == STEPS
    cache = tmp_path / "cache"
    sel = json.loads((cache / CAUSAL_FEATURES).read_text())
    names = [f["feature"] for f in sel["features"]]
    assert len(names) >= 2
    strongest = max(sel["features"], key=lambda f: abs(f["cohen_d"]))["feature"]
    assert (cache / "prototype" / f"{strongest}.json").is_file()
    for rel in (AUDIT_VALIDATION, AUDIT_TRIALS, PATHWAYS_INDEX, PATHWAYS_NODES, PATHWAYS_EDGES, TOKENS_INDEX,
                TOKENS_LOGIT_LENS, TOKENS_DECISION_TOKENS, TOKENS_PROMPT_ACTIVATIONS, TOKENS_TOP_ACTIVATING,
                TOKENS_BEHAVIOURAL_WORDS, INTEGRATED_FEATURES, INTEGRATED_FEATURES_JSON, INTEGRATED_UNION_GRAPH,
                INTEGRATED_REPORT):
        assert (cache / rel).is_file(), rel
    for n in names:
        assert (cache / "pathways" / f"{n}.json").is_file() and (cache / "tokens" / f"{n}.json").is_file()
    words = pd.read_parquet(cache / TOKENS_BEHAVIOURAL_WORDS)
    assert set(words["feature"]) <= set(names) and len(words) > 0
    integrated = json.loads((cache / INTEGRATED_FEATURES_JSON).read_text())
    assert sorted(r["feature"] for r in integrated["features"]) == sorted(names)
    assert all(r["has_pathway"] and r["has_tokens"] for r in integrated["features"])
    report = (cache / INTEGRATED_REPORT).read_text()
    assert f"| selected causal features | {len(names)} (" in report
    for fig in ("layer_counts", "effect_sizes", "hubs", "pathway_agreement"):
        assert (cache / "integrated" / "figures" / f"{fig}.png").stat().st_size > 10_000
    # unchanged: everything is skipped; a changed token view re-runs only the integration
    rc, results = orch.run_pipeline(load_config(cfg_path), out=lines.append)
    assert rc == 0 and not any(r.ran for r in results)
    bump(cache / "tokens" / f"{names[0]}.json")
    rc, results = orch.run_pipeline(load_config(cfg_path), out=lines.append)
    assert [r.step for r in results if r.ran] == ["integrate"]


HOLDER = """
import sys, time, types
from pathlib import Path
from engine.config import load_config
from engine import orchestrator as orch
cache, flag = sys.argv[1], Path(sys.argv[2])
def main(args, cfg):
    flag.write_text("started")
    while flag.read_text() != "release":
        time.sleep(0.05)
    return 0
step = types.SimpleNamespace(add_arguments=lambda p: None, main=main)
rc, _ = orch.run_pipeline(load_config(None, {"cache_dir": cache}), ["integrate"], force=True,
                          modules={"integrate": step}, out=lambda *a: None)
sys.exit(rc)
"""


def test_a_second_run_on_the_same_cache_is_refused_while_the_first_runs(tmp_path):
    """Two real processes: `engine run` while another run holds the cache exits 2 with one line
    naming the holder's pid; once the first run ends the lock is free again."""
    from engine.schema import RUN_LOCK, exclusive_lock

    cache, flag = tmp_path / "cache", tmp_path / "flag"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen([os.sys.executable, "-c", HOLDER, str(cache), str(flag)], cwd=str(ROOT), env=env)
    try:
        deadline = time.time() + 60
        while not (flag.exists() and flag.read_text() == "started"):
            assert first.poll() is None and time.time() < deadline, "the first run never started its step"
            time.sleep(0.05)
        second = run_cli("run", "--config", str(ROOT / "config.yaml"), "--cache", str(cache), "--only", "integrate",
                         "--force", timeout=120)
        assert second.returncode == 2
        err = second.stderr.strip()
        assert err.startswith(f"error: another `engine run` is already running on cache {cache} (pid {first.pid}, "
                              f"started "), err
        assert len(err.splitlines()) == 1 and "[1/1] integrate" not in second.stdout
        dry = run_cli("run", "--config", str(ROOT / "config.yaml"), "--cache", str(cache), "--only", "integrate",
                      "--dry-run", timeout=120)
        assert dry.returncode == 0 and "would run" in dry.stdout  # a dry run only reads, so it is let through
    finally:
        flag.write_text("release")
        assert first.wait(timeout=60) == 0
    with exclusive_lock(cache / RUN_LOCK, "test"):  # released by the first run
        pass


def test_internal_error_traceback_goes_to_a_new_file_under_the_cache(tmp_path, capsys, monkeypatch):
    from engine import cli

    monkeypatch.delenv("ENGINE_DEBUG", raising=False)
    cache = tmp_path / "cache"

    def boom():
        cli._RUN.update(command="select", cache=cache)
        raise RuntimeError("bug in a step")

    assert cli.run_main(boom) == 1 and cli.run_main(boom) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    logs = sorted((cache / "logs").iterdir())
    assert len(lines) == 2 and len(logs) == 2  # one file per run, none shared
    for line, log in zip(lines, logs):
        assert log.name.startswith("error-select-") and log.stat().st_mode & 0o777 == 0o600
        assert line.startswith("internal error: RuntimeError: bug in a step; traceback in ") and str(log) in " ".join(lines)
        assert "Traceback (most recent call last)" in log.read_text() and "bug in a step" in log.read_text()
    # a symlink planted at logs/ is not written through: the traceback goes to a private temp file
    for log in logs:
        log.unlink()
    (cache / "logs").rmdir()
    target = tmp_path / "elsewhere"
    target.mkdir()
    (cache / "logs").symlink_to(target)
    assert cli.run_main(boom) == 1
    line = capsys.readouterr().err.strip()
    assert list(target.iterdir()) == []
    path = Path(line.rsplit("traceback in ", 1)[1])
    assert path.name.startswith("engine-error-select-") and "bug in a step" in path.read_text()
    path.unlink()
