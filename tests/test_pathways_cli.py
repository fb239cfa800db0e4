"""`python -m engine pathways`: selection input, files written, kill-and-resume, sharding, errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from engine.schema import CAUSAL_FEATURES, PATHWAY_SCHEMA_VERSION, atomic_write_json, with_schema
from helpers import ROOT, run_cli

TARGETS = ["L2-3", "L3-17", "L3-40", "L4-7", "L4-100", "L5-10", "L5-200", "L5-300"]


def write_selection(cache, features=TARGETS):
    feats = []
    for f in features:
        layer, fid = f[1:].split("-")
        feats.append({"feature": f, "layer": int(layer), "feature_id": int(fid), "cohen_d": 0.5,
                      "direction": "risky", "checkpoint_verdict": True, "recomputed_verdict": None,
                      "n_trials": 180, "trial_counts": {}, "source_file": "hand-made"})
    atomic_write_json(cache / CAUSAL_FEATURES, with_schema({"verdict": "checkpoint", "top_n": 50,
                                                            "per_layer_counts": {}, "n_features": len(feats),
                                                            "features": feats}))


def pathways(cfg, cache, *extra):
    return run_cli("pathways", "--config", str(cfg), "--cache", str(cache), "--set", "pathways.n_replay=6",
                   "--set", "pathways.top_k_per_layer=5", *extra, env={"OMP_NUM_THREADS": "1"})


def load_results(cache):
    out = {}
    for f in TARGETS:
        out[f] = json.loads((cache / "pathways" / f"{f}.json").read_text())
    return out


def assert_same(a: dict, b: dict, rel=1e-4):
    for f in TARGETS:
        for prompt in ("safe", "risky"):
            ra, rb = a[f]["prompts"][prompt], b[f]["prompts"][prompt]
            assert [n["id"] for n in ra["nodes"]] == [n["id"] for n in rb["nodes"]], (f, prompt)
            for na, nb in zip(ra["nodes"], rb["nodes"]):
                for k in ("attribution", "replay_delta", "activation"):
                    if na[k] is None:
                        assert nb[k] is None
                    else:
                        assert nb[k] == pytest.approx(na[k], rel=rel, abs=1e-7), (f, prompt, na["id"], k)
                assert na["validated"] == nb["validated"]
            assert {(e["source"], e["target"]) for e in ra["edges"]} == {(e["source"], e["target"]) for e in rb["edges"]}


@pytest.fixture(scope="module")
def reference(fixture_dir, tmp_path_factory):
    cache = tmp_path_factory.mktemp("ref")
    write_selection(cache)
    r = pathways(fixture_dir / "config.yaml", cache, "--chunk-size", "3")
    assert r.returncode == 0, r.stderr
    return cache, r


def test_run_from_selection_writes_every_artifact(reference):
    cache, r = reference
    assert f"wrote {cache / 'pathways'}" in r.stdout and "8 computed" in r.stdout
    index = json.loads((cache / "pathways" / "index.json").read_text())
    assert index["schema_version"] == 1 and index["n_targets"] == 8
    assert [t["feature"] for t in index["targets"]] == sorted(TARGETS, key=lambda f: (int(f[1:].split("-")[0]), int(f.split("-")[1])))
    res = load_results(cache)
    edges = pd.read_parquet(cache / "pathways" / "edges.parquet")
    nodes = pd.read_parquet(cache / "pathways" / "nodes.parquet")
    # the tables hold features and the edges between them; SAE-error and bias nodes stay in the JSON
    feats = {(f, p): {n["id"] for n in res[f]["prompts"][p]["nodes"] if n["kind"] == "feature"}
             for f in TARGETS for p in ("safe", "risky")}
    n_edges = sum(1 for f in TARGETS for p in ("safe", "risky") for e in res[f]["prompts"][p]["edges"]
                  if e["source"] in feats[(f, p)])
    n_nodes = sum(len(v) for v in feats.values())
    assert len(edges) == n_edges and len(nodes) == n_nodes
    assert set(nodes.columns) >= {"linear_confirmed", "changes_target_activation", "out_share"}
    for f in TARGETS:
        rec = res[f]
        assert rec["schema_version"] == PATHWAY_SCHEMA_VERSION and rec["feature"] == f
        assert set(rec["metadata"]) >= {"model", "sae_source", "encode_convention", "config_hash", "timings_s"}
        for p, pr in rec["prompts"].items():
            assert set(pr) >= {"text", "target_pre_activation", "target_activation", "nodes", "edges", "agreement"}
            summary = next(t for t in index["targets"] if t["feature"] == f)["prompts"][p]
            replayed = [n for n in pr["nodes"] if n["validated"] is not None]
            n_feat = sum(1 for n in pr["nodes"] if n["kind"] == "feature" and not n["is_target"])
            assert summary["n_replayed"] == len(replayed) == min(6, n_feat)
            if replayed:
                assert summary["validated_fraction"] == pytest.approx(sum(n["validated"] for n in replayed) / len(replayed))
                assert summary["linear_confirmed_fraction"] == pytest.approx(
                    sum(n["linear_confirmed"] for n in replayed) / len(replayed))
                # validated = the linear estimate confirmed and the target's activation changed
                assert all(n["validated"] == (n["linear_confirmed"] and n["changes_target_activation"]) for n in replayed)
        # circuit-tracer export: the viewer's required keys, links between exported nodes
        for p in ("safe", "risky"):
            ct = json.loads((cache / "pathways" / "circuit_tracer" / f"{f}.{p}.json").read_text())
            assert set(ct) == {"metadata", "qParams", "nodes", "links"}
            ids = {n["node_id"] for n in ct["nodes"]}
            assert all(l["source"] in ids and l["target"] in ids for l in ct["links"])
            assert len(ct["links"]) == len(rec["prompts"][p]["edges"])
            assert sum(n["is_target_logit"] for n in ct["nodes"]) == 1
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["steps"]["pathways"]["status"] == "done"
    assert manifest["steps"]["pathways"]["summary"]["computed"] == 8


def test_rerun_skips_finished_targets(reference, fixture_dir, tmp_path):
    cache = tmp_path / "copy"
    shutil.copytree(reference[0], cache)
    before = {f: (cache / "pathways" / f"{f}.json").stat().st_mtime_ns for f in TARGETS}
    r = pathways(fixture_dir / "config.yaml", cache)
    assert r.returncode == 0 and "0 computed, 8 already done" in r.stdout
    assert before == {f: (cache / "pathways" / f"{f}.json").stat().st_mtime_ns for f in TARGETS}
    # a changed method parameter recomputes
    r = run_cli("pathways", "--config", str(fixture_dir / "config.yaml"), "--cache", str(cache),
                "--set", "pathways.n_replay=6", "--set", "pathways.top_k_per_layer=4", "--features", "L2-3",
                env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0 and "1 computed" in r.stdout


def test_killed_run_resumes_to_the_same_results(reference, fixture_dir, tmp_path):
    ref_cache, _ = reference
    cache = tmp_path / "killed"
    write_selection(cache)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ENGINE_NO_PROGRESS": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "engine", "pathways", "--config", str(fixture_dir / "config.yaml"), "--cache",
           str(cache), "--set", "pathways.n_replay=6", "--set", "pathways.top_k_per_layer=5", "--chunk-size", "1"]
    proc = subprocess.Popen(cmd, cwd=str(ROOT), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    folder = cache / "pathways"
    deadline = time.time() + 120
    done = []
    while time.time() < deadline:
        done = list(folder.glob("L*-*.json")) if folder.is_dir() else []
        if done or proc.poll() is not None:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 1 <= len(done) < len(TARGETS), "the kill must land mid-run"
    survived = list(folder.glob("L*-*.json"))
    for p in survived:  # whatever survived is complete, valid JSON
        json.loads(p.read_text())
    r = pathways(fixture_dir / "config.yaml", cache, "--chunk-size", "1")
    assert r.returncode == 0, r.stderr
    computed = int(r.stdout.split(" computed")[0].split()[-1])
    assert computed == len(TARGETS) - len(survived)
    assert_same(load_results(ref_cache), load_results(cache))
    assert json.loads((folder / "index.json").read_text())["n_targets"] == 8


def test_shards_are_disjoint_and_merge(reference, fixture_dir, tmp_path):
    ref_cache, _ = reference
    cache = tmp_path / "sharded"
    write_selection(cache)
    seen = []
    for i in range(2):
        r = pathways(fixture_dir / "config.yaml", cache, "--shard", f"{i}/2")
        assert r.returncode == 0, r.stderr
        seen.append(int(r.stdout.split(" computed")[0].split()[-1]))
    assert seen == [4, 4]
    assert_same(load_results(ref_cache), load_results(cache))
    index = json.loads((cache / "pathways" / "index.json").read_text())
    assert index["n_targets"] == 8
    steps = json.loads((cache / "manifest.json").read_text())["steps"]
    assert steps["pathways[0/2]"]["status"] == steps["pathways[1/2]"]["status"] == "done"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--features", "L9-1"], "feature L9-1: layer 9 is outside the model (layers 0..5)"),
        (["--features", "L2-9999"], "feature L2-9999: index 9999 is outside the SAE (0..511)"),
        (["--features", "L2_3"], "malformed feature id 'L2_3'"),
        (["--features", "L2-3", "--shard", "2/2"], "--shard 2/2: need 0 <= i < n"),
        ([], "feature selection not found"),
    ],
)
def test_bad_input_is_one_line(fixture_dir, tmp_path, args, message):
    r = run_cli("pathways", "--config", str(fixture_dir / "config.yaml"), "--cache", str(tmp_path), *args)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    if not args:
        assert "python -m engine select" in r.stderr


def test_empty_selection_is_nothing_to_do(fixture_dir, tmp_path):
    write_selection(tmp_path, features=[])
    r = run_cli("pathways", "--config", str(fixture_dir / "config.yaml"), "--cache", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "no targets to process" in r.stdout
    assert json.loads((tmp_path / "pathways" / "index.json").read_text())["n_targets"] == 0


@pytest.mark.gpu
def test_pathways_on_cuda_match_cpu(fixture_dir, tmp_path):
    """The same targets through the CLI on CUDA and on CPU (float32): same graphs and numbers."""
    cfg = fixture_dir / "config.yaml"
    runs = {}
    for dev in ("cpu", "cuda"):
        cache = tmp_path / dev
        write_selection(cache)
        r = pathways(cfg, cache, "--device", dev)
        assert r.returncode == 0, r.stderr
        runs[dev] = load_results(cache)
    for f in TARGETS:
        assert runs["cuda"][f]["metadata"]["device"].startswith("cuda")
        for prompt in ("safe", "risky"):
            c, g = runs["cpu"][f]["prompts"][prompt], runs["cuda"][f]["prompts"][prompt]
            assert g["target_pre_activation"] == pytest.approx(c["target_pre_activation"], rel=1e-3, abs=1e-4)
            # TF32 and kernel order differ: compare the strongest nodes and every shared node's numbers
            top = lambda rec: [n["id"] for n in sorted(rec["nodes"], key=lambda n: -abs(n["attribution"] or 0))[:5]]
            assert top(g) == top(c), (f, prompt)
            gn = {n["id"]: n for n in g["nodes"]}
            for n in c["nodes"]:
                if n["id"] in gn and not n["is_target"]:
                    assert gn[n["id"]]["attribution"] == pytest.approx(n["attribution"], rel=1e-2, abs=1e-4)
                    if n["replay_delta"] is not None and gn[n["id"]]["replay_delta"] is not None:
                        assert gn[n["id"]]["replay_delta"] == pytest.approx(n["replay_delta"], rel=1e-2, abs=1e-4)
