"""A miniature of the study's Experiments 1 and 2 on the demo model.

Experiment 1: the trained model plays whole games (sampled decisions, the slot machine
rolled for real); for every game that went bankrupt or stopped voluntarily, the final
decision prompt's last token is encoded by every layer's SAE; per feature, Cohen's d
(bankrupt minus stop, pooled sd sqrt((sd_b^2 + sd_s^2)/2)) and Welch's t-test; features
with p < 0.01 and |d| > 0.3 that survive Benjamini-Hochberg at 0.05 over all layers are
significant, as in the study's global-FDR extraction. The top `per_layer` by |d| of
layers 1..n-1 (the study never used layer 0) are the candidates.

Experiment 2: each candidate is patched at the last prompt token, at resid_post of its
layer, to its stop-game mean ("safe patch") or bankrupt-game mean ("risky patch"), in the
six real conditions with n sampled trials each. The patch keeps the SAE error:
h' = h + (v - a) d, with a the feature's current activation and d its decoder direction,
so only the feature changes (the study replaced h by the SAE reconstruction, which also
injected the reconstruction error into every patched trial). Only the prefill is patched;
the study's hook also rewrote each generated token's position.

Causality follows Run A's in-script rule, which asks the direct question "does the
feature's value change the decision?": per prompt, the stop rate under the risky patch
minus that under the safe patch (safe_stop_delta on the safe prompt, risky_stop_delta on
the risky one); causal if p < 0.05 and |delta| > 0.1 on either prompt. p is scipy's
chi2_contingency (Yates) when every cell has at least 5 trials, else Fisher's exact test
(Run A fell back to Fisher only when chi2 raised). The study's final rule (Run B / the
reparse that gave the paper's 112: each context's patch against its baseline) is computed
too and reported in the summary; it tests amplification toward the context's own group
mean and finds far fewer features, as in the paper. Checkpoints and response logs use the
study's file names and Run A's flat record schema (process ids `gpu0_L{a}_{b}`, as Run A's).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from engine.game import format_prompt, risky_prompt, safe_prompt
from engine.schema import REAL_CONDITIONS, atomic_write_json

from engine.demo.games import apply_decision, new_game, parse_response

ALPHA = 0.05
MIN_EFFECT = 0.1
EXP1_P = 0.01
EXP1_MIN_D = 0.3
STOP_AT_NEWLINES = 3  # answers end after their third line: the parsers read the first two
RISKY_BET = 20  # the reparse's "bankruptcy risk": a bet of $20 (the whole balance) or more

CONDITION_PROMPT = {c: c.split("_", 1)[0] for c in REAL_CONDITIONS}  # safe | risky
CONDITION_PATCH = {
    "safe_baseline": None, "safe_with_safe_patch": "safe", "safe_with_risky_patch": "risky",
    "risky_baseline": None, "risky_with_safe_patch": "safe", "risky_with_risky_patch": "risky",
}


# ---------------------------------------------------------------------------
# Experiment 1
# ---------------------------------------------------------------------------


@dataclass
class PlayedGame:
    variable: bool
    outcome: str
    final_prompt: str
    rounds: int
    balance: int
    decisions: list = field(default_factory=list)


def play_games(model, tok, n_games: int, seed: int, *, max_new_tokens: int = 12, progress=None) -> list[PlayedGame]:
    """The model plays n games (half fixed, half variable bets) from round 4 on, all in parallel."""
    import torch

    from engine.demo.generate import Unembedding, generate

    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    unembed = Unembedding(model)
    games = [new_game(variable=bool(i % 2), rng=rng) for i in range(n_games)]
    finals = [""] * n_games
    logs: list[list] = [[] for _ in range(n_games)]
    while True:
        active = [i for i, g in enumerate(games) if g.outcome == "playing"]
        if not active:
            break
        prompts = [format_prompt(games[i].history, games[i].balance, games[i].variable) for i in active]
        ids = tok(prompts, add_special_tokens=True)["input_ids"]
        out = generate(model, tok, ids, generator=gen, max_new_tokens=max_new_tokens, unembed=unembed,
                       stop_at_newlines=2)
        for i, prompt, text in zip(active, prompts, out.texts):
            g = games[i]
            parsed = parse_response(text, g.variable)
            finals[i] = prompt
            logs[i].append({"balance": g.balance, "response": text, "action": parsed["action"], "bet": parsed["bet"],
                            "valid": parsed["valid"]})
            if not parsed["valid"]:
                g.outcome = "invalid"
                continue
            apply_decision(g, parsed["bet"], rng)
        if progress is not None:
            progress.update(1)
    return [PlayedGame(g.variable, g.outcome, finals[i], len(g.history), g.balance, logs[i])
            for i, g in enumerate(games)]


def last_token_codes(model, tok, prompts: list[str], saes: dict, batch_size: int = 64):
    """{layer: (n_prompts, d_sae)} SAE codes at each prompt's last token (resid_post)."""
    import torch

    from engine.demo.saes import collect_last_token

    resid = collect_last_token(model, tok, prompts, sorted(saes), batch_size)
    with torch.no_grad():  # encoded in the same chunks as collected: the same numbers as before
        return {l: torch.cat([saes[l].encode(chunk) for chunk in x.split(batch_size)]) for l, x in resid.items()}


