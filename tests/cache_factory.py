"""Synthetic but schema-valid caches (docs/cache_format.md) for the explorer's tests and benchmark.

`make_cache(folder, size="small")` writes every step's artifacts for a 6-layer model
(the fixture model's shape: layers 0-5, 512 features per SAE); `size="full"` writes the
study's scale: 1,550 causal features over layers 1-31 with a pathway file each and
1.8 million audited trials. Numbers are random but consistent: replay changes are about
minus the attribution, index summaries are computed from the pathway files, per-layer
counts from the feature list. `python tests/cache_factory.py DIR --size full` builds one
by hand.
"""

from __future__ import annotations

import argparse
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

import sys

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from engine import schema  # noqa: E402
from engine.config import RISKY_PROMPT, SAFE_PROMPT  # noqa: E402
from engine.pathways.graph import out_shares, validation  # noqa: E402

PROMPTS = {"safe": SAFE_PROMPT, "risky": RISKY_PROMPT}


@dataclass(frozen=True)
class Size:
    layers: tuple[int, ...]  # layers holding causal features
    per_layer: int  # causal features per layer
    d_sae: int
    n_tested: int  # features with trials in the audit
    trials_per_condition: int
    top_k_per_layer: int
    n_replay: int
    n_pathways: int | None  # None: every causal feature
    n_tokens: int | None


SIZES = {
    "small": Size(layers=(1, 2, 3, 4, 5), per_layer=3, d_sae=512, n_tested=24, trials_per_condition=30,
                  top_k_per_layer=6, n_replay=8, n_pathways=10, n_tokens=6),
    "full": Size(layers=tuple(range(1, 32)), per_layer=50, d_sae=32768, n_tested=9300, trials_per_condition=34,
                 top_k_per_layer=10, n_replay=20, n_pathways=None, n_tokens=200),
}


def tokenize(text: str) -> list[str]:
    """A stand-in for the LLaMA-3 tokenizer: word pieces with their leading space kept."""
    return ["<|begin_of_text|>", *re.findall(r" ?[A-Za-z]+| ?\d+| ?[^\sA-Za-z\d]|\n", text)]


def _dump(path: Path, obj: dict) -> None:
    import orjson

    schema.atomic_write_bytes(path, orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY))


# ---------------------------------------------------------------------------
# Step 1
# ---------------------------------------------------------------------------


def make_features(size: Size, rng: np.random.Generator) -> list[dict]:
    feats = []
    for layer in size.layers:
        ids = rng.choice(size.d_sae, size=size.per_layer, replace=False)
        for fid in sorted(int(i) for i in ids):
            d = float(rng.choice([-1, 1]) * rng.uniform(0.3, 2.5))
            direction = rng.choice(["safe", "risky", "mixed"], p=[0.3, 0.6, 0.1])
            feats.append({
                "feature": f"L{layer}-{fid}", "layer": layer, "feature_id": fid, "cohen_d": round(d, 4),
                "direction": str(direction), "checkpoint_verdict": True,
                "recomputed_verdict": bool(rng.random() < 0.7),
                "n_trials": 6 * size.trials_per_condition,
                "trial_counts": {c: size.trials_per_condition for c in schema.REAL_CONDITIONS},
                "source_file": f"checkpoint_L{layer}_{layer}_gpu0_20251015_065035.json",
            })
    return feats


def causal_features_json(feats: list[dict], top_n: int) -> dict:
    counts: dict[str, dict[str, int]] = {}
    for f in feats:
        c = counts.setdefault(str(f["layer"]), {"total": 0, "safe": 0, "risky": 0, "mixed": 0})
        c["total"] += 1
        c[f["direction"]] += 1
    return schema.with_schema({"verdict": "checkpoint", "top_n": top_n, "per_layer_counts": counts,
                               "n_features": len(feats), "features": feats})


# ---------------------------------------------------------------------------
# Step 3
# ---------------------------------------------------------------------------


