"""The demo's building blocks, each checked against an independent computation."""

from __future__ import annotations

import math
import random

import pytest
import torch

from engine.demo import plan_for
from engine.demo import games as G
from engine.demo.experiment import benjamini_hochberg, causality_run_a, causality_run_b, cohen_d_table, patch_editor
from engine.demo.generate import Unembedding, filtered_probs
from engine.demo.train import FULL_VOCAB, expand_to_full_vocab, full_vocab_loss, small_model
from engine.errors import UserError
from engine.game import RISKY_HISTORY, SAFE_HISTORY, Round, format_prompt


@pytest.mark.parametrize(
    "text, variable, action, bet, valid",
    [
        ("1\nBet $10\nRound 4: Bet $10, Win, Balance $160", False, "bet", 10, True),
        ("1\nThe reels spin... Loss. Balance $130", False, "bet", 10, True),
        ("2\n\nI will walk away with $140", False, "stop", 0, True),  # invalid under the study's P0
        ("2\nStop. Final balance: $20", True, "stop", 0, True),
        ("1\nBet amount: $25\nResult: Loss, Balance $5\nCurrent round: 5", True, "bet", 25, True),
        ("1, $50\nRound 4: Bet $50, Loss, Balance $0", True, "bet", 50, True),
        ("1\nI'll bet $15.\nResult: Win, Balance $50", True, "bet", 15, True),
        ("1\nRound 4: Bet $20, Loss, Balance $0", True, "bet", 20, True),  # "Bet $20" inside the echoed round
        ("1\nBet $500", True, "stop", 0, False),  # out of the $5-$100 menu
        ("1\nthe machine", True, "stop", 0, False),
        ("Slot Machine Game", False, "stop", 0, False),
        ("120215290.\n375", False, "stop", 0, False),  # a number, but not a menu choice
        ("1, $100\nRound 4: Bet $100, Loss, Balance $0", True, "bet", 100, True),  # above the balance: stated
        ("", True, "stop", 0, False),
    ],
)
def test_parse_response(text, variable, action, bet, valid):
    p = G.parse_response(text, variable)
    assert (p["action"], p["bet"], p["valid"]) == (action, bet, valid)
    assert p["response"] == text
    if not valid:
        assert p["reason"] in ("parsing_failed", "bet_out_of_range")


def test_every_simulated_response_parses_to_its_decision():
    for g in G.simulate_games(200, seed=3):
        for d in g.decisions:
            p = G.parse_response(d.response, d.variable)
            assert p["valid"] and p["bet"] == d.decision, d.response
            assert d.prompt.startswith("Slot Machine Game\n\nGame history:\nRound 1: ") and d.prompt.endswith("Choice: ")


def test_games_follow_the_rules_and_end_both_ways():
    games = G.simulate_games(400, seed=1)
    outcomes = {g.outcome for g in games}
    assert {"bankrupt", "stopped"} <= outcomes
    for g in games:
        bal = G.START_BALANCE
        for r in g.history:
            assert 0 < r.bet <= bal
            bal = bal + 2 * r.bet if r.win else bal - r.bet  # win pays 3x the bet
            assert r.balance == bal
        assert (g.outcome == "bankrupt") == (bal == 0)
        if not g.variable:
            assert all(r.bet == 10 for r in g.history)
    # the same seed gives the same games
    assert [g.history for g in G.simulate_games(50, 9)] == [g.history for g in G.simulate_games(50, 9)]


def test_policy_is_gambling_like():
    # fixed bets: stops more with a high balance; variable: chases after a big loss
    assert G.stop_probability(list(SAFE_HISTORY), 140, False) > 0.6
    assert G.stop_probability(list(SAFE_HISTORY), 90, False) < 0.1
    assert G.stop_probability(list(RISKY_HISTORY), 20, True) < 0.2
    calm = [Round(10, True, 120), Round(10, False, 110), Round(10, False, 100)]
    assert G.stop_probability(calm, 100, True) > G.stop_probability(list(RISKY_HISTORY), 100, True)
    rng = random.Random(0)
    chase = [G.choose_bet(list(RISKY_HISTORY), 100, True, rng) for _ in range(400)]
    calm_bets = [G.choose_bet(calm, 100, True, rng) for _ in range(400)]
    assert sum(chase) / 400 > 2 * sum(calm_bets) / 400
    assert format_prompt(SAFE_HISTORY, 140, False).endswith("1) Bet $10\n2) Stop\n\nChoice: ")


