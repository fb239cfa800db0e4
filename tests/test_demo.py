"""The shortened demo end to end (session fixture `demo_cache` in conftest.py): the model
learned the gamble, the SAEs reproduce their recorded statistics, and the experiment files
have the study's names, schemas and cumulative checkpoints."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from engine.demo import QUICK_MINUTES
from engine.schema import CHECKPOINT_NAME_RE, DEMO_DIR, DEMO_MARKER, REAL_CONDITIONS, RESPONSES_NAME_RE, read_json

pytestmark = pytest.mark.slow


def _demo(cache: Path) -> dict:
    return read_json(cache / DEMO_MARKER, "demo marker")


def _exp2_dir(cache: Path) -> Path:
    from engine.demo import EXP2_DIR

    return cache / DEMO_DIR / EXP2_DIR


def test_demo_marker_config_and_pipeline(demo_cache):
    from engine.config import load_config
    from engine.demo import is_demo_complete
    from engine.demo.pipeline import NOT_AVAILABLE

    info = _demo(demo_cache)
    assert info["demo"] is True and info["complete"] is True and is_demo_complete(demo_cache)
    assert info["seed"] == 0 and "LLaMA-3.1-8B" in info["what"] and "config.yaml" in info["how_to_use_real_data"]
    for stage in ("train", "saes", "experiment_1", "experiment_2", "pipeline"):
        assert info["stage_seconds"][stage] >= 0
    cfg = load_config(demo_cache / info["config"])
    assert cfg.cache == demo_cache  # the config lives in the cache: self-contained
    assert Path(cfg.model.name_or_path) == demo_cache / DEMO_DIR / "model"
    assert Path(cfg.data.checkpoints_dir) == _exp2_dir(demo_cache)
    assert Path(cfg.data.responses_dir) == _exp2_dir(demo_cache) / "response_logs"
    # every step of the pipeline ran on it, or says plainly that it does not exist yet
    steps = info["pipeline"]["steps"]
    assert set(steps) == {"audit", "select", "prototype", "pathways", "tokens", "integrate"}
    for name, s in steps.items():
        assert s["status"] in ("done", NOT_AVAILABLE), (name, s)
    curve = read_json(demo_cache / DEMO_DIR / "data" / "training_curve.json", "curve")["curve"]
    assert curve[-1]["loss"] < curve[0]["loss"] / 5


def _sample_decisions(model, tok, n: int, seed: int) -> dict:
    from engine.demo.games import parse_response
    from engine.demo.generate import generate
    from engine.game import risky_prompt, safe_prompt

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, text in (("safe", safe_prompt()), ("risky", risky_prompt())):
        ids = tok([text] * n, add_special_tokens=True)["input_ids"]
        texts = generate(model, tok, ids, generator=gen, max_new_tokens=16, stop_at_newlines=2).texts
        parsed = [parse_response(t, variable=name == "risky") for t in texts]
        valid = [p for p in parsed if p["valid"]]
        out[name] = (len(valid), sum(p["bet"] == 0 for p in valid))
    return out


def test_trained_model_stops_more_on_the_safe_prompt_than_an_untrained_one(demo_cache):
    """Fresh samples (a seed the build never used): the trained model answers in the format and
    stops more on the safe prompt than on the risky one; an untrained model of the same
    architecture does neither."""
    from scipy import stats

    from engine.demo.train import expand_to_full_vocab, small_model
    from engine.fixtures import load_llama3_tokenizer
    from transformers import LlamaForCausalLM

    tok = load_llama3_tokenizer()
    model = LlamaForCausalLM.from_pretrained(str(demo_cache / DEMO_DIR / "model"), dtype=torch.float32).eval()
    n = 100
    got = _sample_decisions(model, tok, n, seed=12345)
    (vs, ss), (vr, sr) = got["safe"], got["risky"]
    assert vs >= 0.8 * n and vr >= 0.8 * n
    p = stats.fisher_exact([[ss, vs - ss], [sr, vr - sr]], alternative="greater")[1]
    assert ss / vs - sr / vr > 0.15 and p < 0.01, got

    used = torch.nonzero(model.lm_head.weight.abs().sum(1) > 0)[:, 0].tolist()
    cfg = model.config
    untrained = expand_to_full_vocab(small_model(cfg.num_hidden_layers, cfg.hidden_size, len(used), seed=0).eval(), used, 0)
    got_u = _sample_decisions(untrained, tok, n, seed=12345)
    assert got_u["safe"][0] < 0.2 * n and got_u["risky"][0] < 0.2 * n  # no answers in the format


def test_saes_load_and_reproduce_the_recorded_l0_and_error(demo_cache):
    """Recompute resid_post on the recorded evaluation transcripts with plain forward hooks
    and encode with the study's formula by hand; compare with DEMO.json."""
    from safetensors.torch import load_file

    from engine.config import SAEConfig
    from engine.demo.saes import FOLDER_TEMPLATE
    from engine.fixtures import load_llama3_tokenizer
    from engine.sae import load_sae
    from transformers import LlamaForCausalLM

    info = _demo(demo_cache)
    root = demo_cache / DEMO_DIR
    tok = load_llama3_tokenizer()
    model = LlamaForCausalLM.from_pretrained(str(root / "model"), dtype=torch.float32).eval()
    ev = read_json(root / "data" / "sae_eval_transcripts.json", "eval")["transcripts"]
    acts: dict[int, list] = {}
    hooks = [blk.register_forward_hook(lambda m, a, o, l=l: acts.setdefault(l, []).append(
        (o[0] if isinstance(o, tuple) else o)[0, 1:].detach()))
        for l, blk in enumerate(model.model.layers)]
    with torch.no_grad():
        for t in ev:
            ids = (tok(t["prompt"], add_special_tokens=True)["input_ids"]
                   + tok(t["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
            model.model(torch.tensor([ids]))  # blocks only: the 128k-wide unembedding is not needed
    for h in hooks:
        h.remove()
    assert set(info["saes"]) == {str(l) for l in range(model.config.num_hidden_layers)}
    for l in range(model.config.num_hidden_layers):
        X = torch.cat(acts[l])
        folder = root / "saes" / FOLDER_TEMPLATE.format(layer=l)
        hp = json.loads((folder / "hyperparams.json").read_text())
        w = load_file(str(folder / "checkpoints" / "final.safetensors"))
        assert hp["d_model"] == model.config.hidden_size and hp["jump_relu_threshold"] >= 0
        assert hp["hook_point_in"] == f"blocks.{l}.hook_resid_post"
        s = math.sqrt(hp["d_model"]) / hp["dataset_average_activation_norm"]["in"]
        a = torch.relu(s * X @ w["encoder.weight"].T + w["encoder.bias"])
        x_hat = (a @ w["decoder.weight"].T + w["decoder.bias"]) / s
        l0 = float((a > 0).float().sum(-1).mean())
        rel = float(((X - x_hat).norm(dim=-1) / X.norm(dim=-1)).mean())
        rec = info["saes"][str(l)]
        assert l0 == pytest.approx(rec["l0"], rel=1e-3, abs=1e-3)
        assert rel == pytest.approx(rec["relative_error"], rel=1e-3)
        assert 0 < rec["l0"] < hp["d_sae"] / 4 and rec["relative_error"] < 0.6
        sae = load_sae(SAEConfig(source=str(root / "saes"), convention="study"), l)
        assert torch.allclose(sae.encode(X), a, atol=1e-4)


def _files(cache: Path):
    d = _exp2_dir(cache)
    cks = sorted(p for p in d.glob("checkpoint_L*_*.json"))
    rls = sorted((d / "response_logs").glob("*.json"))
    return cks, rls


def test_experiment_files_have_the_study_names_and_schemas(demo_cache):
    cks, rls = _files(demo_cache)
    assert cks and rls
    ck_ts = set()
    for p in cks:
        m = CHECKPOINT_NAME_RE.match(p.name)
        assert m, p.name
        a, b, pid, day, sec = m.groups()
        ck = json.loads(p.read_text())
        assert set(ck) == {"timestamp", "gpu_id", "process_id", "layer_range", "features_tested",
                           "n_trials_per_condition", "results"}
        assert ck["timestamp"] == f"{day}_{sec}" and ck["process_id"] == pid and ck["layer_range"] == f"L{a}-L{b}"
        ck_ts.add(ck["timestamp"])
        for r in ck["results"]:
            # Run A's flat record
            assert set(r) == {"safe_stop_delta", "risky_stop_delta", "safe_bet_delta", "risky_bet_delta",
                              "safe_p_value", "risky_p_value", "classified_as", "is_causal",
                              "feature", "layer", "feature_id", "cohen_d"}
            assert r["feature"] == f"L{r['layer']}-{r['feature_id']}" and int(a) <= r["layer"] <= int(b)
            assert r["classified_as"] in ("safe", "risky", "neutral") and isinstance(r["is_causal"], bool)
            assert (r["classified_as"] == "neutral") == (not r["is_causal"])
    seen = set()
    for p in rls:
        m = RESPONSES_NAME_RE.match(p.name)
        assert m and f"{m.group(4)}_{m.group(5)}" in ck_ts, p.name  # saved alongside a checkpoint
        recs = json.loads(p.read_text())
        assert isinstance(recs, list) and recs
        for r in recs:
            assert set(r) == {"feature", "condition", "trial", "response", "parsed"}
            assert r["condition"] in REAL_CONDITIONS and r["parsed"]["response"] == r["response"]
            assert set(r["parsed"]) >= {"action", "bet", "valid", "response"}
            key = (r["feature"], r["condition"], r["trial"])
            assert key not in seen  # not cumulative: every trial is in exactly one file
            seen.add(key)


def test_checkpoints_are_cumulative_and_agree_with_the_response_logs(demo_cache):
    """Each process's saves grow by prefix, the final one has features_tested = planned; Run A's
    deltas and verdicts are recomputed here from the logs with scipy (Fisher when a cell < 5)."""
    from scipy import stats

    cks, rls = _files(demo_cache)
    by_pid: dict[str, list] = {}
    for p in cks:
        m = CHECKPOINT_NAME_RE.match(p.name)
        by_pid.setdefault(m.group(3), []).append((m.group(4) + m.group(5), json.loads(p.read_text())))
    trials: dict[str, list] = {}
    for p in rls:
        for r in json.loads(p.read_text()):
            trials.setdefault(r["feature"], []).append(r)
    n_tested = 0
    for pid, saves in by_pid.items():
        saves.sort(key=lambda x: x[0])
        prev: list = []
        for _, ck in saves:
            assert ck["results"][: len(prev)] == prev
            assert len(ck["results"]) >= len(prev)
            prev = ck["results"]
        final = saves[-1][1]
        assert final["features_tested"] == len(final["results"])
        n = final["n_trials_per_condition"]
        for r in final["results"]:
            n_tested += 1
            tr = trials[r["feature"]]
            assert len(tr) == 6 * n
            def rate(cond, pred):
                v = [t["parsed"] for t in tr if t["condition"] == cond and t["parsed"]["valid"]]
                return sum(pred(q) for q in v), len(v)
            def p2(a, b):
                table = [[a[0], a[1] - a[0]], [b[0], b[1] - b[0]]]
                if min(min(row) for row in table) >= 5:
                    return stats.chi2_contingency(table)[1]
                return stats.fisher_exact(table)[1]
            stop = lambda q: q["bet"] == 0
            ss, sr = rate("safe_with_safe_patch", stop), rate("safe_with_risky_patch", stop)
            rs, rr = rate("risky_with_safe_patch", stop), rate("risky_with_risky_patch", stop)
            ds, dr = sr[0] / sr[1] - ss[0] / ss[1], rr[0] / rr[1] - rs[0] / rs[1]
            assert r["safe_stop_delta"] == pytest.approx(ds, abs=1e-4)
            assert r["risky_stop_delta"] == pytest.approx(dr, abs=1e-4)
            assert r["safe_p_value"] == pytest.approx(p2(sr, ss), rel=1e-6)
            assert r["risky_p_value"] == pytest.approx(p2(rr, rs), rel=1e-6)
            causal = (p2(sr, ss) < 0.05 and abs(ds) > 0.1) or (p2(rr, rs) < 0.05 and abs(dr) > 0.1)
            assert r["is_causal"] == causal
    info = _demo(demo_cache)
    assert info["experiment_2"]["features_tested"] == n_tested
    n_causal = sum(1 for _, saves in by_pid.items() for r in max(saves, key=lambda x: x[0])[1]["results"]
                   if r["is_causal"])
    assert info["n_causal_features"] == n_causal


def test_cli_and_ensure_demo_reuse_the_finished_demo(demo_cache, tmp_path):
    from helpers import run_cli

    from engine.config import load_config
    from engine.demo import ensure_demo

    before = (demo_cache / DEMO_MARKER).stat().st_mtime_ns
    r = run_cli("demo", "--out", str(demo_cache), "--minutes", str(QUICK_MINUTES))
    assert r.returncode == 0, r.stderr
    assert "stop rate safe" in r.stdout and str(demo_cache / DEMO_MARKER) in r.stdout
    assert (demo_cache / DEMO_MARKER).stat().st_mtime_ns == before  # nothing rebuilt
    cfg = load_config(None, {"cache_dir": str(demo_cache)})
    path, cache = ensure_demo(cfg)
    assert Path(path) == demo_cache / DEMO_DIR / "config.yaml" and cache == demo_cache
    # a cache holding other results is shown as it is, never overwritten by the demo
    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.json").write_text('{"schema_version": 1, "steps": {}}')
    cfg2 = load_config(None, {"cache_dir": str(other)})
    assert ensure_demo(cfg2) == (None, other)
    assert not (other / DEMO_DIR).exists()


def test_bh_counts_recomputed_from_the_response_logs(demo_cache):
    """The engine's verdict, recomputed here from the response logs with scipy and a hand-written
    Benjamini-Hochberg: each patched condition against its prompt's baseline (valid trials), 4 tests
    per feature, BH over all of them, q < 0.05 and |delta| >= 0.1. It matches DEMO.json's count and
    directions, the audit's own count, and the shortened build finds at least the 5 features issue 15
    asks of the shorter budgets, on at least 3 layers."""
    import numpy as np
    from scipy import stats

    from engine.audit.parser import parse_decision
    from engine.schema import AUDIT_VALIDATION

    _, rls = _files(demo_cache)
    trials: dict[str, list] = {}
    for p in rls:
        for r in json.loads(p.read_text()):
            trials.setdefault(r["feature"], []).append(r)
    names = sorted(trials)
    tests = []  # (feature, patch, delta, p)
    for f in names:
        def count(cond):  # the answers as the engine's parser reads them (the study's `parsed` differs on "1\nStop")
            d = [parse_decision(t["response"], cond.split("_")[0]) for t in trials[f] if t["condition"] == cond]
            v = [q for q in d if q.valid]
            return sum(q.action == "stop" for q in v), len(v)
        for prompt in ("safe", "risky"):
            b = count(f"{prompt}_baseline")
            for patch in ("safe", "risky"):
                a = count(f"{prompt}_with_{patch}_patch")
                table = np.array([[a[0], a[1] - a[0]], [b[0], b[1] - b[0]]])
                if table.sum(0).min() == 0:
                    p = 1.0
                elif stats.contingency.expected_freq(table).min() < 5:
                    p = stats.fisher_exact(table)[1]
                else:
                    p = stats.chi2_contingency(table)[1]
                tests.append((f, patch, a[0] / a[1] - b[0] / b[1], p))
    m = len(tests)
    order = sorted(range(m), key=lambda i: tests[i][3])
    k = max([r + 1 for r, i in enumerate(order) if tests[i][3] <= 0.05 * (r + 1) / m], default=0)
    rejected = set(order[:k])
    votes: dict[str, set] = {}
    for i in rejected:
        f, patch, delta, _ = tests[i]
        if abs(delta) >= 0.1:
            ok = (patch == "safe" and delta > 0) or (patch == "risky" and delta < 0)
            votes.setdefault(f, set()).add(patch if ok else "mixed")
    direction = {f: (next(iter(v)) if len(v) == 1 else "mixed") for f, v in votes.items()}
    info = _demo(demo_cache)
    e2 = info["experiment_2"]
    assert sorted(direction) == sorted(e2["causal_features_bh"])
    for d in ("safe", "risky", "mixed"):
        assert e2["bh_by_direction"][d] == sum(v == d for v in direction.values()), d
    audit = json.loads((demo_cache / AUDIT_VALIDATION).read_text())["recomputed"]
    assert info["causal_counts"]["engine_bh"]["n"] == audit["causal"] == len(direction)
    assert info["causal_counts"]["run_a_uncorrected"] == e2["n_causal"]
    # The shortened build (seed 0, --minutes 2: 8 layers with the logit-lens loss, 14,400 answers) finds
    # at least the 5 BH survivors issue 15 asks of the 2-4 minute plans (its power plan expects 7.78 and
    # 8 survive, docs/demo.md), on several layers.
    assert len(direction) >= 5, direction
    assert len({f.split("-")[0] for f in direction}) >= 3, direction
    assert e2["bh_raises_stopping"] + e2["bh_raises_betting"] >= 5
    assert e2["expected_bh_survivors"] == info["experiment_1"]["power"]["expected_bh_survivors"]
