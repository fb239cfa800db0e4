"""Step 1 on hand-written audit tables: top N per layer by |cohen_d|, both verdicts."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from engine.config import load_config
from engine.errors import UserError
from engine.schema import AUDIT_FEATURE_CONDITIONS, AUDIT_FEATURE_EFFECTS, atomic_write_parquet
from engine.audit.outputs import mark_complete
from engine.select import select_features
from helpers import run_cli

ROWS = [  # feature, layer, id, cohen_d, checkpoint verdict/direction, recomputed verdict/direction, trials
    ("L3-1", 3, 1, 0.50, True, "risky", False, None, 180),
    ("L3-2", 3, 2, -0.90, True, "safe", True, "safe", 180),
    ("L3-3", 3, 3, 0.70, True, None, True, "mixed", 180),      # plan record: direction from our effects
    ("L3-4", 3, 4, float("nan"), True, "risky", True, "risky", 180),  # no cohen_d: cannot be ranked
    ("L5-9", 5, 9, 0.20, False, None, True, "risky", 174),
    ("L5-8", 5, 8, -0.20, True, "risky", False, None, 0),
]


@pytest.fixture
def cfg(tmp_path):
    cfg = load_config(None, {"cache_dir": str(tmp_path / "cache")})
    fe = pd.DataFrame(ROWS, columns=["feature", "layer", "feature_id", "cohen_d", "checkpoint_verdict",
                                     "checkpoint_direction", "recomputed_verdict", "recomputed_direction", "n_trials"])
    fe["checkpoint_file"] = "checkpoint_L3_5_p_20251014_000000.json"
    atomic_write_parquet(cfg.cache / AUDIT_FEATURE_EFFECTS, fe)
    fc = pd.DataFrame([(f, c, 30 if n else 0) for f, *_, n in ROWS for c in ("safe_baseline", "risky_baseline")],
                      columns=["feature", "condition", "n_trials"])
    atomic_write_parquet(cfg.cache / AUDIT_FEATURE_CONDITIONS, fc)
    mark_complete(cfg.cache / "audit")
    return cfg


def test_checkpoint_verdict_top_n(cfg):
    out = select_features(cfg, 2, "checkpoint")
    # layer 3 causal with a finite d: |-0.9| > 0.7 > 0.5 -> L3-2, L3-3; layer 5: L5-8 only (tie-free)
    assert [f["feature"] for f in out["features"]] == ["L3-2", "L3-3", "L5-8"]
    assert out["per_layer_counts"] == {"3": {"total": 2, "safe": 1, "risky": 0, "mixed": 1},
                                       "5": {"total": 1, "safe": 0, "risky": 1, "mixed": 0}}
    assert out["n_causal"] == 5 and out["n_without_cohen_d"] == 1
    f = out["features"][0]
    assert f == {"feature": "L3-2", "layer": 3, "feature_id": 2, "cohen_d": -0.9, "direction": "safe",
                 "checkpoint_verdict": True, "recomputed_verdict": True, "n_trials": 180,
                 "trial_counts": {"safe_baseline": 30, "risky_baseline": 30},
                 "source_file": "checkpoint_L3_5_p_20251014_000000.json"}
    assert out["features"][2]["trial_counts"] == {}
    assert [f["feature"] for f in select_features(cfg, 1, "checkpoint")["features"]] == ["L3-2", "L5-8"]


def test_recomputed_verdict(cfg):
    out = select_features(cfg, 50, "recomputed")
    assert [f["feature"] for f in out["features"]] == ["L3-2", "L3-3", "L5-9"]
    assert [f["direction"] for f in out["features"]] == ["safe", "mixed", "risky"]
    assert out["features"][2]["checkpoint_verdict"] is False


def test_cli_writes_json_and_parquet(cfg):
    r = run_cli("select", "--cache", str(cfg.cache), "--top-n", "1", "--verdict", "checkpoint")
    assert r.returncode == 0, r.stderr
    data = json.loads((cfg.cache / "features/causal_features.json").read_text())
    assert data["schema_version"] == 1 and data["verdict"] == "checkpoint" and data["top_n"] == 1
    assert list(data)[:4] == ["schema_version", "verdict", "top_n", "per_layer_counts"]
    t = pd.read_parquet(cfg.cache / "features/causal_features.parquet")
    assert t.feature.tolist() == ["L3-2", "L5-8"] and json.loads(t.trial_counts[0]) == {"risky_baseline": 30, "safe_baseline": 30}
    m = json.loads((cfg.cache / "manifest.json").read_text())["steps"]["select"]
    assert m["status"] == "done" and m["summary"]["n_features"] == 2


def test_select_before_audit_is_a_clear_error(tmp_path):
    cfg = load_config(None, {"cache_dir": str(tmp_path / "empty")})
    with pytest.raises(UserError, match="run `python -m engine audit` first"):
        select_features(cfg, 50, "checkpoint")
    r = run_cli("select", "--cache", str(tmp_path / "empty"))
    assert r.returncode == 2 and "engine audit" in r.stderr