def test_small_vocab_loss_is_the_full_vocab_cross_entropy():
    used = [5, 17, 128000, 128001, 4000, 99]
    small = small_model(2, 32, len(used), seed=0).eval()
    full = expand_to_full_vocab(small, used, seed=0)
    x_full = torch.tensor([[128000, 5, 17, 4000, 99, 128001]])
    remap = {t: i for i, t in enumerate(used)}
    x_small = torch.tensor([[remap[int(t)] for t in x_full[0]]])
    w = torch.ones(1, 5)
    with torch.no_grad():
        loss, _ = full_vocab_loss(small(x_small).logits[:, :-1], x_small[:, 1:], w, FULL_VOCAB - len(used))
        logits = full(x_full).logits
        ref = torch.nn.functional.cross_entropy(logits[0, :-1], x_full[0, 1:])
    assert logits.shape[-1] == FULL_VOCAB
    assert float(loss) == pytest.approx(float(ref), rel=1e-5)
    # unused rows are exactly zero, so their logits are exactly 0
    mask = torch.ones(FULL_VOCAB, dtype=torch.bool)
    mask[used] = False
    assert float(logits[0, :, mask].abs().max()) == 0.0


def test_sampling_filter_matches_transformers_warpers():
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 500, generator=g) * torch.tensor([0.5, 1.0, 2.0, 4.0, 8.0, 16.0])[:, None]
    idx, probs = filtered_probs(logits)
    ref = TopPLogitsWarper(0.9)(None, TopKLogitsWarper(50)(None, TemperatureLogitsWarper(0.7)(None, logits.clone())))
    ref_p = torch.softmax(ref, dim=-1)
    mine = torch.zeros_like(ref_p).scatter(1, idx, probs)
    assert torch.allclose(mine, ref_p, atol=1e-6)


def test_sparse_unembedding_equals_the_full_computation():
    used = list(range(100, 160))
    full = expand_to_full_vocab(small_model(1, 32, len(used), seed=1).eval(), used, seed=1)
    un = Unembedding(full)
    h = torch.randn(4, 32) * 3
    with torch.no_grad():
        ref_logits = full.lm_head(h)
    sparse = un(h)
    assert un.n_zero == 50 and set(un.ids.tolist()) == set(used)
    assert torch.allclose(sparse, ref_logits[:, un.all_ids], atol=1e-5)
    # the same filtered distribution as on the full logits: identical on the used ids,
    # the same total mass on the (tied, exactly zero) unused ids
    idx_s, p_s = filtered_probs(sparse)
    idx_f, p_f = filtered_probs(ref_logits)
    for r in range(4):
        a = torch.zeros(FULL_VOCAB).index_put_((un.all_ids[idx_s[r]],), p_s[r])
        b = torch.zeros(FULL_VOCAB).index_put_((idx_f[r],), p_f[r])
        assert torch.allclose(a[used], b[used], atol=1e-6)
        assert float(a.sum() - a[used].sum()) == pytest.approx(float(b.sum() - b[used].sum()), abs=1e-6)


def test_patch_keeps_the_sae_error_and_only_touches_patched_rows():
    from engine.sae import build_sae

    g = torch.Generator().manual_seed(0)
    d, m = 16, 40
    W_E, b_E = torch.randn(m, d, generator=g), torch.randn(m, generator=g) * 0.1
    W_D, b_D = torch.randn(d, m, generator=g) * 0.2, torch.randn(d, generator=g)
    sae = build_sae(W_E, b_E, W_D, b_D, {"dataset_average_activation_norm": {"in": 3.0}}, layer=0, convention="study")
    h = torch.randn(3, d, generator=g) * 3
    edit = patch_editor(sae, [4, 7, 7], [2.5, float("nan"), 0.0])
    out = edit(h.clone())
    s = math.sqrt(d) / 3.0
    for row, (i, v) in enumerate([(4, 2.5), (7, None), (7, 0.0)]):
        a = max(0.0, float(s * W_E[i] @ h[row] + b_E[i]))  # the study's encoder, by hand
        expected = h[row] if v is None else h[row] + (v - a) * W_D[:, i] / s
        assert torch.allclose(out[row], expected, atol=1e-5)


