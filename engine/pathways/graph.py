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

#: Version of the export below (metadata.info.generator.version); bump when its content changes.
EXPORT_VERSION = "2"
#: Viewer feature_type per node kind. circuit-tracer's viewer knows "cross layer transcoder"
#: (features: examples, Cantor-paired label), "mlp reconstruction error" (counted as the "% Err"
#: share of a node's inputs), "embedding" and "logit". SAE-error and bias nodes are neither a
#: feature nor a token, so both use the error type; the node keeps our "kind" beside it.
CT_FEATURE_TYPE = {"feature": "cross layer transcoder", "error": "mlp reconstruction error",
                   "bias": "mlp reconstruction error"}
#: `feature` of error/bias nodes (circuit-tracer writes -1 for its error nodes); distinct values
#: keep an error and a bias node of one layer apart in the viewer's feature grouping.
CT_SPECIAL_FEATURE = {"error": -1, "bias": -2}


def cantor_pair(x: int, y: int) -> int:
    """circuit-tracer's node `feature` for schema_version 1: the Cantor pairing of (layer, index)."""
    return (x + y) * (x + y + 1) // 2 + y


def cantor_unpair(z: int) -> tuple[int, int]:
    """Inverse of cantor_pair, as the viewer computes it (util.cantorUnpair)."""
    w = (math.isqrt(8 * z + 1) - 1) // 2
    y = z - w * (w + 1) // 2
    return w - y, y


def _kind(n: dict) -> str:
    if n.get("is_target"):
        return "target"
    k = n.get("kind") or "feature"
    return k if k in CT_FEATURE_TYPE else "feature"


def _strongest(n: dict) -> int | None:
    """Index (into n["positions"]) of the position with the largest |attribution|."""
    pos = n.get("positions") or []
    if not pos:
        return None
    pa = n.get("position_attributions") or []
    if len(pa) != len(pos) or all(a is None for a in pa):
        acts = n.get("position_activations") or []
        if len(acts) == len(pos):
            return max(range(len(pos)), key=lambda i: abs(acts[i] or 0.0))
        return 0
    return max(range(len(pos)), key=lambda i: abs(pa[i] or 0.0))


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.4g}"


def ct_node_ids(rec: dict) -> dict[str, str]:
    """Our node id -> the node_id in the export (layer_index_ctx, as circuit-tracer writes them)."""
    tpos = int(rec.get("target_position", max(len(rec.get("tokens") or []) - 1, 0)))
    out = {}
    for n in rec["nodes"]:
        k = _kind(n)
        i = _strongest(n)
        ctx = int(n["positions"][i]) if i is not None else tpos
        if k == "target":
            out[n["id"]] = f"{int(n['layer']) + 1}_{n['feature_id']}_{tpos}"
        elif k == "feature":
            out[n["id"]] = f"{n['layer']}_{n['feature_id']}_{ctx}"
        else:
            out[n["id"]] = f"{n['layer']}_{k}_{ctx}"
    return out


def export_metadata(result: dict, prompt: str, slug: str, scan: str, source_set: str) -> dict:
    """The export's `metadata`, which is also its entry in the graph-metadata.json listing."""
    rec = result["prompts"][prompt]
    tokens = [str(t) for t in (rec.get("tokens") or [])] or [rec.get("text") or prompt]
    return {
        "slug": slug,
        "scan": scan,
        # circuit-tracer fills this only for a "custom-" scan made of several transcoder sets
        "transcoder_list": [],
        "prompt_tokens": tokens,
        "prompt": rec.get("text", ""),
        # influence below is the cumulative |attribution| share over the exported nodes, so 1.0
        # keeps them all: the viewer's pruning slider starts there
        "node_threshold": 1.0,
        "schema_version": 1,
        "title_prefix": f"{result['feature']} {prompt}:",
        "feature_details": {"neuronpedia_source_set": source_set},
        "info": {
            "description": (
                f"Pathway of residual-SAE feature {result['feature']} on the {prompt} prompt. Feature nodes "
                f"are residual-stream SAE features ({source_set}) aggregated over positions: ctx_idx is the "
                "position of the largest |attribution| and `activation` the activation there (the clerp "
                "gives the sum over positions). The sink node is the target feature's pre-activation "
                "(feature_type logit for the viewer), not a token logit. SAE-error and bias nodes use the "
                "viewer's error type."
            ),
            "generator": {"name": "engine.pathways", "version": EXPORT_VERSION},
        },
    }


def _annotation_ids(annotations: dict | None, ids: dict[str, str]) -> tuple[list[str], list[list[str]], dict]:
    """pinnedIds, supernodes ([label, member ids...]) and labels, in export ids. Ids absent
    from this prompt's graph are left out (a node can be in one prompt's graph only)."""
    if not annotations:
        return [], [], {}
    if not isinstance(annotations, dict):
        raise ValueError(f"annotations must be a mapping, got {type(annotations).__name__}")
    pinned = [ids[i] for i in annotations.get("pinned") or [] if i in ids]
    supernodes = []
    for k, sn in enumerate(annotations.get("supernodes") or []):
        if isinstance(sn, dict):
            name, members = sn.get("name"), sn.get("members")
        elif isinstance(sn, (list, tuple)) and sn:
            name, members = sn[0], list(sn[1:])
        else:
            raise ValueError(f"annotations supernodes[{k}] must be [name, member ids...] or {{name, members}}")
        if not isinstance(name, str) or not isinstance(members, list):
            raise ValueError(f"annotations supernodes[{k}] needs a name (text) and a list of members")
        mapped = [ids[m] for m in members if m in ids]
        if mapped:
            supernodes.append([name] + mapped)
    # the viewer draws a supernode only from pinned members
    for sn in supernodes:
        pinned.extend(m for m in sn[1:] if m not in pinned)
    labels = annotations.get("labels") or {}
    if not isinstance(labels, dict):
        raise ValueError("annotations labels must map node ids to text")
    return list(dict.fromkeys(pinned)), supernodes, {k: str(v) for k, v in labels.items() if k in ids}


