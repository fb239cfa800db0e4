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
    ids = encode_batch(tokenizer, responses)
    lens = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    rows = np.repeat(np.arange(len(ids), dtype=np.int64), lens)
    flat = np.fromiter((t for x in ids for t in x), dtype=np.int64, count=int(lens.sum()))
    uniq, codes = np.unique(flat, return_inverse=True)
    labels = [token_text.shown(int(t)) for t in uniq]
    return Terms("llama3", rows, codes.astype(np.int64), labels, [int(t) for t in uniq])


COLUMNS = ["feature", "prompt", "patch", "patched_condition", "baseline_condition", "tokenization", "term",
           "token_id", "count_patched", "count_baseline", "total_patched", "total_baseline",
           "responses_patched", "responses_baseline", "n_responses_patched", "n_responses_baseline",
           "log_odds", "z", "p", "q", "significant"]


def encode_batch(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids without special tokens; the fast tokenizer's Rust batch encoder when there is one
    (the same ids, without transformers' per-text Python conversion)."""
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def behavioural_words(trials, tokenizer, token_text, prior_strength: float = 1.0, min_word_count: int = 3,
                      alpha: float = 0.05):
    """All tests for all features in `trials` (columns feature, condition, prompt, patch, response).

    Returns (rows: DataFrame of every tested term, strongest |z| first within a feature,
    summary: {feature: [one dict per comparison and tokenisation]})."""
    import pandas as pd

    trials = trials.reset_index(drop=True)
    responses = trials["response"].fillna("").astype(str).tolist()
    group_keys = trials[["feature", "prompt", "patch"]].astype(str)
    gid, groups = pd.factorize(pd.MultiIndex.from_frame(group_keys))
    gid = np.asarray(gid, dtype=np.int64)
    n_resp = np.bincount(gid, minlength=len(groups))
    cond_name = trials.groupby(gid)["condition"].agg(lambda s: s.mode().iloc[0] if len(s) else "").to_dict()
    features = sorted({g[0] for g in groups})
    by_feature: dict[str, dict[tuple[str, str], int]] = {f: {} for f in features}
    for i, (feature, prompt, patch) in enumerate(groups):
        by_feature[feature][(prompt, patch)] = i
    fcode = {f: i for i, f in enumerate(features)}
    group_fcode = np.array([fcode[g[0]] for g in groups], dtype=np.int64)

    cols: dict[str, list] = {c: [] for c in COLUMNS}
    summary: dict[str, list] = {f: [] for f in features}
    for terms in (word_terms(responses), llama3_terms(responses, tokenizer, token_text)):
        K = len(terms.labels) + 1
        keys, counts = np.unique(gid[terms.rows] * K + terms.codes, return_counts=True)
        pairs = np.unique(terms.rows * K + terms.codes)  # each (response, term) once
        dkeys, dcounts = np.unique(gid[pairs // K] * K + pairs % K, return_counts=True)
        docs = dcounts[np.searchsorted(dkeys, keys)]  # the same (group, term) keys
        g_all, c_all = keys // K, keys % K
        f_all = group_fcode[g_all]
        order = np.argsort(f_all, kind="stable")
        g_all, c_all, f_all, counts, docs = g_all[order], c_all[order], f_all[order], counts[order], docs[order]
        cuts = np.flatnonzero(np.diff(f_all)) + 1
        starts = np.concatenate([[0], cuts]) if len(f_all) else np.array([], dtype=np.int64)
        ends = np.concatenate([cuts, [len(f_all)]]) if len(f_all) else np.array([], dtype=np.int64)
        seen = set()
        labels = np.array(terms.labels, dtype=object)
        token_ids = np.array([-1 if t is None else t for t in terms.token_ids], dtype=np.int64)
        for a, b in zip(starts, ends):
            feature = features[f_all[a]]
            seen.add(feature)
            _feature_tests(feature, g_all[a:b], c_all[a:b], counts[a:b], docs[a:b], by_feature[feature], n_resp,
                           cond_name, terms.name, labels, token_ids, prior_strength, min_word_count, alpha, cols,
                           summary[feature])
        for feature in features:
            if feature not in seen:  # no terms at all in any of its responses
                summary[feature].append({"tokenization": terms.name, "note": "no terms in any response"})
    if cols["feature"]:
        data = {c: np.concatenate(v) for c, v in cols.items()}
        rows = pd.DataFrame(data)
        rows["token_id"] = pd.array(np.where(rows["token_id"] < 0, pd.NA, rows["token_id"]), dtype="Int64")
        rows["abs_z"] = rows["z"].abs()
        rows = rows.sort_values(["feature", "abs_z"], ascending=[True, False], kind="mergesort")
        rows = rows.drop(columns="abs_z").reset_index(drop=True)
    else:
        rows = pd.DataFrame(columns=COLUMNS)
    return rows[COLUMNS], {f: v for f, v in summary.items() if v}


def _feature_tests(feature, g, c, n, d, fgroups: dict, n_resp, cond_name, tokenization, labels, token_ids,
                   prior_strength, min_word_count, alpha, cols: dict, summary: list) -> None:
    """One feature: dense counts over its own vocabulary, then each patched group vs its baseline."""
    vocab, ci = np.unique(c, return_inverse=True)
    local = {gg: i for i, gg in enumerate(np.unique(g))}
    gi_idx = np.array([local[x] for x in g], dtype=np.int64)
    counts = np.zeros((len(local), len(vocab)))
    docs = np.zeros((len(local), len(vocab)), dtype=np.int64)
    counts[gi_idx, ci] = n
    docs[gi_idx, ci] = d
    background = counts.sum(axis=0)  # the feature's responses pooled over all its conditions
    zeros = np.zeros(len(vocab))
    for (prompt, patch), gi in sorted(fgroups.items()):
        if patch == BASELINE_PATCH:
            continue
        gj = fgroups.get((prompt, BASELINE_PATCH))
        info = {"prompt": prompt, "patch": patch, "patched_condition": str(cond_name.get(gi, "")),
                "baseline_condition": str(cond_name.get(gj, "")) if gj is not None else None,
                "tokenization": tokenization, "n_responses_patched": int(n_resp[gi]),
                "n_responses_baseline": int(n_resp[gj]) if gj is not None else 0, "n_tested": 0, "n_significant": 0}
        summary.append(info)
        if gj is None:
            info["note"] = "no baseline responses for this prompt"
            continue
        y_i = counts[local[gi]] if gi in local else zeros
        y_j = counts[local[gj]] if gj in local else zeros
        if y_i.sum() == 0 or y_j.sum() == 0:
            info["note"] = "a group has no terms"
            continue
        alpha0 = prior_strength * (y_i.sum() + y_j.sum()) / 2.0
        lo = log_odds_dirichlet(y_i, y_j, alpha0 * background / background.sum())
        keep = np.flatnonzero((y_i + y_j) >= min_word_count)
        info["alpha0"] = float(alpha0)
        if not len(keep):
            continue
        q = benjamini_hochberg(lo.p[keep])
        sig = q <= alpha
        info["n_tested"] = int(len(keep))
        info["n_significant"] = int(sig.sum())
        m = len(keep)
        d_i = docs[local[gi]] if gi in local else np.zeros(len(vocab), dtype=np.int64)
        d_j = docs[local[gj]] if gj in local else np.zeros(len(vocab), dtype=np.int64)
        for col, val in (("feature", feature), ("prompt", prompt), ("patch", patch),
                         ("patched_condition", info["patched_condition"]),
                         ("baseline_condition", info["baseline_condition"]), ("tokenization", tokenization)):
            cols[col].append(np.full(m, val, dtype=object))
        cols["term"].append(labels[vocab[keep]])
        cols["token_id"].append(token_ids[vocab[keep]])
        cols["count_patched"].append(y_i[keep].astype(np.int64))
        cols["count_baseline"].append(y_j[keep].astype(np.int64))
        cols["total_patched"].append(np.full(m, int(y_i.sum()), dtype=np.int64))
        cols["total_baseline"].append(np.full(m, int(y_j.sum()), dtype=np.int64))
        cols["responses_patched"].append(d_i[keep])
        cols["responses_baseline"].append(d_j[keep])
        cols["n_responses_patched"].append(np.full(m, info["n_responses_patched"], dtype=np.int64))
        cols["n_responses_baseline"].append(np.full(m, info["n_responses_baseline"], dtype=np.int64))
        cols["log_odds"].append(lo.delta[keep])
        cols["z"].append(lo.z[keep])
        cols["p"].append(lo.p[keep])
        cols["q"].append(q)
        cols["significant"].append(sig)
