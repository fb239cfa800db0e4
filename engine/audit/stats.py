"""Per feature x condition counts and per-feature recomputed patching effects.

Stop rate = stops / valid parses (our parser). For each prompt (safe, risky) and patch
(safe, risky) the effect is the change in stop rate from `{prompt}_baseline` to
`{prompt}_with_{patch}_patch`:
* delta = stop_rate(patched) - stop_rate(baseline);
* Cohen's h = 2 asin(sqrt(p_patched)) - 2 asin(sqrt(p_baseline));
* p-value: Pearson's chi-square on the 2x2 table [[stops, bets] patched, [stops, bets] baseline]
  with Yates' continuity correction (scipy's chi2_contingency default, as the study), or
  Fisher's exact test (two-sided) when an expected count is below 5; p = 1 when a margin is
  zero (all trials in both conditions stop, or none does); NaN when a condition has no valid trial.
* q: Benjamini-Hochberg over all the effect tests of all features together.
A feature is causal (recomputed) when some test has q < alpha and |delta| >= min_effect.
Direction: each such test votes safe (safe patch, delta > 0: more stopping), risky (risky
patch, delta < 0: less stopping) or mixed (the opposite signs); one kind of vote gives that
direction, anything else mixed.
"""

from __future__ import annotations

import numpy as np

TESTS = (("safe", "safe"), ("safe", "risky"), ("risky", "safe"), ("risky", "risky"))


def test_key(prompt: str, patch: str) -> str:
    return f"{prompt}_prompt_{patch}_patch"


