"""`python -m engine status`: each step's state, time and memory from the manifest, and the commands."""

from __future__ import annotations

import argparse
import json
import os

from engine import status as st
from engine.config import load_config
from engine.manifest import read_manifest, update_step
from test_orchestrator import STEPS, bump, pipe  # noqa: F401  (the pipeline fixture)


def rows_by_step(cfg):
    return {r["step"]: r for r in st.pipeline_status(cfg)}


def test_status_of_a_fresh_cache_says_how_to_start(tmp_path, capsys):
    cfg = load_config(None, {"cache_dir": str(tmp_path / "cache")})
    rows = st.pipeline_status(cfg)
    assert [r["status"] for r in rows] == ["missing"] * 6 and all(r["will_run"] for r in rows)
    assert rows[2]["command"].startswith("python -m engine run --config") and "--only prototype" in rows[2]["command"]
    st.main(argparse.Namespace(json=False), cfg)
    out = capsys.readouterr().out
    assert "0 audit      missing" in out
    assert f"to bring everything up to date: python -m engine run --config config.yaml --cache {tmp_path / 'cache'}" in out


def test_status_after_runs_changes_and_failures(pipe, capsys):
    pipe["run"]()
    cfg = load_config(pipe["cfg_path"])
    rows = rows_by_step(cfg)
    assert all(r["status"] == "done" and not r["will_run"] for r in rows.values())
    m = read_manifest(pipe["cache"])["steps"]
    assert rows["pathways"]["seconds"] == m["pathways"]["seconds"]
    assert rows["pathways"]["peak_memory_gb"] == m["pathways"]["peak_memory_gb"] > 0
    st.main(argparse.Namespace(json=False), cfg)
    out = capsys.readouterr().out
    assert "everything is up to date" in out
    line = next(l for l in out.splitlines() if l.startswith("3 pathways"))
    assert "done" in line and "GB RSS" in line and "cpu" in line and line.endswith("skip")

    bump(pipe["cache"] / "features" / "causal_features.json")
    rows = rows_by_step(cfg)
    assert rows["select"]["status"] == "done" and not rows["select"]["will_run"]
    assert (rows["prototype"]["status"], rows["prototype"]["reason"]) == ("stale", "input changed: selection")
    assert rows["pathways"]["status"] == "stale" and rows["tokens"]["status"] == "stale"
    assert rows["integrate"]["reason"] == "input changed: features"
    assert st.next_command(cfg, list(rows.values())) == f"python -m engine run --config {pipe['cfg_path']} --from prototype"

    cfg2 = load_config(pipe["cfg_path"], {"tokens.top_n": 3})
    rows = rows_by_step(cfg2)
    assert "config changed: tokens" in rows["tokens"]["reason"]

    e = read_manifest(pipe["cache"])["steps"]["integrate"]
    update_step(pipe["cache"], "integrate", {**e, "status": "failed", "error": "UserError: no disk space"})
    st.main(argparse.Namespace(json=True), cfg)
    data = json.loads(capsys.readouterr().out)
    by = {r["step"]: r for r in data["steps"]}
    assert by["integrate"]["status"] == "failed" and by["integrate"]["reason"] == "UserError: no disk space"
    assert by["integrate"]["command"] == f"python -m engine integrate --config {pipe['cfg_path']}"
    assert data["next_command"].endswith("--from prototype")


def test_status_of_entries_without_fingerprints_and_corrupt_manifests(pipe, capsys):
    pipe["run"]()
    cfg = load_config(pipe["cfg_path"])
    e = read_manifest(pipe["cache"])["steps"]["tokens"]
    e.pop("pipeline")
    update_step(pipe["cache"], "tokens", e)  # as a step recorded without cfg= would leave it
    rows = rows_by_step(cfg)
    assert rows["tokens"]["status"] == "stale" and "without pipeline fingerprints" in rows["tokens"]["reason"]
    os.remove(pipe["cache"] / "tokens" / "index.json")
    assert rows_by_step(cfg)["tokens"]["status"] == "missing"
    (pipe["cache"] / "manifest.json").write_text("{not json")
    st.main(argparse.Namespace(json=False), cfg)
    out = capsys.readouterr().out
    assert "the manifest could not be read" in out and "0 audit      missing" in out


