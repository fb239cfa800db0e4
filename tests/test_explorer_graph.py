"""explorer.graph and explorer.figures on hand-made pathway records: every number checked
against a hand computation or scipy."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from explorer import figures
from explorer import graph as G


def node(nid, layer, act, attr, replay=None, validated=None, positions=(5,), target=False):
    pos = list(positions)
    return {"id": nid, "layer": layer, "feature_id": int(nid.split("-")[1]), "is_target": target,
            "positions": pos, "position_activations": [act / len(pos)] * len(pos),
            "position_attributions": [None if attr is None else attr / len(pos)] * len(pos),
            "activation": act, "attribution": attr, "replay_delta": replay, "patch_delta": None, "validated": validated}


def pathway():
    tokens = ["<bos>", "Slot", " Machine", " bet", " $", "10"]
    safe = {
        "tokens": tokens, "target_position": 5, "target_activation": 1.5,
        "nodes": [node("L3-9", 3, 1.5, None, target=True),
                  node("L2-1", 2, 2.0, 0.6, -0.5, True, positions=(5, 3)),
                  node("L2-2", 2, 1.0, -0.3, 0.35, True),
                  node("L1-7", 1, 0.5, 0.1, 0.2, False, positions=(1,)),
                  node("L0-4", 0, 0.2, 0.05)],
        "edges": [{"source": "L2-1", "target": "L3-9", "weight": 0.6, "raw": 0.6},
                  {"source": "L2-2", "target": "L3-9", "weight": -0.3, "raw": -0.3},
                  {"source": "L1-7", "target": "L2-1", "weight": 0.08, "raw": 0.2},
                  {"source": "L0-4", "target": "L1-7", "weight": 0.01, "raw": 0.1}],
    }
    risky = {
        "tokens": tokens, "target_position": 5, "target_activation": 2.5,
        "nodes": [node("L3-9", 3, 2.5, None, target=True),
                  node("L2-1", 2, 3.0, 0.9, -1.0, True),
                  node("L1-8", 1, 0.7, -0.2, 0.1, False)],
        "edges": [{"source": "L2-1", "target": "L3-9", "weight": 0.9, "raw": 0.9},
                  {"source": "L1-8", "target": "L2-1", "weight": -0.05, "raw": -0.1}],
    }
    return {"schema_version": 1, "feature": "L3-9", "layer": 3, "feature_id": 9, "prompts": {"safe": safe, "risky": risky}}


def test_prompt_view_and_difference():
    p = pathway()
    assert G.available_modes(p) == ["safe", "risky", "difference"]
    v = G.prompt_view(p, "safe")
    assert list(v.nodes["id"]) == ["L3-9", "L2-1", "L2-2", "L1-7", "L0-4"]
    assert v.edges.set_index("source")["validated"].to_dict() == {"L2-1": True, "L2-2": True, "L1-7": False, "L0-4": False}
    d = G.prompt_view(p, "difference").nodes.set_index("id")
    # risky - safe, absent counts 0; validated on either prompt.
    assert d.loc["L2-1", "attribution"] == pytest.approx(0.9 - 0.6)
    assert d.loc["L2-2", "attribution"] == pytest.approx(0 - (-0.3))
    assert d.loc["L1-8", "attribution"] == pytest.approx(-0.2)
    assert d.loc["L2-1", "replay_delta"] == pytest.approx(-1.0 - (-0.5))
    assert math.isnan(d.loc["L2-2", "replay_delta"])  # replayed on one prompt only
    assert d.loc["L2-2", "validated"] is True and d.loc["L1-8", "validated"] is False and d.loc["L0-4", "validated"] is None
    assert d.loc["L2-1", "activation"] == 3.0
    e = G.prompt_view(p, "difference").edges.set_index(["source", "target"])["weight"]
    assert e[("L2-1", "L3-9")] == pytest.approx(0.3)
    assert e[("L1-8", "L2-1")] == pytest.approx(-0.05)
    assert e[("L2-2", "L3-9")] == pytest.approx(0.3)


def test_keep_by_share_and_prune():
    # |values| 3, 1, 2, 0.5 (total 6.5): 70% needs 3 + 2 = 5 (76.9%).
    assert G.keep_by_share(np.array([3.0, -1.0, 2.0, 0.5]), 0.7).tolist() == [True, False, True, False]
    assert G.keep_by_share(np.array([3.0, -1.0, 2.0, 0.5]), 0.4).tolist() == [True, False, False, False]
    assert G.keep_by_share(np.array([3.0, 0.0, 2.0]), 1.0).tolist() == [True, False, True]
    v = G.prompt_view(pathway(), "safe")
    # |attribution| 0.6, 0.3, 0.1, 0.05 of 1.05: 80% needs 0.6 + 0.3 (85.7%).
    pv = G.prune(v, 0.8)
    assert set(pv.nodes["id"]) == {"L3-9", "L2-1", "L2-2"}
    assert set(zip(pv.edges["source"], pv.edges["target"])) == {("L2-1", "L3-9"), ("L2-2", "L3-9")}
    assert (pv.dropped_nodes, pv.dropped_edges) == (2, 2)
    capped = G.prune(v, 1.0, 1.0, max_edges=2)
    assert sorted(capped.edges["weight"].abs()) == [0.3, 0.6]


def test_agreement_matches_scipy():
    v = G.prompt_view(pathway(), "safe")
    a = G.agreement(v.nodes)
    attr, rep = [0.6, -0.3, 0.1], [-0.5, 0.35, 0.2]
    assert a["n"] == 3
    assert a["pearson_r"] == pytest.approx(stats.pearsonr(attr, [-x for x in rep]).statistic)
    assert a["sign_agreement"] == pytest.approx(2 / 3)  # L1-7: attribution +0.1, replay +0.2 disagree
    assert G.validated_fraction(v.nodes) == pytest.approx(2 / 3)


def test_layout_layers_and_order():
    v = G.prompt_view(pathway(), "safe")
    g = G.to_networkx(v)
    assert g.number_of_edges() == 4 and g.nodes["L2-1"]["activation"] == 2.0
    pos = G.layout(g)
    assert {n: y for n, (x, y) in pos.items()} == {"L3-9": 3, "L2-1": 2, "L2-2": 2, "L1-7": 1, "L0-4": 0}
    assert pos["L2-2"][0] < pos["L2-1"][0]  # negative attribution on the left
    ppos = G.layout(g, "position", 5)
    assert round(ppos["L1-7"][0]) == 1 and round(ppos["L3-9"][0]) == 5
    assert round(ppos["L2-1"][0]) == 5  # its two positions share the attribution: the first wins


def test_node_details_tokens():
    d = G.node_details(pathway(), "L2-1")
    assert set(d["prompts"]) == {"safe", "risky"}
    assert [(p["position"], p["token"]) for p in d["prompts"]["safe"]["positions"]] == [(5, "10"), (3, " bet")]
    assert d["prompts"]["safe"]["incoming"] == [["L1-7", 0.08]]
    assert d["prompts"]["safe"]["outgoing"] == [["L3-9", 0.6]]


def test_exports():
    v = G.prune(G.prompt_view(pathway(), "safe"), 1.0)
    obj = json.loads(G.graph_json(v, {"node_share": 1.0}))
    assert len(obj["nodes"]) == 5 and len(obj["edges"]) == 4
    assert obj["nodes"][0]["attribution"] is None  # NaN becomes null
    rows = G.edges_csv(v).decode().strip().splitlines()
    assert rows[0].split(",")[:4] == ["prompt", "source", "target", "weight"] and len(rows) == 5


def test_pathway_figure_encodes_the_graph():
    v = G.prompt_view(pathway(), "safe")
    fig = figures.pathway_figure(v)
    data = [t.to_plotly_json() for t in fig.data]
    nodes = next(t for t in data if t["name"] == figures.NODE_TRACE)
    assert list(nodes["customdata"]) == ["L2-1", "L2-2", "L1-7", "L0-4"]
    assert list(nodes["marker"]["color"]) == [0.6, -0.3, 0.1, 0.05]
    assert nodes["marker"]["cmid"] == 0 and nodes["marker"]["cmax"] == 0.6 and nodes["marker"]["cmin"] == -0.6
    assert list(nodes["marker"]["symbol"]) == ["circle", "circle", "circle-x", "circle"]
    sizes = list(nodes["marker"]["size"])
    assert sizes[0] == max(sizes) and sizes[0] == pytest.approx(36.0)  # largest activation
    # Every edge is drawn once: 3 points (x0, x1, None) per edge over the line traces.
    lines = [t for t in data if t.get("mode") == "lines"]
    assert sum(len(t["x"]) for t in lines) == 3 * len(v.edges)
    widest = max(lines, key=lambda t: t["line"]["width"])
    assert widest["line"]["width"] == figures.EDGE_WIDTHS[-1] and widest["line"]["dash"] == "solid"
    assert "178,24,43" in widest["line"]["color"]  # the strongest edge is positive: red
    dotted = [t for t in lines if t["line"]["dash"] == "dot"]
    assert sum(len(t["x"]) for t in dotted) == 3 * 2  # the two edges leaving unvalidated nodes
    idx = figures.node_trace_indices(fig)
    assert {data[i]["name"] for i in idx} == {figures.NODE_TRACE, figures.TARGET_TRACE}
    event = {"selection": {"points": [{"curve_number": min(idx) - 1, "customdata": "x"},
                                      {"curve_number": max(idx), "customdata": "L3-9"}]}}
    assert figures.selected_nodes(event, idx) == ["L3-9"]
    assert figures.selected_nodes({"selection": {"points": []}}, idx) == []


def test_rings_tell_validated_from_pre_activation_only_and_mark_error_nodes():
    """Pathway schema 2: a node whose estimate held on the pre-activation while the target's
    activation did not move gets its own ring and legend entry; error/bias nodes their own symbols."""
    p = pathway()
    rec = p["prompts"]["safe"]
    by_id = {n["id"]: n for n in rec["nodes"]}
    by_id["L2-1"].update(kind="feature", linear_confirmed=True, validated=True)
    by_id["L2-2"].update(kind="feature", linear_confirmed=True, validated=False)  # target did not move
    by_id["L1-7"].update(kind="feature", linear_confirmed=False, validated=False)
    rec["nodes"].append({"id": "L2-error", "kind": "error", "layer": 2, "feature_id": None, "is_target": False,
                         "positions": [], "position_activations": [], "position_attributions": [],
                         "activation": None, "attribution": 0.2, "replay_delta": None, "patch_delta": None,
                         "validated": None, "linear_confirmed": None})
    rec["edges"].append({"source": "L2-error", "target": "L3-9", "weight": 0.2})
    v = G.prompt_view(p, "safe")
    data = [t.to_plotly_json() for t in figures.pathway_figure(v).data]
    nodes = next(t for t in data if t["name"] == figures.NODE_TRACE)
    ids = list(nodes["customdata"])
    ring = dict(zip(ids, nodes["marker"]["line"]["color"]))
    sym = dict(zip(ids, nodes["marker"]["symbol"]))
    assert ring["L2-1"] == "#111111" and ring["L2-2"] == figures.PRE_ONLY_RING and ring["L1-7"] == "#777777"
    assert sym["L2-2"] == "circle" and sym["L1-7"] == "circle-x" and sym["L2-error"] == "square"
    names = {t["name"] for t in data}
    assert {"pre-activation only: estimate held, target's activation unchanged", "SAE error node"} <= names
    assert "pre-activation only" in figures.validation_label(False, True)
    kept = G.prune(v, node_share=0.5)  # the error node (0.2) is not ranked against the features
    assert "L2-error" in set(kept.nodes["id"]) and kept.dropped_nodes >= 1
    d = G.prompt_view(p, "difference").nodes.set_index("id")
    assert d.loc["L2-2", "linear_confirmed"] is True and d.loc["L2-error", "kind"] == "error"


def test_token_highlight_escapes_and_scales():
    html = figures.token_highlight_html(["<b>", " x"], [2.0, 1.0], "#102030")
    assert "&lt;b&gt;" in html and "<b>" not in html
    assert "rgba(16,32,48,1.00)" in html and "rgba(16,32,48,0.50)" in html
