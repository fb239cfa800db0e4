"""explorer.graph and explorer.figures on hand-made pathway records: every number checked
against a hand computation or scipy."""

from __future__ import annotations

import csv
import io
import json
import math

import numpy as np
import pandas as pd
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
    key = figures.legend_markdown()  # the key drawn under the chart (no plotly legend over the nodes)
    assert figures.PRE_ONLY_RING in key and "pre-activation only" in key and "SAE error" in key and "bias" in key
    assert "pre-activation only" in figures.validation_label(False, True)
    kept = G.prune(v, node_share=0.5)  # the error node (0.2) is not ranked against the features
    assert "L2-error" in set(kept.nodes["id"]) and kept.dropped_nodes >= 1
    d = G.prompt_view(p, "difference").nodes.set_index("id")
    assert d.loc["L2-2", "linear_confirmed"] is True and d.loc["L2-error", "kind"] == "error"


def test_token_highlight_escapes_and_scales():
    html = figures.token_highlight_html(["<b>", " x"], [2.0, 1.0], "#102030")
    assert "&lt;b&gt;" in html and "<b>" not in html
    assert "rgba(16,32,48,1.00)" in html and "rgba(16,32,48,0.50)" in html


# ---------------------------------------------------------------------------
# Labels: placement without overlap (issue 14, item 1)
# ---------------------------------------------------------------------------


def annotation_boxes(fig) -> dict[str, tuple]:
    """Label boxes re-derived from the figure's own annotations (anchor, shift, text) and its
    axis ranges and fixed margins: a second implementation of place_labels' geometry."""
    lay = fig.layout
    w, h = lay.meta["plot_width"], lay.meta["plot_height"]
    x0, x1 = lay.xaxis.range
    y0, y1 = lay.yaxis.range
    out = {}
    for a in lay.annotations:
        if not (a.name or "").startswith("label:"):
            continue
        px = (a.x - x0) / (x1 - x0) * w + a.xshift
        py = (a.y - y0) / (y1 - y0) * h + a.yshift
        tw, th = figures.text_size(a.text)
        left = {"left": px, "center": px - tw / 2, "right": px - tw}[a.xanchor]
        bottom = {"bottom": py, "middle": py - th / 2, "top": py - th}[a.yanchor]
        out[a.name[6:]] = (left, bottom, left + tw, bottom + th)
    return out


