"""Choosing Experiment 2's candidates and trial count by statistical power.

Before any trial is sampled, the demo computes what each candidate's patches are expected to
do, exactly: the probability that the first answer token is "2" (stop) rather than "1" (bet)
under the study's decoding (temperature 0.7, top-k 50, top-p 0.9), with the patch applied at
the last prompt token, for the baselines and the four patched conditions. That gives, per
feature and per test of the engine's recomputed verdict (engine/audit/stats.py: each patched
condition against its own prompt's baseline; chi2 with Yates or Fisher's exact test; Benjamini-
Hochberg over every test; causal when q < alpha and |delta| >= min_effect), the exact power at
n trials per condition: the probability, over Binomial(n, p_patched) x Binomial(n, p_baseline)
outcomes, that the test's p-value clears the BH threshold and |delta| clears min_effect.

The BH threshold depends on how many tests end up significant: with m tests of which R are
expected to be rejected, a test passes BH at about p <= alpha * R / m. R and the threshold are
solved together (a fixed point, starting from R = 1). The budget is a number of sampled answers;
for every trial count n of a grid, the K = budget / (6 n) features with the highest detection
probability are considered (and fewer, when the weak tail would only dilute BH), and the n with the
largest expected number of BH-surviving features wins.

The trials themselves are sampled afterwards with their own random numbers: the prediction only
decides where the budget goes, never the verdict, so the tests keep their level.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

STOP_TOKEN = "2"
BET_TOKEN = "1"
N_GRID = (20, 30, 40, 50, 60, 80, 100, 120, 150, 200, 250, 300)
PATCHED = (("safe", "safe"), ("safe", "risky"), ("risky", "safe"), ("risky", "risky"))  # (prompt, patch)


def predicted_stop_rates(model, tok, saes: dict, candidates: dict[int, list[dict]], batch_rows: int = 256,
                         share_prefix: bool = True) -> dict:
    """{"baseline": {prompt: p}, "features": {name: {(prompt, patch): p}}}: the exact probability of
    answering "2" among {"1", "2"} as first token, after the study's decoding filters.

    `share_prefix=False` runs every row's whole prompt (the slower path, kept for the benchmark)."""
    import copy

    import torch

    from engine.demo.experiment import patch_editor
    from engine.demo.generate import Unembedding, filtered_probs
    from engine.game import risky_prompt, safe_prompt
    from engine.model import capture_resid_post

    unembed = Unembedding(model)
    col = {t: int((unembed.all_ids == tok.convert_tokens_to_ids(t)).nonzero()[0, 0]) for t in (STOP_TOKEN, BET_TOKEN)}
    prompts = {"safe": tok(safe_prompt(), add_special_tokens=True)["input_ids"],
               "risky": tok(risky_prompt(), add_special_tokens=True)["input_ids"]}

    def stop_prob(h_last):
        idx, probs = filtered_probs(unembed(h_last))
        p = {}
        for t, c in col.items():
            p[t] = (probs * (idx == c)).sum(-1)
        return p[STOP_TOKEN] / (p[STOP_TOKEN] + p[BET_TOKEN]).clamp_min(1e-12)

    # The patch acts at the last token only, so every row shares the prompt's first T-1 tokens: their
    # cache is computed once per prompt, and each row runs the last token alone (the same function
    # as a full forward; tests/test_demo_parts.py compares the two)
    prefixes = {}
    if share_prefix:
        for name, ids in prompts.items():
            with torch.no_grad():
                prefixes[name] = model.model(input_ids=torch.tensor([ids[:-1]]), use_cache=True).cache

    def run(pname, layer, sae, fids, values):
        ids = prompts[pname]
        B = len(fids)
        if share_prefix:
            cache = copy.deepcopy(prefixes[pname])
            cache.batch_repeat_interleave(B)
            kw = {"input_ids": torch.tensor([[ids[-1]]] * B), "position_ids": torch.full((B, 1), len(ids) - 1),
                  "cache": cache, "use_cache": True}
        else:
            kw = {"input_ids": torch.tensor([ids] * B), "use_cache": False}
        edit = patch_editor(sae, fids, values) if sae is not None else None

        def _edit(l, h):
            h = h.clone()
            h[:, -1] = edit(h[:, -1])
            return h

        with torch.no_grad():
            if edit is None:
                h = model.model(**kw).last_hidden_state[:, -1]
            else:
                with capture_resid_post(model, [layer], detach=True, stop_after_last=False, edit=_edit):
                    h = model.model(**kw).last_hidden_state[:, -1]
        return stop_prob(h)

    base = {name: float(run(name, None, None, [0], [0.0])[0]) for name in prompts}
    feats: dict[str, dict] = {}
    for layer, fl in sorted(candidates.items()):
        if not fl:
            continue
        for start in range(0, len(fl), max(1, batch_rows // 2)):
            chunk = fl[start:start + max(1, batch_rows // 2)]
            fids = [f["feature_idx"] for f in chunk for _ in (0, 1)]
            vals = [f[key] for f in chunk for key in ("safe_mean", "bankrupt_mean")]
            for pname in prompts:
                p = run(pname, layer, saes[layer], fids, vals).tolist()
                for i, f in enumerate(chunk):
                    rec = feats.setdefault(f"L{layer}-{f['feature_idx']}", {})
                    rec[(pname, "safe")] = p[2 * i]
                    rec[(pname, "risky")] = p[2 * i + 1]
    return {"baseline": base, "features": feats}


# ---------------------------------------------------------------------------
# Exact power of the engine's test
# ---------------------------------------------------------------------------

_GRIDS: dict[int, object] = {}


def _pvalue_grid(n: int):
    """(n+1, n+1) p-values of the engine's 2x2 test for k1 stops of n patched vs k0 stops of n baseline."""
    import numpy as np

    from engine.audit.stats import two_by_two_p

    if n not in _GRIDS:
        k1, k0 = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
        a, c = k1.ravel(), k0.ravel()
        p, _ = two_by_two_p(a, n - a, c, n - c)
        _GRIDS[n] = np.where(np.isfinite(p), p, 1.0).reshape(n + 1, n + 1)
    return _GRIDS[n]


def test_power(p_patched: float, p_base: float, n: int, alpha_t: float, min_effect: float) -> float:
    """P(p-value <= alpha_t and |k1/n - k0/n| >= min_effect) for k1 ~ Bin(n, p_patched), k0 ~ Bin(n, p_base)."""
    import numpy as np

    grid = _pvalue_grid(n)
    k = np.arange(n + 1)
    delta = np.abs(k[:, None] - k[None, :]) / n
    ok = (grid <= alpha_t) & (delta >= min_effect - 1e-12)
    return float(_pmf(n, p_patched) @ ok.astype(float) @ _pmf(n, p_base))


@functools.lru_cache(maxsize=100_000)
def _pmf(n: int, p: float):
    """Bin(k; n, p) for k = 0..n, cached: the plan asks for the same (n, p) under many thresholds."""
    import numpy as np
    from scipy.stats import binom

    return binom.pmf(np.arange(n + 1), n, p)


@dataclass
class PowerPlan:
    n_trials: int
    features: list[str]  # chosen, best first
    expected_survivors: float
    alpha_threshold: float  # the BH per-test threshold solved for
    table: list[dict]  # per n of the grid: n, K, expected survivors, threshold
    detection: dict[str, float]  # per chosen feature: P(it survives) at n_trials

    def as_dict(self) -> dict:
        return {"n_trials": self.n_trials, "n_features": len(self.features),
                "expected_bh_survivors": round(self.expected_survivors, 2),
                "bh_threshold": float(f"{self.alpha_threshold:.3g}"), "grid": self.table,
                "detection_probability": {k: round(v, 4) for k, v in self.detection.items()}}


def _detect(pred: dict, names: list[str], n: int, alpha_t: float, min_effect: float) -> tuple[dict, float]:
    """Per feature P(some test of a real effect is significant) (tests treated as independent; a test
    whose predicted effect is under half the minimum effect counts as null), and the expected number
    of significant tests (all of them: BH's threshold depends on every rejection)."""
    det, tests = {}, 0.0
    for name in names:
        miss = 1.0
        for prompt, patch in PATCHED:
            p1, p0 = pred["features"][name][(prompt, patch)], pred["baseline"][prompt]
            pw = test_power(p1, p0, n, alpha_t, min_effect)
            tests += pw  # every expected rejection moves BH's threshold
            if abs(p1 - p0) >= min_effect / 2:  # a test of a (nearly) null effect only finds false positives
                miss *= 1 - pw
        det[name] = 1 - miss
    return det, tests


def _solve(pred: dict, chosen: list[str], n: int, alpha: float, min_effect: float) -> tuple[dict, float]:
    """BH's per-test threshold for the chosen features at n trials (a fixed point) and each
    feature's detection probability at it."""
    m = 4 * len(chosen)
    alpha_t = alpha / m
    for _ in range(6):
        det_c, tests = _detect(pred, chosen, n, alpha_t, min_effect)
        new = alpha * max(1.0, tests) / m
        if abs(new - alpha_t) <= 1e-3 * alpha_t:
            break
        alpha_t = new
    else:
        det_c, _ = _detect(pred, chosen, n, alpha_t, min_effect)
    return det_c, alpha_t


K_FRACTIONS = (1.0, 0.75, 0.5, 0.35, 0.25)
DET_CUTS = (0.5, 0.2, 0.1, 0.05, 0.02)


def plan_trials(pred: dict, budget_answers: int, *, alpha: float = 0.05, min_effect: float = 0.1,
                n_grid=N_GRID, min_features: int = 1, must_include: list[str] = ()) -> PowerPlan:
    """The trial count and the features to test that maximise the expected number of features
    surviving the engine's BH verdict within `budget_answers` sampled answers (6 conditions each).

    For each n, up to K = budget / (6 n) features fit; fewer may be better, since every feature
    tested adds 4 tests to BH's denominator, so K, 3/4 K, 1/2 K, ... and the counts of features
    above a few detection probabilities are compared, and the budget a weak tail would only
    dilute the verdict with is not spent."""
    names = sorted(pred["features"])
    table, best = [], None
    for n in n_grid:
        K_max = min(len(names), budget_answers // (6 * n))
        if K_max < min_features:
            continue
        # rank by a first guess of the threshold (alpha / number of tests)
        det, _ = _detect(pred, names, n, alpha / (4 * K_max), min_effect)
        rank = sorted(names, key=lambda f: (-det[f], f))
        row = None
        # candidate sizes: fractions of K_max, and the cut points of the ranking's detection probabilities
        sizes = {int(round(K_max * f)) for f in K_FRACTIONS} | {sum(det[f] >= c for f in names) for c in DET_CUTS}
        for K in sorted({min(K_max, max(min_features, k)) for k in sizes}, reverse=True):
            chosen = [f for f in must_include if f in det][:K]
            chosen += [f for f in rank if f not in chosen][: K - len(chosen)]
            det_c, alpha_t = _solve(pred, chosen, n, alpha, min_effect)
            expected = sum(det_c.values())
            if row is None or expected > row[0] + 1e-9:
                row = (expected, chosen, det_c, alpha_t)
        expected, chosen, det_c, alpha_t = row
        table.append({"n_trials": n, "n_features": len(chosen), "answers": 6 * n * len(chosen),
                      "bh_threshold": float(f"{alpha_t:.3g}"), "expected_bh_survivors": round(expected, 2)})
        if best is None or expected > best.expected_survivors + 1e-9:
            order = sorted(chosen, key=lambda f: (-det_c[f], f))
            best = PowerPlan(n, order, expected, alpha_t, table, det_c)
    if best is None:
        raise ValueError(f"a budget of {budget_answers} answers cannot test {min_features} feature(s)")
    best.table = table
    return best


def required_n(p_patched: float, p_base: float, alpha_t: float, min_effect: float, power: float = 0.8,
               n_max: int = 400) -> int | None:
    """Smallest n (per condition) of the grid 10, 20, ... with power >= `power`; None if above n_max."""
    for n in range(10, n_max + 1, 10):
        if test_power(p_patched, p_base, n, alpha_t, min_effect) >= power:
            return n
    return None


def fmt_pred(pred: dict, name: str) -> dict:
    """JSON-able predicted stop rates of one feature: {"safe_with_safe_patch": p, ...}."""
    return {f"{prompt}_with_{patch}_patch": round(p, 4) for (prompt, patch), p in pred["features"][name].items()}

