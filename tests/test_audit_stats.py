"""Statistics against scipy (a second implementation) and hand values."""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import chi2_contingency, false_discovery_control, fisher_exact

from engine.audit.stats import bh_qvalues, chi2_yates_p, cohens_h, effects, feature_conditions, fisher_p, two_by_two_p


def test_chi2_yates_matches_scipy():
    rng = np.random.default_rng(1)
    tabs = rng.integers(0, 40, size=(300, 4))
    tabs = tabs[(tabs[:, 0] + tabs[:, 1] > 0) & (tabs[:, 2] + tabs[:, 3] > 0)
                & (tabs[:, 0] + tabs[:, 2] > 0) & (tabs[:, 1] + tabs[:, 3] > 0)]
    ours = chi2_yates_p(*tabs.T)
    ref = [chi2_contingency([[a, b], [c, d]])[1] for a, b, c, d in tabs]
    np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=1e-14)


def test_fisher_matches_scipy():
    rng = np.random.default_rng(4)
    tabs = np.concatenate([rng.integers(0, 12, size=(400, 4)), [[3, 3, 3, 3], [0, 5, 5, 0], [0, 0, 4, 6], [30, 0, 0, 30]]])
    ours = fisher_p(*tabs.T)
    ref = [fisher_exact([[a, b], [c, d]])[1] for a, b, c, d in tabs]
    np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-15)


def test_small_cells_use_fisher_and_zero_margins_give_one():
    # expected counts: [[1, 29], [5, 25]] has 30*6/60 = 3 < 5 in the stop column
    p, test = two_by_two_p([1, 20, 0, 0], [29, 10, 30, 0], [5, 5, 0, 3], [25, 25, 30, 27])
    assert list(test) == ["fisher", "chi2", "fisher", ""]
    assert math.isclose(p[0], fisher_exact([[1, 29], [5, 25]])[1], rel_tol=1e-9)
    assert math.isclose(p[1], chi2_contingency([[20, 10], [5, 25]])[1])
    assert p[2] == 1.0  # nobody stops in either condition
    assert math.isnan(p[3])  # a condition with no valid trial


def test_bh_matches_scipy_and_keeps_nan():
    rng = np.random.default_rng(2)
    p = rng.uniform(0, 0.2, 500)
    p[::17] = np.nan
    q = bh_qvalues(p)
    ok = np.isfinite(p)
    np.testing.assert_allclose(q[ok], false_discovery_control(p[ok], method="bh"), rtol=1e-12)
    assert np.isnan(q[~ok]).all()
    # by hand: p = (0.01, 0.04, 0.03) -> sorted ranks 1..3, q = min over tail of p*3/rank
    np.testing.assert_allclose(bh_qvalues([0.01, 0.04, 0.03]), [0.03, 0.04, 0.04])


def test_cohens_h_by_hand():
    assert math.isclose(float(cohens_h(0.5, 0.0)), 2 * math.asin(math.sqrt(0.5)))
    assert math.isclose(float(cohens_h(1.0, 0.0)), math.pi)


def test_effects_on_hand_counts():
    conds = ("safe_baseline", "safe_with_safe_patch", "safe_with_risky_patch", "risky_baseline",
             "risky_with_safe_patch", "risky_with_risky_patch")
    # one feature: safe baseline 2/30 stop, safe patch 20/30 stop; everything else 10/30
    f, c, action, bet = [], [], [], []
    for ci, stops in enumerate([2, 20, 10, 10, 10, 10]):
        for t in range(30):
            f.append(0)
            c.append(ci)
            action.append(1 if t < stops else 0)
            bet.append(0 if t < stops else 10)
    f, c, action, bet = (np.array(x) for x in (f, c, action, bet))
    counts = feature_conditions(f, c, action, bet, np.zeros(len(f), np.int8), np.ones(len(f), bool), 1, conds)
    assert counts["n_stop"].tolist() == [2, 20, 10, 10, 10, 10]
    assert counts["bet_sum"].tolist() == [280, 100, 200, 200, 200, 200]
    e = effects(counts, 1, conds, alpha=0.05, min_effect=0.1)
    assert math.isclose(e["safe_prompt_safe_patch_delta"][0], 18 / 30)
    assert math.isclose(e["safe_prompt_safe_patch_p"][0], chi2_contingency([[20, 10], [2, 28]])[1])
    assert math.isclose(e["safe_prompt_risky_patch_p"][0], chi2_contingency([[10, 20], [2, 28]])[1])
    assert e["risky_prompt_safe_patch_p"][0] == 1.0
    assert bool(e["recomputed_verdict"][0])
    # the safe patch raises stopping (safe vote); the risky patch raises it too in the safe
    # prompt (+8/30, a paradoxical sign): significant? then mixed
    q_risky = e["safe_prompt_risky_patch_q"][0]
    assert e["recomputed_direction"][0] == ("mixed" if q_risky < 0.05 else "safe")
