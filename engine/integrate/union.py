"""The union of all pathway graphs: one node per SAE feature, one edge per (source, target).

A node's `n_targets` is the number of distinct selected targets whose pathway (on any prompt)
contains it as an upstream node; `abs_attribution` sums its |attribution| over those pathways
and prompts. Upstream features that feed several targets are the hubs, ranked by n_targets,
then abs_attribution. An edge's `n_pathways` counts the (target, prompt) graphs holding it;
`weight_sum` adds their weights (so opposite signs cancel) and `abs_weight_sum` does not.
"""

from __future__ import annotations

from pathlib import Path


def union_graph(cache: Path, selected: dict[str, dict], top_hubs: int) -> dict:
    import pandas as pd

    from engine.integrate.join import node_table
    from engine.schema import PATHWAYS_EDGES

    nodes = node_table(cache)
    epath = cache / PATHWAYS_EDGES
    edges = pd.read_parquet(epath) if epath.is_file() else None
    if nodes is None or not len(nodes):
        return {"n_nodes": 0, "n_edges": 0, "n_targets": 0, "nodes": [], "edges": [], "hubs": []}
    nodes = nodes.copy()
    nodes["is_target"] = nodes["is_target"].astype(bool)
    nodes["abs_attr"] = nodes["attribution"].abs()
    up = nodes[~nodes["is_target"]]
    agg = up.groupby("id").agg(
        layer=("layer", "first"), feature_id=("feature_id", "first"),
        n_targets=("target_feature", "nunique"), n_pathways=("target_feature", "size"),
        abs_attribution=("abs_attr", "sum"), attribution=("attribution", "sum"),
        n_validated=("validated", lambda s: int((s == True).sum())),  # noqa: E712  (None is not validated)
        n_replayed=("validated", lambda s: int(s.notna().sum())),
    )
    targets_of = up.groupby("id")["target_feature"].agg(lambda s: sorted(set(s)))
    agg["targets"] = targets_of
    tnodes = nodes[nodes["is_target"]].groupby("id").agg(layer=("layer", "first"), feature_id=("feature_id", "first"))
    out_nodes = []
    for nid, r in agg.iterrows():
        out_nodes.append({
            "id": nid, "layer": int(r["layer"]), "feature_id": int(r["feature_id"]),
            "is_selected": nid in selected, "is_target": nid in tnodes.index,
            "direction": (selected.get(nid) or {}).get("direction"),
            "n_targets": int(r["n_targets"]), "n_pathways": int(r["n_pathways"]),
            "abs_attribution": float(r["abs_attribution"]), "attribution": float(r["attribution"]),
            "n_replayed": int(r["n_replayed"]), "n_validated": int(r["n_validated"]),
            "targets": list(r["targets"]),
        })
    for nid, r in tnodes.iterrows():
        if nid not in agg.index:
            out_nodes.append({
                "id": nid, "layer": int(r["layer"]), "feature_id": int(r["feature_id"]), "is_selected": nid in selected,
                "is_target": True, "direction": (selected.get(nid) or {}).get("direction"), "n_targets": 0,
                "n_pathways": 0, "abs_attribution": 0.0, "attribution": 0.0, "n_replayed": 0, "n_validated": 0,
                "targets": [],
            })
    out_nodes.sort(key=lambda n: (n["layer"], n["feature_id"]))
    ranked = sorted((n for n in out_nodes if n["n_targets"] > 0), key=lambda n: (-n["n_targets"], -n["abs_attribution"]))
    hubs = [{k: n[k] for k in ("id", "layer", "n_targets", "abs_attribution", "is_selected", "direction", "targets")}
            for n in ranked[:top_hubs]]
    out_edges = []
    if edges is not None and len(edges):
        e = edges.assign(abs_w=edges["weight"].abs(), key=edges["target_feature"] + "|" + edges["prompt"])
        g = e.groupby(["source", "target"]).agg(
            n_pathways=("key", "nunique"), n_targets=("target_feature", "nunique"),
            weight_sum=("weight", "sum"), abs_weight_sum=("abs_w", "sum"),
            source_layer=("source_layer", "first"), target_layer=("target_layer", "first"),
        ).reset_index()
        g = g.sort_values(["n_targets", "abs_weight_sum"], ascending=[False, False])
        for r in g.to_dict(orient="records"):
            out_edges.append({
                "source": r["source"], "target": r["target"], "n_pathways": int(r["n_pathways"]),
                "n_targets": int(r["n_targets"]), "weight_sum": float(r["weight_sum"]),
                "abs_weight_sum": float(r["abs_weight_sum"]),
                "source_layer": None if pd.isna(r["source_layer"]) else int(r["source_layer"]),
                "target_layer": None if pd.isna(r["target_layer"]) else int(r["target_layer"]),
            })
    return {
        "n_nodes": len(out_nodes), "n_edges": len(out_edges),
        "n_targets": int(nodes["target_feature"].nunique()),
        "n_shared": int(sum(1 for n in out_nodes if n["n_targets"] >= 2)),
        "nodes": out_nodes, "edges": out_edges, "hubs": hubs,
    }
