"""Statistics of the token views: log-odds with an informative Dirichlet prior, and BH.

Log-odds ratio with informative Dirichlet prior (Monroe, Colaresi & Quinn 2008,
"Fightin' words", Political Analysis 16:372, eqs. 16-22). For word w with counts
y_i (group i, the patched condition) and y_j (group j, its baseline), group totals
n_i = sum_w y_i and n_j, and prior pseudo-counts alpha_w = alpha_0 * pi_w (pi_w the
word's share of a background corpus, alpha_0 = sum_w alpha_w):

    delta_w   = log((y_i + a_w) / (n_i + a_0 - y_i - a_w)) - log((y_j + a_w) / (n_j + a_0 - y_j - a_w))
    var_w     ~ 1 / (y_i + a_w) + 1 / (y_j + a_w)
    z_w       = delta_w / sqrt(var_w)
    p_w       = 2 * (1 - Phi(|z_w|))         (two-sided, normal approximation)

Benjamini-Hochberg: with p sorted ascending p_(1) <= ... <= p_(m),
q_(k) = min_{l >= k} min(1, m p_(l) / l); a word is significant when q <= alpha.

Only numpy and scipy.special are used, so the explorer could call these too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class LogOdds:
    delta: np.ndarray  # log-odds ratio, group i vs group j
    var: np.ndarray  # its approximate variance
    z: np.ndarray
    p: np.ndarray  # two-sided normal p-value
    alpha: np.ndarray  # the prior pseudo-counts used


def informative_prior(background: np.ndarray, alpha0: float) -> np.ndarray:
    """alpha_w = alpha0 * background_w / sum(background)."""
    background = np.asarray(background, dtype=np.float64)
    total = background.sum()
    if total <= 0:
        raise ValueError("the background corpus is empty")
    if np.any(background <= 0):
        raise ValueError("every compared word needs a positive background count (use the pooled counts)")
    return alpha0 * background / total


def log_odds_dirichlet(y_i, y_j, alpha) -> LogOdds:
    """Monroe et al. (2008) log-odds ratio with prior pseudo-counts `alpha` (one per word)."""
    from scipy.special import ndtr

    y_i = np.asarray(y_i, dtype=np.float64)
    y_j = np.asarray(y_j, dtype=np.float64)
    alpha = np.asarray(alpha, dtype=np.float64)
    if not (y_i.shape == y_j.shape == alpha.shape):
        raise ValueError("counts and prior must have the same shape")
    n_i, n_j, a0 = y_i.sum(), y_j.sum(), alpha.sum()
    delta = np.log((y_i + alpha) / (n_i + a0 - y_i - alpha)) - np.log((y_j + alpha) / (n_j + a0 - y_j - alpha))
    var = 1.0 / (y_i + alpha) + 1.0 / (y_j + alpha)
    z = delta / np.sqrt(var)
    p = 2.0 * ndtr(-np.abs(z))
    return LogOdds(delta, var, z, p, alpha)


def benjamini_hochberg(p) -> np.ndarray:
    """BH-adjusted p-values (q-values), in the input order; NaN stays NaN (not counted in m).

    The audit's implementation is the one the whole engine uses."""
    from engine.audit.stats import bh_qvalues

    return bh_qvalues(p)
