"""The audit on a hand-built directory with every problem kind, counts checked by hand;
run selection on generated mixed runs; the command line."""

from __future__ import annotations

import datetime as dt
import json
import os

import pandas as pd
import pytest

from engine.audit.run import run_audit
from engine.config import load_config
from engine.experiment_data import generate
from helpers import run_cli

CONDS = ["safe_baseline", "safe_with_safe_patch", "safe_with_risky_patch", "risky_baseline",
         "risky_with_safe_patch", "risky_with_risky_patch"]


def rec(feature, cond, trial, response="1\nBet $10", bet=10):
    return {"feature": feature, "condition": cond, "trial": trial, "response": response,
            "parsed": {"action": "bet" if bet else "stop", "bet": bet, "valid": True, "response": response}}


def flat(feature, causal, d, cls="neutral", **kw):
    layer, fid = feature[1:].split("-")
    return {"safe_stop_delta": 0.0, "risky_stop_delta": 0.0, "safe_bet_delta": 0.0, "risky_bet_delta": 0.0,
            "safe_p_value": 0.5, "risky_p_value": 0.5, "classified_as": cls, "is_causal": causal,
            "feature": feature, "layer": int(layer), "feature_id": int(fid), "cohen_d": d, **kw}


@pytest.fixture(scope="module")
def hand_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("exp")
    rd = root / "response_logs"
    rd.mkdir()
    head = {"gpu_id": 0, "process_id": "gpu0_L1_2", "layer_range": "L1-L2", "n_trials_per_condition": 3}
    # C1 (older) says L1-10 is causal; C2 (newer, cumulative) says it is not: newest wins
    (root / "checkpoint_L1_2_gpu0_L1_2_20251014_100000.json").write_text(json.dumps(
        {**head, "timestamp": "20251014_100000", "results": [flat("L1-10", True, 0.5, "risky"), flat("L1-11", False, 0.2)]}))
    c2 = [flat("L1-10", False, 0.6), flat("L1-11", False, 0.2), flat("L2-20", True, -0.9, "safe"),
          flat("L2-21", True, 0.4, "risky", layer="2"),          # mistyped layer: converted
          flat("L2-22", True, 0.3, "risky", layer=3),            # layer disagrees with the name: kept as L2-22
          {**flat("L2-23", True, 0.3, "risky"), "feature": "L2_23"},  # malformed name: dropped
          flat("L2-40", True, 0.7, "risky")]                     # no trials in the logs
    (root / "checkpoint_L1_2_gpu0_L1_2_20251014_110000.json").write_text(json.dumps(
        {**head, "timestamp": "20251014_110000", "results": c2}))
    plan = root / "comprehensive_patching_checkpoint_a.json"  # the plan's name and schema, no timestamp
    plan.write_text(json.dumps({"results": [{"feature": "L2-30", "layer": 2, "feature_id": 30, "is_causal": True,
                                             "cohen_d": 1.2}]}))
    t = dt.datetime(2025, 10, 14, 12, 30).timestamp()
    os.utime(plan, (t, t))

    r1 = [rec("L1-10", c, k, "2\nI stop", 0) if c == "safe_baseline" else rec("L1-10", c, k) for c in CONDS for k in range(3)]
    (rd / "responses_L1_2_gpu0_L1_2_20251014_100000.json").write_text(json.dumps(r1, indent=2))
    r2 = [rec("L1-10", "safe_baseline", k, "1\nBet $10 (restart)") for k in range(3)]  # 3 restart duplicates
    r2 += [rec("L1-11", c, k) for c in CONDS for k in range(3)]
    r2[3]["response"] = ""                                          # empty response: kept
    r2[4]["parsed"] = dict(r2[4]["parsed"], bet=999)                # absurd bet: kept
    r2 += [rec("L2-20", c, k) for c in CONDS[:5] for k in range(3)]  # no risky_with_risky_patch
    l21 = [rec("L2-21", c, k) for c in CONDS for k in range(3) if not (c == "safe_baseline" and k == 2)]
    l21[8]["trial"] = str(l21[8]["trial"])                           # "trial": "2": converted
    r2 += l21
    r2 += [rec("L2-99", "safe_baseline", 0)]                         # orphan: no checkpoint record
    r2 += [rec("L2-20", "safe_amplification", 0), rec("L2_5", "safe_baseline", 0), 42,
           {k: v for k, v in rec("L2-20", "safe_baseline", 0).items() if k != "response"}]
    assert len(r2) == 58
    (rd / "responses_L1_2_gpu0_L1_2_20251014_110000.json").write_text(json.dumps(r2, indent=2))
    trunc = json.dumps([rec("L2-30", "safe_baseline", k) for k in range(3)], indent=2)
    (rd / "responses_L2_2_x_20251014_120000.json").write_text(trunc[: trunc.rindex('"trial"')])
    (rd / "responses_L2_2_x_20251014_120001.json").write_bytes(b"")
    (rd / "responses_L2_2_x_20251014_120002.json").write_text("hello")
    (rd / "responses_L2_2_x_20251014_120003.json").write_bytes(
        b"\xef\xbb\xbf" + json.dumps([rec("L2-30", "safe_baseline", 2)]).encode())
    (rd / "responses_L2_2_x_20251014_120004.json").write_text(
        json.dumps([rec("L2-30", "risky_baseline", 0, bet=7777)]).replace("7777", "NaN"))
    return root