def test_damaged_manifest_fields_are_named_and_the_rest_is_kept(pipe, capsys):
    """A field of the wrong type in one entry is named (file, step, key) and ignored; every other
    entry keeps its state, and `engine status` still prints the table."""
    pipe["run"]()
    cfg = load_config(pipe["cfg_path"])
    path = pipe["cache"] / "manifest.json"
    m = json.loads(path.read_text())
    m["steps"]["audit"]["seconds"] = "slow"
    m["steps"]["audit"]["started"] = 17
    m["steps"]["select"]["pipeline"]["inputs"] = ["not", "a", "map"]
    m["steps"]["tokens"]["summary"] = "text"
    m["steps"]["demo"] = 5
    path.write_text(json.dumps(m))
    rows = rows_by_step(cfg)
    assert rows["audit"]["status"] == "done" and rows["audit"]["seconds"] is None and rows["audit"]["started"] is None
    assert rows["select"]["status"] == "stale" and "without pipeline fingerprints" in rows["select"]["reason"]
    assert [rows[s]["status"] for s in ("prototype", "pathways", "tokens", "integrate")] == ["done"] * 4
    st.main(argparse.Namespace(json=False), cfg)
    out = capsys.readouterr().out
    for warning in ('steps.audit.seconds is "slow", not a number of 0 or more', "steps.audit.started is 17, not text",
                    "steps.select.pipeline: inputs are not a map of fingerprints",
                    'steps.tokens.summary is "text", not the expected object', "steps.demo is 5, not an object"):
        assert f"warning: manifest {path}: {warning} (ignored)" in out
    assert "0 audit      done" in out and "to bring everything up to date: " in out
    st.main(argparse.Namespace(json=True), cfg)
    assert len(json.loads(capsys.readouterr().out)["manifest_problems"]) == 5


def test_a_corrupt_manifest_is_kept_aside_when_a_step_records_itself(tmp_path, capsys):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "manifest.json").write_bytes(b'{"steps": {"audit": {"status": "done"}}, "x": "caf\xe9"}')
    m = read_manifest(cache)
    assert m["corrupt"] and m["steps"] == {}
    assert m["problem"] == f"manifest {cache / 'manifest.json'} is not valid JSON (not UTF-8: byte 0xe9 at offset 50)"
    cfg = load_config(None, {"cache_dir": str(cache)})
    st.main(argparse.Namespace(json=False), cfg)
    assert f"warning: the manifest could not be read ({m['problem']}); every step shows as missing" in capsys.readouterr().out
    update_step(cache, "audit", {"status": "done", "seconds": 1.0})
    kept = [p.name for p in cache.iterdir() if p.name.startswith("manifest.json.corrupt-")]
    assert len(kept) == 1 and b"caf\xe9" in (cache / kept[0]).read_bytes()
    assert read_manifest(cache) == {"schema_version": 1, "steps": {"audit": {"status": "done", "seconds": 1.0}}}


def test_a_moved_or_copied_study_folder_stays_up_to_date(pipe, tmp_path_factory):
    """Fingerprints hold paths relative to each input folder and the config hash leaves local paths
    out, so a study folder (config, data, cache) copied with its file times, or a cache moved on its
    own, is still done; an edit in the copy still makes the steps reading it stale."""
    import shutil

    root = pipe["cfg_path"].parent
    (root / "weights").mkdir()  # a local model folder (relative in the config), fingerprinted by content
    (root / "weights" / "model.safetensors").write_bytes(b"\0" * 64)
    local = {"model.name_or_path": "weights"}
    pipe["run"](overrides=local)
    copy = tmp_path_factory.mktemp("moved") / "study"
    copy.mkdir()
    for name in ("config.yaml", "data", "cache", "weights"):
        (shutil.copytree if (root / name).is_dir() else shutil.copy2)(root / name, copy / name)
    cfg = load_config(copy / "config.yaml", local)
    assert cfg.model.name_or_path == str(copy / "weights")
    assert {r["step"]: r["status"] for r in st.pipeline_status(cfg)} == dict.fromkeys(STEPS, "done")
    # only the cache moves; the config names it and the data where they are now
    alone = tmp_path_factory.mktemp("cache_alone") / "cache"
    shutil.move(str(copy / "cache"), alone)
    cfg = load_config(copy / "config.yaml", {**local, "cache_dir": str(alone)})
    rows = rows_by_step(cfg)
    assert all(r["status"] == "done" for r in rows.values()), rows
    bump(next((copy / "data").glob("checkpoint_*.json")))
    rows = rows_by_step(cfg)
    assert (rows["audit"]["status"], rows["audit"]["reason"]) == ("stale", "input changed: checkpoints, responses")  # one folder holds both
    # new weights in the local model folder are a changed input; a hub id instead is a change of config
    (copy / "weights" / "model.safetensors").write_bytes(b"\1" * 65)
    rows = rows_by_step(cfg)
    assert (rows["pathways"]["status"], rows["pathways"]["reason"]) == ("stale", "input changed: model")
    rows = rows_by_step(load_config(copy / "config.yaml", {"cache_dir": str(alone), "model.name_or_path": "other/model"}))
    assert "config changed: model" in rows["pathways"]["reason"]
