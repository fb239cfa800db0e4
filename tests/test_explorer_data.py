"""explorer.data: cached loaders, the feature overview, step statuses and bad-file messages."""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict

import pytest

from explorer import data
from explorer.context import build_context, engine_command, parse_app_args
from explorer_fixtures import cache_copy, read, small_cache  # noqa: F401


def test_app_args_and_commands(small_cache, tmp_path):
    assert parse_app_args(["--config", "a.yaml", "--cache", "c", "--other"]) == ("a.yaml", "c")
    ctx = build_context(str(small_cache.config), None)
    assert ctx.cache == small_cache.cache.resolve()  # the config's cache_dir, relative to the config
    assert engine_command(ctx, "select") == f"python -m engine select --config {small_cache.config}"
    other = build_context(str(small_cache.config), str(tmp_path))
    assert engine_command(other, "pathways", "--features", "L3-17") == (
        f"python -m engine pathways --config {small_cache.config} --cache {tmp_path} --features L3-17")


def test_feature_overview_joins_the_index(small_cache):
    ctx = build_context(str(small_cache.config), None)
    meta, feats = data.causal_features(ctx)
    assert meta["n_features"] == len(small_cache.info["features"]) == len(feats)
    assert list(feats["feature"]) == sorted((f["feature"] for f in small_cache.info["features"]),
                                            key=lambda f: tuple(int(x) for x in f[1:].split("-")))
    ov = data.feature_overview(ctx).set_index("feature")
    for f in small_cache.info["features"]:
        name = f["feature"]
        assert ov.loc[name, "abs_d"] == pytest.approx(abs(f["cohen_d"]))
        assert bool(ov.loc[name, "has_pathway"]) == (name in small_cache.info["pathway_features"])
    for name in small_cache.info["pathway_features"]:
        p = read(small_cache.cache / "pathways" / f"{name}.json")
        fracs, nodes = [], []
        for rec in p["prompts"].values():
            ups = [n for n in rec["nodes"] if not n["is_target"] and n.get("kind", "feature") == "feature"]
            rep = [n for n in ups if n["validated"] is not None]
            fracs.append(sum(n["validated"] for n in rep) / len(rep))
            nodes.append(len(ups))
        assert ov.loc[name, "validated"] == pytest.approx(sum(fracs) / len(fracs))
        assert ov.loc[name, "nodes"] == max(nodes)
        assert ov.loc[name, "act_risky"] == pytest.approx(p["prompts"]["risky"]["target_activation"])


def test_loaders_reread_a_rewritten_file(cache_copy):
    ctx = build_context(str(cache_copy.config), None)
    assert len(data.causal_features(ctx)[1]) == len(cache_copy.info["features"])
    path = cache_copy.cache / "features" / "causal_features.json"
    obj = json.loads(path.read_text())
    obj["features"] = obj["features"][:2]
    path.write_text(json.dumps(obj))
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))  # a new stamp even on coarse clocks
    assert len(data.causal_features(ctx)[1]) == 2
    assert len(data.feature_overview(ctx)) == 2


@pytest.mark.parametrize("content, kind", [
    (None, "missing"), (b"", "empty"), (b"[1, 2", "corrupt"), (b"[1, 2]", "schema"),
    (b'{"schema_version": 2, "features": []}', "schema"),
    (b'{"schema_version": 1, "features": {"a": 1}}', "schema"),
    (b'{"schema_version": 1, "features": [{"feature": "L1-2"}]}', "schema"),
])
def test_bad_feature_lists(cache_copy, content, kind):
    path = cache_copy.cache / "features" / "causal_features.json"
    if content is None:
        path.unlink()
    else:
        path.write_bytes(content)
    ctx = build_context(str(cache_copy.config), None)
    with pytest.raises(data.CacheProblem) as exc:
        data.causal_features(ctx)
    assert exc.value.kind == kind
    assert "features/causal_features.json" in exc.value.message
    assert exc.value.command == f"python -m engine select --config {cache_copy.config}"


def test_pathway_checks(cache_copy):
    ctx = build_context(str(cache_copy.config), None)
    f = cache_copy.info["pathway_features"][0]
    assert data.pathway(ctx, f)["feature"] == f
    path = cache_copy.cache / "pathways" / f"{f}.json"
    obj = json.loads(path.read_text())
    obj["prompts"]["safe"]["nodes"][2].pop("layer")
    path.write_text(json.dumps(obj))
    with pytest.raises(data.CacheProblem, match=r"prompt 'safe' node 2 lacks `id` or `layer`") as exc:
        data.pathway(ctx, f)
    assert exc.value.command.endswith(f"--features {f}")
    with pytest.raises(data.CacheProblem, match="missing from the cache"):
        data.pathway(ctx, "L5-1")
    assert data.pathway_export(ctx, cache_copy.info["pathway_features"][1], "risky").startswith(b"{")
    assert data.pathway_export(ctx, "L5-1", "risky") is None


def test_step_statuses(cache_copy):
    from engine.config import load_config
    from engine.manifest import read_manifest, update_step

    ctx = build_context(str(cache_copy.config), None)
    got = {s.step: s.status for s in data.step_statuses(ctx)}
    assert got == {"audit": "done", "select": "done", "prototype": "done", "pathways": "done", "tokens": "done",
                   "integrate": "missing"}
    # A failed run is reported with its error, and a changed input makes the steps reading it stale.
    entry = read_manifest(cache_copy.cache)["steps"]["tokens"]
    update_step(cache_copy.cache, "tokens", {**entry, "status": "failed", "error": "UserError: no trials"})
    sel = cache_copy.cache / "features" / "causal_features.json"
    sel.write_text(sel.read_text() + "\n")
    data._STATUS_MEMO.clear()
    rows = {s.step: s for s in data.step_statuses(ctx)}
    assert rows["tokens"].status == "failed" and rows["tokens"].error == "UserError: no trials"
    assert rows["pathways"].status == "stale" and "selection" in rows["pathways"].note
    assert rows["audit"].status == "done"
    assert load_config(cache_copy.config).cache_dir  # the config itself is untouched