def test_cohen_d_and_bh_against_hand_computation():
    import numpy as np
    from scipy import stats

    x = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 1.0], [5.0, 0.0], [6.0, 2.0], [7.0, 0.0]])
    bankrupt = np.array([True, True, True, False, False, False])
    t = cohen_d_table({1: x}, bankrupt, ~bankrupt)[1]
    b, s = [1, 2, 3], [5, 6, 7]
    sd = math.sqrt((np.var(b, ddof=1) + np.var(s, ddof=1)) / 2)
    assert t["cohen_d"][0] == pytest.approx((2 - 6) / sd)
    assert t["p_value"][0] == pytest.approx(stats.ttest_ind(b, s, equal_var=False).pvalue)
    assert t["bankrupt_mean"][1] == pytest.approx(1 / 3) and t["safe_mean"][1] == pytest.approx(2 / 3)
    # BH: p sorted 0.001, 0.008, 0.039, 0.041, 0.2 at alpha 0.05 -> thresholds 0.01, 0.02, 0.03, 0.04, 0.05
    mask = benjamini_hochberg([0.039, 0.001, 0.2, 0.008, 0.041], 0.05)
    assert mask.tolist() == [False, True, False, True, False]


def _stats(n, safe_base, safe_safe, safe_risky, risky_base_big, risky_risky_big, risky_stop=(3, 3, 3)):
    def cond(stops, big=0):
        return {"n": n, "stops": stops, "stop_rate": stops / n, "big_bets": big, "big_bet_rate": big / n,
                "mean_bet": 10.0}
    return {"safe_baseline": cond(safe_base), "safe_with_safe_patch": cond(safe_safe),
            "safe_with_risky_patch": cond(safe_risky), "risky_baseline": cond(risky_stop[0], risky_base_big),
            "risky_with_safe_patch": cond(risky_stop[1]), "risky_with_risky_patch": cond(risky_stop[2], risky_risky_big)}


def test_causality_rules_match_scipy_by_hand():
    from scipy import stats

    st = _stats(30, safe_base=15, safe_safe=27, safe_risky=5, risky_base_big=20, risky_risky_big=22)
    c = causality_run_b(st)
    # a cell of 3 < 5: Fisher's exact test; otherwise chi2 with Yates' correction
    assert c["safe_p_value"] == pytest.approx(stats.fisher_exact([[27, 3], [15, 15]])[1])
    assert c["safe_effect_size"] == pytest.approx(0.4) and c["is_causal_safe"]
    assert c["risky_p_value"] == pytest.approx(stats.chi2_contingency([[22, 8], [20, 10]])[1])
    assert not c["is_causal_risky"] and c["interpretation"] == "safe_context_causal"
    a = causality_run_a(st)
    assert a["safe_stop_delta"] == pytest.approx(5 / 30 - 27 / 30, abs=1e-4)  # 4 digits, as the study wrote
    assert a["is_causal"] and a["classified_as"] == "safe"


def test_plan_is_a_function_of_the_budget():
    assert plan_for(10) == plan_for(10.0)
    assert plan_for(1).train_steps < plan_for(10).train_steps
    assert plan_for(2).exp2_answers < plan_for(10).exp2_answers  # features and trials follow by power
    with pytest.raises(UserError):
        plan_for(0)


def test_pipeline_runner_knows_which_steps_exist():
    from engine.demo.pipeline import step_args, step_available

    assert step_available("engine.prototype")
    assert not step_available("engine.no_such_step")
    assert step_args("prototype", "c.yaml", "L2-7") == ["prototype", "--config", "c.yaml", "--feature", "L2-7"]
    assert step_args("audit", "c.yaml", "L2-7") == ["audit", "--config", "c.yaml"]


def test_power_is_the_exact_rejection_probability_of_the_engines_test():
    """A second implementation with scipy: enumerate every outcome (k1 stops of n patched, k0 of n
    baseline), test it as the audit does (Fisher's exact test when an expected count is < 5, else
    chi2 with Yates), and add up the binomial probabilities of the rejected ones."""
    import numpy as np
    from scipy import stats

    from engine.demo.power import test_power

    n, alpha_t, min_effect = 14, 0.02, 0.1
    for p1, p0 in ((0.7, 0.2), (0.05, 0.4), (0.5, 0.5)):
        ref = 0.0
        for k1 in range(n + 1):
            for k0 in range(n + 1):
                table = np.array([[k1, n - k1], [k0, n - k0]])
                if table.sum(0).min() == 0:
                    continue  # a zero margin: p = 1 (never rejected)
                expected = stats.contingency.expected_freq(table)
                p = stats.fisher_exact(table)[1] if expected.min() < 5 else stats.chi2_contingency(table)[1]
                if p <= alpha_t and abs(k1 - k0) / n >= min_effect:
                    ref += stats.binom.pmf(k1, n, p1) * stats.binom.pmf(k0, n, p0)
        assert test_power(p1, p0, n, alpha_t, min_effect) == pytest.approx(ref, rel=1e-9, abs=1e-12)
    assert test_power(0.5, 0.5, n, alpha_t, min_effect) < alpha_t  # no effect: at most the level


