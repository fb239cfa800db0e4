"""Pathway graphs as the Pathway page shows them: one prompt or the risky-minus-safe
difference, pruned by attribution share, laid out with networkx (layer on y).

Definitions used on the page (docs/cache_format.md, docs/science.md):
- a node's `attribution` is its first-order effect on the target's pre-activation
  (summed over positions); `replay_delta` is the measured change when the node is
  zero-ablated, which should be about minus the attribution;
- agreement over replayed nodes: Pearson r of (attribution, -replay_delta) and the
  share of nodes where the two have the same sign;
- difference mode: risky minus safe, a node or edge missing from one prompt counts 0
  there; a node counts as validated when replay validated it on either prompt.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field, replace
from typing import Iterable

import networkx as nx
import numpy as np
import pandas as pd

MODES = ("safe", "risky", "difference")
NODE_COLUMNS = ["id", "layer", "feature_id", "is_target", "activation", "attribution", "replay_delta",
                "patch_delta", "validated", "positions", "position_activations", "position_attributions",
                "kind", "linear_confirmed"]
EDGE_COLUMNS = ["source", "target", "weight", "raw", "validated"]


@dataclass
class View:
    feature: str
    mode: str
    nodes: pd.DataFrame
    edges: pd.DataFrame
    tokens: list[str] = field(default_factory=list)
    target_position: int | None = None
    info: dict = field(default_factory=dict)
    dropped_nodes: int = 0
    dropped_edges: int = 0

    @property
    def target(self) -> str:
        return self.feature


def available_modes(pathway: dict) -> list[str]:
    prompts = list(pathway.get("prompts", {}))
    modes = [p for p in ("safe", "risky") if p in prompts] + [p for p in prompts if p not in ("safe", "risky")]
    if "safe" in prompts and "risky" in prompts:
        modes.append("difference")
    return modes


def node_ids(pathway: dict, mode: str) -> set[str]:
    """Ids of the nodes of one prompt's graph (both prompts' for the difference)."""
    prompts = pathway.get("prompts", {})
    names = ("safe", "risky") if mode == "difference" else (mode,)
    return {str(n.get("id")) for p in names for n in (prompts.get(p) or {}).get("nodes", [])}


def _f(x) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return math.nan
    return v


def _node_frame(nodes: list[dict]) -> pd.DataFrame:
    rows = []
    for n in nodes:
        rows.append({
            "id": str(n["id"]),
            "layer": int(n["layer"]),
            "feature_id": n.get("feature_id"),
            "is_target": bool(n.get("is_target", False)),
            "activation": _f(n.get("activation")),
            "attribution": _f(n.get("attribution")),
            "replay_delta": _f(n.get("replay_delta")),
            "patch_delta": _f(n.get("patch_delta")),
            "validated": n.get("validated"),
            "positions": list(n.get("positions") or []),
            "position_activations": list(n.get("position_activations") or []),
            "position_attributions": list(n.get("position_attributions") or []),
            # pathway schema 2: feature | error | bias; the linear estimate's own verdict
            "kind": n.get("kind", "feature"),
            "linear_confirmed": n.get("linear_confirmed", n.get("validated")),
        })
    df = pd.DataFrame.from_records(rows, columns=NODE_COLUMNS)
    df["validated"] = df["validated"].astype(object)
    df["linear_confirmed"] = df["linear_confirmed"].astype(object)
    return df


def _edge_frame(edges: list[dict], validated_nodes: set[str]) -> pd.DataFrame:
    rows = []
    for e in edges:
        v = e.get("validated")
        rows.append({
            "source": str(e["source"]),
            "target": str(e["target"]),
            "weight": _f(e.get("weight")),
            "raw": _f(e.get("raw")),
            # Edges carry no replay of their own: solid when replay confirmed the source node.
            "validated": bool(v) if v is not None else str(e["source"]) in validated_nodes,
        })
    return pd.DataFrame.from_records(rows, columns=EDGE_COLUMNS)


def prompt_view(pathway: dict, mode: str) -> View:
    """The graph of one prompt, or the risky-minus-safe difference."""
    feature = str(pathway.get("feature"))
    prompts = pathway.get("prompts", {})
    if mode == "difference":
        return _difference(pathway)
    if mode not in prompts:
        raise KeyError(f"{feature} has no {mode!r} prompt (it has {', '.join(prompts)})")
    rec = prompts[mode]
    nodes = _node_frame(rec["nodes"])
    validated = set(nodes.loc[nodes["validated"].eq(True), "id"])
    edges = _edge_frame(rec["edges"], validated)
    info = {k: rec.get(k) for k in ("target_activation", "target_pre_activation", "agreement", "coverage",
                                     "n_tokens", "text")}
    return View(feature, mode, nodes, edges, list(rec.get("tokens") or []), rec.get("target_position"), info)


def _difference(pathway: dict) -> View:
    feature = str(pathway.get("feature"))
    safe = prompt_view(pathway, "safe")
    risky = prompt_view(pathway, "risky")
    keep = ["id", "layer", "feature_id", "is_target", "activation", "attribution", "replay_delta", "validated",
            "positions", "position_activations", "position_attributions", "kind", "linear_confirmed"]
    m = risky.nodes[keep].merge(safe.nodes[keep], on="id", how="outer", suffixes=("_r", "_s"), sort=False,
                                indicator=True)
    in_r = m["_merge"].isin(["both", "left_only"]).to_numpy()
    in_s = m["_merge"].isin(["both", "right_only"]).to_numpy()

    def pick(col: str) -> pd.Series:  # the risky record's value, else the safe one's
        return m[f"{col}_r"].where(in_r, m[f"{col}_s"])

    is_target = pick("is_target").astype(bool)
    attr_r = m["attribution_r"].astype(float)
    attr_s = m["attribution_s"].astype(float)
    diff = attr_r.fillna(0.0).where(in_r, 0.0) - attr_s.fillna(0.0).where(in_s, 0.0)

    def either(col: str) -> list:
        a_, b_ = m[f"{col}_r"].where(in_r, None), m[f"{col}_s"].where(in_s, None)
        return [True if (a is True or b is True) else (False if (a is False or b is False) else None)
                for a, b in zip(a_, b_)]

    validated = either("validated")
    nodes = pd.DataFrame({
        "id": m["id"], "layer": pick("layer").astype(int), "feature_id": pick("feature_id"), "is_target": is_target,
        "activation": np.fmax(m["activation_r"].astype(float), m["activation_s"].astype(float)),
        "attribution": diff.where(~is_target, np.nan),
        "replay_delta": m["replay_delta_r"].astype(float) - m["replay_delta_s"].astype(float),
        "patch_delta": np.nan,
        "validated": pd.Series(validated, dtype=object),
        "kind": pick("kind"), "linear_confirmed": pd.Series(either("linear_confirmed"), dtype=object),
        "positions": pick("positions"), "position_activations": pick("position_activations"),
        "position_attributions": pick("position_attributions"),
        "attribution_safe": attr_s.where(in_s, np.nan), "attribution_risky": attr_r.where(in_r, np.nan),
        "activation_safe": m["activation_s"].astype(float).where(in_s, np.nan),
        "activation_risky": m["activation_r"].astype(float).where(in_r, np.nan),
    })
    e = risky.edges.merge(safe.edges, on=["source", "target"], how="outer", suffixes=("_r", "_s"), sort=False)
    edges = pd.DataFrame({
        "source": e["source"], "target": e["target"],
        "weight": e["weight_r"].fillna(0.0) - e["weight_s"].fillna(0.0), "raw": np.nan,
        "validated": (e["validated_r"].fillna(False).astype(bool) | e["validated_s"].fillna(False).astype(bool)),
        "weight_safe": e["weight_s"], "weight_risky": e["weight_r"],
    })
    ta = {p: (pathway["prompts"][p].get("target_activation")) for p in ("safe", "risky")}
    info = {"target_activation": ta, "agreement": None, "coverage": None}
    return View(feature, "difference", nodes, edges, risky.tokens, risky.target_position, info)


def _z(x) -> float:
    x = _f(x)
    return 0.0 if math.isnan(x) else x


# ---------------------------------------------------------------------------
# Pruning
# ---------------------------------------------------------------------------


def keep_by_share(values: np.ndarray, share: float) -> np.ndarray:
    """Boolean mask of the fewest entries (largest |value| first) whose |values| reach `share` of the total."""
    v = np.abs(np.nan_to_num(np.asarray(values, dtype=float)))
    keep = np.zeros(len(v), dtype=bool)
    total = v.sum()
    if len(v) == 0 or total <= 0:
        return keep
    if share >= 1.0:
        keep[v > 0] = True
        return keep
    order = np.argsort(-v, kind="stable")
    cum = np.cumsum(v[order])
    n = int(np.searchsorted(cum, share * total - 1e-12 * total) + 1)
    keep[order[:n]] = True
    return keep


def prune(view: View, node_share: float = 1.0, edge_share: float = 1.0, max_edges: int | None = None,
          always: Iterable[str] = ()) -> View:
    """Keep the features covering `node_share` of their total |attribution| (the target, the
    error/bias nodes and the `always` nodes, e.g. pinned ones, too), then the edges between kept
    nodes covering `edge_share` of their |weight|, at most `max_edges`."""
    nodes = view.nodes
    # the target and the per-layer SAE-error/bias nodes (accounting, not features) are always kept
    fixed = nodes["is_target"].astype(bool) | nodes.get("kind", pd.Series("feature", index=nodes.index)).isin(
        ["error", "bias"])
    others = ~fixed
    keep = fixed.to_numpy().copy()
    keep[others.to_numpy()] = keep_by_share(nodes.loc[others, "attribution"].to_numpy(), node_share)
    keep |= nodes["id"].isin(set(always)).to_numpy()
    kept_nodes = nodes[keep]
    ids = set(kept_nodes["id"])
    edges = view.edges
    inside = edges[edges["source"].isin(ids) & edges["target"].isin(ids)]
    emask = keep_by_share(inside["weight"].to_numpy(), edge_share) if len(inside) else np.zeros(0, bool)
    kept_edges = inside[emask]
    if max_edges is not None and len(kept_edges) > max_edges:
        order = np.argsort(-np.abs(kept_edges["weight"].to_numpy()), kind="stable")[:max_edges]
        kept_edges = kept_edges.iloc[np.sort(order)]
    return replace(view, nodes=kept_nodes.reset_index(drop=True), edges=kept_edges.reset_index(drop=True),
                   dropped_nodes=len(nodes) - len(kept_nodes), dropped_edges=len(edges) - len(kept_edges))


# ---------------------------------------------------------------------------
# networkx graph and layout
# ---------------------------------------------------------------------------


def to_networkx(view: View) -> nx.DiGraph:
    g = nx.DiGraph(feature=view.feature, mode=view.mode)
    for rec in view.nodes.to_dict("records"):
        g.add_node(rec["id"], **rec)
    for rec in view.edges.to_dict("records"):
        if rec["source"] in g and rec["target"] in g:
            g.add_edge(rec["source"], rec["target"], **rec)
    return g


def strongest_position(rec: dict, default: int | None) -> int | None:
    pos = rec.get("positions") or []
    if not pos:
        return default
    attr = rec.get("position_attributions") or []
    if len(attr) == len(pos):
        return int(pos[int(np.argmax(np.abs(np.nan_to_num(np.asarray(attr, dtype=float)))))])
    return int(pos[0])


def position_of(d: dict, target_position: int | None) -> int:
    """The prompt position a node is drawn at in the position layout."""
    p = strongest_position(d, target_position) if not d.get("is_target") else target_position
    return 0 if p is None else int(p)


def layout(g: nx.DiGraph, x_mode: str = "attribution", target_position: int | None = None) -> dict[str, tuple[float, float]]:
    """Node -> (x, y) with y = layer. x: order by attribution within the layer (negative
    left), or the token position of the node's strongest attribution."""
    if g.number_of_nodes() == 0:
        return {}
    if x_mode == "position":
        out: dict[str, tuple[float, float]] = {}
        seen: dict[tuple[int, int], int] = {}
        base = {n: position_of(d, target_position) for n, d in g.nodes(data=True)}
        span = (max(base.values()) - min(base.values())) or 1
        # Nodes sharing a (layer, position) cell fan out by about a marker's width (24 px of a
        # 425 px plot), so that each stays visible and clickable.
        step = max(0.18, span * 24 / 425)
        for n, d in sorted(g.nodes(data=True), key=lambda kv: -abs(_z(kv[1].get("attribution")))):
            p = base[n]
            k = seen.get((d["layer"], p), 0)
            seen[(d["layer"], p)] = k + 1
            out[n] = (p + step * ((k + 1) // 2) * (1 if k % 2 else -1), float(d["layer"]))
        return out
    layers: dict[int, list[str]] = {}
    for n, d in sorted(g.nodes(data=True), key=lambda kv: (_z(kv[1].get("attribution")), kv[0])):
        layers.setdefault(int(d["layer"]), []).append(n)
    pos = nx.multipartite_layout(g, subset_key=layers, align="horizontal")
    return {n: (float(xy[0]), float(g.nodes[n]["layer"])) for n, xy in pos.items()}


# ---------------------------------------------------------------------------
# Agreement, details and exports
# ---------------------------------------------------------------------------


def agreement(nodes: pd.DataFrame) -> dict:
    """Pearson r of (attribution, -replay change) and sign agreement over replayed nodes."""
    sub = nodes[~nodes["is_target"].astype(bool)]
    a = sub["attribution"].to_numpy(dtype=float)
    d = -sub["replay_delta"].to_numpy(dtype=float)
    ok = np.isfinite(a) & np.isfinite(d)
    a, d = a[ok], d[ok]
    n = int(len(a))
    r = None
    if n >= 3 and a.std() > 0 and d.std() > 0:
        r = float(np.corrcoef(a, d)[0, 1])
    nz = (a != 0) & (d != 0)
    sign = float(np.mean(np.sign(a[nz]) == np.sign(d[nz]))) if nz.any() else None
    return {"n": n, "pearson_r": r, "sign_agreement": sign}


def validated_fraction(nodes: pd.DataFrame) -> float | None:
    sub = nodes.loc[~nodes["is_target"].astype(bool), "validated"]
    replayed = sub[sub.notna()]
    return float((replayed == True).mean()) if len(replayed) else None  # noqa: E712


def token_at(tokens: list[str], pos: int | None) -> str | None:
    if pos is None or not tokens or not 0 <= int(pos) < len(tokens):
        return None
    return tokens[int(pos)]


def node_details(pathway: dict, node_id: str) -> dict:
    """A node's numbers on every prompt that has it, with its positions' tokens."""
    out: dict = {"id": node_id, "prompts": {}}
    for name, rec in pathway.get("prompts", {}).items():
        for n in rec.get("nodes", []):
            if str(n.get("id")) != node_id:
                continue
            tokens = rec.get("tokens") or []
            positions = n.get("positions") or []
            pacts = n.get("position_activations") or [None] * len(positions)
            pattr = n.get("position_attributions") or [None] * len(positions)
            out["layer"] = n.get("layer")
            out["is_target"] = bool(n.get("is_target"))
            out["prompts"][name] = {
                "activation": n.get("activation"),
                "attribution": n.get("attribution"),
                "replay_delta": n.get("replay_delta"),
                "patch_delta": n.get("patch_delta"),
                "validated": n.get("validated"), "linear_confirmed": n.get("linear_confirmed"),
                "positions": [
                    {"position": int(p), "token": token_at(tokens, p), "activation": a, "attribution": t}
                    for p, a, t in zip(positions, pacts, pattr)
                ],
                "incoming": sorted(([e["source"], e["weight"]] for e in rec.get("edges", [])
                                    if str(e.get("target")) == node_id), key=lambda x: -abs(_z(x[1])))[:8],
                "outgoing": sorted(([e["target"], e["weight"]] for e in rec.get("edges", [])
                                    if str(e.get("source")) == node_id), key=lambda x: -abs(_z(x[1])))[:8],
            }
    return out


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (np.floating, np.integer)):
        return _clean(v.item())
    if isinstance(v, np.bool_):
        return bool(v)
    return v


def subgraph(full: View, keep: list[str] | set[str]) -> View:
    """The graph restricted to `keep` (pinned nodes) plus the target, with every edge of the
    full graph between them (circuit-tracer's pinned subgraph)."""
    ids = set(keep) | set(full.nodes.loc[full.nodes["is_target"].astype(bool), "id"])
    nodes = full.nodes[full.nodes["id"].isin(ids)]
    edges = full.edges[full.edges["source"].isin(ids) & full.edges["target"].isin(ids)]
    return replace(full, nodes=nodes.reset_index(drop=True), edges=edges.reset_index(drop=True),
                   dropped_nodes=len(full.nodes) - len(nodes), dropped_edges=len(full.edges) - len(edges))


def incident(view: View, node: str | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(edges touching `node`, `node` and its neighbours) for the filtered tables; the whole
    view when no node is selected."""
    if not node:
        return view.edges, view.nodes
    e = view.edges[(view.edges["source"] == node) | (view.edges["target"] == node)]
    ids = {node} | set(e["source"]) | set(e["target"])
    return e.reset_index(drop=True), view.nodes[view.nodes["id"].isin(ids)].reset_index(drop=True)


def _node_notes(ann: dict | None) -> tuple[dict, dict, set, dict]:
    ann = ann or {}
    groups = {m: sn["name"] for sn in ann.get("supernodes") or [] for m in sn.get("members", [])}
    return ann.get("labels") or {}, ann.get("notes") or {}, set(ann.get("pinned") or []), groups


def graph_json(view: View, pruning: dict, annotations: dict | None = None, auto_labels: dict | None = None) -> bytes:
    """The graph as shown (after pruning), for download: the pruning actually applied, the
    annotations, and per node its label, note, pin and supernode."""
    labels, notes, pinned, groups = _node_notes(annotations)
    auto_labels = auto_labels or {}
    nodes = []
    for r in view.nodes.to_dict("records"):
        rec = {k: _clean(v) if not isinstance(v, list) else v for k, v in r.items()}
        nid = rec["id"]
        rec.update({"auto_label": auto_labels.get(nid), "label": labels.get(nid), "note": notes.get(nid),
                    "pinned": nid in pinned, "supernode": groups.get(nid)})
        nodes.append(rec)
    obj = {
        "feature": view.feature,
        "prompt": view.mode,
        "pruning": pruning,
        "dropped": {"nodes": view.dropped_nodes, "edges": view.dropped_edges},
        "annotations": annotations,
        "nodes": nodes,
        "edges": [{k: _clean(v) for k, v in r.items()} for r in view.edges.to_dict("records")],
    }
    return json.dumps(obj, indent=1, allow_nan=False, default=str).encode()


def edges_csv(view: View, annotations: dict | None = None) -> bytes:
    """The edges shown, with each end's label, pin and supernode."""
    labels, _, pinned, groups = _node_notes(annotations)
    buf = io.StringIO()
    cols = [c for c in view.edges.columns]
    w = csv.writer(buf)
    w.writerow(["prompt", *cols, "source_label", "target_label", "source_supernode", "target_supernode",
                "source_pinned", "target_pinned"])
    for rec in view.edges.itertuples(index=False):
        d = dict(zip(cols, rec))
        s, t = d["source"], d["target"]
        w.writerow([view.mode, *["" if (isinstance(v, float) and math.isnan(v)) else v for v in rec],
                    labels.get(s, ""), labels.get(t, ""), groups.get(s, ""), groups.get(t, ""),
                    int(s in pinned), int(t in pinned)])
    return buf.getvalue().encode()
