"""Step 5: `python -m engine integrate --config FILE`.

Joins, per selected feature, the selection (identity, direction, checkpoint statistics), the
audit's recomputed statistics, behavioural effects per context from the trials, the pathway
summary and the token views (`engine.integrate.join`); builds the union of all pathway graphs
with its hub features (`engine.integrate.union`); and writes a readable report with figures
(`engine.integrate.report`, `engine.integrate.figures`). Inputs other than the selection may
be missing: the report then says which and how to make them.

Writes `<cache>/integrated/features.parquet`, `features.json`, `union_graph.json`,
`report.md` and `figures/*.png|html`.
"""

from __future__ import annotations

import argparse
import time

from engine.config import Config


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-figures", action="store_true", help="write the tables and the report without figures")


def run_integrate(cfg: Config, figures: bool = True) -> dict:
    import pandas as pd

    from engine.integrate import figures as F
    from engine.integrate.join import integrate_records
    from engine.integrate.report import render
    from engine.integrate.union import union_graph
    from engine.schema import (INTEGRATED_DIR, INTEGRATED_FEATURES, INTEGRATED_FEATURES_JSON,
                               INTEGRATED_FIGURES_DIR, INTEGRATED_REPORT, INTEGRATED_UNION_GRAPH,
                               atomic_write_json, atomic_write_parquet, atomic_write_text, with_schema)

    cache = cfg.cache
    records, notes, sel = integrate_records(cache, cfg.integrate.top_upstream)
    selected = {r["feature"]: r for r in records}
    union = union_graph(cache, selected, cfg.integrate.top_hubs)
    created = time.strftime("%Y-%m-%dT%H:%M:%S")
    meta = {"created": created, "cache": str(cache), "model": cfg.model.name_or_path, "sae_source": cfg.sae.source,
            "encode_convention": cfg.sae.convention}
    frame = pd.DataFrame(records)
    for col in frame.columns:  # lists of strings stay lists; mixed object columns become strings
        if frame[col].dtype == object and not frame[col].map(lambda v: v is None or isinstance(v, (list, str))).all():
            frame[col] = frame[col].map(lambda v: None if v is None else str(v))
    out = []
    out.append(atomic_write_parquet(cache / INTEGRATED_FEATURES, frame))
    out.append(atomic_write_json(cache / INTEGRATED_FEATURES_JSON, with_schema(
        {"created": created, "n_features": len(records), "notes": notes, "features": records})))
    out.append(atomic_write_json(cache / INTEGRATED_UNION_GRAPH, with_schema({"created": created, **union}),
                                 indent=None))
    figs = []
    if figures and records:
        fig_dir = cache / INTEGRATED_FIGURES_DIR
        figs.append(F.layer_counts(records, fig_dir))
        figs.append(F.effect_sizes(records, fig_dir))
        for extra in (F.hubs(union, fig_dir, cfg.integrate.top_hubs),
                      F.pathway_agreement(records, list(cfg.pathways.prompts), fig_dir)):
            if extra:
                figs.append(extra)
    text = render(records, union, sel, figs, notes, meta, list(cfg.pathways.prompts), cfg.integrate.top_hubs,
                  cache / INTEGRATED_DIR)
    out.append(atomic_write_text(cache / INTEGRATED_REPORT, text))
    for f in figs:
        out += [f["png"], f["html"]]
    return {"files": out, "n_features": len(records), "notes": notes, "n_hubs": len(union["hubs"]),
            "union_nodes": union["n_nodes"], "union_edges": union["n_edges"]}


def main(args: argparse.Namespace, cfg: Config) -> int:
    from engine.manifest import record_step

    with record_step(cfg.cache, "integrate", device="cpu", cfg=cfg,
                     command=f"python -m engine integrate --config {cfg.source_path or 'FILE'}") as rec:
        res = run_integrate(cfg, figures=not args.no_figures)
        rec["outputs"] = [str(p) for p in res["files"]]
        rec["summary"] = {k: res[k] for k in ("n_features", "n_hubs", "union_nodes", "union_edges")}
    for note in res["notes"]:
        print(f"note: {note}")
    print(f"integrate: {res['n_features']} feature(s), union graph {res['union_nodes']} nodes / "
          f"{res['union_edges']} edges, {res['n_hubs']} hubs listed")
    for p in res["files"]:
        print(f"wrote {p}")
    return 0
