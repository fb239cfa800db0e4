"""The per-feature join of step 5: one flat record per selected feature.

Columns (missing inputs leave theirs null and are listed in `notes`):
- identity and direction, from features/causal_features.json;
- `audit_*`: the audit's recomputed per-feature statistics (audit/feature_effects.parquet,
  every column, prefixed);
- behaviour per condition from audit/trials.parquet (our re-parse): `n__<cond>`,
  `stop_rate__<cond>`, `mean_bet__<cond>` (valid bets only), and for each patched condition
  `delta_stop__<cond>` / `delta_bet__<cond>` against the baseline of the same prompt;
- `pathway_<prompt>_*`: the pathway index summary (upstream nodes, layers, edges, replayed
  and validated fraction, attribution-replay Pearson r and sign agreement) and the strongest
  upstream features by |attribution| summed over the prompts (`pathway_top_upstream`);
- `tokens_*`: top promoted / suppressed logit-lens tokens, the change in bet-vs-stop log-odds
  under ablation and amplification per prompt, the top activating response token, activation
  density, and the behavioural words significant after BH.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from engine.schema import (AUDIT_FEATURE_EFFECTS, AUDIT_TRIALS, CAUSAL_FEATURES, PATHWAYS_DIR, PATHWAYS_INDEX,
                           PATHWAYS_NODES, PATHWAY_SCHEMA_VERSION, read_artifact, tokens_path)

IDENTITY = ["feature", "layer", "feature_id", "direction", "cohen_d", "checkpoint_verdict", "recomputed_verdict",
            "n_trials", "source_file"]


def _num(v):
    if isinstance(v, bool) or v is None:
        return v
    if isinstance(v, (int, float)):
        return v if not (isinstance(v, float) and not math.isfinite(v)) else None
    try:
        return v.item()  # numpy scalars
    except AttributeError:
        return v


def load_selection(cache: Path) -> dict:
    return read_artifact(cache / CAUSAL_FEATURES, "causal feature selection",
                         rebuild="python -m engine select --config FILE")


def behaviour_table(cache: Path, features: list[str]):
    """Per feature: n, stop rate and mean bet per condition, and patched-minus-baseline deltas."""
    import pandas as pd

    path = cache / AUDIT_TRIALS
    if not path.is_file():
        return None
    t = pd.read_parquet(path, columns=["feature", "condition", "prompt", "patch", "action", "bet", "valid"])
    t = t[t["feature"].isin(features)]
    t = t[t["valid"].fillna(False).astype(bool)]
    t = t.assign(stop=(t["action"] == "stop").astype(float),
                 bet_amount=t["bet"].where(t["action"] == "bet"))
    g = t.groupby(["feature", "prompt", "patch"])
    stats = g.agg(n=("stop", "size"), stop_rate=("stop", "mean"), mean_bet=("bet_amount", "mean"),
                  condition=("condition", lambda s: s.mode().iloc[0])).reset_index()
    rows: dict[str, dict] = {}
    for rec in stats.to_dict(orient="records"):
        r = rows.setdefault(rec["feature"], {})
        c = rec["condition"]
        r[f"n__{c}"] = int(rec["n"])
        r[f"stop_rate__{c}"] = float(rec["stop_rate"])
        r[f"mean_bet__{c}"] = _num(rec["mean_bet"]) if pd.notna(rec["mean_bet"]) else None
    base = stats[stats["patch"] == "none"].set_index(["feature", "prompt"])
    for rec in stats[stats["patch"] != "none"].to_dict(orient="records"):
        key = (rec["feature"], rec["prompt"])
        if key not in base.index:
            continue
        b = base.loc[key]
        r = rows[rec["feature"]]
        r[f"delta_stop__{rec['condition']}"] = float(rec["stop_rate"] - b["stop_rate"])
        mb = rec["mean_bet"] - b["mean_bet"]
        r[f"delta_bet__{rec['condition']}"] = float(mb) if pd.notna(mb) else None
    return rows


def audit_effects(cache: Path):
    import pandas as pd

    path = cache / AUDIT_FEATURE_EFFECTS
    if not path.is_file():
        return None
    t = pd.read_parquet(path)
    if "feature" not in t.columns:
        return None
    out = {}
    drop = {"feature", "layer", "feature_id"}
    for rec in t.to_dict(orient="records"):
        out[str(rec["feature"])] = {f"audit_{k}": _num(v) for k, v in rec.items() if k not in drop
                                     and not isinstance(v, (list, dict))}
    return out


def pathway_summaries(cache: Path, top_upstream: int):
    """{feature: {columns}} from pathways/index.json and nodes.parquet (or the per-target files)."""
    import pandas as pd

    idx_path = cache / PATHWAYS_INDEX
    if not idx_path.is_file():
        return None
    index = read_artifact(idx_path, "pathway index", rebuild="python -m engine pathways --config FILE")
    out: dict[str, dict] = {}
    for t in index.get("targets", []):
        r = out.setdefault(t["feature"], {})
        for p, s in (t.get("prompts") or {}).items():
            for k in ("n_nodes", "n_edges", "n_layers", "n_replayed", "validated_fraction", "pearson_r",
                      "sign_agreement", "target_activation"):
                r[f"pathway_{p}_{k}"] = _num(s.get(k))
    nodes = node_table(cache)
    if nodes is not None and len(nodes):
        up = nodes[~nodes["is_target"].astype(bool)].copy()
        up["abs_attr"] = up["attribution"].abs()
        agg = up.groupby(["target_feature", "id"])["abs_attr"].sum().reset_index()
        agg = agg.sort_values(["target_feature", "abs_attr"], ascending=[True, False])
        for feat, g in agg.groupby("target_feature"):
            out.setdefault(feat, {})["pathway_top_upstream"] = g["id"].head(top_upstream).tolist()
            out[feat]["pathway_n_upstream"] = int(len(g))
            layers = up[up["target_feature"] == feat]["layer"]
            out[feat]["pathway_n_layers"] = int(layers.nunique())
    return out


def node_table(cache: Path):
    """pathways/nodes.parquet, or the same columns rebuilt from the per-target files."""
    import pandas as pd

    path = cache / PATHWAYS_NODES
    if path.is_file():
        return pd.read_parquet(path)
    rows = []
    for p in sorted((cache / PATHWAYS_DIR).glob("L*-*.json")):
        try:
            res = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if res.get("schema_version") != PATHWAY_SCHEMA_VERSION:
            continue
        for prompt, rec in (res.get("prompts") or {}).items():
            for n in rec.get("nodes", []):
                if n.get("kind", "feature") != "feature":
                    continue  # SAE-error and bias nodes are not features
                rows.append({"target_feature": res["feature"], "prompt": prompt, **{
                    k: n.get(k) for k in ("id", "layer", "feature_id", "is_target", "activation", "attribution",
                                          "replay_delta", "validated")}})
    return pd.DataFrame(rows) if rows else None


def token_summary(cache: Path, feature: str, n: int = 5) -> dict | None:
    path = tokens_path(cache, feature)
    if not path.is_file():
        return None
    try:
        doc = read_artifact(path, "token views", rebuild="python -m engine tokens --config FILE")
    except Exception:
        return None
    ll = doc.get("logit_lens", {})
    r = {
        "tokens_promoted": [e["token"] for e in ll.get("promoted", [])[:n]],
        "tokens_suppressed": [e["token"] for e in ll.get("suppressed", [])[:n]],
    }
    for s in ll.get("decision_summary", []):
        if s.get("context") == "choice" and "delta_bet_vs_stop_logodds" in s:
            r[f"tokens_{s['intervention']}_{s['prompt']}_delta_bet_vs_stop"] = s["delta_bet_vs_stop_logodds"]
        if s.get("context") == "amount" and "delta_mean_amount" in s:
            r[f"tokens_{s['intervention']}_{s['prompt']}_delta_mean_amount"] = s["delta_mean_amount"]
    top = doc.get("top_activating") or []
    r["tokens_top_activating"] = top[0]["token"] if top else None
    r["tokens_top_activation"] = top[0]["activation"] if top else None
    stats = doc.get("activation_stats") or {}
    r["tokens_density"] = stats.get("density")
    words = [w for w in doc.get("behavioural_words", []) if w.get("significant")]
    r["tokens_n_significant_words"] = int(sum(s.get("n_significant", 0) for s in doc.get("behavioural_summary", [])))
    r["tokens_top_words"] = [
        f"{'+' if w['log_odds'] > 0 else '-'}{w['term']} ({w['patched_condition']}, {w['tokenization']})"
        for w in words[:n]
    ]
    return r


def integrate_records(cache: Path, top_upstream: int) -> tuple[list[dict], list[str], dict]:
    """The joined records (strongest |cohen_d| first), notes on missing inputs, and the selection."""
    sel = load_selection(cache)
    feats = [f for f in sel.get("features", []) if isinstance(f, dict) and "feature" in f]
    names = [f["feature"] for f in feats]
    notes = []
    behaviour = behaviour_table(cache, names)
    if behaviour is None:
        notes.append(f"no trials table ({cache / AUDIT_TRIALS}): behavioural effects are empty; "
                     f"run `python -m engine audit --config FILE`")
    effects = audit_effects(cache)
    if effects is None:
        notes.append(f"no audit feature effects ({cache / AUDIT_FEATURE_EFFECTS})")
    pathways = pathway_summaries(cache, top_upstream)
    if pathways is None:
        notes.append(f"no pathway index ({cache / PATHWAYS_INDEX}): run `python -m engine pathways --config FILE`")
    records = []
    n_tokens = 0
    for f in feats:
        name = f["feature"]
        rec = {k: _num(f.get(k)) for k in IDENTITY}
        rec["trial_counts"] = json.dumps(f.get("trial_counts")) if f.get("trial_counts") is not None else None
        rec.update((behaviour or {}).get(name, {}))
        rec.update((effects or {}).get(name, {}))
        rec["has_pathway"] = bool(pathways and name in pathways)
        rec.update((pathways or {}).get(name, {}))
        tok = token_summary(cache, name)
        rec["has_tokens"] = tok is not None
        n_tokens += tok is not None
        rec.update(tok or {})
        records.append(rec)
    if feats and n_tokens == 0:
        notes.append("no token views (tokens/<feature>.json): run `python -m engine tokens --config FILE`")
    records.sort(key=lambda r: -abs(r.get("cohen_d") or 0.0))
    return records, notes, sel
