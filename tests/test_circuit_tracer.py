"""The circuit-tracer export (engine/pathways/graph.py circuit_tracer_json, index.py write_export
and rebuild): the mapping checked by hand here, then judged by circuit-tracer 0.5.0 itself, its
pydantic graph models and its own local server and viewer in Debian's chromium (ct_support.py;
the venv and the viewer's npm scripts come from scripts/make_ct_venv.sh and
scripts/make_ct_viewer_assets.sh, which scripts/test.sh runs)."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
from pathlib import Path
from urllib.parse import quote

import pytest
import yaml

from engine.config import ExportConfig, config_from_dict
from engine.pathways import graph as G
from engine.pathways.index import rebuild, write_export
from engine.schema import (PATHWAY_SCHEMA_VERSION, PATHWAYS_EXPORT_LISTING, atomic_write_json, pathway_export_path,
                           pathway_path, with_schema)
from helpers import ROOT, run_cli

TOKENS = ["<|begin_of_text|>", "Bet", " $", "10", " or", " stop", "?", " Choice", ":", " "]


def node(nid, layer, fid, positions, acts, attrs, kind=None):
    n = {"id": nid, "layer": layer, "feature_id": fid, "is_target": False, "positions": positions,
         "position_activations": acts, "position_attributions": attrs,
         "activation": sum(a for a in acts if a is not None), "attribution": sum(attrs),
         "replay_delta": None, "replay_delta_activation": None, "patch_delta": None, "validated": None}
    if kind:
        n["kind"] = kind
        n["feature_id"] = None
    return n


def hand_result(feature="L3-427", prompts=("safe", "risky")) -> dict:
    """A pathway result in the runner's shape with one of each node kind; figures chosen by hand."""
    layer, fid = int(feature[1:].split("-")[0]), int(feature.split("-")[1])
    recs = {}
    for prompt in prompts:
        nodes = [
            {"id": feature, "layer": layer, "feature_id": fid, "is_target": True, "positions": [9],
             "position_activations": [1.5], "position_attributions": [None], "activation": 1.5,
             "attribution": None, "replay_delta": None, "replay_delta_activation": None, "patch_delta": None,
             "validated": None},
            # strongest |attribution| at position 5 (-0.3), where the activation is 2.0 (sum 3.0)
            node("L0-380", 0, 380, [2, 5], [1.0, 2.0], [0.1, -0.3]),
            node("L1-7", 1, 7, [9], [0.5], [0.15]),
            node("L1-error", 1, None, [9], [None], [0.05], kind="error"),
            node("L1-bias", 1, None, [9], [None], [-0.05], kind="bias"),
        ]
        edges = [{"source": "L0-380", "target": "L1-7", "weight": -0.12, "raw": -0.2},
                 {"source": "L1-7", "target": feature, "weight": 0.15, "raw": 0.15},
                 {"source": "L1-error", "target": feature, "weight": 0.05, "raw": 0.05},
                 {"source": "L1-bias", "target": feature, "weight": -0.05, "raw": -0.05},
                 {"source": "L0-999", "target": "L1-7", "weight": 0.3, "raw": 0.3}]  # L0-999 is not a node
        recs[prompt] = {"text": "".join(TOKENS[1:]), "n_tokens": len(TOKENS), "tokens": TOKENS,
                        "target_position": 9, "target_pre_activation": 1.5, "target_activation": 1.5,
                        "nodes": nodes, "edges": edges,
                        "agreement": {"pearson_r": None, "sign_agreement": None, "n": 0},
                        "coverage": {"attribution_total": 0.5, "attribution_in_graph": 0.4}}
    return with_schema({"feature": feature, "layer": layer, "feature_id": fid,
                        "metadata": {"method_hash": "0" * 16}, "prompts": recs}, version=PATHWAY_SCHEMA_VERSION)


# ---------------------------------------------------------------------------
# The mapping, by hand
# ---------------------------------------------------------------------------


def test_cantor_pairing_matches_hand_values_and_inverts():
    # (x + y)(x + y + 1)/2 + y
    assert G.cantor_pair(0, 380) == 380 * 381 // 2 + 380 == 72770
    assert G.cantor_pair(3, 427) == 430 * 431 // 2 + 427 == 93092
    assert G.cantor_pair(0, 0) == 0 and G.cantor_pair(1, 0) == 1 and G.cantor_pair(0, 1) == 2
    for layer in (0, 1, 15, 31):
        for index in (0, 1, 2, 380, 32767):
            assert G.cantor_unpair(G.cantor_pair(layer, index)) == (layer, index)


