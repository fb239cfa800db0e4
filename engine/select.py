"""Step 1: select the top causal features per layer (`python -m engine select`).

Reads the audit's tables and writes `<cache>/features/causal_features.json` (+ a Parquet
copy): per layer, the top N causal features by |Cohen's d| (the plan's rule), where
"causal" is the checkpoint's own verdict (`--verdict checkpoint`, as the plan) or ours
recomputed from the trials (`--verdict recomputed`). Direction is the record's own
classification or effects (docs/audit.md), else the recomputed one; features without a
finite cohen_d cannot be ranked and are counted, not selected.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--top-n", type=int, default=None, metavar="N", help="features kept per layer (default select.top_n)")
    p.add_argument("--verdict", choices=["checkpoint", "recomputed"], default=None,
                   help="which causal verdict to use (default select.verdict)")


def select_features(cfg, top_n: int, verdict: str) -> dict:
    import math

    import numpy as np
    import pandas as pd

    from engine.errors import UserError
    from engine.schema import AUDIT_FEATURE_CONDITIONS, AUDIT_FEATURE_EFFECTS, with_schema

    fe_path = cfg.cache / AUDIT_FEATURE_EFFECTS
    fc_path = cfg.cache / AUDIT_FEATURE_CONDITIONS
    if not fe_path.is_file() or not fc_path.is_file():
        raise UserError(f"{fe_path} not found: run `python -m engine audit` first (not with --validate-only)")
    if top_n < 1:
        raise UserError(f"--top-n must be at least 1, got {top_n}")
    from engine.audit.outputs import incomplete_reason

    why = incomplete_reason(cfg.cache)
    if why:  # never select from a half-written or mixed audit
        raise UserError(f"{why}: run `python -m engine audit` again")
    try:
        fe = pd.read_parquet(fe_path)
        fc = pd.read_parquet(fc_path, columns=["feature", "condition", "n_trials"])
    except Exception as exc:  # a damaged table: say which and how to rebuild it
        raise UserError(f"cannot read {fe_path} ({exc}); rebuild it with `python -m engine audit`") from None
    col = "checkpoint_verdict" if verdict == "checkpoint" else "recomputed_verdict"
    causal = fe[fe[col].fillna(False).astype(bool)].copy()
    d = pd.to_numeric(causal["cohen_d"], errors="coerce")
    rankable = causal[np.isfinite(d.to_numpy(dtype=float, na_value=np.nan))].copy()
    rankable["abs_d"] = rankable["cohen_d"].abs()
    rankable = rankable.sort_values(["layer", "abs_d", "feature_id"], ascending=[True, False, True], kind="mergesort")
    chosen = rankable.groupby("layer", sort=True).head(top_n)
    counts = {f: dict(zip(g["condition"], g["n_trials"].astype(int))) for f, g in fc.groupby("feature", sort=False)}

    def direction(row) -> str | None:
        if verdict == "checkpoint" and isinstance(row["checkpoint_direction"], str):
            return row["checkpoint_direction"]
        rd = row["recomputed_direction"]
        return rd if isinstance(rd, str) else None

    def opt_bool(v):
        return None if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA else bool(v)

    feats = []
    per_layer: dict[str, dict] = {}
    for _, row in chosen.iterrows():
        dirn = direction(row)
        tc = {k: v for k, v in counts.get(row["feature"], {}).items() if v}
        feats.append({
            "feature": row["feature"], "layer": int(row["layer"]), "feature_id": int(row["feature_id"]),
            "cohen_d": float(row["cohen_d"]), "direction": dirn,
            "checkpoint_verdict": opt_bool(row["checkpoint_verdict"]),
            "recomputed_verdict": opt_bool(row["recomputed_verdict"]),
            "n_trials": int(row["n_trials"]), "trial_counts": tc,
            "source_file": row["checkpoint_file"] if isinstance(row["checkpoint_file"], str) else None,
        })
        pl = per_layer.setdefault(str(int(row["layer"])), {"total": 0, "safe": 0, "risky": 0, "mixed": 0})
        pl["total"] += 1
        key = dirn if dirn in ("safe", "risky", "mixed") else "unknown"
        pl[key] = pl.get(key, 0) + 1
    return with_schema({
        "verdict": verdict, "top_n": top_n, "per_layer_counts": per_layer, "n_features": len(feats),
        "n_causal": int(len(causal)), "n_without_cohen_d": int(len(causal) - len(rankable)),
        "features": feats,
    })


def main(args: argparse.Namespace, cfg) -> int:
    import pandas as pd

    from engine.manifest import fingerprint, record_step
    from engine.schema import (AUDIT_FEATURE_CONDITIONS, AUDIT_FEATURE_EFFECTS, CAUSAL_FEATURES,
                               CAUSAL_FEATURES_PARQUET, atomic_write_json, atomic_write_parquet)

    top_n = args.top_n if args.top_n is not None else cfg.select.top_n
    verdict = args.verdict or cfg.select.verdict
    inputs = {"feature_effects": fingerprint([cfg.cache / AUDIT_FEATURE_EFFECTS]),
              "feature_conditions": fingerprint([cfg.cache / AUDIT_FEATURE_CONDITIONS])}
    with record_step(cfg.cache, "select", device="cpu", cfg=cfg, inputs=inputs, config_hash=cfg.hash("select", "audit"),
                     command=f"python -m engine select --top-n {top_n} --verdict {verdict}") as rec:
        out = select_features(cfg, top_n, verdict)
        path = atomic_write_json(cfg.cache / CAUSAL_FEATURES, out)
        table = pd.DataFrame(out["features"], columns=["feature", "layer", "feature_id", "cohen_d", "direction",
                                                       "checkpoint_verdict", "recomputed_verdict", "n_trials",
                                                       "trial_counts", "source_file"])
        table["trial_counts"] = [__import__("json").dumps(t, sort_keys=True) for t in table["trial_counts"]]
        atomic_write_parquet(cfg.cache / CAUSAL_FEATURES_PARQUET, table)
        rec["outputs"] = [str(path), str(cfg.cache / CAUSAL_FEATURES_PARQUET)]
        rec["summary"] = {"n_features": out["n_features"], "verdict": verdict, "top_n": top_n}
    layers = ", ".join(f"L{k}:{v['total']}" for k, v in out["per_layer_counts"].items()) or "none"
    print(f"select: {out['n_features']} features ({verdict} verdict, top {top_n} per layer by |cohen_d|) "
          f"of {out['n_causal']} causal; {layers}")
    if out["n_without_cohen_d"]:
        print(f"  {out['n_without_cohen_d']} causal features have no finite cohen_d and were not ranked")
    print(path)
    return 0