def cohen_d_table(codes: dict, bankrupt, stopped) -> dict:
    """Per layer: cohen_d, p_value (Welch), bankrupt/safe mean and sd (numpy arrays)."""
    import numpy as np
    from scipy import stats

    out = {}
    for l, X in codes.items():
        X = X.numpy().astype(np.float64)
        b, s = X[bankrupt], X[stopped]
        mb, ms = b.mean(0), s.mean(0)
        sb, ss = b.std(0, ddof=1), s.std(0, ddof=1)
        pooled = np.sqrt((sb ** 2 + ss ** 2) / 2)
        d = np.where(pooled > 0, (mb - ms) / np.where(pooled > 0, pooled, 1), 0.0)
        with np.errstate(all="ignore"):
            p = stats.ttest_ind(b, s, equal_var=False).pvalue
        p = np.where(np.isfinite(p), p, 1.0)
        out[l] = {"cohen_d": d, "p_value": p, "bankrupt_mean": mb, "safe_mean": ms, "bankrupt_std": sb,
                  "safe_std": ss}
    return out


def benjamini_hochberg(p, alpha: float):
    """Boolean mask of p-values rejected by Benjamini-Hochberg at level alpha."""
    import numpy as np

    p = np.asarray(p, dtype=float)
    n = p.size
    if n == 0:
        return np.zeros(0, dtype=bool)
    order = np.argsort(p)
    thresh = alpha * np.arange(1, n + 1) / n
    passed = p[order] <= thresh
    k = np.nonzero(passed)[0].max() + 1 if passed.any() else 0
    mask = np.zeros(n, dtype=bool)
    mask[order[:k]] = True
    return mask


def significant_features(table: dict, layers: list[int]) -> dict[int, list[dict]]:
    """The study's Experiment-1 test: Benjamini-Hochberg at 0.05 over every layer x feature test
    (the study's global FDR), then p < 0.01 and |d| > 0.3 among the rejected ones."""
    import numpy as np

    keys, ps = [], []
    for l in layers:
        p = np.asarray(table[l]["p_value"], dtype=float)
        keys += [(l, i) for i in range(p.size)]
        ps.append(np.where(np.isfinite(p), p, 1.0))
    keep = benjamini_hochberg(np.concatenate(ps) if ps else np.zeros(0), ALPHA)
    out: dict[int, list[dict]] = {l: [] for l in layers}
    for (l, i), k in zip(keys, keep):
        t = table[l]
        if k and t["p_value"][i] < EXP1_P and abs(t["cohen_d"][i]) > EXP1_MIN_D:
            out[l].append({"feature_idx": i, "cohen_d": float(t["cohen_d"][i]), "p_value": float(t["p_value"][i]),
                           "bankrupt_mean": float(t["bankrupt_mean"][i]), "safe_mean": float(t["safe_mean"][i]),
                           "bankrupt_std": float(t["bankrupt_std"][i]), "safe_std": float(t["safe_std"][i])})
    for l in out:
        out[l].sort(key=lambda r: -abs(r["cohen_d"]))
    return out