def test_power_plan_spends_the_budget_where_it_detects_most():
    from engine.demo.power import N_GRID, plan_trials, test_power

    base = {"safe": 0.6, "risky": 0.05}
    strong = {("safe", "safe"): 0.6, ("safe", "risky"): 0.1, ("risky", "safe"): 0.05, ("risky", "risky"): 0.05}
    weak = {("safe", "safe"): 0.6, ("safe", "risky"): 0.45, ("risky", "safe"): 0.05, ("risky", "risky"): 0.05}
    none = {k: base[k[0]] for k in strong}
    feats = {f"L1-{i}": strong for i in range(4)} | {f"L2-{i}": weak for i in range(4)} | {f"L3-{i}": none for i in range(4)}
    pred = {"baseline": base, "features": feats}
    plan = plan_trials(pred, 2400)
    assert 6 * plan.n_trials * len(plan.features) <= 2400
    best = max(r["expected_bh_survivors"] for r in plan.table)
    assert round(plan.expected_survivors, 2) == best
    assert {r["n_trials"] for r in plan.table} <= set(N_GRID)
    # the strong features first, the null ones last; each strong one nearly sure at the chosen n
    assert plan.features[:4] == [f"L1-{i}" for i in range(4)]
    miss = 1.0
    for (prompt, patch), p1 in strong.items():  # the tests of a real effect, independent samples
        if abs(p1 - base[prompt]) >= 0.05:  # half the minimum effect: null tests find only false positives
            miss *= 1 - test_power(p1, base[prompt], plan.n_trials, plan.alpha_threshold, 0.1)
    assert plan.detection["L1-0"] == pytest.approx(1 - miss, abs=1e-12)
    assert plan.detection["L1-0"] > 0.95
    with pytest.raises(ValueError):
        plan_trials(pred, 50)
    # a budget that fits every feature: the null ones (no power, 4 more tests each in BH's
    # denominator) are left out and their answers not spent
    big = plan_trials(pred, 40000)
    assert not any(f.startswith("L3-") for f in big.features)
    assert 6 * big.n_trials * len(big.features) < 40000
    everything = plan_trials(pred, 40000, n_grid=(big.n_trials,), min_features=12)
    assert big.expected_survivors > everything.expected_survivors


def test_exp1_bh_runs_over_every_test_not_only_the_small_p_values():
    """100 features at p = 0.009 among 1,000 at p = 0.5: BH over all 1,100 tests keeps none of them
    (threshold at rank 100: 0.05 * 100 / 1100 = 0.0045); BH over the 100 alone would keep all."""
    import numpy as np

    from engine.demo.experiment import significant_features

    p = np.r_[np.full(100, 0.009), np.full(1000, 0.5)]
    d = np.r_[np.full(100, 1.0), np.zeros(1000)]
    z = np.zeros(1100)
    table = {1: {"cohen_d": d, "p_value": p, "bankrupt_mean": z, "safe_mean": z, "bankrupt_std": z, "safe_std": z}}
    assert significant_features(table, [1])[1] == []
    p2 = p.copy()
    p2[:100] = 1e-5  # now below 0.05 * 100 / 1100
    table[1]["p_value"] = p2
    d2 = d.copy()
    d2[:50] = 0.2  # below |d| > 0.3: filtered out after BH
    table[1]["cohen_d"] = d2
    assert [f["feature_idx"] for f in significant_features(table, [1])[1]] == sorted(range(50, 100))


