"""Composite, cached computations behind the pages (no streamlit): a pruned pathway view with
its figure, the feature table filters, the audit summaries. Cached on the source file's
stamp plus the page's settings, so a rerun with the same settings costs a dict lookup."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pandas as pd

from engine import schema
from explorer import data, figures
from explorer import graph as G
from explorer.context import AppContext


class Memo:
    """A small LRU cache on explicit keys (for values built from unhashable inputs)."""

    def __init__(self, maxsize: int):
        self.maxsize = maxsize
        self._d: OrderedDict = OrderedDict()

    def get(self, key: Any, build: Callable[[], Any]) -> Any:
        if key in self._d:
            self._d.move_to_end(key)
            return self._d[key]
        value = build()
        self._d[key] = value
        if len(self._d) > self.maxsize:
            self._d.popitem(last=False)
        return value

    def clear(self) -> None:
        self._d.clear()


# ---------------------------------------------------------------------------
# Pathway
# ---------------------------------------------------------------------------


@dataclass
class PathwayBundle:
    pathway: dict
    full: G.View
    shown: G.View
    figure: Any  # plotly Figure
    node_traces: set[int]
    agreement: dict
    validated_fraction: float | None
    auto_labels: dict = field(default_factory=dict)
    pruning: dict = field(default_factory=dict)  # what was applied, for the "as shown" JSON


_PATHWAYS = Memo(48)
_LABELS = Memo(64)


def auto_labels(ctx: AppContext, feature: str, mode: str, ids: list[str]) -> dict[str, str]:
    """Auto-labels of a graph's nodes, cached on the tokens folder's stamp."""
    key = (str(ctx.cache), feature, mode, data.stamp(ctx.cache / schema.TOKENS_DIR))
    return _LABELS.get(key, lambda: data.node_auto_labels(ctx, ids))


def pathway_bundle(ctx: AppContext, feature: str, mode: str, node_share: float, edge_share: float,
                   max_edges: int, x_mode: str = "attribution", title: str | None = None,
                   compact: bool = False, *, selected: str | None = None, pinned: tuple[str, ...] = (),
                   annotations: dict | None = None, pinned_subgraph: bool = False) -> PathwayBundle:
    """The pathway of `feature` on `mode`, pruned (pinned and selected nodes always kept), or
    only the pinned nodes with the target, with its labelled figure. Raises CacheProblem."""
    pathway = data.pathway(ctx, feature)
    path = schema.pathway_path(ctx.cache, feature)
    ann = annotations or {}
    ann_key = (tuple((k, v) for k, v in sorted((ann.get("labels") or {}).items())),
               tuple((sn["name"], tuple(sn["members"])) for sn in ann.get("supernodes") or []))
    pinned = tuple(pinned)
    key = (str(path), data.stamp(path), data.stamp(ctx.cache / schema.TOKENS_DIR), mode, round(node_share, 4),
           round(edge_share, 4), max_edges, x_mode, title, compact, selected, pinned, ann_key, pinned_subgraph)

    def build() -> PathwayBundle:
        try:
            full = G.prompt_view(pathway, mode)
            keep = set(pinned) | ({selected} if selected else set())
            if pinned_subgraph and pinned:
                shown = G.subgraph(full, keep)
                pruning = {"method": "pinned subgraph", "pinned": list(pinned)}
            else:
                shown = G.prune(full, node_share, edge_share, max_edges, always=keep)
                inside = full.edges["source"].isin(set(shown.nodes["id"])) & full.edges["target"].isin(set(shown.nodes["id"]))
                by_share = int(G.keep_by_share(full.edges.loc[inside, "weight"].to_numpy(), edge_share).sum())
                pruning = {"method": "attribution share", "node_share": node_share, "edge_share": edge_share,
                           "max_edges": max_edges, "edge_cap_applied": by_share > max_edges,
                           "always_kept": sorted(keep)}
            pruning.update({"nodes_shown": len(shown.nodes), "nodes_total": len(full.nodes),
                            "edges_shown": len(shown.edges), "edges_total": len(full.edges), "layout": x_mode})
            labels = auto_labels(ctx, feature, mode, full.nodes["id"].tolist())
            label = "attribution, risky − safe" if mode == "difference" else "attribution"
            fig = figures.pathway_figure(shown, x_mode, title or pathway_title(feature, mode), label, compact=compact,
                                         auto_labels=labels, user_labels=ann.get("labels"), selected=selected,
                                         pinned=pinned, supernodes=ann.get("supernodes"))
            return PathwayBundle(pathway, full, shown, fig, figures.node_trace_indices(fig),
                                 G.agreement(full.nodes), G.validated_fraction(full.nodes), labels, pruning)
        except Exception as exc:  # noqa: BLE001  (values the shape check let through: the file is the problem)
            rel = f"{schema.PATHWAYS_DIR}/{schema.safe_feature_filename(feature)}"
            raise data.CacheProblem(f"The pathway file `{rel}` cannot be drawn ({type(exc).__name__}: "
                                    f"{data._short_exc(exc)}).", data.pathway_command(ctx, feature), "schema") from None

    return _PATHWAYS.get(key, build)


_SUGGESTED = Memo(32)
_DOWNLOADS = Memo(16)


def download_bytes(ctx: AppContext, bundle: PathwayBundle, ann: dict | None) -> tuple[bytes, bytes, bytes | None]:
    """(graph JSON as shown, edges CSV, circuit-tracer JSON with the annotations or None) of
    a bundle, built once per bundle and annotations (the value holds the bundle, so its id is
    not reused meanwhile)."""
    import json

    from explorer import annotations as A

    view = bundle.shown
    key = (id(bundle), json.dumps(ann, sort_keys=True, default=str))

    def build():
        ct = data.pathway_export(ctx, view.feature, view.mode) if view.mode != "difference" else None
        if ct and ann and A.circuit_tracer_annotations(ann):
            # the engine's own exporter, so pins, supernodes and labels use the export's node ids
            from engine.pathways.graph import circuit_tracer_json

            export = ctx.cfg.export
            try:
                doc = circuit_tracer_json(bundle.pathway, view.mode, scan=export.scan,
                                          source_set=export.neuronpedia_source_set,
                                          annotations=A.circuit_tracer_annotations(ann))
                ct = json.dumps(doc).encode()
            except (ValueError, KeyError, TypeError):
                pass  # a pathway the exporter cannot read: offer the export as written
        return bundle, (G.graph_json(view, bundle.pruning, ann, bundle.auto_labels), G.edges_csv(view, ann), ct)

    return _DOWNLOADS.get(key, build)[1]


def suggested_supernodes(ctx: AppContext, bundle: PathwayBundle, exclude: set[str]) -> list[dict]:
    """annotations.suggest_supernodes on the full graph, cached on the pathway file's stamp."""
    from explorer import annotations as A

    path = schema.pathway_path(ctx.cache, bundle.full.feature)
    key = (str(path), data.stamp(path), bundle.full.mode, frozenset(exclude))
    return _SUGGESTED.get(key, lambda: A.suggest_supernodes(bundle.full.nodes, bundle.full.edges, exclude=exclude))