def test_export_nodes_links_and_metadata():
    doc = G.circuit_tracer_json(hand_result(), "safe", scan="demo-scan", source_set="demo-res")
    by = {n["our_id"]: n for n in doc["nodes"]}
    f = by["L0-380"]
    assert f["node_id"] == "0_380_5" and f["ctx_idx"] == 5 and f["layer"] == "0"
    assert f["feature"] == 72770 and f["feature_type"] == "cross layer transcoder"
    # one position's activation (where |attribution| is largest), not the sum 3.0
    assert f["activation"] == 2.0 and f["activation_sum"] == 3.0
    assert f["attribution"] == pytest.approx(-0.2)
    err, bias = by["L1-error"], by["L1-bias"]
    assert (err["feature_type"], err["feature"], err["node_id"]) == ("mlp reconstruction error", -1, "1_error_9")
    assert (bias["feature_type"], bias["feature"], bias["node_id"]) == ("mlp reconstruction error", -2, "1_bias_9")
    assert err["kind"] == "error" and bias["kind"] == "bias" and err["activation"] is None
    t = by["L3-427"]
    assert t["feature_type"] == "logit" and t["is_target_logit"] and t["layer"] == "4" and t["ctx_idx"] == 9
    assert t["node_id"] == "4_427_9" and t["feature"] == 93092
    # the viewer computes +clerp.split('(p=')[1].split(')')[0] and reads the token between quotes
    assert '"L3-427"' in t["clerp"] and t["clerp"].split("(p=")[1].split(")")[0].startswith("n/a")
    # influence: cumulative |attribution| share, strongest first: |A| = 0.2, 0.15, 0.05, 0.05 of 0.45
    assert f["influence"] == pytest.approx(0.2 / 0.45, abs=1e-6)
    assert by["L1-7"]["influence"] == pytest.approx(0.35 / 0.45, abs=1e-6)
    assert sorted([err["influence"], bias["influence"]]) == pytest.approx([0.4 / 0.45, 1.0], abs=1e-6)
    assert t["influence"] is None
    # links between exported nodes only, in export ids
    assert doc["links"] == [{"source": "0_380_5", "target": "1_7_9", "weight": -0.12},
                            {"source": "1_7_9", "target": "4_427_9", "weight": 0.15},
                            {"source": "1_error_9", "target": "4_427_9", "weight": 0.05},
                            {"source": "1_bias_9", "target": "4_427_9", "weight": -0.05}]
    m = doc["metadata"]
    assert m["slug"] == "L3-427.safe" and m["scan"] == "demo-scan" and m["transcoder_list"] == []
    assert m["feature_details"] == {"neuronpedia_source_set": "demo-res"}
    assert m["prompt_tokens"] == TOKENS and m["node_threshold"] == 1.0 and m["schema_version"] == 1
    assert doc["qParams"] == {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}


def test_annotations_fill_pinned_ids_supernodes_and_labels():
    ann = {"pinned": ["L1-7", "L9-9"],
           "supernodes": [["bet words", "L0-380", "L1-error", "L8-1"], {"name": "bias", "members": ["L1-bias"]},
                          {"name": "absent", "members": ["L8-1"]}],
           "labels": {"L1-7": "says bet", "L3-427": "risk", "L8-1": "not here"}}
    doc = G.circuit_tracer_json(hand_result(), "risky", annotations=ann)
    q = doc["qParams"]
    # ids not in this prompt's graph are left out; supernode members are pinned (the viewer draws
    # supernodes from pinned nodes only)
    assert q["pinnedIds"] == ["1_7_9", "0_380_5", "1_error_9", "1_bias_9"]
    assert q["supernodes"] == [["bet words", "0_380_5", "1_error_9"], ["bias", "1_bias_9"]]
    by = {n["our_id"]: n for n in doc["nodes"]}
    assert by["L1-7"]["clerp"] == "says bet (L1-7)"
    assert by["L3-427"]["clerp"].startswith('Target "L3-427" risk') and "(p=" in by["L3-427"]["clerp"]
    assert by["L0-380"]["clerp"] == "L0-380 (A -0.2; act +3 summed over 2 position(s))"
    assert by["L1-bias"]["clerp"] == "L1-bias (bias terms at layer 1; A -0.05)"
    for bad in ({"supernodes": ["loose"]}, {"supernodes": [{"name": 3, "members": []}]}, {"labels": ["x"]}):
        with pytest.raises(ValueError, match="annotations"):
            G.circuit_tracer_json(hand_result(), "safe", annotations=bad)


