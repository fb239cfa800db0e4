"""Behavioural words: which words and amounts a patch makes more or less frequent.

For every feature and every patched condition, its responses (group i) are compared
with the responses of the same prompt without a patch (group j, the matching baseline):
safe_with_safe_patch and safe_with_risky_patch against safe_baseline, and the risky
ones against risky_baseline. Counts are occurrences of each term over all responses of
a group, under two tokenisations kept side by side:

- ``word``: the simple splitter of `engine.tokens.text.split_words` (lower-cased words and
  amounts such as "$10");
- ``llama3``: the model's own tokenizer (LLaMA-3 BPE tokens, shown visibly).

The test is the log-odds ratio with an informative Dirichlet prior (`engine.tokens.stats`).
The background corpus is the feature's responses pooled over all its conditions, and
alpha_0 = prior_strength * (n_i + n_j) / 2 (the prior is worth `prior_strength` groups'
worth of tokens). Only terms with y_i + y_j >= min_word_count are tested; BH runs across
those terms, per (feature, comparison, tokenisation).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.tokens.stats import benjamini_hochberg, log_odds_dirichlet

TOKENIZATIONS = ("word", "llama3")
BASELINE_PATCH = "none"


@dataclass
class Terms:
    """A long table of term occurrences: row (index into trials) and term code."""

    name: str
    rows: np.ndarray  # int64
    codes: np.ndarray  # int64, index into `labels`
    labels: list[str]  # shown text per code
    token_ids: list[int | None]  # LLaMA-3 id per code (None for words)


def word_terms(responses: list[str]) -> Terms:
    from engine.tokens.text import split_words

    vocab: dict[str, int] = {}
    rows, codes = [], []
    for r, text in enumerate(responses):
        for w in split_words(text):
            c = vocab.setdefault(w, len(vocab))
            rows.append(r)
            codes.append(c)
    return Terms("word", np.asarray(rows, dtype=np.int64), np.asarray(codes, dtype=np.int64),
                 list(vocab), [None] * len(vocab))


def llama3_terms(responses: list[str], tokenizer, token_text) -> Terms:
    ids = tokenizer(responses, add_special_tokens=False)["input_ids"] if responses else []
    lens = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    rows = np.repeat(np.arange(len(ids), dtype=np.int64), lens)
    flat = np.fromiter((t for x in ids for t in x), dtype=np.int64, count=int(lens.sum()))
    uniq, codes = np.unique(flat, return_inverse=True)
    labels = [token_text.shown(int(t)) for t in uniq]
    return Terms("llama3", rows, codes.astype(np.int64), labels, [int(t) for t in uniq])


def behavioural_words(trials, tokenizer, token_text, prior_strength: float = 1.0, min_word_count: int = 3,
                      alpha: float = 0.05):
    """All tests for all features in `trials` (columns feature, condition, prompt, patch, response).

    Returns (rows: DataFrame of every tested term, summary: {feature: [per-comparison dict]})."""
    import pandas as pd

    trials = trials.reset_index(drop=True)
    responses = trials["response"].fillna("").astype(str).tolist()
    group_keys = trials[["feature", "prompt", "patch"]].astype(str)
    gid, groups = pd.factorize(pd.MultiIndex.from_frame(group_keys))
    n_resp = np.bincount(gid, minlength=len(groups))
    cond_name = trials.groupby(gid)["condition"].agg(lambda s: s.mode().iloc[0] if len(s) else "")
    group_feature = np.array([g[0] for g in groups], dtype=object)
    by_feature: dict[str, dict[tuple[str, str], int]] = {}
    for i, (feature, prompt, patch) in enumerate(groups):
        by_feature.setdefault(feature, {})[(prompt, patch)] = i

    frames, summary = [], {}
    for terms in (word_terms(responses), llama3_terms(responses, tokenizer, token_text)):
        K = len(terms.labels) + 1
        key = gid[terms.rows] * K + terms.codes
        counts = pd.Series(key).value_counts()
        pairs = np.unique(terms.rows * K + terms.codes)  # each (response, term) once
        doc_counts = pd.Series(gid[pairs // K] * K + pairs % K).value_counts()
        table = pd.DataFrame({
            "group": counts.index.to_numpy() // K,
            "code": counts.index.to_numpy() % K,
            "count": counts.to_numpy(),
            "docs": doc_counts.reindex(counts.index).fillna(0).astype(np.int64).to_numpy(),
        })
        table["feature"] = group_feature[table["group"].to_numpy()]
        for feature, ft in table.groupby("feature", sort=False):
            recs = _feature_tests(feature, ft, by_feature[feature], n_resp, cond_name, terms, prior_strength,
                                  min_word_count, alpha)
            for rec_frame, info in recs:
                if rec_frame is not None:
                    frames.append(rec_frame)
                summary.setdefault(feature, []).append(info)
    cols = ["feature", "prompt", "patch", "patched_condition", "baseline_condition", "tokenization", "term",
            "token_id", "count_patched", "count_baseline", "total_patched", "total_baseline",
            "responses_patched", "responses_baseline", "n_responses_patched", "n_responses_baseline",
            "log_odds", "z", "p", "q", "significant"]
    rows = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=cols)
    if len(rows):
        rows["abs_z"] = rows["z"].abs()
        rows = rows.sort_values(["feature", "abs_z"], ascending=[True, False], kind="mergesort")
        rows = rows.drop(columns="abs_z").reset_index(drop=True)
    return rows[cols], summary


def _feature_tests(feature, ft, fgroups: dict, n_resp, cond_name, terms: Terms, prior_strength, min_word_count,
                   alpha):
    import pandas as pd

    wide = ft.pivot_table(index="code", columns="group", values="count", aggfunc="sum", fill_value=0)
    docs = ft.pivot_table(index="code", columns="group", values="docs", aggfunc="sum", fill_value=0)
    background = wide.to_numpy().sum(axis=1).astype(np.float64)
    codes = wide.index.to_numpy()
    out = []
    for (prompt, patch), gi in sorted(fgroups.items()):
        if patch == BASELINE_PATCH:
            continue
        gj = fgroups.get((prompt, BASELINE_PATCH))
        info = {"prompt": prompt, "patch": patch, "patched_condition": str(cond_name.get(gi, "")),
                "baseline_condition": str(cond_name.get(gj, "")) if gj is not None else None,
                "tokenization": terms.name, "n_responses_patched": int(n_resp[gi]),
                "n_responses_baseline": int(n_resp[gj]) if gj is not None else 0, "n_tested": 0, "n_significant": 0}
        if gj is None or n_resp[gj] == 0 or n_resp[gi] == 0:
            info["note"] = "no baseline responses for this prompt" if gj is None else "a group has no responses"
            out.append((None, info))
            continue
        y_i = wide[gi].to_numpy().astype(np.float64) if gi in wide.columns else np.zeros(len(codes))
        y_j = wide[gj].to_numpy().astype(np.float64) if gj in wide.columns else np.zeros(len(codes))
        if y_i.sum() == 0 or y_j.sum() == 0:
            info["note"] = "a group has no terms"
            out.append((None, info))
            continue
        alpha0 = prior_strength * (y_i.sum() + y_j.sum()) / 2.0
        a_w = alpha0 * background / background.sum()
        lo = log_odds_dirichlet(y_i, y_j, a_w)
        keep = (y_i + y_j) >= min_word_count
        q = benjamini_hochberg(np.where(keep, lo.p, np.nan))
        idx = np.flatnonzero(keep)
        d_i = docs[gi].to_numpy() if gi in docs.columns else np.zeros(len(codes))
        d_j = docs[gj].to_numpy() if gj in docs.columns else np.zeros(len(codes))
        frame = pd.DataFrame({
            "feature": feature,
            "prompt": prompt,
            "patch": patch,
            "patched_condition": info["patched_condition"],
            "baseline_condition": info["baseline_condition"],
            "tokenization": terms.name,
            "term": [terms.labels[c] for c in codes[idx]],
            "token_id": pd.array([terms.token_ids[c] for c in codes[idx]], dtype="Int64"),
            "count_patched": y_i[idx].astype(np.int64),
            "count_baseline": y_j[idx].astype(np.int64),
            "total_patched": int(y_i.sum()),
            "total_baseline": int(y_j.sum()),
            "responses_patched": d_i[idx].astype(np.int64),
            "responses_baseline": d_j[idx].astype(np.int64),
            "n_responses_patched": info["n_responses_patched"],
            "n_responses_baseline": info["n_responses_baseline"],
            "log_odds": lo.delta[idx],
            "z": lo.z[idx],
            "p": lo.p[idx],
            "q": q[idx],
        })
        frame["significant"] = frame["q"] <= alpha
        info["n_tested"] = int(len(idx))
        info["n_significant"] = int(frame["significant"].sum())
        info["alpha0"] = float(alpha0)
        out.append((frame, info))
    return out