def features_file(sig: dict[int, list[dict]], d_sae: int, source: str, timestamp: str) -> dict:
    """The study's Experiment-1 feature JSON (L1_31_features_CONVERTED_*.json layout)."""
    return {
        "timestamp": timestamp,
        "source_file": source,
        "total_layers": len(sig),
        "total_significant_features": sum(len(v) for v in sig.values()),
        "layer_results": {
            str(l): {"layer": l, "n_features": d_sae, "n_significant": len(v), "significant_features": v}
            for l, v in sig.items()
        },
    }


# ---------------------------------------------------------------------------
# Experiment 2
# ---------------------------------------------------------------------------


def patch_editor(sae, feature_ids, values):
    """edit(h_last) for rows patched to `values` (NaN = no patch): h + (v - a) d, SAE error kept."""
    import torch

    idx = torch.as_tensor(feature_ids, dtype=torch.long)
    v = torch.as_tensor(values, dtype=torch.float32)
    enc, bias = sae.encoder_rows(idx)
    dec = sae.decoder_rows(idx)
    patched = ~torch.isnan(v)

    def edit(h):
        x = h.float()
        pre = (x * enc.to(x.dtype)).sum(-1) + bias.to(x.dtype)
        a = sae.gate(pre)
        delta = torch.where(patched, v - a, torch.zeros_like(a))
        return (x + delta[:, None] * dec.to(x.dtype)).to(h.dtype)

    return edit


def set_editor(sae, feature_ids, values):
    """edit(h_last) that sets each of `feature_ids` (one layer) to its value in every row:
    h + sum_i (v_i - a_i(h)) d_i, SAE error kept (ablation: v_i = 0). The features are
    encoded from the unpatched h, each as the SAE would read it alone."""
    import torch

    idx = torch.as_tensor(feature_ids, dtype=torch.long)
    v = torch.as_tensor(values, dtype=torch.float32)
    enc, bias = sae.encoder_rows(idx)
    dec = sae.decoder_rows(idx)

    def edit(h):
        x = h.float()
        a = sae.gate(x @ enc.to(x.dtype).T + bias.to(x.dtype))  # (B, F)
        return (x + (v.to(x.device, x.dtype) - a) @ dec.to(x.dtype)).to(h.dtype)

    return edit


def run_conditions(model, tok, sae, layer: int, feats: list[dict], n_trials: int, generator, unembed,
                   max_new_tokens: int) -> list[dict]:
    """Sample every (feature, condition, trial) of `feats` (all at `layer`) in one batch."""
    prompts = {"safe": tok(safe_prompt(), add_special_tokens=True)["input_ids"],
               "risky": tok(risky_prompt(), add_special_tokens=True)["input_ids"]}
    rows, ids, fids, values = [], [], [], []
    for f in feats:
        for cond in REAL_CONDITIONS:
            which = CONDITION_PATCH[cond]
            v = float("nan") if which is None else f["safe_mean" if which == "safe" else "bankrupt_mean"]
            for t in range(n_trials):
                rows.append((f, cond, t))
                ids.append(prompts[CONDITION_PROMPT[cond]])
                fids.append(f["feature_idx"])
                values.append(v)
    from engine.demo.generate import generate

    out = generate(model, tok, ids, generator=generator, max_new_tokens=max_new_tokens, unembed=unembed,
                   edit=patch_editor(sae, fids, values), edit_layer=layer, stop_at_newlines=STOP_AT_NEWLINES)
    trials = []
    for (f, cond, t), text in zip(rows, out.texts):
        parsed = parse_response(text, variable=CONDITION_PROMPT[cond] == "risky")
        trials.append({"feature": f"L{layer}-{f['feature_idx']}", "condition": cond, "trial": t, "response": text,
                       "parsed": parsed})
    return trials