def pathway_title(feature: str, mode: str) -> str:
    what = "risky − safe difference" if mode == "difference" else f"{mode} prompt"
    return f"Pathway of {feature} · {what}"


def coverage_share(cov: dict | None) -> float | None:
    """Share of all active upstream features' |attribution| that the graph's nodes hold."""
    if not isinstance(cov, dict):
        return None
    for part, whole in (("attribution_abs_in_graph", "attribution_abs_total"), ("attribution_in_graph", "attribution_total")):
        if cov.get(part) is not None and cov.get(whole):
            return abs(cov[part]) / abs(cov[whole])
    return None


def prototype_view(result: dict) -> dict:
    """Per prompt: target activation, rank, and the strongest upstream features."""
    out = {}
    for name, rec in (result.get("prompts") or {}).items():
        out[name] = {
            "activation": rec.get("target_activation"),
            "pre_activation": rec.get("target_pre_activation"),
            "rank": rec.get("target_rank"),
            "n_tokens": rec.get("n_tokens"),
        }
    return out


def prototype_tables(result: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(upstream candidates wide by prompt, SAE stats per layer and prompt)."""
    ups = pd.DataFrame(result.get("upstream_candidates") or [], columns=["source", "source_layer", "activation", "prompt"])
    if len(ups):
        ups = (ups.pivot_table(index=["source", "source_layer"], columns="prompt", values="activation", aggfunc="max")
               .reset_index().rename(columns={"source": "feature", "source_layer": "layer"}))
        ups.columns.name = None
        val_cols = [c for c in ups.columns if c not in ("feature", "layer")]
        ups = ups.assign(_m=ups[val_cols].max(axis=1)).sort_values("_m", ascending=False).drop(columns="_m")
    stats = []
    for name, rec in (result.get("prompts") or {}).items():
        for layer, s in (rec.get("sae_stats") or {}).items():
            stats.append({"prompt": name, "layer": int(layer), "L0": s.get("l0"), "relative error": s.get("relative_error")})
    return ups.reset_index(drop=True), pd.DataFrame(stats)


# ---------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------


def filter_features(df: pd.DataFrame, layers: list[int] | None = None, directions: list[str] | None = None,
                    min_abs_d: float = 0.0, only_validated: bool = False, search: str = "") -> pd.DataFrame:
    mask = np.ones(len(df), dtype=bool)
    if layers:
        mask &= df["layer"].isin(layers).to_numpy()
    if directions:
        mask &= df["direction"].isin(directions).to_numpy()
    if min_abs_d > 0:
        mask &= (df["abs_d"].fillna(0) >= min_abs_d).to_numpy()
    if only_validated:
        mask &= (df["has_pathway"] & (df["validated"].fillna(0) > 0)).to_numpy()
    text = (search or "").strip().lower()
    if text:
        hay = df["feature"].str.lower()
        for col in ("direction", "source_file", "label"):
            if col in df.columns:
                hay = hay + " " + df[col].astype(str).str.lower()
        mask &= hay.str.contains(text, regex=False).to_numpy()
    return df[mask].reset_index(drop=True)


# ---------------------------------------------------------------------------
# Audit
# ---------------------------------------------------------------------------

_AUDIT = Memo(8)


def _pick(d: dict, *names: str, default=None):
    for n in names:
        if isinstance(d, dict) and d.get(n) is not None:
            return d[n]
    return default


def _total(x) -> int | None:
    """A count, or the sum of a per-kind breakdown ({"checkpoints": 21, "responses": 14})."""
    if isinstance(x, dict):
        vals = [v for v in x.values() if isinstance(v, (int, float))]
        return int(sum(vals)) if vals else None
    return x if isinstance(x, (int, float)) else None


def _breakdown(x) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in x.items()) if isinstance(x, dict) else ""


def audit_headline(v: dict) -> dict:
    """The numbers of the audit's headline, from data_validation.json."""
    results = v.get("audit_results") or {}
    rec = v.get("recomputed") or {}
    return {
        "files": _total(_pick(v, "files_read", "n_files")),
        "files_detail": _breakdown(v.get("files_read")),
        "records": _total(_pick(v, "records_read", "n_records")),
        "records_detail": _breakdown(v.get("records_read")),
        "valid_trials": _pick(v, "valid_unique_trials", "total_trials"),
        "duplicates": _pick(v, "duplicates", "n_duplicates"),
        "invalid_records": v.get("invalid_records"),
        "join_rate": _pick(v, "join_rate_percent"),
        "causal": _pick(v, "total_causal_features"),
        "joinable": _pick(v, "joinable_features"),
        "validated": _pick(v, "validated") if "validated" in v else results.get("validated"),
        "errors": _pick(results, "n_errors", default=len(results["errors"]) if isinstance(results.get("errors"), list)
                        else results.get("errors")),
        "warnings": _pick(results, "n_warnings", default=len(results["warnings"]) if isinstance(results.get("warnings"), list)
                          else results.get("warnings")),
        "recomputed_causal": rec.get("causal"),
        "verdicts_compared": rec.get("compared_with_checkpoint"),
        "verdicts_agree": rec.get("agree"),
        "expected_per_condition": _pick(v, "n_trials_per_condition", "expected_trials_per_condition"),
    }


def coverage_matrix(fc: pd.DataFrame, expected: int | None, conditions: list[str]) -> pd.DataFrame:
    """Share of each layer's features with at least `expected` trials in each condition."""
    if fc is None or not len(fc):
        return pd.DataFrame()
    fc = fc.copy()
    if "layer" not in fc.columns:
        fc["layer"] = fc["feature"].astype(str).str.extract(r"^L([0-9]+)-")[0].astype(int)
    need = expected if expected else max(1, int(fc["n_trials"].mode().iloc[0]))
    fc["full"] = fc["n_trials"] >= need
    wide = fc.pivot_table(index="layer", columns="condition", values="full", aggfunc="mean", fill_value=0.0,
                          observed=True)
    cols = [c for c in conditions if c in wide.columns] + [c for c in wide.columns if c not in conditions]
    return wide[cols].sort_index()


def expected_trials(fc: pd.DataFrame | None, headline: dict) -> int | None:
    e = headline.get("expected_per_condition")
    if e:
        return int(e)
    if fc is not None and len(fc):
        return int(fc["n_trials"].mode().iloc[0])
    return None


def parse_summary(v: dict, trials: pd.DataFrame | None) -> dict | None:
    """Valid parses under the study's parser and ours, and where they disagree.

    From the audit's `parser_comparison` when present, else counted from the trial table
    (columns study_valid/valid and study_action/action)."""
    p = v.get("parser_comparison") if isinstance(v.get("parser_comparison"), dict) else None
    if p and p.get("trials"):
        return {"compared": p["trials"], "study_valid": p.get("study_valid"), "our_valid": p.get("ours_valid"),
                "both_valid": p.get("both_valid"), "disagree": p.get("action_disagree"),
                "study_stop_ours_bet": p.get("study_stop_ours_bet"), "study_bet_ours_stop": p.get("study_bet_ours_stop"),
                "bet_amount_disagree": p.get("bet_amount_disagree")}
    if trials is None or not len(trials):
        return None
    ours_valid = "valid" if "valid" in trials.columns else ("our_valid" if "our_valid" in trials.columns else None)
    ours_action = "action" if "action" in trials.columns else ("our_action" if "our_action" in trials.columns else None)
    out: dict = {"compared": int(len(trials))}
    sv = trials["study_valid"].fillna(False).astype(bool) if "study_valid" in trials.columns else None
    ov = trials[ours_valid].fillna(False).astype(bool) if ours_valid else None
    if sv is not None:
        out["study_valid"] = int(sv.sum())
    if ov is not None:
        out["our_valid"] = int(ov.sum())
    if sv is not None and ov is not None and ours_action and "study_action" in trials.columns:
        both = sv & ov
        out["both_valid"] = int(both.sum())
        sa, oa = trials["study_action"].astype(str), trials[ours_action].astype(str)
        out["disagree"] = int((both & (sa != oa)).sum())
        out["study_stop_ours_bet"] = int((both & (sa == "stop") & (oa == "bet")).sum())
        out["study_bet_ours_stop"] = int((both & (sa == "bet") & (oa == "stop")).sum())
    return out if len(out) > 1 else None


def audit_trial_summary(ctx: AppContext, v: dict) -> dict | None:
    """parse_summary over the trial table, cached on the table's stamp (1.8M rows: read once)."""
    path = ctx.cache / schema.AUDIT_TRIALS
    key = (str(path), data.stamp(path))
    if isinstance(v.get("parser_comparison"), dict) and v["parser_comparison"].get("trials"):
        return parse_summary(v, None)
    return _AUDIT.get(key, lambda: parse_summary(v, data.audit_trials(ctx)))


def preview_prompt(rec) -> str:
    """The prompt a feature's preview shows: where the feature is more active, so the graph
    explains an activation rather than an off feature; by its direction when both are off."""
    import math

    safe, risky = rec.get("act_safe"), rec.get("act_risky")
    safe = 0.0 if safe is None or (isinstance(safe, float) and math.isnan(safe)) else float(safe)
    risky = 0.0 if risky is None or (isinstance(risky, float) and math.isnan(risky)) else float(risky)
    if safe != risky:
        return "safe" if safe > risky else "risky"
    return "risky" if rec.get("direction") == "risky" else "safe"


def decision_tables(summary: list[dict]) -> dict[str, pd.DataFrame]:
    """Step 4's decision summary as one table per context, so that no column is empty:
    'choice' (Δ log-odds of bet vs stop) and 'amount' (Δ mean bet in dollars)."""
    if not summary:
        return {}
    df = pd.DataFrame(summary)
    if "context" not in df.columns:
        return {}
    effect = {"choice": "delta_bet_vs_stop_logodds", "amount": "delta_mean_amount"}
    out = {}
    for context, col in effect.items():
        part = df[df["context"] == context]
        if part.empty or col not in part.columns:
            continue
        keep = [c for c in ("prompt", "intervention", "value", "activation", col) if c in part.columns]
        out[context] = part[keep].reset_index(drop=True)
    return out


def low_precision(meta: dict) -> bool:
    """Whether a pathway was computed in a 16-bit dtype (its node order is approximate)."""
    return str(meta.get("dtype") or "").removeprefix("torch.") in ("bfloat16", "float16", "bf16", "fp16", "half")


# ---------------------------------------------------------------------------
# Tables with missing numbers
# ---------------------------------------------------------------------------

MISSING = "–"


def numbers_as_text(df: pd.DataFrame, formats: dict[str, str], missing: str = MISSING) -> pd.DataFrame:
    """Format the numeric columns in `formats` ("{:.3f}") as text, a missing value (None, NaN)
    as `missing`. Streamlit's grid draws a missing number as the word "None", and ignores a
    Styler's na_rep, so tables whose numbers may be absent show text instead."""
    out = df.copy()
    for col, spec in formats.items():
        if col in out.columns:
            out[col] = [missing if _is_missing(v) else spec.format(v) for v in out[col].tolist()]
    return out


def _is_missing(v) -> bool:
    if v is None:
        return True
    try:
        return bool(np.isnan(v))
    except TypeError:
        return False


# ---------------------------------------------------------------------------
# Intervention runs
# ---------------------------------------------------------------------------


def _pct(x) -> str:
    return MISSING if _is_missing(x) else f"{100 * x:.0f}%"


def _ci(ci) -> str:
    if not ci or any(_is_missing(c) for c in ci):
        return MISSING
    return f"{100 * ci[0]:.0f}–{100 * ci[1]:.0f}%"


def intervention_table(result: dict) -> pd.DataFrame:
    """One row per prompt and arm: decisions, valid, stop and bet rates with Wilson 95% intervals,
    mean bet, and on the patched row the change and its p-value."""
    rows = []
    for prompt, rec in (result.get("prompts") or {}).items():
        for arm in ("baseline", "patched"):
            s = rec.get(arm) or {}
            row = {"prompt": prompt, "arm": "unpatched" if arm == "baseline" else result.get("mode", "patched"),
                   "decisions": s.get("n"), "valid": s.get("valid"),
                   "stop rate": _pct(s.get("stop_rate")), "stop 95% CI": _ci(s.get("stop_ci")),
                   "bet rate": _pct(s.get("bet_rate")), "bet 95% CI": _ci(s.get("bet_ci")),
                   "mean bet": MISSING if s.get("mean_bet") is None else f"${s['mean_bet']:.1f}",
                   "Δ stop": MISSING, "p (stop)": MISSING}
            if arm == "patched":
                d, p = rec.get("delta_stop_rate"), rec.get("stop_p_value")
                row["Δ stop"] = MISSING if d is None else f"{100 * d:+.0f} pts"
                row["p (stop)"] = MISSING if p is None else f"{p:.3g}"
            rows.append(row)
    return pd.DataFrame(rows, columns=["prompt", "arm", "decisions", "valid", "stop rate", "stop 95% CI", "bet rate",
                                       "bet 95% CI", "mean bet", "Δ stop", "p (stop)"])


def intervention_samples(result: dict, prompt: str, limit: int = 200) -> pd.DataFrame:
    """The sampled replies side by side (same seed: row i of both arms drew the same random numbers)."""
    arms = (result.get("samples") or {}).get(prompt) or {}
    base, patched = arms.get("baseline") or [], arms.get("patched") or []
    rows = []
    for i in range(min(limit, max(len(base), len(patched)))):
        b = base[i] if i < len(base) else {}
        p = patched[i] if i < len(patched) else {}
        rows.append({"#": i + 1, "unpatched": _decision(b), "unpatched reply": (b.get("response") or "").strip(),
                     "patched": _decision(p), "patched reply": (p.get("response") or "").strip()})
    return pd.DataFrame(rows, columns=["#", "unpatched", "unpatched reply", "patched", "patched reply"])


def _decision(d: dict) -> str:
    if not d:
        return ""
    if d.get("action") == "bet":
        return f"bet ${d['bet']}" if d.get("bet") is not None else "bet"
    return d.get("action") or ""