def test_audit_views(small_cache):
    from explorer import views

    ctx = build_context(str(small_cache.config), None)
    v = data.audit_validation(ctx)
    h = views.audit_headline(v)
    assert (h["valid_trials"], h["duplicates"]) == (small_cache.info["audit"]["total_trials"], 12)
    fc = data.audit_feature_conditions(ctx)
    cov = views.coverage_matrix(fc, 30, ["safe_baseline", "risky_baseline"])
    want = defaultdict(list)
    for r in small_cache.info["audit"]["feature_conditions"].to_dict("records"):
        want[(r["layer"], r["condition"])].append(r["n_trials"] >= 30)
    for layer in cov.index:
        assert cov.loc[layer, "safe_baseline"] == pytest.approx(sum(want[(layer, "safe_baseline")]) / len(want[(layer, "safe_baseline")]))
    assert list(cov.columns[:2]) == ["safe_baseline", "risky_baseline"]
    trials = data.audit_trials(ctx)
    assert len(trials) == small_cache.info["audit"]["total_trials"]
    # Counted from the trial table, the parser figures equal the audit's own.
    ps = views.parse_summary({}, trials)
    pc = v["parser_comparison"]
    assert (ps["study_valid"], ps["our_valid"], ps["both_valid"], ps["disagree"]) == (
        pc["study_valid"], pc["ours_valid"], pc["both_valid"], pc["action_disagree"])
    assert (ps["study_stop_ours_bet"], ps["study_bet_ours_stop"]) == (pc["study_stop_ours_bet"], pc["study_bet_ours_stop"])
    assert views.parse_summary(v, None)["disagree"] == pc["action_disagree"]
    assert (h["files"], h["records"]) == (sum(v["files_read"].values()), sum(v["records_read"].values()))


def test_preview_prompt_is_where_the_feature_is_active():
    from explorer.views import preview_prompt

    assert preview_prompt({"act_safe": 0.0, "act_risky": 1.2, "direction": "safe"}) == "risky"
    assert preview_prompt({"act_safe": 0.4, "act_risky": 0.1, "direction": "risky"}) == "safe"
    assert preview_prompt({"act_safe": 0.0, "act_risky": 0.0, "direction": "risky"}) == "risky"
    assert preview_prompt({"act_safe": float("nan"), "act_risky": None, "direction": "safe"}) == "safe"


def test_decision_tables_split_by_context_with_no_empty_cells():
    from explorer.views import decision_tables

    summary = [
        {"prompt": "safe", "context": "choice", "intervention": "ablate", "value": 0.0, "activation": 2.5,
         "delta_bet_vs_stop_logodds": -0.4, "delta_mean_amount": None},
        {"prompt": "risky", "context": "amount", "intervention": "amplify", "value": 10.0, "activation": 2.0,
         "delta_bet_vs_stop_logodds": None, "delta_mean_amount": 3.25},
        {"prompt": "risky", "context": "choice", "intervention": "amplify", "value": 10.0, "activation": 2.0,
         "delta_bet_vs_stop_logodds": 1.5},
    ]
    t = decision_tables(summary)
    assert set(t) == {"choice", "amount"}
    assert list(t["choice"].columns) == ["prompt", "intervention", "value", "activation", "delta_bet_vs_stop_logodds"]
    assert t["choice"]["delta_bet_vs_stop_logodds"].tolist() == [-0.4, 1.5]
    assert t["amount"].to_dict("records") == [{"prompt": "risky", "intervention": "amplify", "value": 10.0,
                                               "activation": 2.0, "delta_mean_amount": 3.25}]
    assert not any(df.isna().any().any() for df in t.values())
    assert decision_tables([]) == {} and decision_tables([{"prompt": "safe"}]) == {}


def test_streamlit_binds_to_localhost_by_default():
    """`streamlit run app.py` reads .streamlit/config.toml: it must not listen on every interface,
    and `engine explore` passes the same default address explicitly."""
    import tomllib

    from engine.config import Config
    from engine.explore import streamlit_command
    from helpers import ROOT

    conf = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    assert conf["server"]["address"] == "127.0.0.1"
    cmd = streamlit_command(None, ROOT / "cache", Config().app.host, 8501)
    assert cmd[cmd.index("--server.address") + 1] == "127.0.0.1"


def test_a_damaged_pathway_index_does_not_hide_the_features(cache_copy):
    """Every feature stays listed (with its pathway flag from the files); the index's problem is attached."""
    ctx = build_context(str(cache_copy.config), None)
    (cache_copy.cache / "pathways" / "index.json").write_bytes(b'{"schema_version": 1, "targets": [5, 6]}')
    ov = data.feature_overview(ctx)
    assert len(ov) == len(cache_copy.info["features"])
    assert set(ov[ov["has_pathway"]]["feature"]) == set(cache_copy.info["pathway_features"])
    assert ov["nodes"].isna().all()
    problem = data.CacheProblem(**ov.attrs["problem"])
    assert "pathways/index.json" in problem.message and problem.kind == "schema"
    assert problem.command == f"python -m engine pathways --config {cache_copy.config}"
