"""The pathway index and the all-targets node and edge tables, rebuilt from the per-target files.

Rebuilding from whatever files exist makes sharded and resumed runs merge for free: each
rank (or restart) rewrites the index atomically from every finished target."""

from __future__ import annotations

import json
import time
from pathlib import Path

from engine.pathways import graph as G
from engine.schema import (PATHWAY_SCHEMA_VERSION, PATHWAYS_DIR, PATHWAYS_EDGES, PATHWAYS_INDEX, PATHWAYS_NODES,
                           atomic_write_json, atomic_write_parquet, iter_feature_files, pathway_export_path,
                           with_schema)


def summarise(result: dict) -> dict:
    prompts = {}
    for name, rec in result["prompts"].items():
        ups = [n for n in rec["nodes"] if not n.get("is_target") and n.get("kind", "feature") == "feature"]
        replayed = [n for n in ups if n.get("validated") is not None]
        prompts[name] = {
            "n_nodes": len(ups),
            "n_edges": len(rec["edges"]),
            "n_layers": len({n["layer"] for n in ups}),
            "n_replayed": len(replayed),
            "validated_fraction": (sum(1 for n in replayed if n["validated"]) / len(replayed)) if replayed else None,
            "linear_confirmed_fraction": ((sum(1 for n in replayed if n.get("linear_confirmed")) / len(replayed))
                                          if replayed else None),
            "pearson_r": rec["agreement"]["pearson_r"],
            "sign_agreement": rec["agreement"]["sign_agreement"],
            "target_activation": rec["target_activation"],
            "target_pre_activation": rec["target_pre_activation"],
            "top_upstream": [n["id"] for n in sorted(ups, key=lambda n: -abs(n["attribution"]))[:5]],
        }
    return {"feature": result["feature"], "layer": result["layer"], "feature_id": result["feature_id"],
            "method_hash": result["metadata"].get("method_hash"), "prompts": prompts}


def write_export(cache: Path, result: dict) -> list[Path]:
    out = []
    for prompt in result["prompts"]:
        p = pathway_export_path(cache, result["feature"], prompt)
        atomic_write_json(p, G.circuit_tracer_json(result, prompt), indent=None, fsync=False)
        out.append(p)
    return out


def rebuild(cache: Path) -> dict:
    """Rewrite index.json, nodes.parquet and edges.parquet from every pathways/L*-*.json."""
    import pandas as pd

    cache = Path(cache)
    targets, node_rows, edge_rows, bad = [], [], [], []
    for fid, path in iter_feature_files(cache / PATHWAYS_DIR):
        try:
            res = json.loads(path.read_text())
            if res.get("schema_version") != PATHWAY_SCHEMA_VERSION:
                raise ValueError(f"schema_version {res.get('schema_version')!r}")
            targets.append(summarise(res))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            bad.append({"file": str(path), "error": str(exc)})
            continue
        for prompt, rec in res["prompts"].items():
            # the tables hold features only (the SAE-error and bias nodes stay in the JSON)
            feats = [n for n in rec["nodes"] if n.get("kind", "feature") == "feature"]
            layer_of = {n["id"]: n["layer"] for n in feats}
            for n in feats:
                node_rows.append({
                    "target_feature": res["feature"], "prompt": prompt, "id": n["id"], "layer": n["layer"],
                    "feature_id": n["feature_id"], "is_target": n["is_target"], "activation": n["activation"],
                    "attribution": n["attribution"], "replay_delta": n["replay_delta"],
                    "replay_delta_activation": n["replay_delta_activation"], "patch_delta": n["patch_delta"],
                    "validated": n["validated"], "linear_confirmed": n.get("linear_confirmed"),
                    "changes_target_activation": n.get("changes_target_activation"), "out_share": n.get("out_share"),
                    "n_positions": len(n["positions"]),
                })
            for e in rec["edges"]:
                if e["source"] not in layer_of or e["target"] not in layer_of:
                    continue
                edge_rows.append({
                    "target_feature": res["feature"], "prompt": prompt, "source": e["source"], "target": e["target"],
                    "weight": e["weight"], "source_layer": layer_of.get(e["source"]),
                    "target_layer": layer_of.get(e["target"]),
                })
    targets.sort(key=lambda t: (t["layer"], t["feature_id"]))
    index = with_schema({
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "n_targets": len(targets),
        "targets": targets,
        "unreadable": bad,
    })
    atomic_write_json(cache / PATHWAYS_INDEX, index)
    node_cols = ["target_feature", "prompt", "id", "layer", "feature_id", "is_target", "activation", "attribution",
                 "replay_delta", "replay_delta_activation", "patch_delta", "validated", "linear_confirmed",
                 "changes_target_activation", "out_share", "n_positions"]
    edge_cols = ["target_feature", "prompt", "source", "target", "weight", "source_layer", "target_layer"]
    atomic_write_parquet(cache / PATHWAYS_NODES, pd.DataFrame(node_rows, columns=node_cols))
    atomic_write_parquet(cache / PATHWAYS_EDGES, pd.DataFrame(edge_rows, columns=edge_cols))
    return index