def test_export_config_from_yaml_and_the_demo_writes_its_own(tmp_path):
    assert ExportConfig() == ExportConfig(scan="llama3.1-8b", neuronpedia_source_set="llamascope-res-32k")
    cfg = config_from_dict({"export": {"scan": "my-model", "neuronpedia_source_set": "my-saes"}})
    assert (cfg.export.scan, cfg.export.neuronpedia_source_set) == ("my-model", "my-saes")
    from engine.config import UserError

    with pytest.raises(UserError, match="export.scan"):
        config_from_dict({"export": {"scan": "../x y"}})
    from engine.demo import DemoPlan, _config_yaml

    from engine.config import load_config

    plan = DemoPlan(minutes=1.0)
    demo = yaml.safe_load(_config_yaml(plan))["export"]
    assert demo == {"scan": f"slot-demo-llama-{plan.n_layers}l-{plan.d_model}d",
                    "neuronpedia_source_set": f"slot-demo-res-{plan.d_sae}"}
    (tmp_path / "config.yaml").write_text(_config_yaml(plan))  # the whole demo config loads
    cfg = load_config(tmp_path / "config.yaml")
    assert (cfg.export.scan, cfg.export.neuronpedia_source_set) == (demo["scan"], demo["neuronpedia_source_set"])
    assert cfg.export != ExportConfig()


# ---------------------------------------------------------------------------
# Files and the graph-metadata.json listing
# ---------------------------------------------------------------------------


def listing(cache: Path) -> dict:
    return {g["slug"]: g for g in json.loads((cache / PATHWAYS_EXPORT_LISTING).read_text())["graphs"]}


def test_write_export_files_are_named_by_slug_and_listed(tmp_path):
    paths = write_export(tmp_path, hand_result("L3-427"), ExportConfig(scan="s1", neuronpedia_source_set="r1"))
    write_export(tmp_path, hand_result("L2-5"), ExportConfig(scan="s1", neuronpedia_source_set="r1"))
    assert [p.name for p in paths] == ["L3-427.safe.json", "L3-427.risky.json"]
    got = listing(tmp_path)
    assert sorted(got) == ["L2-5.risky", "L2-5.safe", "L3-427.risky", "L3-427.safe"]
    for slug, meta in got.items():
        doc = json.loads((tmp_path / "pathways" / "circuit_tracer" / f"{slug}.json").read_text())
        assert doc["metadata"] == meta and meta["scan"] == "s1"
    # a rewrite replaces its own entries and keeps the others
    write_export(tmp_path, hand_result("L3-427"), ExportConfig(scan="s2", neuronpedia_source_set="r1"))
    got = listing(tmp_path)
    assert len(got) == 4 and got["L3-427.safe"]["scan"] == "s2" and got["L2-5.safe"]["scan"] == "s1"


def _write_many(cache: str, layer: int, n: int) -> None:
    for i in range(n):
        write_export(Path(cache), hand_result(f"L{layer}-{i}", prompts=("safe",)))


def test_concurrent_writers_keep_every_listing_entry(tmp_path):
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_write_many, args=(str(tmp_path), layer, 15)) for layer in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert sorted(listing(tmp_path)) == sorted(f"L{l}-{i}.safe" for l in (1, 2) for i in range(15))