@pytest.fixture(scope="module")
def audited(hand_dir, tmp_path_factory):
    cfg = load_config(None, {"cache_dir": str(tmp_path_factory.mktemp("cache")), "audit.workers": 1})
    s = run_audit(cfg, checkpoints_dir=str(hand_dir), responses_dir=str(hand_dir / "response_logs"), show_progress=False)
    return cfg, s


def test_counts_by_hand(audited):
    _, s = audited
    # records: 18 + 58 + 2 (truncated) + 0 + 0 + 1 (BOM) + 1 (NaN) = 80; 4 invalid; 3 duplicates
    assert s["records_read"] == {"checkpoint": 10, "responses": 80}
    assert s["invalid_records"] == 4 and s["duplicates"] == 3
    assert s["valid_unique_trials"] == s["total_trials"] == 73
    assert s["files_read"] == {"checkpoints": 3, "responses": 7}
    assert s["checkpoint_records"] == {"read": 10, "valid": 9, "unique": 7, "superseded": 2,
                                       "schemas": {"run_a_flat": 8, "plan": 1}}
    # newest record per feature: L1-10 is no longer causal; L2-20, L2-21, L2-22, L2-40, L2-30 are
    assert s["causal_by_layer"] == {"2": 5} and s["total_causal_features"] == 5
    assert s["total_response_features"] == 6 and s["joinable_features"] == 3 and s["join_rate_percent"] == 60.0
    assert s["problem_counts"] == {
        "absurd_bet": 2, "bom": 1, "checkpoint_without_trials": 2, "duplicate_trials": 1, "empty_file": 1,
        "empty_response": 1, "feature_without_checkpoint": 1, "layer_mismatch": 1, "malformed_feature": 2,
        "missing_conditions": 3, "missing_field": 1, "mistyped_field": 2, "nan_literal": 1, "no_timestamp": 1,
        "not_json": 1, "record_not_object": 1, "too_few_trials": 3, "truncated_file": 1, "unknown_condition": 1}
    assert s["validated"] is False and s["audit_results"]["validated"] is False
    # valid safe_baseline records, duplicates included: 3 + (3 + 3 + 3 + 2 + 1) + 2 + 1
    assert s["conditions_found"]["safe_amplification"] == 1 and s["conditions_found"]["safe_baseline"] == 18
    assert len(s["runs_found"]) == 1


