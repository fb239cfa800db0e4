"""The pathway index and the all-targets node and edge tables, rebuilt from the per-target files.

Rebuilding from whatever files exist makes sharded and resumed runs merge for free: each
rank (or restart) rewrites the index atomically from every finished target."""

from __future__ import annotations

import json
import time
from pathlib import Path

from engine.pathways import graph as G
from engine.config import ExportConfig
from engine.errors import UserError
from engine.schema import (PATHWAY_SCHEMA_VERSION, PATHWAYS_DIR, PATHWAYS_EDGES, PATHWAYS_EXPORT_LISTING, PATHWAYS_INDEX,
                           PATHWAYS_NODES, atomic_write_json, atomic_write_parquet, file_lock,
                           iter_feature_files, pathway_export_path, pathway_export_slug, with_schema)


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


def _listing_lock(cache: Path) -> Path:
    return Path(cache) / PATHWAYS_DIR / ".graph-metadata.lock"


def _read_listing(path: Path) -> list[dict]:
    """The listing's entries; an unreadable listing counts as empty (it is rebuilt from results)."""
    try:
        graphs = json.loads(path.read_text()).get("graphs")
    except (OSError, ValueError, AttributeError):
        return []
    return [g for g in graphs if isinstance(g, dict) and isinstance(g.get("slug"), str)] if isinstance(graphs, list) else []


def _write_listing(path: Path, entries: list[dict]) -> None:
    entries = sorted(entries, key=lambda g: g["slug"])
    atomic_write_json(path, {"graphs": entries}, indent=None, fsync=False)


def write_export(cache: Path, result: dict, export: ExportConfig | None = None,
                 annotations: dict | None = None) -> list[Path]:
    """Write each prompt's circuit-tracer JSON (pathways/circuit_tracer/<slug>.json) and put its
    metadata into graph-metadata.json, the listing circuit-tracer's viewer opens. The listing's
    read-modify-write holds a lock, so concurrent ranks never lose each other's entries."""
    export = export or ExportConfig()
    cache = Path(cache)
    out, entries = [], []
    for prompt in result["prompts"]:
        slug = pathway_export_slug(result["feature"], prompt)
        doc = G.circuit_tracer_json(result, prompt, scan=export.scan, source_set=export.neuronpedia_source_set,
                                    annotations=annotations, slug=slug)
        p = pathway_export_path(cache, result["feature"], prompt)
        atomic_write_json(p, doc, indent=None, fsync=False)
        out.append(p)
        entries.append(doc["metadata"])
    listing = cache / PATHWAYS_EXPORT_LISTING
    with file_lock(_listing_lock(cache)):
        new = {g["slug"] for g in entries}
        _write_listing(listing, [g for g in _read_listing(listing) if g["slug"] not in new] + entries)
    return out


def _refresh_export(cache: Path, res: dict, export: ExportConfig, old: dict[str, dict]) -> tuple[list[dict], int]:
    """Listing entries of one result's graphs; rewrites each export that is missing or whose
    metadata differs from the listing's (older export version, other scan or source set)."""
    entries, rewritten = [], 0
    for prompt in res["prompts"]:
        slug = pathway_export_slug(res["feature"], prompt)
        meta = G.export_metadata(res, prompt, slug, export.scan, export.neuronpedia_source_set)
        p = pathway_export_path(cache, res["feature"], prompt)
        if old.get(slug) != meta or not p.is_file():
            doc = G.circuit_tracer_json(res, prompt, scan=export.scan, source_set=export.neuronpedia_source_set,
                                        slug=slug)
            atomic_write_json(p, doc, indent=None, fsync=False)
            rewritten += 1
        entries.append(meta)
    return entries, rewritten


def rebuild(cache: Path, export: ExportConfig | None = None) -> dict:
    """Rewrite index.json, nodes.parquet and edges.parquet from every pathways/L*-*.json, and the
    circuit-tracer listing graph-metadata.json (rewriting missing or stale exports first)."""
    cache = Path(cache)
    export = export or ExportConfig()
    with file_lock(_listing_lock(cache)):
        listing = cache / PATHWAYS_EXPORT_LISTING
        old = {g["slug"]: g for g in _read_listing(listing)}
        index, entries = _rebuild(cache, export, old)
        _write_listing(listing, entries)
    return index


def _rebuild(cache: Path, export: ExportConfig, old: dict[str, dict]) -> tuple[dict, list[dict]]:
    import pandas as pd

    targets, node_rows, edge_rows, bad, entries = [], [], [], [], []
    for fid, path in iter_feature_files(cache / PATHWAYS_DIR):
        try:
            res = json.loads(path.read_text())
            if res.get("schema_version") != PATHWAY_SCHEMA_VERSION:
                raise ValueError(f"schema_version {res.get('schema_version')!r}")
            summary = summarise(res)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            bad.append({"file": str(path), "error": str(exc)})
            continue
        targets.append(summary)
        try:
            entries.extend(_refresh_export(cache, res, export, old)[0])
        except (OSError, ValueError, KeyError, TypeError, UserError) as exc:  # the export is a view of the result
            bad.append({"file": str(path), "error": f"circuit-tracer export: {exc}"})
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
    return index, entries
