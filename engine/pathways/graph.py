"""Node selection, edge weights, agreement figures and the circuit-tracer export.

Pure Python/numpy on plain records, so the explorer and tests can use it without torch.

Graph definition (docs/science.md, "Pathway graphs"):
- Nodes: the target, and per upstream layer the features with the largest |attribution|:
  at most `top_k_per_layer`, and no more than needed to reach `coverage` of that layer's
  total |attribution|; optionally only the `max_graph_layers` layers with most |attribution|.
- Graph layers are the distinct layers holding nodes. Edges join nodes of successive graph
  layers, and the top graph layer to the target.
- Each graph layer also has an SAE-error and a decoder-bias node (kind "error" / "bias").
- Edge weight (edge_weight: exact): w(s -> v) = sum_{p in P_v} g_v[p] dpre_v[p]/d(s), with
  g_v[p] = <d_v, dpre_t/dh_{l_v}[p]>: the first-order effect on the target of source s through
  v's activation at every position; w(s -> t) = A_s. A source's attribution splits exactly
  (first order) into its out-edges, the next graph layer's other features and its SAE error
  (out_shares). edge_weight: approx keeps the old approximation raw(u -> v) * A_v / act_v,
  exact only when v is active at one position.
- Incoming edges of each node are pruned to the strongest covering `coverage` of their
  total |weight| (at most `top_k_per_layer`); edges into the target are all kept.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence


def select_indices(scores: Sequence[float], top_k: int, coverage: float) -> list[int]:
    """Indices of the largest |scores|: at most top_k, stopping once `coverage` of the total is reached."""
    order = sorted(range(len(scores)), key=lambda i: -abs(scores[i]))
    total = sum(abs(s) for s in scores)
    if total <= 0:
        return []
    kept, acc = [], 0.0
    for i in order[:top_k]:
        if scores[i] == 0:
            break
        kept.append(i)
        acc += abs(scores[i])
        if acc >= coverage * total - 1e-12 * total:
            break
    return kept


def graph_layers(nodes: Iterable[dict]) -> list[int]:
    return sorted({n["layer"] for n in nodes if not n.get("is_target")})


def prune_incoming(edges: list[dict], top_k: int, coverage: float, keep_targets: set[str]) -> list[dict]:
    """Keep, per downstream node, the strongest incoming edges covering `coverage` of |weight|."""
    by_target: dict[str, list[dict]] = {}
    for e in edges:
        by_target.setdefault(e["target"], []).append(e)
    out = []
    for tgt, es in by_target.items():
        if tgt in keep_targets:
            out.extend(e for e in es if e["weight"] != 0)
            continue
        idx = select_indices([e["weight"] for e in es], top_k, coverage)
        out.extend(es[i] for i in idx)
    return out


def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    n = len(x)
    if n < 3:
        return None
    mx, my = sum(x) / n, sum(y) / n
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    if sxx <= 0 or syy <= 0:
        return None
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    return sxy / math.sqrt(sxx * syy)


def agreement(nodes: Iterable[dict]) -> dict:
    """Attribution vs replay over replayed nodes: Pearson r of (A, -Δ) and sign agreement."""
    pairs = [(n["attribution"], -n["replay_delta"]) for n in nodes
             if not n.get("is_target") and n.get("replay_delta") is not None]
    if not pairs:
        return {"pearson_r": None, "sign_agreement": None, "n": 0}
    a = [p[0] for p in pairs]
    b = [p[1] for p in pairs]
    signs = [(x > 0) == (y > 0) for x, y in pairs if x != 0 and y != 0]
    return {
        "pearson_r": pearson(a, b),
        "sign_agreement": (sum(signs) / len(signs)) if signs else None,
        "n": len(pairs),
    }


def is_validated(attribution: float, replay_delta: float, target_pre: float, min_abs: float, min_rel: float) -> bool:
    """The measured change has the predicted sign (Δ ≈ -A) and is large enough."""
    big = abs(replay_delta) >= max(min_abs, min_rel * abs(target_pre))
    return bool(big and attribution != 0 and (replay_delta > 0) == (attribution < 0))


def validation(attribution: float | None, replay_delta: float | None, replay_delta_activation: float | None,
               target_pre: float, min_abs: float, min_rel: float) -> dict:
    """Replay verdicts, reported separately (None where the node was not replayed).

    linear_confirmed: the first-order estimate holds on the target's pre-activation;
    changes_target_activation: the same test on the target's gated activation, so it fails
    when the target does not fire before or after the ablation (every Δactivation 0);
    validated: both."""
    if attribution is None or replay_delta is None:
        return {"linear_confirmed": None, "changes_target_activation": None, "validated": None}
    lin = is_validated(attribution, replay_delta, target_pre, min_abs, min_rel)
    eff = (is_validated(attribution, replay_delta_activation, target_pre, min_abs, min_rel)
           if replay_delta_activation is not None else False)
    return {"linear_confirmed": lin, "changes_target_activation": eff, "validated": bool(lin and eff)}


SOURCE_KINDS = ("error", "bias")


def source_node_id(layer: int, kind: str) -> str:
    """Id of a layer's SAE-error or decoder-bias node: "L3-error", "L3-bias" (never a feature id)."""
    if kind not in SOURCE_KINDS:
        raise ValueError(kind)
    return f"L{layer}-{kind}"


