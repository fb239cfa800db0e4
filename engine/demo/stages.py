"""The demo's build stages, in order. Each returns a JSON-able result (kept in
demo/stages/<name>.json) and reads what earlier stages wrote from disk, so a killed build
resumes at the first unfinished stage."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from engine.schema import DEMO_DIR, atomic_write_json, atomic_write_text, read_json

MODEL_DIR = "model"
SAES_DIR = "saes"
TRAINING_CURVE = "data/training_curve.json"
SAE_EVAL = "data/sae_eval_transcripts.json"
GAMES_SAMPLE = "data/transcripts_sample.jsonl"
EXP1_GAMES = "data/experiment_1/games.jsonl"
EXP1_CANDIDATES = "data/experiment_1/candidates.json"
EXP2_SUMMARY = "data/experiment_2_summary.json"


@dataclass
class State:
    cache: Path
    root: Path
    plan: object
    seed: int
    log: Callable[[str], None]
    _model: object = None
    _tok: object = None
    extra: dict = field(default_factory=dict)

    def tokenizer(self):
        if self._tok is None:
            from engine.fixtures import load_llama3_tokenizer

            self._tok = load_llama3_tokenizer()
        return self._tok

    def model(self):
        if self._model is None:
            import torch
            from transformers import LlamaForCausalLM

            self._model = LlamaForCausalLM.from_pretrained(str(self.root / MODEL_DIR), dtype=torch.float32).eval()
            self._model.requires_grad_(False)
        return self._model

    def saes(self) -> dict:
        if "saes" not in self.extra:
            from engine.config import SAEConfig
            from engine.sae import load_sae

            cfg = SAEConfig(source=str(self.root / SAES_DIR), convention="study")
            n = self.model().config.num_hidden_layers
            self.extra["saes"] = {l: load_sae(cfg, l) for l in range(n)}
        return self.extra["saes"]


def _games(state: State):
    from engine.demo.games import simulate_games

    p = state.plan
    train = simulate_games(p.train_games, state.seed * 1000 + 1)
    held = simulate_games(max(60, p.train_games // 20), state.seed * 1000 + 2)
    return train, held


def _pairs(games) -> list[tuple[str, str]]:
    return [(d.prompt, d.response) for g in games for d in g.decisions]


# ---------------------------------------------------------------------------


def stage_train(state: State) -> dict:
    import torch

    from engine.demo import train as tr
    from engine.demo.experiment import decision_rates
    from engine.progress import Progress

    p = state.plan
    tok = state.tokenizer()
    train_games, held_games = _games(state)
    train_pairs, held_pairs = _pairs(train_games), _pairs(held_games)
    seqs = tr.encode_transcripts(tok, train_pairs)
    held = tr.encode_transcripts(tok, held_pairs[:64])
    from engine.game import risky_prompt, safe_prompt

    study = tok([safe_prompt(), risky_prompt()], add_special_tokens=True)["input_ids"]
    used = tr.used_vocabulary(seqs, [*held.ids, *study])
    state.log(f"train: {len(train_pairs)} transcripts from {len(train_games)} games, {len(used)} token ids used")
    with Progress(p.train_steps, "demo: training", unit="step") as bar:
        small, curve = tr.train(seqs, used, n_layers=p.n_layers, d_model=p.d_model, steps=p.train_steps,
                                batch_size=p.batch_size, lr=p.lr, prompt_weight=p.prompt_weight, seed=state.seed,
                                eval_seqs=held, numbers=tr.number_values(tok, used), decision_weight=p.decision_weight,
                                lens_weight=p.lens_weight, answer_head=p.answer_head,
                                log_every=max(1, p.train_steps // 40), progress=bar)
    model = tr.expand_to_full_vocab(small, used, state.seed)
    model.requires_grad_(False)
    out = state.root / MODEL_DIR
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    state._model = model
    atomic_write_json(state.root / TRAINING_CURVE, {"used_token_ids": len(used), "curve": curve})
    # a sample of the training transcripts, for reading
    sample = "\n".join(json.dumps({"prompt": a, "response": b}) for a, b in held_pairs[:200]) + "\n"
    atomic_write_text(state.root / GAMES_SAMPLE, sample)

    untrained = tr.expand_to_full_vocab(tr.small_model(p.n_layers, p.d_model, len(used), state.seed).eval(),
                                        used, state.seed)
    rates = {"trained": decision_rates(model, tok, p.rate_trials, state.seed + 7),
             "untrained": decision_rates(untrained, tok, p.rate_trials, state.seed + 7)}
    del untrained
    learned = learned_verdict(rates["trained"])
    state.log(f"train: {learned['message']}")
    outcomes: dict[str, int] = {}
    for g in train_games:
        k = f"{'variable' if g.variable else 'fixed'}_{g.outcome}"
        outcomes[k] = outcomes.get(k, 0) + 1
    n_params = sum(t.numel() for t in small.parameters())
    return {
        "model": {"n_layers": p.n_layers, "d_model": p.d_model, "vocab_size": model.config.vocab_size,
                  "used_token_ids": len(used), "trained_parameters": n_params,
                  "parameters_full_vocab": sum(t.numel() for t in model.parameters()),
                  "final_loss": curve[-1]["loss"], "final_response_loss": curve[-1]["response_loss"],
                  "final_eval_response_loss": curve[-1].get("eval_response_loss"),
                  "training_games": len(train_games), "training_transcripts": len(train_pairs),
                  "training_game_outcomes": outcomes, "loss_curve": TRAINING_CURVE},
        "decision_rates": rates,
        "learned": learned,
    }


def learned_verdict(r: dict) -> dict:
    """Did the model learn the gamble? Valid answers, and more stopping on the safe prompt
    than on the risky one (Fisher's exact test, p < 0.01)."""
    from scipy import stats

    s, k = r["safe"], r["risky"]
    table = [[s["stops"], s["valid"] - s["stops"]], [k["stops"], k["valid"] - k["stops"]]]
    p = float(stats.fisher_exact(table, alternative="greater")[1]) if s["valid"] and k["valid"] else 1.0
    ok = s["valid_rate"] >= 0.8 and k["valid_rate"] >= 0.8 and p < 0.01
    msg = (f"stop rate {s['stop_rate']:.2f} on the safe prompt vs {k['stop_rate']:.2f} on the risky prompt "
           f"(Fisher p={p:.2g}); valid answers {s['valid_rate']:.2f} / {k['valid_rate']:.2f}")
    return {"ok": ok, "p_value": p, "message": msg if ok else "the model did NOT learn the gamble: " + msg}


# ---------------------------------------------------------------------------


def stage_saes(state: State) -> dict:
    import torch

    from engine.config import SAEConfig
    from engine.demo import saes as sa
    from engine.demo import train as tr
    from engine.progress import Progress
    from engine.sae import load_sae

    p = state.plan
    tok = state.tokenizer()
    model = state.model()
    train_games, held_games = _games(state)
    train_pairs = _pairs(train_games)
    # an even spread over the training transcripts
    step = max(1, len(train_pairs) // p.sae_sequences)
    fit_pairs = train_pairs[::step][: p.sae_sequences]
    eval_pairs = _pairs(held_games)[-60:]
    fit = tr.encode_transcripts(tok, fit_pairs).ids
    ev = tr.encode_transcripts(tok, eval_pairs).ids
    layers = list(range(model.config.num_hidden_layers))
    X, _ = sa.collect_resid_post(model, fit, layers)
    Xe, _ = sa.collect_resid_post(model, ev, layers)
    # the decision token (each prompt's last token, where the study reads and patches features)
    dstep = max(1, len(train_pairs) // p.sae_decision_prompts)
    D = sa.collect_last_token(model, tok, [a for a, _ in train_pairs[::dstep][: p.sae_decision_prompts]], layers)
    De = sa.collect_last_token(model, tok, [a for a, _ in _pairs(held_games)], layers)
    atomic_write_json(state.root / SAE_EVAL, {"transcripts": [{"prompt": a, "response": b} for a, b in eval_pairs],
                                              "positions": "every token of BOS + prompt + response + EOS but BOS (prompt and response tokenised apart)"})
    out = {}
    folder = state.root / SAES_DIR
    with Progress(len(layers), "demo: SAEs", unit="layer") as bar:
        for l in layers:
            weights, norm_in, curve = sa.train_sae(X[l], p.d_sae, steps=p.sae_steps, batch_size=p.sae_batch,
                                                   lr=p.sae_lr, l1=p.sae_l1, seed=state.seed * 100 + l,
                                                   focus=D[l], focus_fraction=p.sae_decision_fraction)
            hp = {"d_model": p.d_model, "d_sae": p.d_sae, "dataset_average_activation_norm": {"in": norm_in, "out": norm_in}}
            theta, th_eval = sa.calibrate_threshold(weights, hp, Xe[l])
            sa.write_sae(folder, l, weights, norm_in, theta, {
                "training": {"tokens": int(X[l].shape[0]), "decision_tokens": int(D[l].shape[0]),
                             "decision_fraction_of_each_batch": p.sae_decision_fraction,
                             "steps": p.sae_steps, "batch_size": p.sae_batch,
                             "lr": p.sae_lr, "l1_coefficient": p.sae_l1, "space": "study (x * sqrt(d_model)/norm_in, ReLU)",
                             "curve": curve},
                "threshold_calibration": {"rule": f"largest theta with FVU <= ReLU FVU + {sa.THRESHOLD_FVU_SLACK}",
                                          "l0_at_threshold": th_eval.get("l0"), "fvu_at_threshold": th_eval.get("fvu")},
            })
            sae = load_sae(SAEConfig(source=str(folder), convention="study"), l)
            ev_stats = sa.evaluate(sae, Xe[l])
            dec_stats = sa.evaluate(sae, De[l])
            out[str(l)] = {k: round(v, 6) for k, v in ev_stats.items()} | {
                "decision_token": {k: round(v, 6) for k, v in dec_stats.items()}, "eval_decision_tokens": int(De[l].shape[0]),
                "jump_relu_threshold": round(theta, 6), "dataset_average_activation_norm": round(norm_in, 6),
                "eval_tokens": int(Xe[l].shape[0])}
            state.log(f"SAE L{l}: L0 {ev_stats['l0']:.1f}, relative error {ev_stats['relative_error']:.3f}, "
                      f"FVU {ev_stats['fvu']:.3f}, dead {ev_stats['dead_fraction']:.2f}; at the decision token "
                      f"L0 {dec_stats['l0']:.1f}, FVU {dec_stats['fvu']:.3f}")
            bar.update(1)
    state.extra.pop("saes", None)
    return {"layers": out, "eval_transcripts": SAE_EVAL}


# ---------------------------------------------------------------------------


def stage_experiment_1(state: State) -> dict:
    import numpy as np

    from engine.demo import experiment as ex
    from engine.demo.experiment import Clock
    from engine.progress import Progress

    p = state.plan
    tok, model, saes = state.tokenizer(), state.model(), state.saes()
    with Progress(None, "demo: experiment 1 (rounds played)", unit="round") as bar:
        games = ex.play_games(model, tok, p.exp1_games, state.seed * 1000 + 3, progress=bar)
    outcomes: dict[str, int] = {}
    for g in games:
        k = f"{'variable' if g.variable else 'fixed'}_{g.outcome}"
        outcomes[k] = outcomes.get(k, 0) + 1
    lines = [json.dumps({"game": i, "bet_type": "variable" if g.variable else "fixed", "outcome": g.outcome,
                         "rounds": g.rounds, "final_balance": g.balance, "decisions": g.decisions})
             for i, g in enumerate(games)]
    atomic_write_text(state.root / EXP1_GAMES, "\n".join(lines) + "\n")
    kept = [g for g in games if g.outcome in ("bankrupt", "stopped")]
    n_b = sum(g.outcome == "bankrupt" for g in kept)
    n_s = len(kept) - n_b
    summary = {"games": len(games), "outcomes": outcomes, "bankrupt": n_b, "stopped": n_s,
               "position": "last token of the final decision prompt, resid_post of each layer"}
    layers = [l for l in sorted(saes) if l >= 1]
    if n_b < 5 or n_s < 5:
        state.log(f"experiment 1: only {n_b} bankrupt and {n_s} stopped games: no Cohen's d")
        atomic_write_json(state.root / EXP1_CANDIDATES, {"candidates": {}})
        return {"summary": {**summary, "significant_per_layer": {}, "candidates": 0,
                            "note": "too few bankrupt or stopped games for Cohen's d"}}
    codes = ex.last_token_codes(model, tok, [g.final_prompt for g in kept], saes)
    bankrupt = np.array([g.outcome == "bankrupt" for g in kept])
    table = ex.cohen_d_table(codes, bankrupt, ~bankrupt)
    sig = ex.significant_features(table, layers)
    ts = Clock().stamp()
    d_sae = next(iter(saes.values())).d_sae
    fname = f"L{layers[0]}_{layers[-1]}_features_demo_{ts}.json"
    atomic_write_json(state.root / "data" / "experiment_1" / fname,
                      ex.features_file(sig, d_sae, f"{EXP1_GAMES} ({len(kept)} games)", ts))
    n_sig = {str(l): len(sig[l]) for l in layers}
    state.log(f"experiment 1: {n_b} bankrupt vs {n_s} stopped games; significant features per layer {n_sig}")
    candidates, power = choose_candidates(state, {l: sig[l][: p.pool_per_layer] for l in layers})
    atomic_write_json(state.root / EXP1_CANDIDATES, {"source": fname, "pool_per_layer": p.pool_per_layer,
                                                     "power": power, "candidates": candidates})
    return {"summary": {**summary, "significant_per_layer": n_sig, "features_file": fname,
                        "candidates": sum(len(v) for v in candidates.values()), "n_trials": power["n_trials"],
                        "power": {k: v for k, v in power.items() if k not in ("predicted", "detection_probability")},
                        "max_abs_cohen_d": max((abs(f["cohen_d"]) for v in sig.values() for f in v), default=0.0)}}


def choose_candidates(state: State, pool: dict[int, list[dict]]) -> tuple[dict, dict]:
    """Experiment 2's features and trial count by power (engine/demo/power.py): the exact predicted
    stop rate of every pool feature's patches, then the plan that maximises the expected number of
    features surviving the engine's BH verdict within the plan's budget of sampled answers."""
    from engine.config import AuditConfig
    from engine.demo import power as pw

    p = state.plan
    audit = AuditConfig()
    pred = pw.predicted_stop_rates(state.model(), state.tokenizer(), state.saes(), pool)
    if not pred["features"]:
        return {}, {"n_trials": pw.N_GRID[0], "n_features": 0, "note": "no Exp-1 significant feature"}
    plan = pw.plan_trials(pred, p.exp2_answers, alpha=audit.alpha, min_effect=audit.min_effect)
    chosen = set(plan.features)
    by_name = {f"L{l}-{f['feature_idx']}": (l, f) for l, fl in pool.items() for f in fl}
    candidates: dict[str, list] = {}
    for name in plan.features:  # best first
        l, f = by_name[name]
        candidates.setdefault(str(l), []).append(f)
    out = plan.as_dict()
    out["budget_answers"] = p.exp2_answers
    out["pool"] = len(pred["features"])
    out["predicted_baseline_stop_rate"] = {k: round(v, 4) for k, v in pred["baseline"].items()}
    out["predicted"] = {name: pw.fmt_pred(pred, name) for name in sorted(pred["features"])}
    out["rule"] = (f"engine verdict: BH over every patched-vs-baseline test, q < {audit.alpha}, "
                   f"|delta| >= {audit.min_effect}")
    state.log(f"experiment 1: power plan: {len(chosen)} of {len(pred['features'])} features x {plan.n_trials} trials, "
              f"expected {plan.expected_survivors:.1f} surviving BH (per-test threshold {plan.alpha_threshold:.2g})")
    return candidates, out


# ---------------------------------------------------------------------------


def stage_experiment_2(state: State) -> dict:
    from engine.demo import experiment as ex
    from engine.demo import EXP2_DIR
    from engine.progress import Progress

    p = state.plan
    tok, model, saes = state.tokenizer(), state.model(), state.saes()
    cand_file = read_json(state.root / EXP1_CANDIDATES, "demo candidates")
    cands = cand_file.get("candidates", {})
    n_trials = int(cand_file.get("power", {}).get("n_trials", 30))
    candidates = {int(l): v for l, v in cands.items() if v}
    n = sum(len(v) for v in candidates.values())
    out_dir = state.root / EXP2_DIR
    if out_dir.exists():  # a killed run's partial files: this stage starts over
        import shutil

        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    (out_dir / "response_logs").mkdir()
    with Progress(n, "demo: experiment 2 (features)", unit="feature") as bar:
        res = ex.run_experiment_2(model, tok, saes, candidates, n_trials=n_trials, seed=state.seed * 1000 + 4,
                                  out_dir=out_dir, save_every=p.save_every, features_per_batch=p.features_per_batch,
                                  max_new_tokens=p.max_new_tokens, clock=ex.Clock(), progress=bar)
    feats = res["features"]
    for f, v in zip(feats, ex.engine_verdicts(feats)):
        f["engine_verdict"] = v
    bh = [f for f in feats if f["engine_verdict"]["causal"]]
    causal = [f for f in feats if f["is_causal"]]
    run_b = [f for f in feats if f["run_b"]["is_causal_safe"] or f["run_b"]["is_causal_risky"]]
    strongest, why = strongest_feature(feats)
    summary = {
        "features_tested": len(feats), "n_trials": n_trials, "conditions": 6,
        "n_causal": len(causal),
        "n_causal_safe": sum(f["classified_as"] == "safe" for f in causal),
        "n_causal_risky": sum(f["classified_as"] == "risky" for f in causal),
        "causal_features": [f["feature"] for f in causal],
        "n_causal_bh": len(bh),
        "causal_features_bh": [f["feature"] for f in bh],
        "bh_by_direction": {d: sum(f["engine_verdict"]["direction"] == d for f in bh) for d in ("safe", "risky", "mixed")},
        "bh_raises_stopping": sum(f["engine_verdict"]["raises_stopping"] for f in bh),
        "bh_raises_betting": sum(f["engine_verdict"]["raises_betting"] for f in bh),
        "bh_per_layer": {str(l): sum(f["layer"] == l for f in bh) for l in sorted(candidates)},
        "rule_bh": "the engine's recomputed verdict (engine/audit/stats.py) on the answers as the engine's parser reads "
                   "them (engine/audit/parser.py): each patched condition against its own "
                   "prompt's baseline, Benjamini-Hochberg over all 4 tests of every feature, causal if q < 0.05 and "
                   "|delta| >= 0.1; direction safe = the safe patch raises stopping, risky = the risky patch lowers "
                   "stopping (raises betting), mixed = both, or an effect against the patch's own direction",
        "expected_bh_survivors": cand_file.get("power", {}).get("expected_bh_survivors"),
        "n_causal_run_b": len(run_b),
        "causal_features_run_b": [f["feature"] for f in run_b],
        "rule": "Run A's in-script rule: per prompt, stop rate under the risky patch minus under the safe patch; "
                "causal if p < 0.05 and |delta| > 0.1 on either prompt (chi2 with Yates, Fisher's exact test when a "
                "cell has fewer than 5 trials); classified_as as Run A (risky when a delta is > 0)",
        "rule_run_b": "the study's final rule (Run B / reparse): safe context stop(safe_with_safe_patch) vs "
                      "stop(safe_baseline); risky context P(bet >= $20) of risky_with_risky_patch vs risky_baseline",
        "patch": "last prompt token, resid_post, h + (v - a) d (SAE error kept), prefill only",
        "strongest_feature": strongest, "strongest_reason": why,
        "checkpoint_files": len(res["checkpoint_files"]), "response_files": len(res["response_files"]),
        "checkpoints_dir": EXP2_DIR, "responses_dir": f"{EXP2_DIR}/response_logs",
    }
    atomic_write_json(state.root / EXP2_SUMMARY, {"summary": summary, "features": feats})
    state.log(f"experiment 2: {len(causal)} of {len(feats)} features causal by Run A's rule (uncorrected), "
              f"{len(bh)} by the engine's BH verdict {summary['bh_by_direction']} "
              f"({len(run_b)} by the final rule of Run B)")
    return {"summary": summary}


def strongest_feature(feats: list[dict]) -> tuple[str | None, str]:
    """The causal feature with the largest |stop delta|; else the largest |Cohen's d|."""
    causal = [f for f in feats if f["is_causal"]]
    if causal:
        best = max(causal, key=lambda f: max(abs(f["safe_stop_delta"]), abs(f["risky_stop_delta"])))
        return best["feature"], "largest |stop delta| among the causal features"
    if feats:
        return max(feats, key=lambda f: abs(f["cohen_d"]))["feature"], "no causal feature; largest |Cohen's d|"
    return None, "no feature tested"


# ---------------------------------------------------------------------------


def stage_pipeline(state: State) -> dict:
    from engine.demo import DEMO_CONFIG
    from engine.demo.pipeline import run_pipeline

    summary = read_json(state.root / EXP2_SUMMARY, "demo experiment 2 summary")["summary"]
    state._model = None  # the steps load their own copies
    state.extra.clear()
    out = run_pipeline(state.root / DEMO_CONFIG, state.cache, summary.get("strongest_feature"),
                       log=lambda m: state.log(m))
    out["audit_recomputed"] = audit_verdict(state.cache)
    if out["audit_recomputed"] is not None:
        state.log(f"pipeline: the audit's recomputed (BH) verdict: {out['audit_recomputed'].get('causal')} causal "
                  f"{out['audit_recomputed'].get('by_direction')}")
    return out


def audit_verdict(cache: Path) -> dict | None:
    """The audit's own recomputed verdict (`recomputed` of audit/data_validation.json), if it ran."""
    from engine.errors import UserError
    from engine.schema import AUDIT_VALIDATION

    try:
        rec = read_json(Path(cache) / AUDIT_VALIDATION, "audit summary").get("recomputed")
    except (UserError, AttributeError):
        return None
    return rec if isinstance(rec, dict) else None


STAGES: list[tuple[str, Callable[[State], dict]]] = [
    ("train", stage_train),
    ("saes", stage_saes),
    ("experiment_1", stage_experiment_1),
    ("experiment_2", stage_experiment_2),
    ("pipeline", stage_pipeline),
]


def reload(state: State, name: str, result: dict) -> None:
    """Nothing to restore: every stage reads its inputs from disk."""
    return None