def test_rebuild_rewrites_stale_exports_and_drops_gone_graphs(tmp_path):
    for f in ("L3-427", "L2-5"):
        atomic_write_json(pathway_path(tmp_path, f), hand_result(f))
    # an export in the old shape (no transcoder_list, lowercase slug) and no listing yet
    old = pathway_export_path(tmp_path, "L3-427", "safe")
    atomic_write_json(old, {"metadata": {"slug": "l3-427-safe"}, "qParams": {}, "nodes": [], "links": []})
    rebuild(tmp_path, ExportConfig(scan="s1", neuronpedia_source_set="r1"))
    assert json.loads(old.read_text())["metadata"]["transcoder_list"] == []
    assert sorted(listing(tmp_path)) == ["L2-5.risky", "L2-5.safe", "L3-427.risky", "L3-427.safe"]
    # a current export is left alone (its annotations survive); another scan rewrites it
    annotated = write_export(tmp_path, hand_result("L2-5"), ExportConfig(scan="s1", neuronpedia_source_set="r1"),
                             annotations={"pinned": ["L1-7"]})[0]
    rebuild(tmp_path, ExportConfig(scan="s1", neuronpedia_source_set="r1"))
    assert json.loads(annotated.read_text())["qParams"]["pinnedIds"] == ["1_7_9"]
    rebuild(tmp_path, ExportConfig(scan="s2", neuronpedia_source_set="r1"))
    assert json.loads(annotated.read_text())["metadata"]["scan"] == "s2"
    pathway_path(tmp_path, "L2-5").unlink()
    rebuild(tmp_path, ExportConfig(scan="s2", neuronpedia_source_set="r1"))
    assert sorted(listing(tmp_path)) == ["L3-427.risky", "L3-427.safe"]


