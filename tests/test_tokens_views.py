"""Step 4 on the fixture model, checked against independent computations: the logit lens
from the saved weights with numpy, prompt activations from hidden_states, patched decision
tokens from a plain hooked forward pass, top activations from one unpadded pass per response."""

from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.numpy import load_file

from engine.config import RISKY_PROMPT, SAFE_PROMPT, load_config
from engine.schema import atomic_write_json, atomic_write_parquet, with_schema
from helpers import run_cli

PROMPTS = {"safe": SAFE_PROMPT, "risky": RISKY_PROMPT}


@lru_cache(maxsize=None)
def _sae_numpy(folder: str, layer: int):
    folder = Path(folder) / "saes" / f"Llama3_1-8B-Base-L{layer}R-8x"
    w = {k: v.astype(np.float64) for k, v in load_file(str(folder / "checkpoints" / "final.safetensors")).items()}
    hp = json.loads((folder / "hyperparams.json").read_text())
    return w, math.sqrt(hp["d_model"]) / hp["dataset_average_activation_norm"]["in"]


def sae_numpy(fixture_dir, layer):
    return _sae_numpy(str(fixture_dir), layer)


def codes_numpy(fixture_dir, x, layer, fid):
    """Study convention: relu(s W_E[i] . x + b_E[i]) for resid_post rows x (T, d)."""
    w, s = sae_numpy(fixture_dir, layer)
    pre = (x.astype(np.float64) * s) @ w["encoder.weight"][fid].T + w["encoder.bias"][fid]
    return np.maximum(pre, 0.0)


_RESID: dict = {}


def hidden(model, ids, layer):
    """resid_post of block `layer` from plain forward hooks on every block (hidden_states[L+1] is
    normed for the last block); one pass per sequence, no logits."""
    key = (id(model), tuple(ids))
    if key not in _RESID:
        got = {}

        def make(i):
            def hook(module, args, output):
                got[i] = (output[0] if isinstance(output, tuple) else output)[0].detach().clone().numpy()
            return hook

        handles = [blk.register_forward_hook(make(i)) for i, blk in enumerate(model.model.layers)]
        try:
            with torch.no_grad():
                model.model(torch.as_tensor([ids]))
        finally:
            for h in handles:
                h.remove()
        _RESID[key] = got
    return _RESID[key][layer]


def make_trials(n_per_cond=4):
    rows = []
    conds = {"safe_baseline": ("safe", "none"), "safe_with_safe_patch": ("safe", "safe"),
             "safe_with_risky_patch": ("safe", "risky"), "risky_baseline": ("risky", "none"),
             "risky_with_safe_patch": ("risky", "safe"), "risky_with_risky_patch": ("risky", "risky")}
    texts = ["2\nStop. I walk away with $140.", "1\nBet $10\nRound 4: Bet $10, Win, Balance $170",
             "1\nBet $50\nResult: Loss, Balance $0", "2\n\nChoose:\n1) Bet $10\n2) Stop", "3"]
    k = 0
    for feature in ("L2-0", "L5-0"):
        for cond, (prompt, patch) in conds.items():
            for t in range(n_per_cond):
                rows.append(dict(feature=feature, layer=int(feature[1]), feature_id=0, condition=cond, prompt=prompt,
                                 patch=patch, trial=t, response=texts[k % len(texts)], action="bet", bet=10,
                                 valid=True))
                k += 1
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def tokens_run(fixture_dir, fixture_model, tmp_path_factory):
    """A cache with a selection (features active at the last safe-prompt token) and trials; step 4 run once."""
    from engine.tokens.run import run_tokens

    model, tok = fixture_model
    ids = tok(SAFE_PROMPT)["input_ids"]
    picks = []
    for layer in (2, 5):  # 5 is the last block: its patch goes straight to the final norm
        c = codes_numpy(fixture_dir, hidden(model, ids, layer)[-1:], layer, slice(None))[0]
        order = np.argsort(-c)
        picks += [(layer, int(order[0])), (layer, int(order[3]))]
    cache = tmp_path_factory.mktemp("tokens") / "cache"
    feats = [{"feature": f"L{l}-{i}", "layer": l, "feature_id": i, "direction": "safe", "cohen_d": 0.5 + n}
             for n, (l, i) in enumerate(picks)]
    feats[0]["safe_patch_value"] = 3.5  # a known patch value adds a "safe_patch" intervention
    atomic_write_json(cache / "features" / "causal_features.json",
                      with_schema({"verdict": "checkpoint", "top_n": 2, "n_features": len(feats), "features": feats}))
    trials = make_trials()
    trials["feature"] = np.where(trials["feature"] == "L2-0", feats[0]["feature"], feats[2]["feature"])
    atomic_write_parquet(cache / "audit" / "trials.parquet", trials)
    cfg = load_config(fixture_dir / "config.yaml", {
        "cache_dir": str(cache), "tokens.sample_size": 12, "tokens.batch_size": 5, "tokens.top_examples": 5,
        "tokens.context_tokens": 3, "tokens.min_word_count": 1})
    summary = run_tokens(cfg)
    docs = {f["feature"]: json.loads((cache / "tokens" / f"{f['feature']}.json").read_text()) for f in feats}
    return cfg, cache, feats, docs, summary, trials