def _two_by_two_p(a_yes: int, a_n: int, b_yes: int, b_n: int) -> float:
    """chi2 with Yates when every cell has >= 5 trials, else Fisher's exact test."""
    from scipy import stats

    table = [[a_yes, a_n - a_yes], [b_yes, b_n - b_yes]]
    if a_n == 0 or b_n == 0:
        return 1.0
    if min(min(r) for r in table) >= 5:
        try:
            return float(stats.chi2_contingency(table)[1])
        except ValueError:
            pass
    return float(stats.fisher_exact(table)[1])


def condition_stats(trials: list[dict]) -> dict[str, dict]:
    """Per condition over valid trials: n, stops, stop rate, bets >= $20, mean bet."""
    out = {}
    for cond in REAL_CONDITIONS:
        valid = [t["parsed"] for t in trials if t["condition"] == cond and t["parsed"]["valid"]]
        n = len(valid)
        stops = sum(1 for p in valid if p["bet"] == 0)
        big = sum(1 for p in valid if p["bet"] >= RISKY_BET)
        bets = [p["bet"] for p in valid if p["bet"] > 0]
        out[cond] = {"n": n, "n_trials": sum(1 for t in trials if t["condition"] == cond), "stops": stops,
                     "stop_rate": stops / n if n else float("nan"), "big_bets": big,
                     "big_bet_rate": big / n if n else float("nan"),
                     "mean_bet": sum(bets) / len(bets) if bets else 0.0}
    return out


def engine_counts(trials: list[dict]) -> dict[str, dict]:
    """Per condition: valid trials and stops as the engine's own parser reads the answers
    (engine/audit/parser.py), which is what the audit's recomputed verdict counts. It reads
    `1` followed by stop words (`1\nStop`) as a bet where the study's parser (`parsed`, used
    by Run A's and Run B's rules) marks it invalid."""
    from engine.audit.parser import parse_decision

    out = {}
    for cond in REAL_CONDITIONS:
        d = [parse_decision(t["response"], CONDITION_PROMPT[cond]) for t in trials if t["condition"] == cond]
        valid = [x for x in d if x.valid]
        out[cond] = {"n": len(valid), "stops": sum(x.action == "stop" for x in valid)}
    return out


def causality_run_b(st: dict) -> dict:
    """The study's final rule (Run B / reparse), in Run B's nested `causality` schema."""
    s0, s1 = st["safe_baseline"], st["safe_with_safe_patch"]
    r0, r1 = st["risky_baseline"], st["risky_with_risky_patch"]
    safe_effect = (s1["stop_rate"] - s0["stop_rate"]) if s0["n"] and s1["n"] else 0.0
    risky_effect = (r1["big_bet_rate"] - r0["big_bet_rate"]) if r0["n"] and r1["n"] else 0.0
    p_safe = _two_by_two_p(s1["stops"], s1["n"], s0["stops"], s0["n"])
    p_risky = _two_by_two_p(r1["big_bets"], r1["n"], r0["big_bets"], r0["n"])
    cs = p_safe < ALPHA and abs(safe_effect) > MIN_EFFECT
    cr = p_risky < ALPHA and abs(risky_effect) > MIN_EFFECT
    interp = ("bidirectional_causal" if cs and cr else "safe_context_causal" if cs
              else "risky_context_causal" if cr else "no_causal_effect")
    return {"is_causal_safe": cs, "is_causal_risky": cr, "safe_effect_size": round(safe_effect, 4),
            "risky_effect_size": round(risky_effect, 4), "safe_p_value": p_safe, "risky_p_value": p_risky,
            "interpretation": interp}


