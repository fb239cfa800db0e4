"""Statistics of the token views against hand computations: log-odds with an informative
Dirichlet prior (Monroe et al. 2008), Benjamini-Hochberg, and the word counts behind them."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy.stats import false_discovery_control

from engine.tokens.stats import benjamini_hochberg, informative_prior, log_odds_dirichlet
from engine.tokens.text import split_words, visible


def test_log_odds_with_prior_matches_a_hand_worked_table():
    # Three words. Group i (patched): 10, 5, 0 (n_i = 15); group j (baseline): 4, 8, 3 (n_j = 15).
    # Background = pooled counts 14, 13, 3 (total 30); alpha_0 = 15 -> alpha = 7, 6.5, 1.5.
    alpha = informative_prior([14, 13, 3], 15.0)
    assert alpha.tolist() == pytest.approx([7.0, 6.5, 1.5])
    res = log_odds_dirichlet([10, 5, 0], [4, 8, 3], alpha)
    # word 0: log(17 / (30 - 17)) - log(11 / (30 - 11)); var = 1/17 + 1/11
    d0 = math.log(17 / 13) - math.log(11 / 19)
    v0 = 1 / 17 + 1 / 11
    # word 1: log(11.5 / 18.5) - log(14.5 / 15.5); var = 1/11.5 + 1/14.5
    d1 = math.log(11.5 / 18.5) - math.log(14.5 / 15.5)
    v1 = 1 / 11.5 + 1 / 14.5
    # word 2: log(1.5 / 28.5) - log(4.5 / 25.5); var = 1/1.5 + 1/4.5
    d2 = math.log(1.5 / 28.5) - math.log(4.5 / 25.5)
    v2 = 1 / 1.5 + 1 / 4.5
    assert res.delta.tolist() == pytest.approx([d0, d1, d2], rel=1e-12)
    assert res.var.tolist() == pytest.approx([v0, v1, v2], rel=1e-12)
    z = [d0 / math.sqrt(v0), d1 / math.sqrt(v1), d2 / math.sqrt(v2)]
    assert res.z.tolist() == pytest.approx(z, rel=1e-12)
    assert z[0] == pytest.approx(2.1057, abs=1e-4)  # the hand-computed value, written down
    # two-sided normal p: erfc(|z| / sqrt 2)
    assert res.p.tolist() == pytest.approx([math.erfc(abs(x) / math.sqrt(2)) for x in z], rel=1e-10)


def test_log_odds_is_antisymmetric_and_zero_for_equal_rates():
    alpha = informative_prior([5, 5, 10], 4.0)
    a = log_odds_dirichlet([3, 1, 6], [6, 2, 12], alpha)  # group j has exactly twice the counts
    b = log_odds_dirichlet([6, 2, 12], [3, 1, 6], alpha)
    np.testing.assert_allclose(a.delta, -b.delta)
    np.testing.assert_allclose(a.z, -b.z)
    np.testing.assert_allclose(a.p, b.p)
    with pytest.raises(ValueError):
        informative_prior([1, 0], 1.0)


def test_benjamini_hochberg_hand_sorted_and_scipy():
    p = np.array([0.01, 0.04, 0.03, 0.005, 0.20])
    # sorted: 0.005 (k=1), 0.01 (2), 0.03 (3), 0.04 (4), 0.20 (5); p*m/k = .025 .025 .05 .05 .20,
    # then the running minimum from the top leaves them as they are.
    expected = [0.025, 0.05, 0.05, 0.025, 0.20]
    np.testing.assert_allclose(benjamini_hochberg(p), expected, rtol=1e-12)
    np.testing.assert_allclose(benjamini_hochberg(p), false_discovery_control(p), rtol=1e-12)
    # the step-up minimum matters: sorted .04 .0499 .05 -> p*m/k = .12 .07485 .05, and the running
    # minimum from the largest p carries .05 down to every rank
    p2 = np.array([0.05, 0.04, 0.0499])
    q2 = benjamini_hochberg(p2)
    np.testing.assert_allclose(q2, [0.05, 0.05, 0.05], rtol=1e-12)
    np.testing.assert_allclose(q2, false_discovery_control(p2), rtol=1e-12)
    rng = np.random.default_rng(3)
    p3 = rng.uniform(size=200) ** 3
    np.testing.assert_allclose(benjamini_hochberg(p3), false_discovery_control(p3), rtol=1e-12)
    # NaN entries are not tested and do not count in m
    q4 = benjamini_hochberg(np.array([0.01, np.nan, 0.04]))
    assert np.isnan(q4[1]) and q4[[0, 2]].tolist() == pytest.approx([0.02, 0.04])


def test_word_splitter_and_visible_tokens():
    assert split_words("1\nBet $15, Loss. I'll STOP at 2.5") == ["1", "bet", "$15", "loss", "i'll", "stop", "at", "2.5"]
    assert visible(" Bet\n\n") == "␣Bet⏎⏎" and visible("") == "∅" and visible("\t\r") == "⇥␍"


@pytest.fixture(scope="module")
def llama3():
    from engine.fixtures import load_llama3_tokenizer
    from engine.tokens.text import TokenText

    tok = load_llama3_tokenizer()
    return tok, TokenText(tok)


def test_token_text_shows_spaces_newlines_and_partial_bytes(llama3):
    tok, text = llama3
    sp = tok(" Stop", add_special_tokens=False)["input_ids"]
    assert len(sp) == 1 and text(sp[0]) == (" Stop", "␣Stop")
    nl = tok("\n\n", add_special_tokens=False)["input_ids"]
    assert text.shown(nl[0]) == "⏎⏎"
    # an emoji is split into byte pieces; each piece shows its UTF-8 bytes
    pieces = tok("🎰", add_special_tokens=False)["input_ids"]
    shown = "".join(text.shown(i) for i in pieces)
    assert shown.startswith("⟨f0") and "🎰".encode("utf-8").hex(" ")[:5] in shown.replace("⟨", "").replace("⟩", " ")


def test_behavioural_words_counts_and_statistics_by_hand(llama3):
    from engine.tokens.words import behavioural_words

    tok, text = llama3
    rows = []

    def add(cond, prompt, patch, responses):
        for t, r in enumerate(responses):
            rows.append(dict(feature="L2-5", condition=cond, prompt=prompt, patch=patch, trial=t, response=r))

    add("safe_baseline", "safe", "none", ["bet bet stop", "bet"])
    add("safe_with_safe_patch", "safe", "safe", ["stop stop", "stop bet"])
    add("safe_with_risky_patch", "safe", "risky", ["bet bet"])
    add("risky_with_safe_patch", "risky", "safe", ["stop"])  # no risky baseline: not tested
    trials = pd.DataFrame(rows)
    out, summary = behavioural_words(trials, tok, text, prior_strength=1.0, min_word_count=1, alpha=0.05)
    w = out[(out.tokenization == "word") & (out.patch == "safe") & (out.prompt == "safe")].set_index("term")
    # counts: patched stop 3, bet 1 (n_i = 4); baseline stop 1, bet 3 (n_j = 4)
    assert (w.loc["stop", "count_patched"], w.loc["stop", "count_baseline"]) == (3, 1)
    assert (w.loc["bet", "count_patched"], w.loc["bet", "count_baseline"]) == (1, 3)
    assert (w.loc["stop", "responses_patched"], w.loc["stop", "responses_baseline"]) == (2, 1)
    assert w.loc["stop", "total_patched"] == 4 and w.loc["stop", "n_responses_baseline"] == 2
    # background: the feature's pooled counts over all its conditions: bet 6, stop 5 (total 11);
    # alpha_0 = (4 + 4) / 2 = 4 -> alpha_stop = 4 * 5/11, alpha_bet = 4 * 6/11
    a_s, a_b = 4 * 5 / 11, 4 * 6 / 11
    d_stop = math.log((3 + a_s) / (4 + 4 - 3 - a_s)) - math.log((1 + a_s) / (4 + 4 - 1 - a_s))
    z_stop = d_stop / math.sqrt(1 / (3 + a_s) + 1 / (1 + a_s))
    d_bet = math.log((1 + a_b) / (4 + 4 - 1 - a_b)) - math.log((3 + a_b) / (4 + 4 - 3 - a_b))
    z_bet = d_bet / math.sqrt(1 / (1 + a_b) + 1 / (3 + a_b))
    assert w.loc["stop", "log_odds"] == pytest.approx(d_stop, rel=1e-12)
    assert w.loc["stop", "z"] == pytest.approx(z_stop, rel=1e-12)
    assert w.loc["bet", "z"] == pytest.approx(z_bet, rel=1e-12)
    p = [math.erfc(abs(z_stop) / math.sqrt(2)), math.erfc(abs(z_bet) / math.sqrt(2))]
    q = false_discovery_control(p)
    assert [w.loc["stop", "q"], w.loc["bet", "q"]] == pytest.approx(list(q), rel=1e-10)
    assert w.loc["stop", "patched_condition"] == "safe_with_safe_patch"
    assert w.loc["stop", "baseline_condition"] == "safe_baseline"
    # LLaMA-3 tokens: the totals are the tokenizer's own counts ("stop stop" is "stop" + " stop")
    lt = out[(out.tokenization == "llama3") & (out.patch == "safe") & (out.prompt == "safe")]
    n_tok = sum(len(tok(r, add_special_tokens=False)["input_ids"]) for r in ["stop stop", "stop bet"])
    assert int(lt["total_patched"].iloc[0]) == n_tok
    assert set(lt["term"]) >= {"stop", "␣stop", "␣bet"}
    # the risky safe-patch group has no baseline: summarised, not tested
    notes = {(s["prompt"], s["patch"], s["tokenization"]): s for s in summary["L2-5"]}
    assert "no baseline" in notes[("risky", "safe", "word")]["note"]
    assert not ((out.prompt == "risky").any())
    # min_word_count drops rare terms from the test (and from m in BH)
    out3, _ = behavioural_words(trials, tok, text, min_word_count=5)
    assert out3[(out3.tokenization == "word") & (out3.patch == "safe")].empty