def chi2_yates_p(a, b, c, d) -> np.ndarray:
    """p-values of 2x2 tables [[a, b], [c, d]], chi-square with Yates' correction exactly as
    scipy.stats.chi2_contingency(correction=True): each observed count moves up to 0.5 toward
    its expected count. Tables with a zero margin give p = 1."""
    from scipy.special import chdtrc  # chi-square survival function; scipy.stats is slow to import

    a, b, c, d = (np.asarray(x, dtype=np.float64) for x in (a, b, c, d))
    n = a + b + c + d
    r1, r2, c1, c2 = a + b, c + d, a + c, b + d
    zero = (r1 == 0) | (r2 == 0) | (c1 == 0) | (c2 == 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        stat = np.zeros_like(n)
        for obs, r, col in ((a, r1, c1), (b, r1, c2), (c, r2, c1), (d, r2, c2)):
            e = r * col / n
            diff = e - obs
            adj = obs + np.sign(diff) * np.minimum(0.5, np.abs(diff))
            stat += (adj - e) ** 2 / e
    p = chdtrc(1, stat)
    p[zero] = 1.0
    return p


def fisher_p(a, b, c, d) -> np.ndarray:
    """Two-sided Fisher exact p-values, vectorised: with the margins fixed, the stop count of
    the first row is hypergeometric; p sums the probabilities of every table no more likely
    than the observed one (relative tolerance 1e-7, as R; scipy.stats.fisher_exact agrees to
    floating-point error). Computed once per distinct table."""
    from scipy.special import gammaln

    tab = np.stack([np.asarray(x, dtype=np.int64) for x in (a, b, c, d)], axis=1)
    if len(tab) == 0:
        return np.zeros(0)
    uniq, inv = np.unique(tab, axis=0, return_inverse=True)
    ua, ub, uc, ud = uniq.T
    r1, r2, c1 = ua + ub, uc + ud, ua + uc
    n = r1 + r2
    lo = np.maximum(0, c1 - r2)
    hi = np.minimum(r1, c1)
    x = lo[:, None] + np.arange(int((hi - lo).max()) + 1)[None, :]
    inside = x <= hi[:, None]
    xs = np.where(inside, x, lo[:, None])

    def logpmf(k):
        k = np.asarray(k, dtype=np.float64)
        r1f, r2f, c1f, nf = (v.astype(np.float64)[:, None] if k.ndim == 2 else v.astype(np.float64)
                             for v in (r1, r2, c1, n))
        return (gammaln(r1f + 1) - gammaln(k + 1) - gammaln(r1f - k + 1) + gammaln(r2f + 1)
                - gammaln(c1f - k + 1) - gammaln(r2f - c1f + k + 1)
                - (gammaln(nf + 1) - gammaln(c1f + 1) - gammaln(nf - c1f + 1)))

    pmf = np.where(inside, np.exp(logpmf(xs)), 0.0)
    p_obs = np.exp(logpmf(ua))
    p = np.where(pmf <= p_obs[:, None] * (1 + 1e-7), pmf, 0.0).sum(axis=1)
    return np.minimum(p, 1.0)[inv.reshape(-1)]


def two_by_two_p(a, b, c, d) -> tuple[np.ndarray, np.ndarray]:
    """(p, test) with test 'chi2', 'fisher' or '' (not testable)."""
    a, b, c, d = (np.asarray(x, dtype=np.int64) for x in (a, b, c, d))
    n = a + b + c + d
    r1, r2, c1, c2 = a + b, c + d, a + c, b + d
    testable = (r1 > 0) & (r2 > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        emin = np.minimum.reduce([r1 * c1, r1 * c2, r2 * c1, r2 * c2]) / np.where(n > 0, n, 1)
    small = testable & (emin < 5)
    p = np.full(len(a), np.nan)
    test = np.full(len(a), "", dtype=object)
    big = testable & ~small
    if big.any():
        p[big] = chi2_yates_p(a[big], b[big], c[big], d[big])
        test[big] = "chi2"
    if small.any():
        p[small] = fisher_p(a[small], b[small], c[small], d[small])
        test[small] = "fisher"
    return p, test


def bh_qvalues(p) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values over the finite entries (NaN stays NaN)."""
    p = np.asarray(p, dtype=np.float64)
    q = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    m = int(ok.sum())
    if m == 0:
        return q
    pv = p[ok]
    order = np.argsort(pv, kind="mergesort")
    ranked = pv[order] * m / np.arange(1, m + 1)
    adj = np.minimum.accumulate(ranked[::-1])[::-1]
    out = np.empty(m)
    out[order] = np.minimum(adj, 1.0)
    q[ok] = out
    return q


def cohens_h(p1, p2) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return 2 * np.arcsin(np.sqrt(p1)) - 2 * np.arcsin(np.sqrt(p2))


def feature_conditions(f, c, action, bet, s_stop, s_valid, n_features: int, conditions: tuple[str, ...]):
    """Counts per (feature, condition) as a dict of flat numpy arrays (index f * C + c).
    One bincount per group of counts: (cell, action) pairs, then the bets with an amount,
    then (cell, study stop) over the study's valid parses."""
    C = len(conditions)
    g = f.astype(np.int64) * C + c.astype(np.int64)
    size = n_features * C
    act = np.asarray(action, dtype=np.int64)  # 0 bet, 1 stop, 2 invalid
    if len(act) and (act.min() < 0 or act.max() > 2):
        raise ValueError("action codes must be 0 (bet), 1 (stop) or 2 (invalid)")
    by_action = np.bincount(g * 3 + act, minlength=size * 3).reshape(size, 3)
    has_amount = (act == 0) & (bet >= 0)
    g_amount = g[has_amount]
    sv = np.asarray(s_valid, dtype=bool)
    by_study = np.bincount(g[sv] * 2 + (np.asarray(s_stop)[sv] == 1), minlength=size * 2).reshape(size, 2)
    return {
        "n_trials": by_action.sum(axis=1),
        "n_valid": by_action[:, 0] + by_action[:, 1],
        "n_stop": by_action[:, 1].copy(),
        "n_bet": by_action[:, 0].copy(),
        "bet_sum": np.bincount(g_amount, weights=bet[has_amount].astype(np.float64), minlength=size),
        "n_bet_amount": np.bincount(g_amount, minlength=size),
        "study_n_valid": by_study.sum(axis=1),
        "study_n_stop": by_study[:, 1].copy(),
    }


def effects(counts: dict, n_features: int, conditions: tuple[str, ...], alpha: float, min_effect: float) -> dict:
    """Per-feature effect columns (numpy arrays of length n_features)."""
    C = len(conditions)
    idx = {cname: i for i, cname in enumerate(conditions)}
    n_valid = counts["n_valid"].reshape(n_features, C) if C else np.zeros((n_features, 0))
    n_stop = counts["n_stop"].reshape(n_features, C) if C else np.zeros((n_features, 0))
    out: dict[str, np.ndarray] = {}
    keys = []
    for prompt, patch in TESTS:
        base, pat = f"{prompt}_baseline", f"{prompt}_with_{patch}_patch"
        key = test_key(prompt, patch)
        keys.append(key)
        if base not in idx or pat not in idx:
            nan = np.full(n_features, np.nan)
            out.update({f"{key}_delta": nan, f"{key}_h": nan, f"{key}_p": nan.copy()})
            out[f"{key}_test"] = np.full(n_features, "", dtype=object)
            continue
        a = n_stop[:, idx[pat]]
        b = n_valid[:, idx[pat]] - a
        cc = n_stop[:, idx[base]]
        d = n_valid[:, idx[base]] - cc
        with np.errstate(divide="ignore", invalid="ignore"):
            p1 = np.where(a + b > 0, a / np.maximum(a + b, 1), np.nan)
            p2 = np.where(cc + d > 0, cc / np.maximum(cc + d, 1), np.nan)
        pval, test = two_by_two_p(a, b, cc, d)
        out[f"{key}_delta"] = p1 - p2
        out[f"{key}_h"] = cohens_h(p1, p2)
        out[f"{key}_p"] = pval
        out[f"{key}_test"] = test
    allp = np.concatenate([out[f"{k}_p"] for k in keys]) if n_features else np.zeros(0)
    allq = bh_qvalues(allp)
    sig_any = np.zeros(n_features, bool)
    votes_safe = np.zeros(n_features, bool)
    votes_risky = np.zeros(n_features, bool)
    votes_mixed = np.zeros(n_features, bool)
    for j, ((prompt, patch), key) in enumerate(zip(TESTS, keys)):
        q = allq[j * n_features:(j + 1) * n_features]
        out[f"{key}_q"] = q
        delta = out[f"{key}_delta"]
        sig = np.nan_to_num(q, nan=1.0) < alpha
        sig &= np.abs(np.nan_to_num(delta)) >= min_effect
        sig_any |= sig
        if patch == "safe":
            votes_safe |= sig & (delta > 0)
            votes_mixed |= sig & (delta < 0)
        else:
            votes_risky |= sig & (delta < 0)
            votes_mixed |= sig & (delta > 0)
    direction = np.full(n_features, None, dtype=object)
    direction[votes_safe & ~votes_risky & ~votes_mixed] = "safe"
    direction[votes_risky & ~votes_safe & ~votes_mixed] = "risky"
    direction[sig_any & (votes_mixed | (votes_safe & votes_risky))] = "mixed"
    with np.errstate(invalid="ignore"):
        qs = np.stack([out[f"{k}_q"] for k in keys], axis=1)
        ds = np.stack([np.abs(out[f"{k}_delta"]) for k in keys], axis=1)
    out["min_q"] = np.where(np.isfinite(qs).any(axis=1), np.nanmin(np.where(np.isfinite(qs), qs, np.inf), axis=1), np.nan)
    out["max_abs_delta"] = np.where(np.isfinite(ds).any(axis=1), np.nanmax(np.where(np.isfinite(ds), ds, -np.inf), axis=1), np.nan)
    out["recomputed_verdict"] = sig_any
    out["recomputed_direction"] = direction
    return out
