"""Every explorer page under Streamlit's AppTest on a synthetic cache: the numbers shown are
recomputed here from the cache files, selections are injected through session state, query
parameters pick the feature, and bad caches give messages with the fixing command."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
from scipy import stats

from explorer_fixtures import (app_test, cache_copy, metrics, no_exception, plotly_specs, read,  # noqa: F401
                               small_cache, texts)

PAGES = ["pages/1_Audit.py", "pages/2_Features.py", "pages/3_Pathway.py", "pages/4_Tokens.py",
         "pages/5_Live_prototype.py"]


def pathway_file(cache, feature):
    return read(cache / "pathways" / f"{feature}.json")


def kept_by_share(nodes, share):
    """Independent pruning: strongest |attribution| first until `share` of the features' total is
    reached; SAE-error and bias nodes (pathway schema 2) are always kept."""
    ups = sorted((n for n in nodes if not n["is_target"] and n.get("kind", "feature") == "feature"),
                 key=lambda n: -abs(n["attribution"]))
    total = sum(abs(n["attribution"]) for n in ups)
    kept, acc = [n["id"] for n in nodes if n.get("kind", "feature") != "feature"], 0.0
    for n in ups:
        if acc >= share * total:
            break
        kept.append(n["id"])
        acc += abs(n["attribution"])
    return kept


# ---------------------------------------------------------------------------
# Home
# ---------------------------------------------------------------------------


def test_home_shows_step_status_and_commands(monkeypatch, small_cache):
    at = app_test(monkeypatch, small_cache.config, small_cache.cache).run()
    no_exception(at)
    table = at.dataframe[0].value
    table = getattr(table, "data", table)  # a Styler in, a frame out
    status = dict(zip(table["step"], table["status"]))
    assert [status[k] for k in sorted(status)] == ["done", "done", "done", "done", "done", "missing"]
    assert status["5 · Integrate"] == "missing"
    code = "\n".join(texts(at, "code"))
    assert f"python -m engine integrate --config {small_cache.config}" in code
    captions = " ".join(texts(at, "caption"))
    assert f"{len(small_cache.info['features'])} causal features" in captions
    assert f"{len(small_cache.info['pathway_features'])} pathway graphs" in captions


# ---------------------------------------------------------------------------
# Audit
# ---------------------------------------------------------------------------


def test_audit_numbers_match_the_cache(monkeypatch, small_cache):
    import pandas as pd

    at = app_test(monkeypatch, small_cache.config, small_cache.cache, "pages/1_Audit.py").run()
    no_exception(at)
    v = read(small_cache.cache / "audit" / "data_validation.json")
    a = small_cache.info["audit"]
    m = metrics(at)
    assert m["Files read"] == f"{sum(v['files_read'].values()):,}"
    assert m["Records read"] == f"{sum(v['records_read'].values()):,}"
    assert m["Valid unique trials"] == f"{a['total_trials']:,}"
    assert m["Duplicates"] == str(v["duplicates"])
    assert m["Audit"] == "failed"  # the cache holds problems of severity 'error'
    # Parser figures, recounted from the trial table.
    t = pd.read_parquet(small_cache.cache / "audit" / "trials.parquet")
    both = t["study_valid"] & t["valid"]
    disagree = int((both & (t["study_action"].astype(str) != t["action"].astype(str))).sum())
    assert m["Bet/stop disagree"] == f"{100 * disagree / both.sum():.1f}%"
    assert m["Study's parser valid"] == f"{100 * t['study_valid'].mean():.1f}%"
    assert m["Our parser valid"] == f"{100 * t['valid'].mean():.1f}%"
    assert f"{len(a['problems'])} of {len(a['problems'])} problems" in " ".join(texts(at, "caption"))
    assert any("`safe_amplification` 3 (not a configured condition)" in c for c in texts(at, "caption"))
    # Coverage heatmap: share of a layer's features with every expected trial, per condition.
    fc = a["feature_conditions"]
    want = {}
    for (layer, cond), g in fc.groupby(["layer", "condition"]):
        want[(f"L{layer}", cond)] = 100.0 * sum(int(n) >= 30 for n in g["n_trials"]) / len(g)
    heat = next(s for s in plotly_specs(at) if s["data"][0]["type"] == "heatmap")["data"][0]
    for i, y in enumerate(heat["y"]):
        for j, x in enumerate(heat["x"]):
            assert heat["z"][i][j] == pytest.approx(want[(y, x)])
    hist = next(s for s in plotly_specs(at) if s["data"][0]["type"] == "histogram")["data"][0]
    assert sorted(hist["x"]) == sorted(int(n) for n in fc["n_trials"])
    runs = next(d.value for d in at.dataframe if "run_id" in d.value.columns)
    assert list(runs["run_id"]) == [r["run_id"] for r in v["runs_found"]]


def test_trial_histogram_has_whole_number_ticks_when_counts_barely_vary():
    import pandas as pd

    from explorer import figures

    even = figures.trial_histogram(pd.Series([50] * 144), 50)  # the demo: every pair has its 50 trials
    assert even.layout.xaxis.dtick == 1 and tuple(even.layout.xaxis.range) == (47.5, 52.5)
    short = figures.trial_histogram(pd.Series([44, 50, 50]), 50)
    assert tuple(short.layout.xaxis.range) == (41.5, 52.5)
    spread = figures.trial_histogram(pd.Series([3, 50, 28]), 50)
    assert spread.layout.xaxis.range is None and spread.layout.xaxis.dtick is None


def test_audit_problem_filter(monkeypatch, small_cache):
    at = app_test(monkeypatch, small_cache.config, small_cache.cache, "pages/1_Audit.py").run()
    at.multiselect[0].select("malformed_feature").run()
    no_exception(at)
    shown = at.dataframe[1].value
    assert set(shown["kind"]) == {"malformed_feature"}
    assert len(shown) == int((small_cache.info["audit"]["problems"]["kind"] == "malformed_feature").sum())
    kinds = at.dataframe[0].value.set_index("kind")
    assert kinds.loc["malformed_feature", "meaning"] == "the feature name is not L<layer>-<index>"


# ---------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------


def test_features_counts_bars_and_filters(monkeypatch, small_cache):
    feats = small_cache.info["features"]
    at = app_test(monkeypatch, small_cache.config, small_cache.cache, "pages/2_Features.py").run()
    no_exception(at)
    m = metrics(at)
    by_dir = Counter(f["direction"] for f in feats)
    assert m["Causal features"] == str(len(feats))
    assert (m["Safe"], m["Risky"], m["Mixed"]) == tuple(str(by_dir.get(d, 0)) for d in ("safe", "risky", "mixed"))
    assert m["With a pathway"] == str(len(small_cache.info["pathway_features"]))
    bars = plotly_specs(at)[0]
    per = Counter((f["layer"], f["direction"]) for f in feats)
    for trace in bars["data"]:
        for x, y in zip(trace["x"], trace["y"]):
            assert y == per.get((x, trace["name"]), 0)
    assert len(at.dataframe[0].value) == len(feats)
    # A bar click filters the table to that layer and direction.
    layer, direction = next(iter(per))
    at.session_state["features_bars"] = {"selection": {"points": [
        {"curve_number": 0, "point_number": 0, "point_index": 0, "x": layer, "y": per[(layer, direction)],
         "customdata": direction}], "point_indices": [0], "box": [], "lasso": []}}
    at.run()
    no_exception(at)
    table = at.dataframe[0].value
    assert len(table) == per[(layer, direction)]
    assert set(table["layer"]) == {layer} and set(table["direction"]) == {direction}


def test_features_row_click_previews_the_pathway(monkeypatch, small_cache):
    feature = small_cache.info["pathway_features"][3]
    row = [f["feature"] for f in small_cache.info["features"]].index(feature)
    direction = small_cache.info["features"][row]["direction"]
    at = app_test(monkeypatch, small_cache.config, small_cache.cache, "pages/2_Features.py").run()
    at.session_state["features_table"] = {"selection": {"rows": [row], "columns": []}}
    at.run()
    no_exception(at)
    assert f"### {feature}" in texts(at, "markdown")
    prompt = "risky" if direction == "risky" else "safe"
    titles = [s["layout"]["title"]["text"] for s in plotly_specs(at)]
    assert f"Pathway of {feature} · {prompt} prompt" in titles
    assert at.query_params["feature"] == [feature] or at.query_params["feature"] == feature
    # The same feature from a deep link is pre-selected.
    at2 = app_test(monkeypatch, small_cache.config, small_cache.cache, "pages/2_Features.py", feature=feature).run()
    assert f"### {feature}" in texts(at2, "markdown")


# ---------------------------------------------------------------------------
# Pathway
# ---------------------------------------------------------------------------


def test_pathway_numbers_pruning_and_node_click(monkeypatch, small_cache):
    feature = "L3-235" if "L3-235" in small_cache.info["pathway_features"] else small_cache.info["pathway_features"][-1]
    p = pathway_file(small_cache.cache, feature)
    safe = p["prompts"]["safe"]
    at = app_test(monkeypatch, small_cache.config, small_cache.cache, "pages/3_Pathway.py", feature=feature).run()
    no_exception(at)
    ups = [n for n in safe["nodes"] if not n["is_target"]]
    kept = kept_by_share(safe["nodes"], 0.8)
    m = metrics(at)
    assert m["Nodes"] == f"{len(kept)} / {len(ups)}"
    assert m["Activation"] == f"{safe['target_activation']:.3f}"
    rep = [n for n in ups if n["replay_delta"] is not None]
    r = stats.pearsonr([n["attribution"] for n in rep], [-n["replay_delta"] for n in rep]).statistic
    assert m["Replay r"] == f"{r:.3f}"
    assert m["Validated"] == f"{100 * sum(n['validated'] for n in rep) / len(rep):.1f}%"
    graph = next(s for s in plotly_specs(at) if s["layout"]["title"]["text"].startswith("Pathway of"))
    node_trace = next(i for i, t in enumerate(graph["data"]) if t.get("name") == "nodes")
    assert set(graph["data"][node_trace]["customdata"]) == set(kept)
    assert graph["layout"]["title"]["text"] == f"Pathway of {feature} · safe prompt"
    # The node slider at 1.0 keeps every node.
    at.slider(key="node_share").set_value(1.0).run()
    assert metrics(at)["Nodes"] == f"{len(ups)} / {len(ups)}"
    # A click puts the node in the address (?node=, the graph's on_select callback; the real click is
    # in tests/test_browser_graph.py): a node that is itself a selected causal feature with a pathway
    # shows its card and a link.
    target_node = next(n for n in ups if n["id"] in small_cache.info["pathway_features"])
    at.query_params["node"] = target_node["id"]
    at.run()
    no_exception(at)
    assert f"#### {target_node['id']}" in texts(at, "markdown")
    card = next(d.value for d in at.dataframe if list(d.value.columns)[:2] == ["prompt", "act"])
    got = dict(zip(card["prompt"], card["act"]))
    assert got["safe"] == f"{target_node['activation']:.3f}"  # text: a missing number shows "–", not "None"
    button = next(b for b in at.button if b.label == f"Open the pathway of {target_node['id']}")
    button.click().run()
    no_exception(at)
    assert at.query_params["feature"] in (target_node["id"], [target_node["id"]])
    assert f"### {target_node['id']}" in " ".join(texts(at, "markdown"))
    # A layer's SAE-error node is not a feature: its card draws (no token views looked up) and the
    # tabs below still render.
    at = app_test(monkeypatch, small_cache.config, small_cache.cache, "pages/3_Pathway.py", feature=feature).run()
    err = next(n for n in safe["nodes"] if n.get("kind") == "error")
    at.query_params["node"] = err["id"]
    at.run()
    no_exception(at)
    assert f"#### {err['id']}" in texts(at, "markdown")
    assert [t.label for t in at.tabs][-1] == "Downloads"


def test_pathway_difference_and_query_params(monkeypatch, small_cache):
    feature = small_cache.info["pathway_features"][4]
    p = pathway_file(small_cache.cache, feature)
    at = app_test(monkeypatch, small_cache.config, small_cache.cache, "pages/3_Pathway.py", feature=feature,
                  prompt="difference").run()
    no_exception(at)
    ta = {k: p["prompts"][k]["target_activation"] for k in ("safe", "risky")}
    assert metrics(at)["Activation"] == f"{ta['safe']:.3f} → {ta['risky']:.3f}"
    # Difference attribution = risky - safe per node (0 where absent), in the node trace's colours.
    at.slider(key="node_share").set_value(1.0).run()
    graph = next(s for s in plotly_specs(at) if s["layout"]["title"]["text"].startswith("Pathway of"))
    nodes = next(t for t in graph["data"] if t.get("name") == "nodes")
    attr = {k: {n["id"]: n["attribution"] for n in p["prompts"][k]["nodes"] if not n["is_target"]} for k in ta}
    for nid, colour in zip(nodes["customdata"], nodes["marker"]["color"]):
        assert colour == pytest.approx(attr["risky"].get(nid, 0.0) - attr["safe"].get(nid, 0.0))
    assert set(nodes["customdata"]) == set(attr["safe"]) | set(attr["risky"])


def test_pathway_says_when_it_was_computed_in_bf16(monkeypatch, cache_copy):
    from engine.schema import atomic_write_json

    feature = cache_copy.info["pathway_features"][0]
    path = cache_copy.cache / "pathways" / f"{feature}.json"
    doc = read(path)
    at = app_test(monkeypatch, cache_copy.config, cache_copy.cache, "pages/3_Pathway.py", feature=feature).run()
    no_exception(at)
    assert not any("may swap places" in c for c in texts(at, "caption"))
    doc["metadata"].update({"dtype": "bfloat16", "device": "cuda"})
    atomic_write_json(path, doc)
    at = app_test(monkeypatch, cache_copy.config, cache_copy.cache, "pages/3_Pathway.py", feature=feature).run()
    no_exception(at)
    assert "bfloat16 on cuda" in " ".join(texts(at, "markdown"))
    assert any(c.startswith("Computed in bfloat16: nodes with close attributions may swap places")
               for c in texts(at, "caption"))


def test_low_precision_names():
    from explorer.views import low_precision

    assert low_precision({"dtype": "bfloat16"}) and low_precision({"dtype": "torch.float16"})
    assert not low_precision({"dtype": "float32"}) and not low_precision({})


def test_pathway_missing_feature_names_the_command(monkeypatch, small_cache):
    missing = next(f["feature"] for f in small_cache.info["features"]
                   if f["feature"] not in small_cache.info["pathway_features"])
    at = app_test(monkeypatch, small_cache.config, small_cache.cache, "pages/3_Pathway.py", feature=missing).run()
    no_exception(at)
    assert any(f"pathways/{missing}.json" in w for w in texts(at, "warning"))
    assert any(f"python -m engine pathways --config {small_cache.config}" in c and f"--features {missing}" in c
               for c in texts(at, "code"))


# ---------------------------------------------------------------------------
# Tokens and live prototype (input checks; the end-to-end run is in test_app_live.py)
# ---------------------------------------------------------------------------


def test_tokens_views(monkeypatch, small_cache):
    feature = small_cache.info["token_features"][0]
    tok = read(small_cache.cache / "tokens" / f"{feature}.json")
    at = app_test(monkeypatch, small_cache.config, small_cache.cache, "pages/4_Tokens.py", feature=feature).run()
    no_exception(at)
    m = metrics(at)
    assert m["Last token, risky"] == f"{tok['prompt_activations']['risky']['last_token_activation']:.3f}"
    assert m["Significant words"] == str(sum(w["significant"] for w in tok["behavioural_words"]))
    lens_fig = next(s for s in plotly_specs(at) if "Logit lens" in s["layout"]["title"]["text"])
    assert lens_fig["layout"]["yaxis"]["type"] == "category"  # number tokens ('130') stay labels
    lens = lens_fig["data"][0]
    assert sorted(lens["x"]) == sorted(t["value"] for t in tok["logit_lens"]["promoted"] + tok["logit_lens"]["suppressed"])
    words = next(d.value for d in at.dataframe if "term" in d.value.columns)
    assert set(words["term"]) == {w["term"] for w in tok["behavioural_words"]}
    # A feature without token views says how to make them.
    other = next(f for f in small_cache.info["pathway_features"] if f not in small_cache.info["token_features"])
    at = app_test(monkeypatch, small_cache.config, small_cache.cache, "pages/4_Tokens.py", feature=other).run()
    no_exception(at)
    assert any(f"No token views for {other}" in w for w in texts(at, "warning"))
    assert any("python -m engine tokens" in c for c in texts(at, "code"))


@pytest.mark.parametrize("feature, bad, message", [
    ("L99-1", "L99-1", "the model has layers 0 to 31"),
    ("L3-99999", "L3-99999", "the layer-3 SAE has features 0 to 32,767"),
    ("L3x17", "L3x17", "it is not a feature id (L<layer>-<index>, e.g. L12-3456)"),
    # the Live page takes a set for an intervention: the message names the id that is wrong
    ("L3-17,L99-1", "L99-1", "the model has layers 0 to 31"),
])
def test_live_refuses_a_bad_feature_link_before_starting(monkeypatch, cache_copy, feature, bad, message):
    """A bad ?feature= gets the link message every page gives (tests/test_app_pages.py
    test_bad_feature_links_...) and leaves the address; nothing can start."""
    at = app_test(monkeypatch, cache_copy.config, cache_copy.cache, "pages/5_Live_prototype.py", feature=feature)
    at.run()
    no_exception(at)
    assert texts(at, "warning")[0] == f"Ignored the link's feature `{bad}`: {message}. It has been removed from the address."
    assert "feature" not in at.query_params
    assert at.button(key="live_run").disabled
    assert not (cache_copy.cache / "jobs").exists()


def test_live_refuses_an_empty_custom_prompt(monkeypatch, cache_copy):
    at = app_test(monkeypatch, cache_copy.config, cache_copy.cache, "pages/5_Live_prototype.py", feature="L3-17")
    at.run()
    at.radio(key="live_prompt").set_value("custom").run()
    at.text_area(key="live_text").input("   ").run()
    no_exception(at)
    assert any("the custom prompt is empty" in e for e in texts(at, "error")), texts(at, "error")
    assert at.button(key="live_run").disabled
    assert not (cache_copy.cache / "jobs").exists()


@pytest.mark.parametrize("page", [None, "pages/1_Audit.py", "pages/2_Features.py", "pages/3_Pathway.py",
                                  "pages/4_Tokens.py", "pages/5_Live_prototype.py"])
def test_bad_feature_links_get_one_message_on_every_page(monkeypatch, small_cache, page):
    """?feature=nonsense, L99-1 (no such layer) and L1-99999999 (no such index): the same
    sentence on every page, and the parameter leaves the address."""
    expected = {"nonsense": "it is not a feature id (L<layer>-<index>, e.g. L12-3456)",
                "L99-1": "the model has layers 0 to 31",
                "L1-99999999": "the layer-1 SAE has features 0 to 32,767"}
    for value, why in expected.items():
        at = app_test(monkeypatch, small_cache.config, small_cache.cache, page, feature=value).run()
        no_exception(at)
        assert f"Ignored the link's feature `{value}`: {why}. It has been removed from the address." in texts(at, "warning")
        assert "feature" not in at.query_params


def test_live_shows_a_failed_job_as_one_line(monkeypatch, cache_copy):
    feature = "L3-17"
    folder = cache_copy.cache / "jobs" / f"{feature}-20260101-000000-abcd"
    folder.mkdir(parents=True)
    (folder / "job.json").write_text(json.dumps({
        "job_id": folder.name, "feature": feature, "state": "failed", "created": 1.0, "finished": 3.0,
        "request": {"feature": feature, "prompt": "both", "device": "cpu"}, "steps": [{"name": "prototype", "argv": []}],
        "error": "error: feature L3-17: index 17 is outside the SAE (0..15)"}))
    (folder / "log.txt").write_text("Traceback (most recent call last):\n  File x\nerror: feature L3-17: index 17 is "
                                    "outside the SAE (0..15)\n")
    at = app_test(monkeypatch, cache_copy.config, cache_copy.cache, "pages/5_Live_prototype.py", feature=feature).run()
    no_exception(at)
    assert "The job failed: error: feature L3-17: index 17 is outside the SAE (0..15)" in texts(at, "error")
    assert not at.button(key="live_run").disabled  # a finished job does not block a new one


# ---------------------------------------------------------------------------
# Empty, missing and corrupt caches
# ---------------------------------------------------------------------------


def test_empty_cache_gives_commands_on_every_page(monkeypatch, tmp_path):
    (tmp_path / "cache").mkdir()
    config = tmp_path / "config.yaml"
    config.write_text("cache_dir: cache\n")
    expect = {"pages/1_Audit.py": "python -m engine audit", "pages/2_Features.py": "python -m engine select",
              "pages/3_Pathway.py": "python -m engine pathways", "pages/4_Tokens.py": "python -m engine tokens"}
    at = app_test(monkeypatch, config, tmp_path / "cache").run()
    no_exception(at)
    assert "python -m engine audit --config" in "\n".join(texts(at, "code"))
    for page, command in expect.items():
        at = app_test(monkeypatch, config, tmp_path / "cache", page).run()
        no_exception(at)
        assert any(command in c for c in texts(at, "code")), (page, texts(at, "code"))
    at = app_test(monkeypatch, config, tmp_path / "nowhere").run()
    no_exception(at)
    assert any("does not exist" in w for w in texts(at, "warning"))


@pytest.mark.parametrize("damage, words", [
    (b"{\"schema_version\": 1, \"features\": [", "not valid JSON"),
    (b"", "is empty"),
    (json.dumps({"schema_version": 99, "features": []}).encode(), "schema_version 99"),
    (json.dumps({"schema_version": 1, "features": [{"feature": "L3_17", "direction": "safe"}]}).encode(),
     "malformed feature id"),
])
def test_corrupt_feature_list(monkeypatch, cache_copy, damage, words):
    (cache_copy.cache / "features" / "causal_features.json").write_bytes(damage)
    at = app_test(monkeypatch, cache_copy.config, cache_copy.cache, "pages/2_Features.py").run()
    no_exception(at)
    assert any(words in w and "features/causal_features.json" in w for w in texts(at, "warning")), texts(at, "warning")
    assert any("python -m engine select" in c for c in texts(at, "code"))
    for page in ("app.py", "pages/3_Pathway.py"):  # the other pages still work
        at = app_test(monkeypatch, cache_copy.config, cache_copy.cache, None if page == "app.py" else page).run()
        no_exception(at)


def test_corrupt_pathway_and_tables(monkeypatch, cache_copy):
    feature = cache_copy.info["pathway_features"][0]
    path = cache_copy.cache / "pathways" / f"{feature}.json"
    path.write_bytes(path.read_bytes()[:200])
    at = app_test(monkeypatch, cache_copy.config, cache_copy.cache, "pages/3_Pathway.py", feature=feature).run()
    no_exception(at)
    assert any(f"pathways/{feature}.json" in w and "not valid JSON" in w for w in texts(at, "warning"))
    assert any(f"--features {feature}" in c for c in texts(at, "code"))
    # An edge without a weight is named.
    p = pathway_file(cache_copy.info["cache"], cache_copy.info["pathway_features"][1])
    del p["prompts"]["risky"]["edges"][0]["weight"]
    other = cache_copy.info["pathway_features"][1]
    (cache_copy.cache / "pathways" / f"{other}.json").write_text(json.dumps(p))
    at = app_test(monkeypatch, cache_copy.config, cache_copy.cache, "pages/3_Pathway.py", feature=other).run()
    no_exception(at)
    assert any("prompt 'risky' edge 0 lacks" in w for w in texts(at, "warning"))
    # A damaged Parquet table spoils only its own section of the audit page.
    (cache_copy.cache / "audit" / "problems.parquet").write_bytes(b"PAR1 not really")
    at = app_test(monkeypatch, cache_copy.config, cache_copy.cache, "pages/1_Audit.py").run()
    no_exception(at)
    assert any("audit/problems.parquet" in w and "not a readable Parquet file" in w for w in texts(at, "warning"))
    assert "Valid unique trials" in metrics(at)
    assert any(s["data"][0]["type"] == "heatmap" for s in plotly_specs(at))


def test_every_page_runs_without_exception(monkeypatch, small_cache):
    feature = small_cache.info["pathway_features"][0]
    for page in PAGES:
        at = app_test(monkeypatch, small_cache.config, small_cache.cache, page, feature=feature).run()
        no_exception(at)
        assert not math.isnan(len(at.main.children))


def test_damaged_files_of_one_feature_show_a_problem_and_hide_nothing_else(monkeypatch, cache_copy):
    """One feature's pathway and token files, and the pathway index, damaged: each page that reads them
    shows a warning naming the file (no exception), the other features still render."""
    bad, good = cache_copy.info["pathway_features"][:2]
    pw = cache_copy.cache / "pathways" / f"{bad}.json"
    obj = json.loads(pw.read_text())
    next(iter(obj["prompts"].values()))["nodes"][0]["layer"] = "three"
    pw.write_text(json.dumps(obj))
    tok_files = sorted((cache_copy.cache / "tokens").glob("L*-*.json"))
    tok_bad = tok_files[0]
    tok_bad.write_bytes(tok_bad.read_bytes()[:-40])  # truncated
    (cache_copy.cache / "pathways" / "index.json").write_bytes(b"\xff\xfe")

    at = app_test(monkeypatch, cache_copy.config, cache_copy.cache, "pages/3_Pathway.py", feature=bad).run()
    no_exception(at)
    assert any(f"pathways/{bad}.json" in w.value and "`prompts." in w.value and "not an integer" in w.value
               for w in at.warning), [w.value for w in at.warning]
    at = app_test(monkeypatch, cache_copy.config, cache_copy.cache, "pages/3_Pathway.py", feature=good).run()
    no_exception(at)
    assert f"### {good}" in " ".join(texts(at, "markdown")) and len(at.get("plotly_chart")) >= 1

    at = app_test(monkeypatch, cache_copy.config, cache_copy.cache, "pages/4_Tokens.py", feature=tok_bad.stem).run()
    no_exception(at)
    assert any(f"tokens/{tok_bad.name}" in w.value and "not valid JSON" in w.value for w in at.warning)
    at = app_test(monkeypatch, cache_copy.config, cache_copy.cache, "pages/4_Tokens.py", feature=tok_files[1].stem).run()
    no_exception(at)
    assert f"### {tok_files[1].stem}" in " ".join(texts(at, "markdown"))

    at = app_test(monkeypatch, cache_copy.config, cache_copy.cache, "pages/2_Features.py").run()
    no_exception(at)
    assert metrics(at)["Causal features"] == f"{len(cache_copy.info['features']):,}"
    assert any("pathways/index.json" in w.value and "not valid JSON" in w.value for w in at.warning)