def overlaps(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def test_place_labels_hand_case():
    # Two nodes 10 px apart on one row: the first (more important) takes the spot above, the
    # second cannot (it would overlap) and takes the one below.
    pts = {"a": (0.0, 0.0), "b": (10.0, 0.0)}
    placed = figures.place_labels(pts, {"a": 3, "b": 3}, {"a": "L1-1", "b": "L1-2"}, ["a", "b"],
                                  (-100, 100), (-100, 100), 200, 200)
    got = {p.node: (p.xanchor, p.yanchor) for p in placed}
    assert got == {"a": ("center", "bottom"), "b": ("center", "top")}
    w, h = figures.text_size("L1-1")
    a = next(p for p in placed if p.node == "a")
    assert a.box == pytest.approx((100 - w / 2, 100 + 5, 100 + w / 2, 100 + 5 + h))  # radius 3 + 2 px gap


def test_place_labels_never_overlap_on_a_crowded_graph():
    rng = np.random.default_rng(0)
    pts = {f"L{i % 9}-{i}": (float(rng.uniform(0, 10)), float(i % 9)) for i in range(80)}
    radii = {n: float(rng.uniform(5, 12)) for n in pts}
    texts = {n: figures.label_text(n, "→ bet, stop") for n in pts}
    placed = figures.place_labels(pts, radii, texts, list(pts), (-0.5, 10.5), (-0.6, 8.75), 425, 600)
    assert 10 < len(placed) <= figures.LABEL_BUDGET
    boxes = [p.box for p in placed]
    for i in range(len(boxes)):
        assert 0 <= boxes[i][0] and boxes[i][2] <= 425 and 0 <= boxes[i][1] and boxes[i][3] <= 600
        for j in range(i + 1, len(boxes)):
            assert not overlaps(boxes[i], boxes[j]), (placed[i], placed[j])
    # No label covers a node marker.
    sx, sy = 425 / 11.0, 600 / 9.35
    for n, (x, y) in pts.items():
        cx, cy, r = (x + 0.5) * sx, (y + 0.6) * sy, radii[n]
        for b in boxes:
            assert not overlaps(b, (cx - r, cy - r, cx + r, cy + r))


@pytest.mark.parametrize("x_mode", ["attribution", "position"])
def test_pathway_figure_labels_do_not_overlap_in_either_layout(x_mode):
    from cache_factory import SIZES, make_pathway

    rng = np.random.default_rng(3)
    p = make_pathway("L20-77", SIZES["full"], rng)
    v = G.prune(G.prompt_view(p, "risky"), 1.0, 0.98, 1500)
    auto = {n: "→ bet, stop" for n in v.nodes["id"][::2]}
    fig = figures.pathway_figure(v, x_mode, auto_labels=auto, user_labels={v.nodes["id"].iloc[1]: "my label"})
    boxes = annotation_boxes(fig)
    assert len(boxes) >= 10 and "L20-77" in boxes  # the target is always labelled
    names = list(boxes)
    for i in range(len(names)):
        b = boxes[names[i]]
        assert b[0] >= -0.5 and b[1] >= -0.5 and b[2] <= fig.layout.meta["plot_width"] + 0.5
        for j in range(i + 1, len(names)):
            assert not overlaps(b, boxes[names[j]]), (names[i], names[j])
    labelled = {a.name[6:]: a.text for a in fig.layout.annotations if (a.name or "").startswith("label:")}
    user = v.nodes["id"].iloc[1]
    if user in labelled:
        assert labelled[user] == f"{user}<br><i>my label</i>"
    # The plot area is fixed: no legend, no automargin that could move it under the labels.
    assert fig.layout.showlegend is False and fig.layout.margin.autoexpand is False


def test_auto_label_from_token_views():
    rec = {"logit_lens": {"promoted": [{"token": "Ġwin"}, {"token": " stop"}, {"token": "x"}]},
           "top_activating": [{"token": "Round"}]}
    assert figures.auto_label(rec) == "→ win, stop"
    assert figures.auto_label({"logit_lens": {"promoted": []}, "top_activating": [{"token": " Round"}]}) == "“Round”"
    assert figures.auto_label(None) is None and figures.auto_label({}) is None
    assert figures.label_text("L1-2", "→ a", "mine") == "L1-2<br><i>mine</i>"
    assert figures.label_text("L1-2", "<b>") == "L1-2<br><i>&lt;b&gt;</i>"
    assert figures.label_text("L1-2") == "L1-2"


def test_selected_node_highlights_its_edges_and_pins_get_a_halo():
    v = G.prompt_view(pathway(), "safe")
    fig = figures.pathway_figure(v, selected="L2-1", pinned=["L1-7"])
    lines = [t for t in fig.data if t.mode == "lines"]
    hot = [t for t in lines if t.name.startswith("selected ")]
    # L2-1's edges: L2-1 -> L3-9 and L1-7 -> L2-1.
    assert sum(len(t.x) for t in hot) == 3 * 2
    assert all(float(t.line.color.rsplit(",", 1)[1].rstrip(")")) == 0.95 for t in hot)
    cold = [t for t in lines if not t.name.startswith("selected ")]
    assert all(float(t.line.color.rsplit(",", 1)[1].rstrip(")")) < 0.3 for t in cold)
    halo = {t.name: list(t.x) for t in fig.data if t.name in ("pinned", "selected")}
    pos = G.layout(G.to_networkx(v))
    assert halo == {"pinned": [pos["L1-7"][0]], "selected": [pos["L2-1"][0]]}


# ---------------------------------------------------------------------------
# Pins, subgraph, supernodes, annotations file (issue 14, item 3)
# ---------------------------------------------------------------------------


def test_prune_keeps_pinned_nodes_and_subgraph_keeps_edges_between_pins():
    v = G.prompt_view(pathway(), "safe")
    pv = G.prune(v, 0.8, always={"L0-4"})
    assert set(pv.nodes["id"]) == {"L3-9", "L2-1", "L2-2", "L0-4"}
    sub = G.subgraph(v, ["L2-1", "L1-7"])
    assert set(sub.nodes["id"]) == {"L3-9", "L2-1", "L1-7"}
    assert set(zip(sub.edges["source"], sub.edges["target"])) == {("L2-1", "L3-9"), ("L1-7", "L2-1")}
    assert (sub.dropped_nodes, sub.dropped_edges) == (2, 2)
    e, n = G.incident(v, "L2-1")
    assert set(zip(e["source"], e["target"])) == {("L2-1", "L3-9"), ("L1-7", "L2-1")}
    assert set(n["id"]) == {"L2-1", "L3-9", "L1-7"}
    assert G.node_ids(pathway(), "difference") == {"L3-9", "L2-1", "L2-2", "L1-7", "L0-4", "L1-8"}


def test_suggested_supernodes_by_co_attribution():
    from explorer import annotations as A

    nodes = pd.DataFrame({"id": ["T", "a", "b", "c", "d", "e"], "layer": [3, 2, 2, 2, 1, 1],
                          "is_target": [True, False, False, False, False, False]})
    edges = pd.DataFrame({"source": ["a", "b", "c", "d", "e", "d", "e"], "target": ["T", "T", "T", "a", "a", "b", "c"],
                          "weight": [0.5, 0.25, -0.4, 0.2, 0.1, 0.1, 0.3]})
    prof = A.edge_profiles(nodes["id"].tolist(), edges)
    # a's profile: out to T 0.5; in from d 0.2 and e 0.1. b: out 0.25; in from d 0.1.
    cos_ab = (0.5 * 0.25 + 0.2 * 0.1) / (math.sqrt(0.25 + 0.04 + 0.01) * math.sqrt(0.0625 + 0.01))
    assert A.cosine_matrix(prof)[1, 2] == pytest.approx(cos_ab)
    assert cos_ab > 0.9
    got = A.suggest_supernodes(nodes, edges, threshold=0.9)
    # a and b (same layer, same partners, same signs) group; c pushes T the other way; d and e
    # feed different nodes (d: a 0.2, b 0.1; e: a 0.1, c 0.3): cosine 0.2*0.1/(0.2236*0.3162) = 0.28.
    assert got == [{"name": "L2 co-attribution 1", "members": ["a", "b"]}]
    assert A.suggest_supernodes(nodes, edges, threshold=0.9, exclude={"a"}) == []


def test_annotations_file_round_trip_and_bad_entries(tmp_path):
    from engine import schema
    from engine.errors import UserError
    from explorer import annotations as A

    ann = A.empty("L3-9")
    A.toggle_pin(ann, "L2-1")
    A.toggle_pin(ann, "L1-7")
    A.toggle_pin(ann, "L2-1")  # unpinned again
    A.set_text(ann, "labels", "L2-1", "  loss words ")
    A.set_text(ann, "notes", "L2-1", "fires on 'Loss'")
    A.add_supernode(ann, "g1", ["L2-1", "L2-2", "L1-7"])
    A.add_supernode(ann, "g2", ["L1-7", "L0-4"])  # L1-7 moves to g2
    path = A.save(tmp_path, "L3-9", ann)
    assert path == schema.annotations_path(tmp_path, "L3-9") == tmp_path / "annotations" / "L3-9.json"
    on_disk = json.loads(path.read_text())
    assert on_disk["schema_version"] == schema.ANNOTATIONS_SCHEMA_VERSION
    assert on_disk["pinned"] == ["L1-7"] and on_disk["labels"] == {"L2-1": "loss words"}
    assert on_disk["supernodes"] == [{"name": "g1", "members": ["L2-1", "L2-2"]}, {"name": "g2", "members": ["L1-7", "L0-4"]}]
    assert A.load(tmp_path, "L3-9")[0]["notes"] == {"L2-1": "fires on 'Loss'"}
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]  # the write was atomic
    # A hand-edited file with bad entries: the good ones survive, the bad ones are named.
    path.write_text(json.dumps({"schema_version": 1, "pinned": ["L1-7", "../../etc", 3],
                                "supernodes": [{"name": "ok", "members": ["L1-7", "a/b"]}, {"members": []}],
                                "labels": {"L2-1": "x", "bad id": "y"}, "notes": "nope"}))
    got, problems = A.load(tmp_path, "L3-9")
    assert got["pinned"] == ["L1-7"] and got["supernodes"] == [{"name": "ok", "members": ["L1-7"]}]
    assert got["labels"] == {"L2-1": "x"} and got["notes"] == {}
    assert len(problems) == 6 and all(p.startswith("L3-9.json: ") for p in problems)
    path.write_text("{not json")
    assert A.load(tmp_path, "L3-9")[0] == A.empty("L3-9")
    with pytest.raises(UserError):
        A.load(tmp_path, "../L3-9")  # ids are checked before they touch a path
    with pytest.raises(UserError):
        A.toggle_pin(ann, "a/b")
    with pytest.raises(UserError):
        A.add_supernode(ann, "solo", ["L2-1"])
    updated = A.update(tmp_path, "L3-9", lambda a: A.toggle_pin(a, "L2-2"))
    assert updated["pinned"] == ["L2-2"]