def test_tables(audited):
    cfg, _ = audited
    t = pd.read_parquet(cfg.cache / "audit/trials.parquet")
    assert len(t) == 73
    sb = t[(t.feature == "L1-10") & (t.condition == "safe_baseline")].sort_values("trial")
    assert sb.response.tolist() == ["1\nBet $10 (restart)"] * 3  # the newer copy won
    assert sb.source_file.unique().tolist() == ["responses_L1_2_gpu0_L1_2_20251014_110000.json"]
    assert set(sb.action) == {"bet"} and set(sb.bet) == {10}
    empty = t[t.response == ""]
    assert len(empty) == 1 and empty.action.iloc[0] == "invalid" and not empty.valid.iloc[0]
    assert t[(t.feature == "L2-30")].shape[0] == 4
    assert {"prompt", "patch", "study_action", "study_bet", "study_valid", "study_reason", "parse_rule", "run_id",
            "file_timestamp", "layer", "feature_id"} <= set(t.columns)
    row = t[(t.feature == "L2-21") & (t.condition == "risky_baseline") & (t.trial == 2)]
    assert len(row) == 1 and row.prompt.iloc[0] == "risky" and row.patch.iloc[0] == "none"
    fc = pd.read_parquet(cfg.cache / "audit/feature_conditions.parquet")
    l10 = fc[(fc.feature == "L1-10") & (fc.condition == "safe_baseline")].iloc[0]
    assert (l10.n_trials, l10.n_stop, l10.stop_rate, l10.mean_bet) == (3, 0, 0.0, 10.0)
    fe = pd.read_parquet(cfg.cache / "audit/feature_effects.parquet").set_index("feature")
    assert sorted(fe.index) == ["L1-10", "L1-11", "L2-20", "L2-21", "L2-22", "L2-30", "L2-40", "L2-99"]
    assert fe.loc["L2-22", "layer"] == 2 and fe.loc["L2-22", "checkpoint_verdict"]  # kept under its name
    assert not fe.loc["L1-10", "checkpoint_verdict"] and fe.loc["L2-20", "checkpoint_direction"] == "safe"
    assert fe.loc["L2-40", "n_trials"] == 0 and not fe.loc["L2-40", "has_trials"]
    assert not fe.loc["L2-99", "has_checkpoint"]
    p = pd.read_parquet(cfg.cache / "audit/problems.parquet")
    lm = p[p.kind == "layer_mismatch"].iloc[0]
    assert (lm.file, lm.record, lm.field) == ("checkpoint_L1_2_gpu0_L1_2_20251014_110000.json", 4, "layer")
    tr = p[p.kind == "truncated_file"].iloc[0]
    assert tr.file == "responses_L2_2_x_20251014_120000.json" and tr.record == 2


def test_run_selection_on_mixed_runs(tmp_path):
    d = tmp_path / "exp"
    summary = generate(d, "tiny", seed=1, runs="A,B")
    cfg = load_config(None, {"cache_dir": str(tmp_path / "c"), "audit.workers": 1})
    both = run_audit(cfg, checkpoints_dir=str(d), responses_dir=str(d / "response_logs"), show_progress=False)
    assert both["problem_counts"].get("mixed_runs") == 1 and len(both["runs_found"]) == 2
    e = summary["expected"]
    assert (both["valid_unique_trials"], both["duplicates"]) == (e["valid_unique_trials"], e["duplicates"])
    run_a = both["runs_found"][0]["run_id"]
    only_a = run_audit(cfg, checkpoints_dir=str(d), responses_dir=str(d / "response_logs"), run="1", show_progress=False)
    assert "mixed_runs" not in only_a["problem_counts"] and only_a["run_selected"] == run_a
    t = pd.read_parquet(cfg.cache / "audit/trials.parquet")
    assert t.run_id.unique().tolist() == [run_a] and t.file_timestamp.str.startswith("202510").all()
    assert len(t) == 4 * 3 * 6 * 5  # Run A: 3 layers x 4 features, 6 conditions x 5 trials, no duplicates left
    b = run_audit(cfg, checkpoints_dir=str(d), responses_dir=str(d / "response_logs"), since="20251101",
                  show_progress=False)
    assert b["checkpoint_records"]["schemas"] == {"run_b_nested": b["checkpoint_records"]["valid"]}
    with pytest.raises(Exception, match="no run"):
        run_audit(cfg, checkpoints_dir=str(d), responses_dir=str(d / "response_logs"), run="19990101")


def test_cli_and_errors(hand_dir, tmp_path):
    cache = tmp_path / "cache"
    r = run_cli("audit", "--checkpoints", str(hand_dir), "--responses", str(hand_dir / "response_logs"),
                "--cache", str(cache), "--set", "audit.workers=2")
    assert r.returncode == 0, r.stderr
    assert str(cache / "audit/data_validation.json") in r.stdout
    v = json.loads((cache / "audit/data_validation.json").read_text())
    assert v["schema_version"] == 1 and v["valid_unique_trials"] == 73
    m = json.loads((cache / "manifest.json").read_text())["steps"]["audit"]
    assert m["status"] == "done" and set(m["inputs"]) == {"checkpoints", "responses"}
    bad = run_cli("audit", "--checkpoints", str(tmp_path / "nope"), "--cache", str(cache))
    assert bad.returncode == 2 and bad.stderr.startswith("error: checkpoint folder not found")