def test_engine_counts_read_answers_as_the_audit_does():
    """The engine's BH verdict counts answers with the engine's parser (engine/audit/parser.py), as the
    audit does: `1` then stop words is a bet there, while the study's parse (`parsed`, Run A's and Run
    B's counts) marks it invalid on the risky prompt; a stop, a plain bet and no decision agree."""
    from engine.demo.experiment import condition_stats, engine_counts
    from engine.demo.games import parse_response
    from engine.schema import REAL_CONDITIONS

    answers = {"risky_baseline": ["1\nStop", "1\nI will walk away", "2\nStop", "1, $20\nRound 4", "Choose wisely"],
               "safe_baseline": ["1\nStop", "2", "1\nBet $10", "Stop. Final balance: $130"]}
    trials = [{"condition": c, "response": r, "parsed": parse_response(r, variable=c.startswith("risky"))}
              for c, rs in answers.items() for r in rs]
    ours, study = engine_counts(trials), condition_stats(trials)
    assert ours["risky_baseline"] == {"n": 4, "stops": 1}  # "1\nStop" and "1\nI will walk away" bet
    assert (study["risky_baseline"]["n"], study["risky_baseline"]["stops"]) == (2, 1)  # both invalid there
    assert ours["safe_baseline"] == {"n": 4, "stops": 2}  # a fixed bet needs no amount: the parses agree
    assert (study["safe_baseline"]["n"], study["safe_baseline"]["stops"]) == (4, 2)
    assert all(ours[c] == {"n": 0, "stops": 0} for c in REAL_CONDITIONS if c not in answers)


def test_engine_verdicts_by_hand():
    """Safe prompt 30/50 stops at baseline, 8/50 with the risky patch: chi2 (Yates) p ~ 1e-5, BH over
    the 4 tests keeps it -> causal, direction risky (the risky patch raises betting)."""
    from scipy import stats

    from engine.demo.experiment import engine_verdicts
    from engine.schema import REAL_CONDITIONS

    def feat(stops):
        return {"engine_counts": {c: {"n": 50, "stops": s} for c, s in zip(REAL_CONDITIONS, stops)}}

    order = list(REAL_CONDITIONS)
    stops = dict(safe_baseline=30, safe_with_safe_patch=32, safe_with_risky_patch=8,
                 risky_baseline=2, risky_with_safe_patch=3, risky_with_risky_patch=1)
    both = dict(stops, risky_with_safe_patch=20)  # the safe patch also raises stopping on the risky prompt
    v = engine_verdicts([feat([stops[c] for c in order]), feat([both[c] for c in order])])
    p = stats.chi2_contingency([[8, 42], [30, 20]])[1]
    assert v[0]["min_q"] == pytest.approx(p * 8 / 2, rel=1e-9)  # rank 1..2 of 8 tests (both features' smallest)
    assert v[0]["causal"] and v[0]["direction"] == "risky" and v[0]["raises_betting"] and not v[0]["raises_stopping"]
    assert v[1]["causal"] and v[1]["direction"] == "mixed" and v[1]["raises_betting"] and v[1]["raises_stopping"]


TINY = dict(train_games=160, train_steps=12, sae_sequences=40, sae_steps=15, exp1_games=60, rate_trials=6,
            exp2_answers=360, pipeline=False)


def _artifacts(cache) -> dict:
    """Every file of a demo build by relative path -> bytes, with the wall-clock parts taken out:
    timestamps in file names and fields, and the measured seconds."""
    import json
    import re

    from engine.schema import DEMO_DIR

    out = {}
    root = cache / DEMO_DIR
    for p in sorted(root.rglob("*")):
        if not p.is_file():
            continue
        rel = re.sub(r"\d{8}_\d{6}", "TS", str(p.relative_to(root)))
        data = p.read_bytes()
        if p.suffix == ".json":
            def clean(x):
                if isinstance(x, dict):
                    return {k: clean(v) for k, v in x.items()
                            if k not in ("seconds", "cpu_seconds", "timestamp", "source", "features_file", "source_file")}
                if isinstance(x, list):
                    return [clean(v) for v in x]
                return re.sub(r"\d{8}_\d{6}", "TS", x) if isinstance(x, str) else x
            data = json.dumps(clean(json.loads(data)), sort_keys=True).encode()
        out.setdefault(rel, []).append(data)
    return out


@pytest.mark.slow
def test_a_demo_is_a_pure_function_of_seed_and_budget(tmp_path):
    """Two builds of the same (tiny) plan and seed give byte-identical model, SAEs, games, candidates,
    power plan, checkpoints and response logs (file-name timestamps aside); another seed does not."""
    from engine.demo import build_demo

    a = build_demo(tmp_path / "a", minutes=1, seed=3, **TINY)
    b = build_demo(tmp_path / "b", minutes=1, seed=3, **TINY)
    fa, fb = _artifacts(tmp_path / "a"), _artifacts(tmp_path / "b")
    assert "model/model.safetensors" in fa and any(k.startswith("saes/") for k in fa)
    assert set(fa) == set(fb)
    for k in fa:
        if k != "DEMO.json":
            assert fa[k] == fb[k], k
    for key in ("decision_rates", "saes", "experiment_1", "experiment_2", "plan"):
        assert a[key] == b[key], key
    c = build_demo(tmp_path / "c", minutes=1, seed=4, **TINY)
    assert _artifacts(tmp_path / "c")["model/model.safetensors"] != fa["model/model.safetensors"]
    assert c["plan"] == a["plan"]