def test_logit_lens_equals_numpy_from_saved_weights(fixture_dir, tokens_run):
    _, _, feats, docs, _, _ = tokens_run
    m = load_file(str(fixture_dir / "model" / "model.safetensors"))
    W_U, g = m["lm_head.weight"].astype(np.float64), m["model.norm.weight"].astype(np.float64)
    for f in feats:
        w, s = sae_numpy(fixture_dir, f["layer"])
        d = w["decoder.weight"][:, f["feature_id"]] / s  # study convention: decoder direction in residual units
        vals = W_U @ (d * g)
        lens = docs[f["feature"]]["logit_lens"]
        top, bottom = np.argsort(-vals)[:20], np.argsort(vals)[:20]
        assert [e["token_id"] for e in lens["promoted"]] == top.tolist()
        assert [e["token_id"] for e in lens["suppressed"]] == bottom.tolist()
        np.testing.assert_allclose([e["value"] for e in lens["promoted"]], vals[top], rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose([e["value"] for e in lens["suppressed"]], vals[bottom], rtol=1e-4, atol=1e-7)
        assert lens["vocab_mean"] == pytest.approx(vals.mean(), abs=1e-6)
        assert lens["vocab_std"] == pytest.approx(vals.std(ddof=1), rel=1e-4)


def test_prompt_activations_equal_independent_codes(fixture_dir, fixture_model, tokens_run):
    model, tok = fixture_model
    _, _, feats, docs, _, _ = tokens_run
    for f in feats:
        for name, text in PROMPTS.items():
            ids = tok(text)["input_ids"]
            want = codes_numpy(fixture_dir, hidden(model, ids, f["layer"]), f["layer"], f["feature_id"])
            pa = docs[f["feature"]]["prompt_activations"][name]
            assert pa["token_ids"] == ids and len(pa["tokens"]) == len(ids)
            np.testing.assert_allclose(pa["activations"], want, rtol=1e-4, atol=1e-5)
            assert pa["max"] == pytest.approx(want[1:].max(), rel=1e-4, abs=1e-6)  # BOS excluded
            assert pa["last_token_activation"] == pytest.approx(want[-1], rel=1e-4, abs=1e-6)
    safe0 = docs[feats[0]["feature"]]["prompt_activations"]["safe"]
    assert safe0["last_token_activation"] > 0 and safe0["tokens"][-1] == "␣"  # "Choice: " ends in a space token


def hooked_log_probs(model, ids, layer, pos, delta):
    """Independent reference: a plain forward hook adds delta to block `layer`'s output at `pos`."""
    def hook(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        h = h.clone()
        h[0, pos] += delta
        return (h, *output[1:]) if isinstance(output, tuple) else h

    handle = model.model.layers[layer].register_forward_hook(hook)
    try:
        with torch.no_grad():
            logits = model(torch.as_tensor([ids]), logits_to_keep=1).logits[0, -1].double()
    finally:
        handle.remove()
    return torch.log_softmax(logits, -1)


def test_patched_decision_tokens_equal_a_hooked_forward_pass(fixture_dir, fixture_model, tokens_run):
    model, tok = fixture_model
    cfg, _, feats, docs, _, _ = tokens_run
    one, two = tok("1", add_special_tokens=False)["input_ids"][0], tok("2", add_special_tokens=False)["input_ids"][0]
    cont = tok("1\nBet $", add_special_tokens=False)["input_ids"]
    amounts = {str(a): tok(str(a), add_special_tokens=False)["input_ids"][0] for a in cfg.tokens.bet_amounts}
    checked = set()
    bases = {}  # the unpatched pass does not depend on the feature
    for f in (feats[0], feats[2]):
        w, s = sae_numpy(fixture_dir, f["layer"])
        d = torch.as_tensor(w["decoder.weight"][:, f["feature_id"]] / s, dtype=torch.float32)
        doc = docs[f["feature"]]
        for name, text in PROMPTS.items():
            ids = tok(text)["input_ids"]
            pos = len(ids) - 1
            a = codes_numpy(fixture_dir, hidden(model, ids, f["layer"])[pos:], f["layer"], f["feature_id"])[0]
            for e in doc["logit_lens"]["decision_summary"]:
                if e["prompt"] != name:
                    continue
                assert e["activation"] == pytest.approx(a, rel=1e-4, abs=1e-6)
                delta = (e["value"] - a) * d
                seq = ids if e["context"] == "choice" else ids + cont
                if (name, e["context"]) not in bases:
                    bases[(name, e["context"])] = hooked_log_probs(model, seq, f["layer"], pos, torch.zeros_like(d))
                base = bases[(name, e["context"])]
                lp = hooked_log_probs(model, seq, f["layer"], pos, delta)
                if e["context"] == "choice":
                    want = (lp[one] - lp[two]) - (base[one] - base[two])
                    assert e["delta_bet_vs_stop_logodds"] == pytest.approx(float(want), abs=2e-4)
                else:
                    vals = torch.tensor([float(k) for k in amounts], dtype=torch.float64)
                    pp = torch.stack([lp[i] for i in amounts.values()]).exp()
                    pb = torch.stack([base[i] for i in amounts.values()]).exp()
                    want = float((vals * pp).sum() / pp.sum() - (vals * pb).sum() / pb.sum())
                    assert e["delta_mean_amount"] == pytest.approx(want, abs=1e-3)
                for t in doc["logit_lens"]["decision_tokens"]:
                    if (t["prompt"], t["context"], t["intervention"]) == (name, e["context"], e["intervention"]):
                        assert t["delta_logp"] == pytest.approx(float(lp[t["token_id"]] - base[t["token_id"]]), abs=2e-4)
                        assert t["p_patched"] == pytest.approx(float(lp[t["token_id"]].exp()), rel=1e-3, abs=1e-9)
                checked.add((f["feature"], name, e["context"], e["intervention"]))
    # ablation, amplification (2 x the largest activation seen) and the known safe patch value were all checked
    assert {c[3] for c in checked} == {"ablate", "amplify", "safe_patch"}
    assert {c[2] for c in checked} == {"choice", "amount"}
    s0 = [e for e in docs[feats[0]["feature"]]["logit_lens"]["decision_summary"] if e["intervention"] == "safe_patch"]
    assert s0 and all(e["value"] == 3.5 for e in s0)
    amp = [e for e in docs[feats[0]["feature"]]["logit_lens"]["decision_summary"] if e["intervention"] == "amplify"]
    stats = docs[feats[0]["feature"]]["activation_stats"]
    scale = max(stats["max_activation_sample"], stats["max_activation_prompts"])
    assert amp and all(e["value"] == pytest.approx(2.0 * scale, rel=1e-6) for e in amp)
    ablate = [e for e in docs[feats[0]["feature"]]["logit_lens"]["decision_summary"]
              if e["intervention"] == "ablate" and e["context"] == "choice" and e["prompt"] == "safe"]
    assert abs(ablate[0]["delta_bet_vs_stop_logodds"]) > 0  # active at the last token, so ablation moves it


def test_top_activations_equal_one_unpadded_pass_per_response(fixture_dir, fixture_model, tokens_run):
    """Top examples are the strongest responses with distinct contexts (a repeated response, or
    one whose shown window equals a stronger one's, is not listed twice), each from one unpadded
    pass; the histogram and density count every sampled response token, repeats included."""
    from engine.tokens.views import histogram_edges

    model, tok = fixture_model
    cfg, cache, feats, docs, _, trials = tokens_run
    index = json.loads((cache / "tokens" / "index.json").read_text())
    sample = index["sample"]
    assert len(sample) == 12 and index["metadata"]["sample"]["seed"] == 0
    edges = histogram_edges().numpy()
    c = 3
    for f in feats:
        best, first, count, resp_acts = [], {}, {}, []
        for s, rec in enumerate(sample):
            resp = trials.loc[rec["trial_row"], "response"]
            p_ids = tok(PROMPTS[rec["prompt"]])["input_ids"]
            ids = p_ids + tok(resp, add_special_tokens=False)["input_ids"]
            acts = codes_numpy(fixture_dir, hidden(model, ids, f["layer"]), f["layer"], f["feature_id"])
            r = acts[len(p_ids):]
            resp_acts.append(r)
            j = first.setdefault(tuple(ids), s)
            count[j] = count.get(j, 0) + 1
            if j == s:
                p = len(p_ids) + int(r.argmax())
                lo = max(0, p - c)
                best.append((float(r.max()), s, p, acts, (tuple(ids[lo:p + c + 1]), p - lo)))
        assert len(first) < len(sample)  # the sample repeats responses: the case deduplication is for
        best.sort(key=lambda x: -x[0])
        distinct, windows = [], set()
        for b in best:
            if b[0] > 0 and b[4] not in windows:  # only responses where the feature fires
                windows.add(b[4])
                distinct.append(b)
        want = distinct[:5]
        top = docs[f["feature"]]["top_activating"]
        assert len(top) == len(want)
        np.testing.assert_allclose([t["activation"] for t in top], [b[0] for b in want], rtol=1e-4, atol=1e-6)
        assert len({(tuple(t["context_tokens"]), t["center"]) for t in top}) == len(top)
        for t, b in zip(top, want):
            if sum(abs(x[0] - b[0]) < 1e-5 for x in distinct) == 1:  # tied responses may come in any order
                assert (t["sample"], t["position"], t["repeats"]) == (b[1], b[2], count[b[1]])
                lo = max(0, b[2] - c)
                np.testing.assert_allclose(t["context_activations"], b[3][lo:b[2] + c + 1], rtol=1e-4, atol=1e-5)
                assert t["context_tokens"][t["center"]] == t["token"]
        stats = docs[f["feature"]]["activation_stats"]
        assert stats["sample_size"] == 12 and stats["seed"] == 0
        every = np.concatenate(resp_acts)  # every sampled response token, repeats included
        assert stats["n_response_tokens"] == len(every) and stats["active_tokens"] == int((every > 0).sum())
        hist = docs[f["feature"]]["activation_histogram"]
        pos = every[every > 0]
        want_counts = np.histogram(np.clip(pos, edges[0], edges[-1]), bins=edges)[0]
        assert hist["counts"] == want_counts.tolist() and hist["zero"] == int((every <= 0).sum())
        assert hist["total"] == len(every) and np.allclose(hist["edges"], edges)


def test_tables_json_and_manifest_are_consistent(tokens_run):
    cfg, cache, feats, docs, summary, _ = tokens_run
    lens = pd.read_parquet(cache / "tokens" / "logit_lens.parquet")
    assert len(lens) == len(feats) * 40
    for f in feats:
        doc = docs[f["feature"]]
        vals = [e["value"] for e in doc["logit_lens"]["promoted"]]
        assert vals == sorted(vals, reverse=True)
        sup = [e["value"] for e in doc["logit_lens"]["suppressed"]]
        assert sup == sorted(sup)
        dec = [abs(e["delta_logp"]) for e in doc["logit_lens"]["decision_tokens"]]
        assert dec == sorted(dec, reverse=True)
        words = [abs(w["z"]) for w in doc["behavioural_words"]]
        assert words == sorted(words, reverse=True)
        mine = lens[lens.feature == f["feature"]]
        assert mine[mine.kind == "promoted"]["token_id"].tolist() == [e["token_id"] for e in doc["logit_lens"]["promoted"]]
    words = pd.read_parquet(cache / "tokens" / "behavioural_words.parquet")
    assert set(words["feature"]) == {feats[0]["feature"], feats[2]["feature"]}  # only these have trials
    assert set(words["tokenization"]) == {"word", "llama3"}
    # each feature x comparison x tokenisation: BH q recomputed from its own p-values
    from scipy.stats import false_discovery_control

    for _, g in words.groupby(["feature", "prompt", "patch", "tokenization"]):
        np.testing.assert_allclose(g["q"], false_discovery_control(g["p"].to_numpy()), rtol=1e-10)
    prompt_acts = pd.read_parquet(cache / "tokens" / "prompt_activations.parquet")
    assert len(prompt_acts) == len(feats) * sum(len(d["prompt_activations"]["safe"]["tokens"]) + len(
        d["prompt_activations"]["risky"]["tokens"]) for d in list(docs.values())[:1])
    index = json.loads((cache / "tokens" / "index.json").read_text())
    assert index["features"] == sorted(index["features"], key=lambda s: (int(s[1:].split("-")[0]), int(s.split("-")[1])))
    assert index["tables"]["tokens/decision_tokens.parquet"] == len(pd.read_parquet(cache / "tokens" / "decision_tokens.parquet"))


def test_patch_values_file_formats(tmp_path):
    from engine.errors import UserError
    from engine.tokens.run import read_patch_values, record_patch_values

    exp1 = {"layer_results": {"3": {"significant_features": [
        {"feature_idx": 17, "cohen_d": 1.1, "safe_mean": 0.25, "bankrupt_mean": 0.75}]}}}
    (tmp_path / "exp1.json").write_text(json.dumps(exp1))
    assert read_patch_values(str(tmp_path / "exp1.json")) == {"L3-17": {"safe": 0.25, "risky": 0.75}}
    (tmp_path / "plain.json").write_text(json.dumps({"L4-2": {"safe": 1, "risky": None}}))
    assert read_patch_values(str(tmp_path / "plain.json")) == {"L4-2": {"safe": 1.0}}
    (tmp_path / "bad.json").write_text(json.dumps({"L4_2": {"safe": 1}}))
    with pytest.raises(UserError, match="malformed feature id 'L4_2'"):
        read_patch_values(str(tmp_path / "bad.json"))
    assert record_patch_values({"safe_mean": 0.1, "bankrupt_mean": 0.9}) == {"safe": 0.1, "risky": 0.9}


def test_tokens_cli_bad_inputs_are_one_line(fixture_dir, tmp_path):
    from engine.errors import UserError
    from engine.tokens.run import run_tokens

    with pytest.raises(UserError, match="causal feature selection not found.*python -m engine select"):
        run_tokens(load_config(fixture_dir / "config.yaml", {"cache_dir": str(tmp_path / "c")}))
    cfg = str(fixture_dir / "config.yaml")
    atomic_write_json(tmp_path / "c" / "features" / "causal_features.json",
                      with_schema({"features": [{"feature": "L2-512", "layer": 2, "feature_id": 512}]}))
    r = run_cli("tokens", "--config", cfg, "--cache", str(tmp_path / "c"))
    assert r.returncode == 2 and "feature L2-512: index 512 is outside the SAE (0..511)" in r.stderr
    assert not (tmp_path / "c" / "tokens").exists()


@pytest.mark.gpu
def test_tokens_on_cuda_agree_with_cpu(tokens_run, tmp_path):
    from engine.schema import FeatureId
    from engine.tokens.run import run_tokens

    cfg, _, feats, docs, _, _ = tokens_run
    run_tokens(cfg, device="cuda", only=[FeatureId.parse(f["feature"]) for f in feats], out_dir=tmp_path,
               write_tables=False)
    for f in feats:
        gpu = json.loads((tmp_path / f"{f['feature']}.json").read_text())
        cpu = docs[f["feature"]]
        assert gpu["metadata"]["device"] == "cuda"
        np.testing.assert_allclose([e["value"] for e in gpu["logit_lens"]["promoted"]],
                                   [e["value"] for e in cpu["logit_lens"]["promoted"]], rtol=1e-3, atol=1e-6)
        g = {(e["prompt"], e["context"], e["intervention"]): e for e in gpu["logit_lens"]["decision_summary"]}
        for e in cpu["logit_lens"]["decision_summary"]:
            k = (e["prompt"], e["context"], e["intervention"])
            key = "delta_bet_vs_stop_logodds" if e["context"] == "choice" else "delta_mean_amount"
            assert g[k][key] == pytest.approx(e[key], abs=1e-3)


def test_every_graph_node_gets_views_and_a_rerun_skips_them(fixture_dir, fixture_model, tokens_run, tmp_path):
    """Issue 14 item 2: the nodes of pathways/nodes.parquet that are not selected get logit lens,
    prompt activations, histogram and distinct top contexts (tokens/nodes/<f>.json), checked like
    the targets'; a node that does not fit the SAE is a note; a rerun skips the written nodes."""
    import shutil

    from engine.tokens.run import run_tokens

    model, tok = fixture_model
    cfg0, cache0, feats, docs, _, _ = tokens_run
    cache = tmp_path / "cache"
    shutil.copytree(cache0 / "features", cache / "features")
    shutil.copytree(cache0 / "audit", cache / "audit")
    nodes = ["L1-3", "L4-100", feats[0]["feature"], "L1-3", "L2-999999"]
    atomic_write_parquet(cache / "pathways" / "nodes.parquet", pd.DataFrame({"id": nodes}))
    cfg = load_config(fixture_dir / "config.yaml", {
        "cache_dir": str(cache), "tokens.sample_size": 12, "tokens.batch_size": 5, "tokens.top_examples": 5,
        "tokens.context_tokens": 3, "tokens.min_word_count": 1})
    run_tokens(cfg)
    folder = cache / "tokens" / "nodes"
    assert sorted(p.name for p in folder.glob("*.json")) == ["L1-3.json", "L4-100.json"]
    m = load_file(str(fixture_dir / "model" / "model.safetensors"))
    W_U, g = m["lm_head.weight"].astype(np.float64), m["model.norm.weight"].astype(np.float64)
    for name in ("L1-3", "L4-100"):
        layer, fid = int(name[1]), int(name.split("-")[1])
        doc = json.loads((folder / f"{name}.json").read_text())
        assert doc["schema_version"] == 1 and doc["kind"] == "graph_node" and doc["feature"] == name
        w, s = sae_numpy(fixture_dir, layer)
        vals = W_U @ ((w["decoder.weight"][:, fid] / s) * g)
        assert [e["token_id"] for e in doc["logit_lens"]["promoted"]] == np.argsort(-vals)[:20].tolist()
        np.testing.assert_allclose([e["value"] for e in doc["logit_lens"]["suppressed"]], np.sort(vals)[:20],
                                   rtol=1e-4, atol=1e-7)
        for pname, text in PROMPTS.items():
            ids = tok(text)["input_ids"]
            want = codes_numpy(fixture_dir, hidden(model, ids, layer), layer, fid)
            np.testing.assert_allclose(doc["prompt_activations"][pname]["activations"], want, rtol=1e-4, atol=1e-5)
        hist = doc["activation_histogram"]
        assert sum(hist["counts"]) + hist["zero"] == hist["total"] == doc["activation_stats"]["n_response_tokens"]
        assert sum(hist["counts"]) == doc["activation_stats"]["active_tokens"]
        top = doc["top_activating"]
        assert len({(tuple(t["context_tokens"]), t["center"]) for t in top}) == len(top) <= 5
        assert [t["activation"] for t in top] == sorted((t["activation"] for t in top), reverse=True)
    # the selected feature keeps its full view, written where it was
    assert json.loads((cache / "tokens" / f"{feats[0]['feature']}.json").read_text())["logit_lens"]["decision_tokens"]
    index = json.loads((cache / "tokens" / "index.json").read_text())
    notes = index["metadata"]["notes"]
    assert any("L2-999999" in n for n in notes) and any("2 other graph node(s): 0 already written" in n for n in notes)
    before = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.json")}
    run_tokens(cfg)
    notes = json.loads((cache / "tokens" / "index.json").read_text())["metadata"]["notes"]
    assert any("2 other graph node(s): 2 already written from the same inputs, 0 computed" in n for n in notes)
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("*.json")} == before