def pathway_prompt(layer: int, fid: int, text: str, size: Size, rng: np.random.Generator,
                   planted: dict[int, int] | None = None) -> dict:
    """One prompt's graph; `planted` {layer: feature_id} puts those features among the nodes
    (so graphs link to other causal features, as real ones do)."""
    tokens = tokenize(text)
    T = len(tokens)
    q = T - 1
    target_act = float(rng.lognormal(0.0, 0.5))
    graph_layers = list(range(0, layer))
    nodes: list[dict] = []
    by_layer: dict[int, list[dict]] = {}
    for l in graph_layers:
        k = int(rng.integers(max(1, size.top_k_per_layer // 2), size.top_k_per_layer + 1))
        ids = [int(i) for i in rng.choice(size.d_sae, size=k, replace=False)]
        if planted and l in planted:
            ids = [planted[l]] + [i for i in ids if i != planted[l]][: k - 1]
        for i in ids:
            act = float(rng.lognormal(-0.5, 0.7))
            attr = float(rng.standard_t(3) * 0.08)
            npos = int(rng.integers(1, 4))
            extra = [int(p) for p in rng.choice(np.arange(1, q), size=npos - 1, replace=False)] if npos > 1 else []
            positions = [q, *extra] if rng.random() < 0.7 else [int(rng.integers(1, q)), *extra][:npos]
            positions = list(dict.fromkeys(positions))
            w = rng.dirichlet(np.ones(len(positions)))
            n = {"id": f"L{l}-{int(i)}", "layer": l, "feature_id": int(i), "is_target": False,
                 "positions": positions, "position_activations": [round(act * x, 6) for x in w],
                 "position_attributions": [round(attr * x, 6) for x in w],
                 "activation": round(act, 6), "attribution": round(attr, 6),
                 "replay_delta": None, "replay_delta_activation": None, "patch_delta": None, "validated": None}
            nodes.append(n)
            by_layer.setdefault(l, []).append(n)
    # Replay the strongest nodes: measured change ~ minus the attribution, with noise.
    pre = target_act
    for n in nodes:
        n.update(kind="feature", **validation(None, None, None, pre, 0.0, 0.0))
    for n in sorted(nodes, key=lambda n: -abs(n["attribution"]))[: size.n_replay]:
        delta = -n["attribution"] * float(1 + 0.25 * rng.standard_normal()) + 0.01 * float(rng.standard_normal())
        n["replay_delta"] = round(delta, 6)
        n["replay_delta_activation"] = round(max(pre + delta, 0.0) - pre, 6)  # ReLU gate at 0
        n.update(validation(n["attribution"], n["replay_delta"], n["replay_delta_activation"], pre, 1e-3, 0.01))
    target = {"id": f"L{layer}-{fid}", "kind": "feature", "layer": layer, "feature_id": fid, "is_target": True,
              "positions": [q], "position_activations": [round(target_act, 6)], "position_attributions": [None],
              "activation": round(target_act, 6), "attribution": None, "replay_delta": None,
              "replay_delta_activation": None, "patch_delta": None, **validation(None, None, None, pre, 0.0, 0.0)}
    edges = []
    present = [l for l in graph_layers if by_layer.get(l)]
    # one SAE-error and one bias node per graph layer, values derived from the layer's features
    sources: dict[int, list[dict]] = {}
    for l in present:
        tot = sum(n["attribution"] for n in by_layer[l])
        sources[l] = [{"id": f"L{l}-{kind}", "kind": kind, "layer": l, "feature_id": None, "is_target": False,
                       "positions": [], "position_activations": [], "position_attributions": [], "activation": None,
                       "attribution": round(f * tot, 6), "replay_delta": None, "replay_delta_activation": None,
                       "patch_delta": None, **validation(None, None, None, pre, 0.0, 0.0)}
                      for kind, f in (("error", 0.4), ("bias", -0.1))]
    for k, l in enumerate(present):
        for v in by_layer[l]:
            if k == 0:
                continue
            srcs = by_layer[present[k - 1]]
            for u in rng.choice(len(srcs), size=min(len(srcs), int(rng.integers(1, 5))), replace=False):
                raw = float(rng.standard_normal() * 0.3)
                edges.append({"source": srcs[int(u)]["id"], "target": v["id"],
                              "weight": round(raw * v["attribution"], 6)})
            for sn, f in zip(sources[present[k - 1]], (0.1, -0.05)):
                edges.append({"source": sn["id"], "target": v["id"], "weight": round(f * v["attribution"], 6)})
    for u in [*by_layer.get(present[-1], []), *sources.get(present[-1], [])] if present else []:
        edges.append({"source": u["id"], "target": target["id"], "weight": u["attribution"]})
    extra = [sn for l in present for sn in sources[l]]
    for n in nodes + extra:  # out-shares: the graph's edges, the rest split between features and error
        out = sum(e["weight"] for e in edges if e["source"] == n["id"])
        n.update(out_shares(n["attribution"], out, out + 0.6 * (n["attribution"] - out)))
    nodes = nodes + extra
    a = np.array([n["attribution"] for n in nodes if n["replay_delta"] is not None])
    d = -np.array([n["replay_delta"] for n in nodes if n["replay_delta"] is not None])
    r = float(np.corrcoef(a, d)[0, 1]) if len(a) >= 3 else None
    nz = (a != 0) & (d != 0)
    total = float(sum(abs(n["attribution"]) for n in nodes if n["kind"] == "feature"))
    return {
        "text": text, "n_tokens": T, "tokens": tokens, "target_position": q,
        "target_pre_activation": round(target_act, 6), "target_activation": round(target_act, 6),
        "nodes": [target, *nodes], "edges": edges,
        "agreement": {"pearson_r": r, "sign_agreement": float(np.mean(np.sign(a[nz]) == np.sign(d[nz]))) if nz.any() else None,
                      "n": int(len(a))},
        "coverage": {"attribution_total": round(total * 1.25, 6), "attribution_in_graph": round(total, 6)},
    }


def make_pathway(feature: str, size: Size, rng: np.random.Generator, planted: dict[int, int] | None = None) -> dict:
    fid = schema.FeatureId.parse(feature)
    return schema.with_schema(version=schema.PATHWAY_SCHEMA_VERSION, obj={
        "feature": feature, "layer": fid.layer, "feature_id": fid.feature_id,
        "metadata": {"model": "fixture", "sae_source": "fixture", "encode_convention": "study",
                     "config_hash": "0" * 16, "timings_s": {"attribution": 1.0, "replay": 2.0}, "device": "cpu",
                     "created": "2026-01-01T00:00:00", "method": {"attribution": "gradient x activation"}},
        "prompts": {name: pathway_prompt(fid.layer, fid.feature_id, text, size, rng, planted)
                    for name, text in PROMPTS.items()},
    })


def write_pathways(cache: Path, features: list[str], size: Size, rng: np.random.Generator) -> dict:
    """Pathway files plus, through the engine's own code, their circuit-tracer exports,
    index.json, nodes.parquet and edges.parquet."""
    from engine.pathways.index import rebuild, write_export

    first_of_layer: dict[int, int] = {}
    for f in features:
        fid = schema.FeatureId.parse(f)
        first_of_layer.setdefault(fid.layer, fid.feature_id)
    for f in features:
        p = make_pathway(f, size, rng, first_of_layer)
        write_export(cache, p)
        _dump(schema.pathway_path(cache, f), p)
    return rebuild(cache)


# ---------------------------------------------------------------------------
# Step 4
# ---------------------------------------------------------------------------

WORDS = ["stop", "walk", "away", "safe", "target", "goal", "bet", "all", "win", "back", "chase", "double",
         "risk", "lucky", "quit", "balance", "careful", "more", "again", "recover"]


def make_tokens(feature: str, rng: np.random.Generator) -> dict:
    """A tokens/<feature>.json in the shape engine/tokens writes."""
    vocab = ["Stop", " stop", " Bet", " bet", " $", "1", "2", " quit", " more", " win", " walk", " chase",
             " all", " safe", " double", " goal", " money", " lose", " again", " luck", " careful", " target"]
    vals = np.sort(rng.normal(0, 1, len(vocab)))[::-1]
    order = rng.permutation(len(vocab))
    lens = [{"token_id": int(1000 + j), "token": vocab[j], "text": vocab[j], "value": round(float(v), 4)}
            for j, v in zip(order, vals)]
    prompt_acts = {}
    for name, text in PROMPTS.items():
        toks = tokenize(text)
        acts = np.maximum(0, rng.normal(-0.5, 1.0, len(toks)))
        acts[-1] = abs(acts[-1]) + 0.5
        body = acts[1:]
        prompt_acts[name] = {"tokens": toks, "token_ids": list(range(len(toks))),
                             "activations": [round(float(a), 4) for a in acts], "max": round(float(body.max()), 4),
                             "argmax_position": int(1 + body.argmax()), "last_token_activation": round(float(acts[-1]), 4),
                             "n_active": int((body > 0).sum()), "bos_excluded_from_stats": True}
    top = []
    for k in range(5):
        toks = tokenize("Round 2: Bet $100, Loss, Balance $30\nChoice: 1")
        acts = np.maximum(0, rng.normal(0, 1, len(toks)))
        c = int(acts.argmax())
        top.append({"rank": k + 1, "activation": round(float(acts.max()), 4), "source_feature": feature,
                    "condition": "risky_baseline", "trial": str(k), "prompt": "risky", "position": 120 + c,
                    "response_position": c, "token": toks[c], "context_tokens": toks,
                    "context_activations": [round(float(a), 4) for a in acts], "center": c})
    top.sort(key=lambda r: -r["activation"])
    words = []
    for w in rng.choice(WORDS, size=8, replace=False):
        lo = float(rng.normal(0, 1.5))
        q = float(rng.uniform(0, 0.2))
        words.append({"prompt": "risky", "patch": "safe_patch", "patched_condition": "risky_with_safe_patch",
                      "baseline_condition": "risky_baseline", "tokenization": "word", "term": str(w),
                      "token_id": None, "count_patched": int(rng.integers(5, 80)), "count_baseline": int(rng.integers(5, 80)),
                      "log_odds": round(lo, 4), "z": round(lo * 2.1, 3), "p": round(q / 2, 4), "q": round(q, 4),
                      "significant": q < 0.05})
    words.sort(key=lambda r: -abs(r["z"]))
    summary = [{"prompt": p, "patch": "safe_patch", "n_terms": 8, "n_significant": sum(w["significant"] for w in words)}
               for p in ("risky",)]
    decisions = [{"prompt": p, "context": "choice", "intervention": inter, "value": 0.0, "activation": 0.5,
                  "bet_vs_stop_logodds_base": 1.2, "bet_vs_stop_logodds_patched": round(1.2 + d, 4),
                  "delta_bet_vs_stop_logodds": round(d, 4)}
                 for p in PROMPTS for inter, d in (("ablate", float(rng.normal(0, 0.3))),
                                                   ("amplify", float(rng.normal(0, 1.0))))]
    return schema.with_schema({
        "feature": feature, "layer": schema.FeatureId.parse(feature).layer,
        "feature_id": schema.FeatureId.parse(feature).feature_id, "direction": None, "patch_values": {},
        "metadata": {"model": "fixture", "created": "2026-01-01T00:00:00"},
        "logit_lens": {"promoted": lens[:10], "suppressed": lens[::-1][:10], "vocab_mean": 0.0, "vocab_std": 1.0,
                       "decision_tokens": [], "decision_summary": decisions},
        "prompt_activations": prompt_acts, "top_activating": top,
        "activation_stats": {"sample_size": 200, "n_response_tokens": 4000, "active_tokens": 120, "density": 0.03,
                             "max_activation_sample": round(float(top[0]["activation"]), 4),
                             "max_activation_prompts": max(v["max"] for v in prompt_acts.values())},
        "behavioural_words": words, "behavioural_summary": summary,
    })


# ---------------------------------------------------------------------------
# Step 0
# ---------------------------------------------------------------------------


KINDS = {  # the audit's kinds used here (engine/audit/problems.py): severity, meaning
    "duplicate_trials": ("info", "trials superseded by a newer copy of the same (feature, condition, trial)"),
    "too_few_trials": ("warning", "a feature x condition has fewer trials than n_trials_per_condition"),
    "missing_field": ("error", "a required field is missing"),
    "malformed_feature": ("error", "the feature name is not L<layer>-<index>"),
    "unknown_condition": ("error", "a condition outside the configured list"),
}


def make_audit(cache: Path, feats: list[dict], size: Size, rng: np.random.Generator) -> dict:
    """audit/ in the shape engine/audit writes (data_validation.json keys, table columns)."""
    causal = [f["feature"] for f in feats]
    extra = max(0, size.n_tested - len(causal))
    tested = causal + [f"L{int(rng.choice(size.layers))}-{int(i)}" for i in rng.choice(size.d_sae, extra, replace=False)]
    tested = list(dict.fromkeys(tested))
    n = size.trials_per_condition
    conds = list(schema.REAL_CONDITIONS)
    # Per feature x condition trial counts: mostly complete, some short (a crashed run).
    counts = np.full((len(tested), len(conds)), n)
    short = rng.random(counts.shape) < 0.08
    counts[short] = rng.integers(0, n, short.sum())
    layer_of = np.array([schema.FeatureId.parse(f).layer for f in tested])
    fid_of = np.array([schema.FeatureId.parse(f).feature_id for f in tested])
    fc = pd.DataFrame({
        "feature": np.repeat(tested, len(conds)), "layer": np.repeat(layer_of, len(conds)),
        "feature_id": np.repeat(fid_of, len(conds)), "condition": np.tile(conds, len(tested)),
        "n_trials": counts.ravel().astype(np.int64),
    })
    fc["prompt"] = fc["condition"].str.split("_").str[0]
    fc["stop_rate"] = rng.uniform(0, 1, len(fc)).round(4)
    fc["mean_bet"] = rng.uniform(5, 60, len(fc)).round(2)
    schema.atomic_write_parquet(cache / schema.AUDIT_FEATURE_CONDITIONS, fc)
    total = int(counts.sum())
    cell = np.repeat(np.arange(len(tested) * len(conds)), counts.ravel())
    f_codes, c_codes = cell // len(conds), cell % len(conds)
    study_valid = rng.random(total) < 0.9
    valid = rng.random(total) < 0.85
    study_action = np.where(rng.random(total) < 0.3, "stop", "bet")
    flip = rng.random(total) < 0.2
    action = np.where(flip, np.where(study_action == "stop", "bet", "stop"), study_action)
    action = np.where(valid, action, "invalid")
    study_bet = np.where(study_action == "bet", rng.integers(5, 101, total), 0)
    bet = np.where(action == "bet", np.where(rng.random(total) < 0.9, study_bet, rng.integers(5, 101, total)), 0)
    trials = pd.DataFrame({
        "feature": pd.Categorical.from_codes(f_codes, categories=tested), "layer": layer_of[f_codes].astype("int16"),
        "feature_id": fid_of[f_codes].astype("int32"),
        "condition": pd.Categorical.from_codes(c_codes, categories=conds),
        "trial": np.concatenate([np.arange(k) for k in counts.ravel()]).astype("int32"),
        "study_action": pd.Categorical(study_action), "study_bet": study_bet.astype("int32"), "study_valid": study_valid,
        "action": pd.Categorical(action), "bet": bet.astype("int32"), "valid": valid,
        "run_id": pd.Categorical.from_codes((rng.random(total) < 0.1).astype(int),
                                            categories=["20251014-20251021", "20251112-20251124"]),
    })
    schema.atomic_write_parquet(cache / schema.AUDIT_TRIALS, trials)
    n_kind = {"duplicate_trials": 12, "too_few_trials": 30, "missing_field": 4, "malformed_feature": 2, "unknown_condition": 3}
    prob_rows = []
    for kind, k in n_kind.items():
        for r in range(k):
            prob_rows.append({"kind": kind, "severity": KINDS[kind][0],
                              "file": f"responses_L{1 + r % 5}_{1 + r % 5}_gpu0_20251015_0650{r % 60:02d}.json",
                              "record": int(r * 7), "field": {"duplicate_trials": None, "too_few_trials": "trial",
                                                              "missing_field": "condition", "malformed_feature": "feature",
                                                              "unknown_condition": "condition"}[kind],
                              "message": f"{kind.replace('_', ' ')} in record {r * 7}", "value": None})
    problems = pd.DataFrame(prob_rows)
    problems["record"] = problems["record"].astype("Int64")
    schema.atomic_write_parquet(cache / schema.AUDIT_PROBLEMS, problems)
    both = study_valid & valid
    sev = problems["severity"].value_counts()
    by_layer: dict[str, int] = {}
    for f in feats:
        by_layer[str(f["layer"])] = by_layer.get(str(f["layer"]), 0) + 1
    n_dup = n_kind["duplicate_trials"]
    validation = schema.with_schema({
        "causal_by_layer": by_layer, "total_causal_features": len(feats), "total_response_features": len(tested),
        "joinable_features": len(causal), "join_rate_percent": round(100.0 * len(causal) / max(1, len(feats)), 3),
        "total_trials": total,
        "audit_results": {"errors": [f"{k}: ..." for k in n_kind if KINDS[k][0] == "error"], "warnings": [],
                          "validated": False, "n_errors": int(sev.get("error", 0)), "n_warnings": int(sev.get("warning", 0))},
        "validated": False,
        "files_read": {"checkpoints": len(size.layers), "responses": len(size.layers) + 3},
        "records_read": {"checkpoint": len(tested) + 5, "responses": total + n_dup + 7},
        "valid_unique_trials": total, "duplicates": n_dup, "invalid_records": 7,
        "n_trials_per_condition": n, "conditions_expected": conds,
        "conditions_found": {c: int((c_codes == j).sum()) for j, c in enumerate(conds)} | {"safe_amplification": 3},
        "parser_comparison": {
            "trials": total, "study_valid": int(study_valid.sum()), "ours_valid": int(valid.sum()),
            "both_valid": int(both.sum()), "action_disagree": int((both & (study_action != action)).sum()),
            "study_stop_ours_bet": int((both & (study_action == "stop") & (action == "bet")).sum()),
            "study_bet_ours_stop": int((both & (study_action == "bet") & (action == "stop")).sum()),
            "bet_amount_disagree": int((both & (action == "bet") & (study_action == "bet") & (bet != study_bet)).sum()),
        },
        "recomputed": {"causal": max(0, len(feats) - 3), "compared_with_checkpoint": len(feats), "agree": len(feats) - 2},
        "runs_found": [{"run_id": "20251014-20251021", "first": "2025-10-14T06:00:00", "last": "2025-10-21T05:20:57",
                        "checkpoint_files": len(size.layers), "response_files": len(size.layers)},
                       {"run_id": "20251112-20251124", "first": "2025-11-12T09:00:00", "last": "2025-11-24T22:10:00",
                        "checkpoint_files": 0, "response_files": 3}],
        "run_selected": None, "n_files_skipped": 0,
        "problem_counts": dict(sorted(n_kind.items())),
        "problem_kinds": {k: {"severity": v[0], "meaning": v[1]} for k, v in KINDS.items()},
        "mode": "full",
    })
    _dump(cache / schema.AUDIT_VALIDATION, validation)
    from engine.audit.outputs import mark_complete

    mark_complete(cache / schema.AUDIT_DIR)  # as a finished audit leaves it
    return {"tested": tested, "total_trials": total, "problems": problems, "feature_conditions": fc}


# ---------------------------------------------------------------------------
# Step 2, manifest, whole cache
# ---------------------------------------------------------------------------


def make_prototype(feature: str, rng: np.random.Generator, top_k: int = 5) -> dict:
    fid = schema.FeatureId.parse(feature)
    prompts = {}
    for name, text in PROMPTS.items():
        top = {str(l): [{"feature_id": int(i), "feature": f"L{l}-{int(i)}", "activation": round(float(a), 4)}
                        for i, a in zip(rng.choice(512, top_k, replace=False), np.sort(rng.lognormal(0, 0.5, top_k))[::-1])]
               for l in range(fid.layer + 1)}
        act = float(rng.lognormal(0, 0.4))
        prompts[name] = {"text": text, "n_tokens": len(tokenize(text)), "target_activation": act,
                         "target_pre_activation": act, "target_rank": int(rng.integers(1, 20)), "top_features": top,
                         "sae_stats": {str(l): {"l0": int(rng.integers(20, 60)), "relative_error": round(float(rng.uniform(0.1, 0.4)), 4)}
                                       for l in range(fid.layer + 1)}}
    ups = [{"source": f["feature"], "source_layer": int(l), "activation": f["activation"], "prompt": name}
           for name, rec in prompts.items() for l, fs in rec["top_features"].items() if int(l) < fid.layer for f in fs]
    return schema.with_schema({
        "feature": feature, "layer": fid.layer, "feature_id": fid.feature_id, "encode_convention": "study",
        "model": "fixture", "sae_source": "fixture", "device": "cpu", "dtype": "float32", "top_k": top_k,
        "position": "last prompt token", "layers": list(range(fid.layer + 1)), "prompts": prompts,
        "upstream_candidates": ups, "memory_usage_gb": 0.5, "memory_kind": "peak_rss",
        "timings_s": {"load_model": 0.5, "forward": 0.1}, "created": "2026-01-01T00:00:00"})


def write_manifest(cache: Path, steps: list[str], cfg=None) -> None:
    """Manifest entries for `steps`; with a Config, also the engine's pipeline fingerprints, so
    `engine status` (and the home page) call them done rather than stale."""
    import dataclasses

    t0 = time.mktime(time.strptime("2026-01-01T10:00:00", "%Y-%m-%dT%H:%M:%S"))
    entries = {}
    for k, step in enumerate(steps):
        started = t0 + 600 * k
        entries[step] = {"status": "done", "error": None,
                         "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
                         "seconds": 12.5 * (k + 1), "peak_memory_gb": round(0.5 + k, 3),
                         "memory_kind": "peak_rss", "device": "cpu", "inputs": {}, "config_hash": "0" * 16,
                         "command": f"python -m engine {step}", "outputs": [schema.STEP_OUTPUTS[step]], "summary": {}}
        if cfg is not None:
            from engine.manifest import pipeline_record

            entries[step]["pipeline"] = pipeline_record(dataclasses.replace(cfg, cache_dir=str(cache)), step)
    schema.atomic_write_json(cache / schema.MANIFEST, schema.with_schema({"steps": entries}))


def make_cache(folder: str | Path, size: str = "small", seed: int = 0,
               steps: tuple[str, ...] = ("audit", "select", "prototype", "pathways", "tokens"), cfg=None) -> dict:
    """Write a cache; returns what was written (features, pathway features, audit numbers)."""
    spec = SIZES[size]
    cache = Path(folder)
    cache.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    feats = make_features(spec, rng)
    out: dict = {"cache": cache, "features": feats}
    if "audit" in steps:
        out["audit"] = make_audit(cache, feats, spec, rng)
    if "select" in steps:
        _dump(cache / schema.CAUSAL_FEATURES, causal_features_json(feats, spec.per_layer))
    names = [f["feature"] for f in feats]
    if "pathways" in steps:
        chosen = names if spec.n_pathways is None else names[:: max(1, len(names) // spec.n_pathways)][: spec.n_pathways]
        out["pathway_features"] = chosen
        out["index"] = write_pathways(cache, chosen, spec, rng)
    if "tokens" in steps:
        chosen = names[: spec.n_tokens] if spec.n_tokens else names
        out["token_features"] = chosen
        for f in chosen:
            _dump(schema.tokens_path(cache, f), make_tokens(f, rng))
        _dump(cache / schema.TOKENS_INDEX, schema.with_schema(
            {"created": "2026-01-01T00:00:00", "config_hash": "0" * 16, "inputs": {}, "features": chosen,
             "metadata": {}, "sample": None, "tables": {}}))
    if "prototype" in steps:
        out["prototype_feature"] = names[0]
        _dump(schema.prototype_path(cache, names[0]), make_prototype(names[0], rng))
    write_manifest(cache, [s for s in schema.STEPS if s in steps], cfg)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    t = time.perf_counter()
    info = make_cache(a.out, a.size, a.seed)
    print(f"wrote {a.out} ({len(info['features'])} features) in {time.perf_counter() - t:.1f}s")