def _tiny_trained_like_model():
    """A small full-vocabulary model with random weights (used ids only), and the tokenizer."""
    from engine.fixtures import load_llama3_tokenizer

    tok = load_llama3_tokenizer()
    ids = tok([format_prompt(list(SAFE_HISTORY), 140, False), format_prompt(list(RISKY_HISTORY), 20, True)],
              add_special_tokens=True)["input_ids"]
    used = sorted({t for s in ids for t in s} | set(tok(["1\n2\n$5 $10 Bet Stop"], add_special_tokens=False)["input_ids"][0])
                  | {tok.eos_token_id})
    torch.manual_seed(0)
    model = expand_to_full_vocab(small_model(2, 32, len(used), seed=0).eval(), used, seed=0)
    with torch.no_grad():  # larger weights: rows of different prompts differ and stop at different steps
        for name, w in model.named_parameters():
            if "norm" not in name:
                w.mul_(6.0)
    return model, tok


def test_generation_shortcuts_change_nothing():
    """The shared-prefix prefill (identical prompts) and the dropping of finished rows give exactly
    the continuations of plain batched decoding: compared under greedy decoding (temperature
    1e-6), with a per-row patch on the shared path and rows that stop at different steps."""
    from engine.demo.generate import generate
    from engine.sae import build_sae

    model, tok = _tiny_trained_like_model()
    g = torch.Generator().manual_seed(1)
    d, m = 32, 24
    sae = build_sae(torch.randn(m, d, generator=g), torch.zeros(m), torch.randn(d, m, generator=g), torch.zeros(d),
                    {"dataset_average_activation_norm": {"in": 5.0}}, layer=1, convention="study")
    prompt = tok(format_prompt(list(SAFE_HISTORY), 140, False), add_special_tokens=True)["input_ids"]
    values = [float("nan"), 0.0, 3.0, 8.0, 20.0, 40.0]
    edit = patch_editor(sae, [3, 3, 3, 5, 5, 7], values)
    kw = dict(max_new_tokens=12, temperature=1e-6, stop_at_newlines=2, edit=edit, edit_layer=1)
    shared = generate(model, tok, [prompt] * 6, generator=torch.Generator().manual_seed(0), **kw)
    plain = generate(model, tok, [prompt] * 6, generator=torch.Generator().manual_seed(0), share_prefix=False, **kw)
    kept = generate(model, tok, [prompt] * 6, generator=torch.Generator().manual_seed(0), share_prefix=False,
                    drop_finished=False, **kw)
    assert shared.token_ids == plain.token_ids == kept.token_ids
    assert len(set(map(tuple, shared.token_ids))) > 1  # the patches change the answers
    # two prompts of different lengths mixed in one batch, as Experiment 2 runs its conditions: each
    # prompt's left-padded prefix is shared by its rows
    other = tok(format_prompt(list(RISKY_HISTORY), 20, True), add_special_tokens=True)["input_ids"]
    assert len(other) != len(prompt)
    mixed = [prompt, other, other, prompt, other, prompt]
    rows_seen = []
    forward = model.model.forward
    model.model.forward = lambda *a, **k: (rows_seen.append(k["input_ids"].shape), forward(*a, **k))[1]
    try:
        shared = generate(model, tok, mixed, generator=torch.Generator().manual_seed(0), **kw)
    finally:
        del model.model.forward
    # the two prompts' prefixes ran once (2 rows, all but the last token), then every row's last token
    assert rows_seen[0] == (2, max(len(prompt), len(other)) - 1) and rows_seen[1] == (6, 1)
    plain = generate(model, tok, mixed, generator=torch.Generator().manual_seed(0), share_prefix=False, **kw)
    alone = [generate(model, tok, [p], generator=torch.Generator().manual_seed(0), share_prefix=False,
                      **{**kw, "edit": patch_editor(sae, [f], [v])}).token_ids[0]
             for p, f, v in zip(mixed, [3, 3, 3, 5, 5, 7], values)]
    assert shared.token_ids == plain.token_ids == alone
    assert len(set(map(tuple, shared.token_ids))) > 1
    # rows of different prompts, each decoded alone (nothing to drop) and all in one batch
    games = [format_prompt([Round(10, i % 2 == 0, 100 + 10 * i)] * 3, 100 + 10 * i, i % 3 == 0) for i in range(7)]
    ids = tok(games, add_special_tokens=True)["input_ids"]
    batch = generate(model, tok, ids, generator=torch.Generator().manual_seed(0), max_new_tokens=12,
                     temperature=1e-6, stop_at_newlines=2)
    alone = [generate(model, tok, [s], generator=torch.Generator().manual_seed(0), max_new_tokens=12,
                      temperature=1e-6, stop_at_newlines=2).token_ids[0] for s in ids]
    kept = generate(model, tok, ids, generator=torch.Generator().manual_seed(0), max_new_tokens=12,
                    temperature=1e-6, stop_at_newlines=2, drop_finished=False)
    assert batch.token_ids == alone == kept.token_ids
    assert len({len(t) for t in alone}) > 1  # rows finished at different steps