# ---------------------------------------------------------------------------
# circuit-tracer 0.5.0 itself
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine_export(fixture_dir, tmp_path_factory) -> Path:
    """The pathways step on the fixture model for two targets, with the export section set on
    the command line, plus the hand-made graph (error/bias nodes, annotations) in the same folder."""
    cache = tmp_path_factory.mktemp("ct_cache")
    r = run_cli("pathways", "--config", str(fixture_dir / "config.yaml"), "--cache", str(cache),
                "--features", "L3-17,L5-10", "--set", "pathways.n_replay=4", "--set", "pathways.top_k_per_layer=4",
                "--set", "export.scan=fixture-llama", "--set", "export.neuronpedia_source_set=fixture-res",
                env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    ann = {"pinned": ["L1-7", "L0-380"], "supernodes": [{"name": "bet words", "members": ["L0-380", "L1-7"]}],
           "labels": {"L1-7": "says bet"}}
    write_export(cache, hand_result("L3-427", prompts=("safe",)),
                 ExportConfig(scan="fixture-llama", neuronpedia_source_set="fixture-res"), annotations=ann)
    return cache / "pathways" / "circuit_tracer"


def test_exports_validate_against_circuit_tracer_graph_models(engine_export):
    from ct_support import validate

    got = validate(engine_export)
    slugs = ["L3-17.risky", "L3-17.safe", "L3-427.safe", "L5-10.risky", "L5-10.safe"]
    assert got["slugs"] == slugs and got["graphs"] == 5
    ours = [json.loads((engine_export / f"{s}.json").read_text()) for s in slugs]
    assert got["nodes"] == sum(len(d["nodes"]) for d in ours) and got["links"] == sum(len(d["links"]) for d in ours)
    # every feature node's `feature` equals circuit-tracer's own _cantor_pairing(layer, index)
    assert got["mismatches"] == []
    for d in ours:
        assert d["metadata"]["scan"] == "fixture-llama"
        assert d["metadata"]["feature_details"]["neuronpedia_source_set"] == "fixture-res"
    # the engine's own graphs: one node per pathway node, one link per edge
    res = json.loads((engine_export.parents[0] / "L3-17.json").read_text())
    doc = ours[1]
    assert len(doc["nodes"]) == len(res["prompts"]["safe"]["nodes"])
    assert len(doc["links"]) == len(res["prompts"]["safe"]["edges"])


def test_validation_catches_a_broken_export(engine_export, tmp_path):
    """The check can fail: the old export's shape (no transcoder_list) is rejected."""
    from ct_support import require_ct

    bad = tmp_path / "bad"
    shutil.copytree(engine_export, bad)
    doc = json.loads((bad / "L3-17.safe.json").read_text())
    del doc["metadata"]["transcoder_list"]
    (bad / "L3-17.safe.json").write_text(json.dumps(doc))
    r = subprocess.run([str(require_ct()), str(ROOT / "tests" / "ct_viewer" / "validate_ct.py"), str(bad)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "transcoder_list" in r.stderr


@pytest.mark.browser
def test_circuit_tracer_viewer_renders_the_export(engine_export):
    """circuit-tracer's own server and viewer open every listed graph: all nodes drawn, no page
    error; a click on a feature shows its Cantor-decoded label and one position's activation."""
    from test_browser import CHROMIUM, _need_browser

    from ct_support import ct_server, route_viewer_scripts

    _need_browser()
    from playwright.sync_api import sync_playwright

    js_nodes = ("() => Array.from(document.querySelectorAll('.link-graph text.node'))"
                ".map(e => [e.__data__.node_id, e.__data__.feature_type])")
    with ct_server(engine_export) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        page = browser.new_page(viewport={"width": 1500, "height": 1000})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        outside = route_viewer_scripts(page, url)
        for slug in ("L3-17.safe", "L5-10.risky", "L3-427.safe"):
            doc = json.loads((engine_export / f"{slug}.json").read_text())
            page.goto(f"{url}/index.html?slug={slug}")
            page.wait_for_selector(".link-graph text.node")
            drawn = page.evaluate(js_nodes)
            assert sorted(d[0] for d in drawn) == sorted(n["node_id"] for n in doc["nodes"]), slug
            # the graph list is the listing: every graph is offered
            assert page.locator("select.graph-prompt-select option").count() == 5
            assert not errors, (slug, errors)
        # the annotated graph: pinned nodes fill the subgraph, under their labels
        assert sorted(d[0] for d in drawn if d[1] == "mlp reconstruction error") == ["1_bias_9", "1_error_9"]
        page.locator(".subgraph", has_text="says bet (L1-7)").wait_for()
        # circuit-tracer 0.5.0's local viewer lets the URL's (empty) supernodes replace the file's
        # qParams.supernodes; handed over in the URL, ours are drawn with their name
        sn = json.dumps(doc["qParams"]["supernodes"])
        page.goto(f"{url}/index.html?slug=L3-427.safe&supernodes={quote(sn)}")
        page.locator(".subgraph", has_text="bet words").wait_for()
        assert not errors, errors
        # the sink: clicked, the viewer lists its inputs (one row per link into it) under our clerp
        page.goto(f"{url}/index.html?slug=L5-10.safe")
        page.wait_for_selector(".link-graph text.node")
        doc = json.loads((engine_export / "L5-10.safe.json").read_text())
        sink = next(n for n in doc["nodes"] if n["is_target_logit"])
        k = [d[0] for d in page.evaluate(js_nodes)].index(sink["node_id"])
        page.locator(".link-graph text.node").nth(k).click(force=True)
        page.locator(".feature-title", has_text='Target "L5-10"').first.wait_for()
        n_in = sum(1 for e in doc["links"] if e["target"] == sink["node_id"])
        assert page.locator(".features.input .feature-row").count() == n_in > 0
        assert not errors, errors
        if os.environ.get("UPDATE_SCREENSHOTS") == "1":
            page.mouse.move(1490, 990)
            page.wait_for_timeout(500)
            page.screenshot(path=str(ROOT / "docs" / "screenshots" / "circuit_tracer_viewer.png"))
        # a feature node: the viewer decodes the Cantor pairing into L<layer>/<index>
        page.goto(f"{url}/index.html?slug=L3-17.safe")
        page.wait_for_selector(".link-graph text.node")
        doc = json.loads((engine_export / "L3-17.safe.json").read_text())
        feat = max((n for n in doc["nodes"] if n["feature_type"] == "cross layer transcoder"),
                   key=lambda n: abs(n["attribution"]))
        k = [d[0] for d in page.evaluate(js_nodes)].index(feat["node_id"])
        page.locator(".link-graph text.node").nth(k).click(force=True)
        layer, index = feat["our_id"][1:].split("-")
        title = page.locator(".feature-title", has_text="Feature")
        title.wait_for()
        assert f"L{layer}/{index}" in title.inner_text() and f"Act: {feat['activation']:.2f}" in title.inner_text()
        browser.close()
    # the viewer then fetches the lab's feature examples for the scan, which do not exist for our
    # SAEs (answered 404): those requests are the only page errors allowed
    assert outside and all("/features/" in u for u in outside), outside
    assert all("JSON" in e for e in errors), errors