def out_shares(attribution: float, to_graph: float, through_features: float | None) -> dict:
    """How a source's attribution A splits over the next graph layer (exact to first order):
    `out_weight` = sum of its out-edge weights before pruning (to_graph), and the shares of A
    reaching the target through the graph's nodes there, through that layer's other active
    features, and through that layer's SAE error. None where A is 0."""
    if not attribution:
        return {"out_weight": to_graph, "out_share": None, "out_shares": None}
    feats = to_graph if through_features is None else through_features
    return {"out_weight": to_graph, "out_share": to_graph / attribution,
            "out_shares": {"graph": to_graph / attribution, "other_features": (feats - to_graph) / attribution,
                           "sae_error": (attribution - feats) / attribution}}


# ---------------------------------------------------------------------------
# circuit-tracer / Neuronpedia graph JSON
# ---------------------------------------------------------------------------


def circuit_tracer_json(result: dict, prompt: str, scan: str = "llama3.1-8b",
                        source_set: str = "llamascope-res-32k") -> dict:
    """One prompt's pathway in the shape circuit-tracer's and Neuronpedia's viewers read.

    Our nodes are residual-SAE features aggregated over positions; each gets the position
    of its largest |attribution| as ctx_idx. The target is exported as the graph's sink
    (feature_type "logit", is_target_logit) since the viewers expect one; the metadata says so."""
    rec = result["prompts"][prompt]
    tokens = rec.get("tokens") or []
    n_layers = max([n["layer"] for n in rec["nodes"]] + [0]) + 1

    def node_id(n: dict) -> str:
        if n.get("is_target"):
            return f"{n_layers + 1}_{n['feature_id']}_{rec.get('target_position', len(tokens) - 1)}"
        return f"{n['layer']}_{n['feature_id']}_{ctx(n)}"

    def ctx(n: dict) -> int:
        if n.get("positions"):
            pa = n.get("position_attributions") or [0] * len(n["positions"])
            return int(n["positions"][max(range(len(pa)), key=lambda i: abs(pa[i]))])
        return int(rec.get("target_position", 0))

    ids = {n["id"]: node_id(n) for n in rec["nodes"]}
    total = sum(abs(n["attribution"]) for n in rec["nodes"] if not n.get("is_target")) or 1.0
    ranked = sorted((n for n in rec["nodes"] if not n.get("is_target")), key=lambda n: -abs(n["attribution"]))
    cum, influence = 0.0, {}
    for n in ranked:
        cum += abs(n["attribution"])
        influence[n["id"]] = cum / total
    nodes = []
    for n in rec["nodes"]:
        target = bool(n.get("is_target"))
        nodes.append({
            "node_id": ids[n["id"]],
            "feature": n["feature_id"],
            "layer": str(n_layers + 1) if target else str(n["layer"]),
            "ctx_idx": int(rec.get("target_position", 0)) if target else ctx(n),
            "feature_type": "logit" if target else "cross layer transcoder",
            "jsNodeId": ids[n["id"]],
            "clerp": (f"target {n['id']} pre-activation" if target else f"{n['id']} (LlamaScope resid SAE)"),
            "influence": None if target else round(influence[n["id"]], 6),
            "activation": n.get("activation"),
            "is_target_logit": target,
            "token_prob": 0.0,
        })
    links = [{"source": ids[e["source"]], "target": ids[e["target"]], "weight": e["weight"]}
             for e in rec["edges"] if e["source"] in ids and e["target"] in ids]
    return {
        "metadata": {
            "slug": f"{result['feature']}-{prompt}".lower(),
            "scan": scan,
            "prompt_tokens": tokens,
            "prompt": rec.get("text", ""),
            "schema_version": 1,
            "node_threshold": None,
            "feature_details": {"neuronpedia_source_set": source_set},
            "info": {
                "description": (
                    f"Pathway of residual-SAE feature {result['feature']} on the {prompt} prompt. "
                    "Feature nodes are LlamaScope residual SAE features (feature_type reused for viewer "
                    "compatibility); the sink node is the target feature's pre-activation, not a logit."
                ),
                "generator": {"name": "engine.pathways", "version": "1"},
            },
        },
        "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
        "nodes": nodes,
        "links": links,
    }