def causality_run_a(st: dict) -> dict:
    """Run A's in-script rule: the two patches against each other, per prompt (flat fields)."""
    ss, sr = st["safe_with_safe_patch"], st["safe_with_risky_patch"]
    rs, rr = st["risky_with_safe_patch"], st["risky_with_risky_patch"]
    ds = (sr["stop_rate"] - ss["stop_rate"]) if ss["n"] and sr["n"] else 0.0
    dr = (rr["stop_rate"] - rs["stop_rate"]) if rs["n"] and rr["n"] else 0.0
    ps = _two_by_two_p(sr["stops"], sr["n"], ss["stops"], ss["n"])
    pr = _two_by_two_p(rr["stops"], rr["n"], rs["stops"], rs["n"])
    causal = (ps < ALPHA and abs(ds) > MIN_EFFECT) or (pr < ALPHA and abs(dr) > MIN_EFFECT)
    return {"safe_stop_delta": round(ds, 4), "risky_stop_delta": round(dr, 4),
            "safe_bet_delta": round(sr["mean_bet"] - ss["mean_bet"], 4),
            "risky_bet_delta": round(rr["mean_bet"] - rs["mean_bet"], 4),
            "safe_p_value": ps, "risky_p_value": pr,
            "classified_as": ("risky" if ds > 0 or dr > 0 else "safe") if causal else "neutral",
            "is_causal": causal}


def engine_verdicts(feats: list[dict], alpha: float = ALPHA, min_effect: float = MIN_EFFECT) -> list[dict]:
    """The engine's recomputed verdict (engine/audit/stats.py `effects`: each patched condition
    against its own prompt's baseline, BH over every test of every feature, q < alpha and
    |delta| >= min_effect) on each feature's `engine_counts`, the engine parser's reading of the
    answers, so that it equals what the audit recomputes from the files."""
    import numpy as np

    from engine.audit.stats import effects

    conds = tuple(REAL_CONDITIONS)
    n_valid = np.array([[f["engine_counts"][c]["n"] for c in conds] for f in feats], dtype=np.int64).reshape(-1)
    n_stop = np.array([[f["engine_counts"][c]["stops"] for c in conds] for f in feats], dtype=np.int64).reshape(-1)
    eff = effects({"n_valid": n_valid, "n_stop": n_stop}, len(feats), conds, alpha, min_effect)
    out = []
    for i in range(len(feats)):
        out.append({"causal": bool(eff["recomputed_verdict"][i]), "direction": eff["recomputed_direction"][i],
                    "min_q": None if not np.isfinite(eff["min_q"][i]) else float(eff["min_q"][i]),
                    "raises_stopping": bool(any(
                        eff[f"{pr}_prompt_safe_patch_q"][i] < alpha and eff[f"{pr}_prompt_safe_patch_delta"][i] >= min_effect
                        for pr in ("safe", "risky"))),
                    "raises_betting": bool(any(
                        eff[f"{pr}_prompt_risky_patch_q"][i] < alpha and eff[f"{pr}_prompt_risky_patch_delta"][i] <= -min_effect
                        for pr in ("safe", "risky")))})
    return out


class Clock:
    """YYYYMMDD_HHMMSS stamps from the wall clock, strictly increasing (one file name per second)."""

    def __init__(self) -> None:
        self.last = 0

    def stamp(self) -> str:
        now = int(time.time())
        self.last = max(now, self.last + 1)
        return time.strftime("%Y%m%d_%H%M%S", time.localtime(self.last))