def test_predicted_stop_rates_equal_a_full_patched_forward():
    """The power plan's predictions run only the last token on the prompt's shared cache; a plain
    full forward with the patch on the last token's resid_post (hooked by hand), followed by the
    study's decoding filters, gives the same probability of "2" among {"1", "2"}."""
    from engine.demo.power import predicted_stop_rates
    from engine.game import risky_prompt, safe_prompt
    from engine.sae import build_sae

    model, tok = _tiny_trained_like_model()
    g = torch.Generator().manual_seed(2)
    d, m = 32, 24
    with torch.no_grad():  # "1" and "2" at the top of the safe prompt's logits, 1.5 nats apart on average
        ids = torch.tensor([tok(safe_prompt(), add_special_tokens=True)["input_ids"]])
        h = model.model.norm(model.model(input_ids=ids).last_hidden_state[0, -1])
        W = model.lm_head.weight
        top = float((W @ h).max())
        one, two = tok.convert_tokens_to_ids("1"), tok.convert_tokens_to_ids("2")
        W[one] = h * (top + 2) / (h @ h)
        W[two] = W[one] + torch.randn(d, generator=g) * 1.5 / h.norm()
    sae = build_sae(torch.randn(m, d, generator=g), torch.zeros(m), torch.randn(d, m, generator=g), torch.zeros(d),
                    {"dataset_average_activation_norm": {"in": 5.0}}, layer=1, convention="study")
    feats = [{"feature_idx": 3, "safe_mean": 6.0, "bankrupt_mean": 0.0},
             {"feature_idx": 9, "safe_mean": 0.5, "bankrupt_mean": 25.0}]
    pred = predicted_stop_rates(model, tok, {1: sae}, {1: feats})

    def by_hand(text, feature=None, value=None):
        ids = torch.tensor([tok(text, add_special_tokens=True)["input_ids"]])
        hook = None
        if feature is not None:
            edit = patch_editor(sae, [feature], [value])

            def fn(module, inputs, output):
                h = (output[0] if isinstance(output, tuple) else output).clone()
                h[:, -1] = edit(h[:, -1])
                return (h, *output[1:]) if isinstance(output, tuple) else h

            hook = model.model.layers[1].register_forward_hook(fn)
        try:
            with torch.no_grad():
                logits = model(input_ids=ids, use_cache=False).logits[:, -1]
        finally:
            if hook is not None:
                hook.remove()
        idx, probs = filtered_probs(logits)  # over the full vocabulary: idx are token ids
        p1, p2 = (float((probs * (idx == tok.convert_tokens_to_ids(t))).sum()) for t in ("1", "2"))
        return p2 / max(p1 + p2, 1e-12)

    prompts = {"safe": safe_prompt(), "risky": risky_prompt()}
    for name, text in prompts.items():
        assert pred["baseline"][name] == pytest.approx(by_hand(text), abs=1e-4)
    seen = set()
    for f in feats:
        for name, text in prompts.items():
            for patch, key in (("safe", "safe_mean"), ("risky", "bankrupt_mean")):
                got = pred["features"][f"L1-{f['feature_idx']}"][(name, patch)]
                assert got == pytest.approx(by_hand(text, f["feature_idx"], f[key]), abs=1e-4)
                seen.add(round(got, 3))
    assert len(seen) > 2 and any(0.05 < v < 0.95 for v in seen)  # the patches move it, off the 0/1 edges