def test_annotations_reach_the_downloads_and_the_circuit_tracer_export():
    from engine.pathways.graph import circuit_tracer_json, ct_node_ids
    from explorer import annotations as A

    ann = A.empty("L3-9")
    A.set_pinned(ann, ["L2-1", "L3-9"])
    A.add_supernode(ann, "drivers", ["L2-1", "L2-2"])
    A.set_text(ann, "labels", "L2-1", "loss words")
    A.set_text(ann, "notes", "L2-2", "check")
    assert A.circuit_tracer_annotations(ann) == {
        "pinned": ["L2-1", "L3-9"], "supernodes": [{"name": "drivers", "members": ["L2-1", "L2-2"]}],
        "labels": {"L2-1": "loss words"}}
    assert A.circuit_tracer_annotations(A.empty("L3-9")) is None
    p = pathway()
    ct = circuit_tracer_json(p, "safe", annotations=A.circuit_tracer_annotations(ann))
    ids = ct_node_ids(p["prompts"]["safe"])
    sink = next(n["node_id"] for n in ct["nodes"] if n["is_target_logit"])
    assert ids["L3-9"] == sink
    # supernode members are pinned too: the viewer draws supernodes from pinned nodes only
    assert ct["qParams"]["pinnedIds"] == [ids["L2-1"], sink, ids["L2-2"]]
    assert ct["qParams"]["supernodes"] == [["drivers", ids["L2-1"], ids["L2-2"]]]
    assert next(n for n in ct["nodes"] if n["node_id"] == ids["L2-1"])["clerp"].startswith("loss words")

    v = G.prune(G.prompt_view(p, "safe"), 0.8)
    pruning = {"method": "attribution share", "node_share": 0.8, "edge_share": 1.0}
    obj = json.loads(G.graph_json(v, pruning, ann, {"L2-2": "→ bet"}))
    assert obj["pruning"] == pruning and obj["annotations"]["supernodes"][0]["name"] == "drivers"
    by = {n["id"]: n for n in obj["nodes"]}
    assert by["L2-1"]["label"] == "loss words" and by["L2-1"]["pinned"] and by["L2-1"]["supernode"] == "drivers"
    assert by["L2-2"]["note"] == "check" and by["L2-2"]["auto_label"] == "→ bet" and not by["L2-2"]["pinned"]
    rows = list(csv.DictReader(io.StringIO(G.edges_csv(v, ann).decode())))
    first = next(r for r in rows if r["source"] == "L2-1")
    assert (first["source_label"], first["source_supernode"], first["source_pinned"], first["target_pinned"]) == \
        ("loss words", "drivers", "1", "1")


def test_average_linkage_matches_a_plain_loop():
    from explorer.annotations import _average_linkage

    def plain(sim, threshold):  # the textbook loop: recompute every cluster pair's mean
        clusters = [[i] for i in range(len(sim))]
        while len(clusters) > 1:
            best, pair = threshold - 1e-12, None
            for a in range(len(clusters)):
                for b in range(a + 1, len(clusters)):
                    s = float(np.mean([sim[x, y] for x in clusters[a] for y in clusters[b]]))
                    if s > best:
                        best, pair = s, (a, b)
            if pair is None:
                break
            clusters[pair[0]] += clusters[pair[1]]
            del clusters[pair[1]]
        return sorted(sorted(c) for c in clusters)

    rng = np.random.default_rng(1)
    for m in (1, 2, 7, 15):
        x = rng.normal(size=(m, 4))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        sim = x @ x.T
        for threshold in (0.2, 0.6, 0.9):
            assert sorted(sorted(c) for c in _average_linkage(sim, threshold)) == plain(sim, threshold)
