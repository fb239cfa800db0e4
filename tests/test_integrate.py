"""Step 5 on a hand-built cache whose joins, deltas and hub counts are worked out by hand."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from engine.config import load_config
from engine.errors import UserError
from engine.schema import PATHWAY_SCHEMA_VERSION, atomic_write_json, atomic_write_parquet, with_schema

SELECTION = [
    {"feature": "L3-10", "layer": 3, "feature_id": 10, "direction": "safe", "cohen_d": 0.4,
     "checkpoint_verdict": True, "recomputed_verdict": True, "n_trials": 12, "source_file": "checkpoint_a.json"},
    {"feature": "L3-11", "layer": 3, "feature_id": 11, "direction": "risky", "cohen_d": -1.5,
     "checkpoint_verdict": True, "recomputed_verdict": False, "n_trials": 0, "source_file": "checkpoint_a.json"},
    {"feature": "L4-5", "layer": 4, "feature_id": 5, "direction": "risky", "cohen_d": 0.9,
     "checkpoint_verdict": True, "recomputed_verdict": None, "n_trials": 0, "source_file": "checkpoint_b.json"},
]

# (target, prompt) -> upstream nodes (id, attribution, validated) and edges (source, target, weight)
PATHWAYS = {
    ("L3-10", "safe"): ([("L1-7", 0.5, True), ("L2-9", -0.2, False), ("L2-4", 0.1, None)],
                       [("L1-7", "L2-9", 0.2), ("L2-9", "L3-10", -0.2), ("L1-7", "L3-10", 0.3)]),
    ("L3-10", "risky"): ([("L1-7", 0.3, True)], [("L1-7", "L3-10", 0.3)]),
    ("L3-11", "safe"): ([("L1-7", 0.4, True), ("L2-4", -0.6, True)], [("L1-7", "L2-4", 0.1), ("L2-4", "L3-11", -0.6)]),
    ("L4-5", "safe"): ([("L3-10", 0.9, True), ("L1-7", 0.05, False)], [("L3-10", "L4-5", 0.9), ("L1-7", "L4-5", 0.05)]),
}


def node(fid: str, attribution, validated, is_target=False):
    layer, idx = fid[1:].split("-")
    return {"id": fid, "layer": int(layer), "feature_id": int(idx), "is_target": is_target, "positions": [10],
            "position_activations": [1.0], "position_attributions": [attribution], "activation": 1.0,
            "attribution": attribution, "replay_delta": None if attribution is None else -attribution,
            "replay_delta_activation": None, "patch_delta": None, "validated": validated}


def write_pathways(cache):
    from engine.pathways.index import rebuild

    targets = sorted({t for t, _ in PATHWAYS})
    for t in targets:
        prompts = {}
        for (tt, p), (ups, edges) in PATHWAYS.items():
            if tt != t:
                continue
            xs = [a for _, a, _ in ups]
            prompts[p] = {"text": p, "n_tokens": 11, "tokens": [], "target_position": 10,
                          "target_pre_activation": 1.0, "target_activation": 1.0,
                          "nodes": [node(t, None, None, True)] + [node(i, a, v) for i, a, v in ups],
                          "edges": [{"source": s, "target": d, "weight": w} for s, d, w in edges],
                          "agreement": {"pearson_r": 0.9 if len(xs) > 1 else None, "sign_agreement": 1.0, "n": len(xs)},
                          "coverage": {"attribution_total": sum(map(abs, xs)), "attribution_in_graph": sum(map(abs, xs))}}
        layer, idx = t[1:].split("-")
        atomic_write_json(cache / "pathways" / f"{t}.json", with_schema({
            "feature": t, "layer": int(layer), "feature_id": int(idx),
            "metadata": {"method_hash": "h", "config_hash": "c"}, "prompts": prompts}, version=PATHWAY_SCHEMA_VERSION))
    rebuild(cache)  # the pathway step's own index and node/edge tables


def write_trials(cache):
    rows = []
    for cond, prompt, patch, outcomes in [
        ("safe_baseline", "safe", "none", ["stop", 10, 10, 10]),
        ("safe_with_safe_patch", "safe", "safe", ["stop", "stop", "stop", 10, "invalid"]),
        ("risky_baseline", "risky", "none", [20, 40, "stop", "stop"]),
        ("risky_with_risky_patch", "risky", "risky", [100, 50, 50, "stop"]),
    ]:
        for t, o in enumerate(outcomes):
            rows.append({"feature": "L3-10", "layer": 3, "feature_id": 10, "condition": cond, "prompt": prompt,
                         "patch": patch, "trial": t, "response": "x",
                         "action": "stop" if o == "stop" else ("invalid" if o == "invalid" else "bet"),
                         "bet": 0 if isinstance(o, str) else o, "valid": o != "invalid"})
    atomic_write_parquet(cache / "audit" / "trials.parquet", pd.DataFrame(rows))


def write_tokens(cache):
    atomic_write_json(cache / "tokens" / "L3-10.json", with_schema({
        "feature": "L3-10", "layer": 3, "feature_id": 10,
        "logit_lens": {
            "promoted": [{"token_id": 14549, "token": "␣Stop", "text": " Stop", "value": 0.9},
                         {"token_id": 17, "token": "2", "text": "2", "value": 0.5}],
            "suppressed": [{"token_id": 16, "token": "1", "text": "1", "value": -0.7}],
            "decision_tokens": [],
            "decision_summary": [{"prompt": "safe", "context": "choice", "intervention": "ablate",
                                  "delta_bet_vs_stop_logodds": -0.25}],
        },
        "prompt_activations": {},
        "top_activating": [{"rank": 1, "token": "␣stop", "activation": 2.5}],
        "activation_stats": {"density": 0.125},
        "behavioural_words": [
            {"term": "stop", "log_odds": 1.2, "z": 3.0, "q": 0.01, "significant": True,
             "patched_condition": "safe_with_safe_patch", "tokenization": "word"},
            {"term": "$50", "log_odds": -0.3, "z": -0.5, "q": 0.9, "significant": False,
             "patched_condition": "risky_with_risky_patch", "tokenization": "word"}],
        "behavioural_summary": [{"n_significant": 1}, {"n_significant": 0}],
    }))


@pytest.fixture
def full_cache(tmp_path):
    cache = tmp_path / "cache"
    atomic_write_json(cache / "features" / "causal_features.json",
                      with_schema({"verdict": "checkpoint", "top_n": 50, "features": SELECTION}))
    atomic_write_parquet(cache / "audit" / "feature_effects.parquet",
                         pd.DataFrame({"feature": ["L3-10", "L4-5"], "layer": [3, 4], "safe_effect": [0.5, 0.0],
                                       "safe_q": [0.01, 0.9]}))
    write_trials(cache)
    write_pathways(cache)
    write_tokens(cache)
    return cache


def test_integrate_joins_every_view(full_cache):
    from engine.integrate import run_integrate

    cfg = load_config(None, {"cache_dir": str(full_cache)})
    res = run_integrate(cfg)
    doc = json.loads((full_cache / "integrated" / "features.json").read_text())
    recs = {r["feature"]: r for r in doc["features"]}
    assert [r["feature"] for r in doc["features"]] == ["L3-11", "L4-5", "L3-10"]  # strongest |d| first
    a = recs["L3-10"]
    # behaviour from the trials (valid only): safe baseline stop 1/4, safe patch stop 3/4 (the invalid trial dropped)
    assert a["stop_rate__safe_baseline"] == 0.25 and a["stop_rate__safe_with_safe_patch"] == 0.75
    assert a["delta_stop__safe_with_safe_patch"] == pytest.approx(0.5)
    assert a["n__safe_with_safe_patch"] == 4
    # risky: baseline bets 20, 40 (mean 30), patch bets 100, 50, 50 (mean 66.67); stop 2/4 vs 1/4
    assert a["delta_bet__risky_with_risky_patch"] == pytest.approx(200 / 3 - 30)
    assert a["delta_stop__risky_with_risky_patch"] == pytest.approx(-0.25)
    assert a["audit_safe_effect"] == 0.5 and a["audit_safe_q"] == 0.01 and "audit_layer" not in a
    assert recs["L3-11"].get("audit_safe_effect") is None and recs["L3-11"].get("stop_rate__safe_baseline") is None
    # pathway summary: L3-10 on safe has 3 upstream nodes in 2 layers, 2 replayed of which 1 validated
    assert a["pathway_safe_n_nodes"] == 3 and a["pathway_safe_n_layers"] == 2
    assert a["pathway_safe_validated_fraction"] == 0.5 and a["pathway_risky_n_nodes"] == 1
    assert a["pathway_top_upstream"] == ["L1-7", "L2-9", "L2-4"]  # |attr| summed over prompts: .8, .2, .1
    assert recs["L3-11"]["pathway_top_upstream"] == ["L2-4", "L1-7"]
    # token views
    assert a["tokens_promoted"] == ["␣Stop", "2"] and a["tokens_suppressed"] == ["1"]
    assert a["tokens_ablate_safe_delta_bet_vs_stop"] == -0.25 and a["tokens_top_activating"] == "␣stop"
    assert a["tokens_n_significant_words"] == 1
    assert a["tokens_top_words"] == ["+stop (safe_with_safe_patch, word)"]
    assert a["has_tokens"] and not recs["L4-5"]["has_tokens"]
    frame = pd.read_parquet(full_cache / "integrated" / "features.parquet")
    assert len(frame) == 3 and frame.set_index("feature").loc["L3-10", "delta_stop__safe_with_safe_patch"] == 0.5
    assert res["n_features"] == 3


def test_union_graph_hubs_and_edges(full_cache):
    from engine.integrate import run_integrate

    run_integrate(load_config(None, {"cache_dir": str(full_cache)}), figures=False)
    u = json.loads((full_cache / "integrated" / "union_graph.json").read_text())
    # L1-7 feeds all three targets (|attr| .5 + .3 + .4 + .05), L2-4 two (.1 + .6), L3-10 one (.9), L2-9 one (.2)
    assert [(h["id"], h["n_targets"]) for h in u["hubs"]] == [("L1-7", 3), ("L2-4", 2), ("L3-10", 1), ("L2-9", 1)]
    assert u["hubs"][0]["abs_attribution"] == pytest.approx(1.25)
    assert u["hubs"][0]["targets"] == ["L3-10", "L3-11", "L4-5"]
    nodes = {n["id"]: n for n in u["nodes"]}
    assert nodes["L3-10"]["is_selected"] and nodes["L3-10"]["is_target"] and nodes["L3-10"]["direction"] == "safe"
    assert nodes["L1-7"]["n_replayed"] == 4 and nodes["L1-7"]["n_validated"] == 3
    assert set(nodes) == {"L1-7", "L2-4", "L2-9", "L3-10", "L3-11", "L4-5"} and u["n_shared"] == 2
    edges = {(e["source"], e["target"]): e for e in u["edges"]}
    assert len(edges) == 7
    e = edges[("L1-7", "L3-10")]  # in both prompts' graphs of one target
    assert (e["n_pathways"], e["n_targets"], e["weight_sum"]) == (2, 1, pytest.approx(0.6))
    assert edges[("L2-4", "L3-11")]["weight_sum"] == pytest.approx(-0.6)
    assert edges[("L2-4", "L3-11")]["abs_weight_sum"] == pytest.approx(0.6)


def test_report_and_figures(full_cache):
    import matplotlib.image as mpimg

    from engine.integrate import run_integrate

    run_integrate(load_config(None, {"cache_dir": str(full_cache)}))
    report = (full_cache / "integrated" / "report.md").read_text()
    figs = full_cache / "integrated" / "figures"
    for name in ("layer_counts", "effect_sizes", "hubs", "pathway_agreement"):
        png = figs / f"{name}.png"
        img = mpimg.imread(png)
        assert img.shape[0] > 100 and img.shape[1] > 100 and img.std() > 0  # a real picture, not blank
        assert f"](figures/{name}.png)" in report and f"(figures/{name}.html)" in report
        html = (figs / f"{name}.html").read_text()
        assert 'src="plotly.min.js"' in html and "Plotly.newPlot" in html
    assert (figs / "plotly.min.js").stat().st_size > 1_000_000  # offline: plotly.js sits beside the pages
    assert "| selected causal features | 3 (risky 2, safe 1) |" in report
    assert "| layers with selected features | 2 (3–4) |" in report
    assert "| mean Δ stop rate, safe features, safe patch, safe prompt | +0.500 (n=1) |" in report
    assert "| L1-7 | 3 | 1.25 | no |" in report
    for table in [b for b in report.split("\n\n") if b.startswith("| ")]:  # every row has the header's columns
        widths = {len(line.replace("\\|", "").split("|")) for line in table.splitlines()}
        assert len(widths) == 1, table
    assert "| pathways computed | 3 of 3 |" in report
    assert "Missing inputs" not in report


def test_integrate_with_only_a_selection_says_what_is_missing(tmp_path):
    from engine.integrate import run_integrate

    cache = tmp_path / "cache"
    with pytest.raises(UserError, match="causal feature selection not found.*python -m engine select"):
        run_integrate(load_config(None, {"cache_dir": str(cache)}))
    atomic_write_json(cache / "features" / "causal_features.json", with_schema({"features": SELECTION[:1]}))
    res = run_integrate(load_config(None, {"cache_dir": str(cache)}))
    report = (cache / "integrated" / "report.md").read_text()
    assert "python -m engine pathways" in report and "python -m engine audit" in report
    assert any("no pathway index" in n for n in res["notes"])
    u = json.loads((cache / "integrated" / "union_graph.json").read_text())
    assert u["n_nodes"] == 0 and u["hubs"] == []
    assert (cache / "integrated" / "figures" / "layer_counts.png").is_file()