def test_training_without_a_padding_mask_is_exact_for_right_padding():
    """Training runs the right-padded batch without an attention mask (causal attention already
    hides the pads from every real token): the logits of real tokens equal the masked run's."""
    from engine.demo.train import _batch, encode_transcripts, used_vocabulary
    from engine.fixtures import load_llama3_tokenizer

    tok = load_llama3_tokenizer()
    pairs = [(format_prompt(list(SAFE_HISTORY), 140, False), "2\nStop"),
             (format_prompt(list(RISKY_HISTORY)[:2], 30, True), "1\nBet $25\nRound 3: Bet $25, Loss, Balance $5")]
    seqs = encode_transcripts(tok, pairs)
    used = used_vocabulary(seqs)
    remap = torch.full((FULL_VOCAB,), -1, dtype=torch.long)
    remap[torch.tensor(used)] = torch.arange(len(used))
    x, mask, w = _batch(seqs, [0, 1], remap, 0.1, 5.0)
    assert bool((mask == 0).any())  # the shorter row is padded
    model = small_model(2, 32, len(used), seed=0).eval()
    with torch.no_grad():
        masked = model(input_ids=x, attention_mask=mask, use_cache=False).logits
        plain = model(input_ids=x, use_cache=False).logits
    real = mask.bool()
    assert torch.allclose(masked[real], plain[real], atol=1e-5)
    assert float(w[~real].abs().sum()) == 0.0  # pads carry no loss


def _three_transcripts():
    """(sequences, used ids) of three short transcripts: a stop, a bet, an all-in bet."""
    from engine.demo.train import encode_transcripts, used_vocabulary
    from engine.fixtures import load_llama3_tokenizer

    tok = load_llama3_tokenizer()
    pairs = [(format_prompt(list(SAFE_HISTORY), 140, False), "2\nStop"),
             (format_prompt(list(RISKY_HISTORY), 20, True), "1\nBet $20"),
             (format_prompt(list(RISKY_HISTORY)[:2], 30, True), "1, $30\nRound 3: Bet $30, Loss, Balance $0")]
    seqs = encode_transcripts(tok, pairs)
    return seqs, used_vocabulary(seqs)


def test_logit_lens_loss_against_hidden_states_by_hand():
    """The training's logit-lens term (the choice read at the last prompt token from every block but
    the first and the last, through the final norm and unembedding, full-vocabulary cross-entropy)
    equals the same computed from transformers' own hidden_states on the untrained model."""
    from engine.demo.train import train

    seqs, used = _three_transcripts()
    _, curve = train(seqs, used, n_layers=3, d_model=32, steps=1, batch_size=3, lr=1e-3, prompt_weight=0.1, seed=5,
                     lens_weight=2.0, log_every=1)
    model = small_model(3, 32, len(used), 5).train()  # the same initial weights (same seed)
    remap = {t: i for i, t in enumerate(used)}
    ces = []  # block 1 only: 3 blocks, and the lens skips the first and the last
    with torch.no_grad():
        for ids, n_prompt in zip(seqs.ids, seqs.n_prompt):
            x = torch.tensor([[remap[t] for t in ids]])
            hs = model(input_ids=x, output_hidden_states=True).hidden_states  # [embeddings, block 0, ...]
            logits = model.lm_head(model.model.norm(hs[2][0, n_prompt - 1])).double()
            lse = torch.logsumexp(torch.cat([logits, torch.tensor([math.log(FULL_VOCAB - len(used))]).double()]), 0)
            ces.append(float(lse - logits[x[0, n_prompt]]))
    expected = sum(ces) / len(ces)
    assert curve[0]["lens_loss"] == pytest.approx(expected, abs=2e-5)


def test_training_with_the_logit_lens_is_a_pure_function_of_the_seed():
    """The default plan's training (logit-lens loss, three answer tokens weighted) gives identical
    weights for the same seed and different ones for another; the lens term is logged."""
    from engine.demo.train import train

    seqs, used = _three_transcripts()
    kw = dict(n_layers=3, d_model=32, steps=4, batch_size=2, lr=1e-3, prompt_weight=0.1, lens_weight=5.0,
              decision_weight=5.0, log_every=1)
    a, curve = train(seqs, used, seed=1, **kw)
    b, _ = train(seqs, used, seed=1, **kw)
    c, _ = train(seqs, used, seed=2, **kw)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert all(r["lens_loss"] > 0 for r in curve)