def circuit_tracer_json(result: dict, prompt: str, scan: str = "llama3.1-8b",
                        source_set: str = "llamascope-res-32k", annotations: dict | None = None,
                        slug: str | None = None) -> dict:
    """One prompt's pathway as circuit-tracer 0.5.0's graph JSON (frontend/graph_models.Model).

    Our nodes are residual-SAE features aggregated over positions; each becomes one viewer node
    at the position of its largest |attribution| (ctx_idx) with that position's activation.
    `feature` is the Cantor pairing of (layer, index), as schema_version 1 requires. The target
    is the graph's sink (feature_type "logit", is_target_logit); its clerp carries the "(p=...)"
    the viewer parses, with n/a since the target is not a token. Nodes of kind error/bias map to
    the viewer's error type. `annotations` ({"pinned": [ids], "supernodes": [[name, ids...]] or
    [{"name", "members"}], "labels": {id: text}}, ids as in the pathway file) fill qParams and
    replace node clerps. `slug` defaults to <feature>.<prompt>, the export's file stem."""
    rec = result["prompts"][prompt]
    if slug is None:
        slug = f"{result['feature']}.{prompt}"
    tpos = int(rec.get("target_position", max(len(rec.get("tokens") or []) - 1, 0)))
    ids = ct_node_ids(rec)
    pinned, supernodes, labels = _annotation_ids(annotations, ids)

    # influence: cumulative share of |attribution| over the exported upstream nodes, strongest first
    ups = [n for n in rec["nodes"] if not n.get("is_target")]
    total = sum(abs(n.get("attribution") or 0.0) for n in ups) or 1.0
    cum, influence = 0.0, {}
    for n in sorted(ups, key=lambda n: -abs(n.get("attribution") or 0.0)):
        cum += abs(n.get("attribution") or 0.0)
        influence[n["id"]] = min(round(cum / total, 6), 1.0)

    nodes = []
    for n in rec["nodes"]:
        k = _kind(n)
        i = _strongest(n)
        acts = n.get("position_activations") or []
        layer = int(n["layer"])
        if k == "target":
            act, pre = rec.get("target_activation", n.get("activation")), rec.get("target_pre_activation")
            clerp = (f'Target "{n["id"]}" pre-activation {_fmt(pre)}, activation {_fmt(act)} '
                     "(p=n/a: a feature, not a token)")
            if n["id"] in labels:
                clerp = f'Target "{n["id"]}" {labels[n["id"]]} (p=n/a)'
            nodes.append({
                "node_id": ids[n["id"]], "feature": cantor_pair(layer, int(n["feature_id"])),
                "layer": str(layer + 1), "ctx_idx": tpos, "feature_type": "logit", "jsNodeId": ids[n["id"]],
                "clerp": clerp, "influence": None, "activation": act, "is_target_logit": True,
                "token_prob": 0.0, "kind": "target", "our_id": n["id"],
            })
            continue
        ctx = int(n["positions"][i]) if i is not None else tpos
        A = n.get("attribution")
        if k == "feature":
            act_here = float(acts[i]) if i is not None and i < len(acts) and acts[i] is not None else None
            act_sum = sum(a for a in acts if a is not None) if acts else n.get("activation")
            npos = len(n.get("positions") or [])
            clerp = f"{n['id']} (A {_fmt(A)}; act {_fmt(act_sum)} summed over {npos} position(s))"
            feature = cantor_pair(layer, int(n["feature_id"]))
        else:
            act_here, act_sum = None, None
            what = "SAE reconstruction error" if k == "error" else "bias terms"
            clerp = f"{n['id']} ({what} at layer {layer}; A {_fmt(A)})"
            feature = CT_SPECIAL_FEATURE[k]
        if n["id"] in labels:
            clerp = f"{labels[n['id']]} ({n['id']})"
        nodes.append({
            "node_id": ids[n["id"]], "feature": feature, "layer": str(layer), "ctx_idx": ctx,
            "feature_type": CT_FEATURE_TYPE[k], "jsNodeId": ids[n["id"]], "clerp": clerp,
            "influence": influence[n["id"]], "activation": act_here, "is_target_logit": False,
            "token_prob": 0.0,
            # ours, ignored by the viewer: what the node is, its position-summed figures, its replay
            "kind": k, "our_id": n["id"], "attribution": A, "activation_sum": act_sum,
            "replay_delta": n.get("replay_delta"), "validated": n.get("validated"),
        })
    links = [{"source": ids[e["source"]], "target": ids[e["target"]], "weight": e["weight"]}
             for e in rec["edges"] if e["source"] in ids and e["target"] in ids]
    return {
        "metadata": export_metadata(result, prompt, slug, scan, source_set),
        "qParams": {"pinnedIds": pinned, "supernodes": supernodes, "linkType": "both", "clickedId": "",
                    "sg_pos": ""},
        "nodes": nodes,
        "links": links,
    }