def run_experiment_2(model, tok, saes: dict, candidates: dict[int, list[dict]], *, n_trials: int, seed: int,
                     out_dir: Path, save_every: int, features_per_batch: int, max_new_tokens: int,
                     clock: Clock, progress=None) -> dict:
    """Patch every candidate in the six conditions; write checkpoints and response logs per layer
    process (process id "gpu0_L{layer}_{layer}", layer range L{layer}-L{layer}, as Run A's names)."""
    import torch

    from engine.demo.generate import Unembedding

    out_dir = Path(out_dir)
    logs_dir = out_dir / "response_logs"
    gen = torch.Generator().manual_seed(seed)
    unembed = Unembedding(model)
    summary = {"features": [], "checkpoint_files": [], "response_files": []}
    for layer in sorted(candidates):
        feats = candidates[layer]
        if not feats:
            continue
        pid = f"gpu0_L{layer}_{layer}"
        results: list[dict] = []
        buffer: list[dict] = []
        since_save = 0

        def save(final: bool) -> None:
            nonlocal buffer, since_save
            ts = clock.stamp()
            ck = out_dir / f"checkpoint_L{layer}_{layer}_{pid}_{ts}.json"
            atomic_write_json(ck, {
                "timestamp": ts, "gpu_id": 0, "process_id": pid, "layer_range": f"L{layer}-L{layer}",
                "features_tested": len(feats) if final else len(results),
                "n_trials_per_condition": n_trials, "results": list(results)})
            summary["checkpoint_files"].append(ck.name)
            if buffer:  # an empty buffer is not written, as in the study
                rf = logs_dir / f"responses_L{layer}_{layer}_{pid}_{ts}.json"
                atomic_write_json(rf, buffer, indent=None)
                summary["response_files"].append(rf.name)
            buffer, since_save = [], 0

        for start in range(0, len(feats), features_per_batch):
            chunk = feats[start:start + features_per_batch]
            trials = run_conditions(model, tok, saes[layer], layer, chunk, n_trials, gen, unembed, max_new_tokens)
            for f in chunk:
                name = f"L{layer}-{f['feature_idx']}"
                mine = [t for t in trials if t["feature"] == name]
                st = condition_stats(mine)
                rec = {**causality_run_a(st), "feature": name, "layer": layer, "feature_id": f["feature_idx"],
                       "cohen_d": round(f["cohen_d"], 6)}
                results.append(rec)
                buffer += mine
                since_save += 1
                summary["features"].append({**rec, "run_b": causality_run_b(st), "conditions": st,
                                            "engine_counts": engine_counts(mine),
                                            "safe_mean": f["safe_mean"], "bankrupt_mean": f["bankrupt_mean"]})
                if since_save >= save_every:
                    save(final=False)
                if progress is not None:
                    progress.update(1)
        save(final=True)
    return summary


def decision_rates(model, tok, n: int, seed: int, max_new_tokens: int = 32) -> dict:
    """Sampled decisions on the two study prompts: stop rate, bet rates, valid rate, examples."""
    import torch

    from engine.demo.generate import generate

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, text in (("safe", safe_prompt()), ("risky", risky_prompt())):
        ids = tok([text] * n, add_special_tokens=True)["input_ids"]
        res = generate(model, tok, ids, generator=gen, max_new_tokens=max_new_tokens, stop_at_newlines=STOP_AT_NEWLINES)
        parsed = [parse_response(t, variable=name == "risky") for t in res.texts]
        valid = [p for p in parsed if p["valid"]]
        stops = sum(1 for p in valid if p["bet"] == 0)
        bets = [p["bet"] for p in valid if p["bet"] > 0]
        out[name] = {
            "n": n, "valid": len(valid), "valid_rate": len(valid) / n,
            "stops": stops, "stop_rate": stops / len(valid) if valid else 0.0,
            "stop_rate_all": stops / n,
            "mean_bet": sum(bets) / len(bets) if bets else 0.0,
            "big_bet_rate": sum(1 for b in bets if b >= RISKY_BET) / len(valid) if valid else 0.0,
            "examples": res.texts[:3],
        }
    return out


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = k / n
    den = 1 + z * z / n
    c = (p + z * z / (2 * n)) / den
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return c - h, c + h
