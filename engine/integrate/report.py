"""The readable report `<cache>/integrated/report.md`: headline numbers, figures, tables."""

from __future__ import annotations

import statistics
from pathlib import Path


def _fmt(v, nd=3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}g}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, list):
        return ", ".join(str(x) for x in v) if v else "–"
    return str(v)


def _md_cell(v) -> str:
    return _fmt(v).replace("|", "\\|").replace("\n", " ")


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _table(headers: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(h.replace("|", "\\|") for h in headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def render(records: list[dict], union: dict, sel: dict, figures: list[dict], notes: list[str], meta: dict,
           prompts: list[str], top_hubs: int, report_dir: Path) -> str:
    n = len(records)
    by_dir: dict[str, int] = {}
    for r in records:
        by_dir[r.get("direction") or "unknown"] = by_dir.get(r.get("direction") or "unknown", 0) + 1
    layers = sorted({r["layer"] for r in records})
    d_abs = [abs(r["cohen_d"]) for r in records if r.get("cohen_d") is not None]
    with_pw = [r for r in records if r.get("has_pathway")]
    with_tok = [r for r in records if r.get("has_tokens")]
    lines = [
        "# Integrated report",
        "",
        f"Generated {meta['created']} from the cache `{meta['cache']}` (model `{meta.get('model')}`, SAE "
        f"`{meta.get('sae_source')}`, `{meta.get('encode_convention')}` encode convention). Selection: "
        f"`{sel.get('verdict', '?')}` verdict, top {sel.get('top_n', '?')} per layer by |Cohen's d|.",
        "",
        "## Headline numbers",
        "",
    ]
    head = [
        ["selected causal features", f"{n} (" + ", ".join(f"{k} {v}" for k, v in sorted(by_dir.items())) + ")"],
        ["layers with selected features", f"{len(layers)} ({layers[0]}–{layers[-1]})" if layers else "–"],
        ["median |Cohen's d| (checkpoint)", _fmt(_median(d_abs))],
    ]
    for cond, label in (("delta_stop__safe_with_safe_patch", "safe patch, safe prompt"),
                        ("delta_stop__risky_with_safe_patch", "safe patch, risky prompt"),
                        ("delta_stop__safe_with_risky_patch", "risky patch, safe prompt"),
                        ("delta_stop__risky_with_risky_patch", "risky patch, risky prompt")):
        for d in ("safe", "risky"):
            vals = [r[cond] for r in records if r.get(cond) is not None and r.get("direction") == d]
            if vals:
                head.append([f"mean Δ stop rate, {d} features, {label}",
                             f"{statistics.fmean(vals):+.3f} (n={len(vals)})"])
    head.append(["pathways computed", f"{len(with_pw)} of {n}"])
    for p in prompts:
        nodes = [r.get(f"pathway_{p}_n_nodes") for r in with_pw]
        if any(x is not None for x in nodes):
            head.append([f"median upstream nodes / validated fraction / Pearson r ({p})",
                         f"{_fmt(_median(nodes))} / {_fmt(_median([r.get(f'pathway_{p}_validated_fraction') for r in with_pw]))}"
                         f" / {_fmt(_median([r.get(f'pathway_{p}_pearson_r') for r in with_pw]))}"])
    head.append(["union graph", f"{union['n_nodes']} features, {union['n_edges']} edges; "
                                f"{union.get('n_shared', 0)} upstream features feed two or more targets"])
    head.append(["token views", f"{len(with_tok)} of {n}; "
                                f"{sum(1 for r in with_tok if (r.get('tokens_n_significant_words') or 0) > 0)} with "
                                f"at least one behavioural word significant after BH"])
    lines += [_table(["", ""], head), ""]
    if notes:
        lines += ["**Missing inputs.**", ""] + [f"- {x}" for x in notes] + [""]
    for fig in figures:
        rel_png = Path(fig["png"]).relative_to(report_dir)
        rel_html = Path(fig["html"]).relative_to(report_dir)
        lines += [f"## {fig['title']}", "", f"![{fig['title']}]({rel_png.as_posix()})", "",
                  f"[interactive version]({rel_html.as_posix()})", ""]
        if fig["name"] == "layer_counts":
            dirs = sorted(by_dir)
            rows = [[l] + [sum(1 for r in records if r["layer"] == l and (r.get("direction") or "unknown") == d)
                           for d in dirs] + [sum(1 for r in records if r["layer"] == l)] for l in layers]
            lines += [_table(["layer"] + dirs + ["total"], rows), ""]
        if fig["name"] == "hubs":
            rows = [[h["id"], h["n_targets"], h["abs_attribution"], "yes" if h["is_selected"] else "no",
                     h.get("direction"), h["targets"][:6] + (["…"] if len(h["targets"]) > 6 else [])]
                    for h in union["hubs"][:top_hubs]]
            lines += [_table(["hub feature", "targets fed", "Σ|attribution|", "itself selected", "direction",
                              "targets"], rows), ""]
    lines += ["## Strongest features", ""]
    rows = []
    for r in records[:20]:
        rows.append([
            r["feature"], r.get("direction"), r.get("cohen_d"),
            r.get("delta_stop__safe_with_safe_patch"), r.get("delta_stop__risky_with_risky_patch"),
            r.get(f"pathway_{prompts[0]}_n_nodes") if prompts else None,
            r.get(f"pathway_{prompts[0]}_pearson_r") if prompts else None,
            (r.get("pathway_top_upstream") or [])[:3],
            (r.get("tokens_promoted") or [])[:3],
            (r.get("tokens_top_words") or [])[:2],
        ])
    p0 = prompts[0] if prompts else "?"
    lines += [_table(["feature", "direction", "d", "Δstop safe/safe", "Δstop risky/risky", f"nodes ({p0})",
                      f"r ({p0})", "top upstream", "promoted tokens", "behavioural words (q ≤ α)"], rows), ""]
    lines += [
        "## How to read this",
        "",
        "- Δ stop rate: a patched condition's stop rate minus the same prompt's baseline, from our re-parse of "
        "the logged responses (audit/trials.parquet, valid trials only).",
        "- Pathways: nodes are upstream SAE features carrying the target's gradient × activation attribution; "
        "validated fraction counts replayed nodes whose real ablation moved the target as predicted; "
        "Pearson r compares attribution with the replay change (docs/science.md).",
        "- Tokens: logit lens through the final norm weight and the unembedding; behavioural words by "
        "log-odds with an informative Dirichlet prior, BH across words (docs/tokens.md).",
        "- Full per-feature data: `integrated/features.parquet` / `features.json`; the union graph: "
        "`integrated/union_graph.json`.",
        "",
    ]
    return "\n".join(lines)
