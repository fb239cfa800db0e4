"""The generator: real layouts, cumulative checkpoints, restart duplicates, the fixture
model's dimensions, and every defect found by the audit exactly as EXPERIMENT.json says."""

from __future__ import annotations

import json
import re

import orjson

from engine.audit.run import run_audit
from engine.config import load_config
from engine.experiment_data import generate
from engine.schema import CHECKPOINT_NAME_RE, RESPONSES_NAME_RE


def test_tiny_layout_and_cumulative_checkpoints(tmp_path):
    s = generate(tmp_path / "d", "tiny", seed=0, runs="A,B")
    d = tmp_path / "d"
    cks = sorted(p.name for p in d.glob("checkpoint_*.json"))
    logs = sorted(p.name for p in (d / "response_logs").glob("*.json"))
    assert all(CHECKPOINT_NAME_RE.match(n) for n in cks) and all(RESPONSES_NAME_RE.match(n) for n in logs)
    assert len(cks) == s["checkpoint_files"] and len(logs) == s["response_files"]
    # Run A's process ids hold underscores (gpu4_L1_2); Run B's are L{layer}
    assert any(CHECKPOINT_NAME_RE.match(n).group(3).startswith("gpu") for n in cks)
    # a process's checkpoints are cumulative: each holds all earlier features, in order
    stem = "checkpoint_L1_1_L1_"
    files = sorted(n for n in cks if n.startswith(stem))
    feats = [[r["feature"] for r in orjson.loads((d / n).read_bytes())["results"]] for n in files]
    assert all(a == b[: len(a)] for a, b in zip(feats, feats[1:])) and len(feats[-1]) == 4
    body = orjson.loads((d / files[-1]).read_bytes())
    assert body["n_trials_per_condition"] == 5 and body["features_tested"] == 4
    assert set(body["results"][0]["causality"]) >= {"is_causal_safe", "is_causal_risky", "interpretation"}
    # logs are not cumulative: each trial key appears once per run attempt; Run A's restart duplicates it
    rec = orjson.loads((d / "response_logs" / logs[0]).read_bytes())[0]
    assert set(rec) == {"feature", "condition", "trial", "response", "parsed"}
    assert rec["response"][0] in "123STI" and rec["parsed"]["response"] == rec["response"]
    # one Run A process crashed after its first save (3 features) and re-ran from scratch:
    # 3 features x 6 conditions x 5 trials written twice
    assert s["expected"]["duplicates"] == 3 * 6 * 5
    assert s["expected"]["records_read"] == s["expected"]["valid_unique_trials"] + 90
    # Run A ids are below 4096 (raw residual dims), both runs use layers 1..3
    names = {r["feature"] for n in files for r in orjson.loads((d / n).read_bytes())["results"]}
    assert all(re.match(r"L1-\d+$", n) for n in names)


def test_config_draws_from_the_fixture_model(fixture_dir, tmp_path):
    s = generate(tmp_path / "d", "small", seed=2, runs="A,B", config=fixture_dir / "config.yaml")
    assert s["layers"] == [1, 2, 3, 4, 5] and s["d_sae"] == 512
    for p in (tmp_path / "d").glob("checkpoint_*.json"):
        for r in orjson.loads(p.read_bytes())["results"]:
            assert 1 <= r["layer"] <= 5 and 0 <= r["feature_id"] < 512


def test_defects_are_all_found(tmp_path):
    d = tmp_path / "d"
    s = generate(d, "small", seed=0, runs="A,B", defects=True)
    e = s["expected"]
    cfg = load_config(None, {"cache_dir": str(tmp_path / "c"), "audit.workers": 1})
    # responses_dir left out: <checkpoints_dir>/response_logs is found (the study's layout)
    v = run_audit(cfg, checkpoints_dir=str(d), responses_dir=None, show_progress=False)
    assert v["inputs"]["responses_dir"] == str(d / "response_logs")
    assert v["records_read"]["responses"] == e["records_read"]
    assert v["invalid_records"] == e["invalid_records"]
    assert v["valid_unique_trials"] == e["valid_unique_trials"] and v["duplicates"] == e["duplicates"]
    assert v["total_response_features"] == e["response_features"]
    assert v["features"]["in_checkpoints"] == e["checkpoint_features"]
    got = {k: n for k, n in v["problem_counts"].items() if k != "duplicate_trials"}
    assert got == e["problem_counts"]
    kinds = {x["kind"] for x in s["defect_list"]}
    assert {"truncated_file", "object_not_array", "bom", "invalid_utf8", "empty_file", "not_json"} <= kinds
    assert json.loads((d / "EXPERIMENT.json").read_text())["expected"] == e
