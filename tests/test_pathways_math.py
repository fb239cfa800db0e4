"""Pathway attribution and replay checked independently: exact on a linear model, a finite
difference on the real (nonlinear) fixture model, and agreement with the prototype."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from engine.config import load_config
from engine.model import forward_resid_post, load_model, load_tokenizer, run_blocks, tokenize
from engine.pathways import graph as G
from engine.pathways.compute import Intervention, apply_intervention, replay
from engine.pathways.runner import PathwayEngine
from engine.prototype import run_prototype
from engine.schema import FeatureId


@pytest.fixture(scope="module")
def cfg64(fixture_dir, tmp_path_factory):
    return load_config(fixture_dir / "config.yaml", {
        "model.dtype": "float64", "sae.dtype": "float64", "cache_dir": str(tmp_path_factory.mktemp("c64")),
        "pathways.n_replay": 8, "pathways.top_k_per_layer": 4,
    })


@pytest.fixture(scope="module")
def model64(cfg64):
    return load_model(cfg64.model, "cpu"), load_tokenizer(cfg64.model)


def linearize(model, seed: int = 0):
    """Make every block affine in the residual stream: no norms, uniform attention
    (zero queries and keys), a linear map in place of the gated MLP."""
    g = torch.Generator().manual_seed(seed)
    d = model.config.hidden_size
    for blk in model.model.layers:
        blk.input_layernorm = nn.Identity()
        blk.post_attention_layernorm = nn.Identity()
        blk.self_attn.q_proj.weight.data.zero_()
        blk.self_attn.k_proj.weight.data.zero_()
        lin = nn.Linear(d, d, bias=False, dtype=torch.float64)
        lin.weight.data = torch.randn(d, d, generator=g, dtype=torch.float64) * 0.1
        lin.requires_grad_(False)
        blk.mlp = lin
    model.model.norm = nn.Identity()
    return model


def target_active_on_safe(cfg, model, tok, layer: int, rank: int = 0) -> FeatureId:
    from engine.sae import load_sae

    ids = tokenize(tok, cfg.prompts["safe"], "cpu")
    h = forward_resid_post(model, ids, [layer])[layer][0, -1]
    acts = load_sae(cfg.sae, layer).encode(h)
    return FeatureId(layer, int(torch.argsort(acts, descending=True)[rank]))


def run_engine(cfg, model, tok, targets):
    eng = PathwayEngine(cfg, model, tok, "cpu")
    eng.encode_prompts(list(cfg.pathways.prompts), targets)
    return eng, eng.run_chunk(targets)


def test_attribution_equals_replay_exactly_on_a_linear_model(cfg64, fixture_dir):
    model = linearize(load_model(cfg64.model, "cpu"))
    tok = load_tokenizer(cfg64.model)
    targets = [target_active_on_safe(cfg64, model, tok, 4), target_active_on_safe(cfg64, model, tok, 2, rank=3)]
    eng, res = run_engine(cfg64, model, tok, targets)
    checked = 0
    for t in targets:
        for prompt, rec in res[str(t)]["prompts"].items():
            ups = [n for n in rec["nodes"] if not n["is_target"]]
            assert ups, "a target with no upstream nodes proves nothing"
            for n in ups:
                if n["replay_delta"] is not None:
                    # affine model: the first-order estimate is the exact effect
                    assert n["replay_delta"] == pytest.approx(-n["attribution"], rel=1e-9, abs=1e-10)
                    checked += 1
            assert rec["agreement"]["pearson_r"] == pytest.approx(1.0, abs=1e-9)
    assert checked >= 16


def _ablate_source(model, pc, resid, nodes, e):
    """Zero edge e's source feature at its layer and rerun the blocks up to the target's: (target
    node, target encoder row in float64, resid_post at the target's layer before, after)."""
    u, v = nodes[e["source"]], nodes[e["target"]]
    cu, cv = pc.layers[u["layer"]], pc.layers[v["layer"]]
    uu = int((cu.features == u["feature_id"]).nonzero()[0])
    uv = int((cv.features == v["feature_id"]).nonzero()[0])
    h = resid[u["layer"]][0].clone()
    apply_intervention(h, cu, Intervention(u["layer"], uu, "zero"), pc.T)
    with torch.no_grad():
        after = run_blocks(model, h[None], u["layer"] + 1, v["layer"])[0]
    return v, cv.enc[uv].double(), resid[v["layer"]][0], after


def test_exact_edge_weight_equals_a_replay_on_a_linear_model(cfg64):
    """On an affine model the first-order path is exact: w(u -> v) = -sum_p g_v[p] (change of
    pre_v[p] when u is ablated), g_v[p] = v's attribution per unit activation at p."""
    model = linearize(load_model(cfg64.model, "cpu"), seed=1)
    tok = load_tokenizer(cfg64.model)
    t = target_active_on_safe(cfg64, model, tok, 5)
    eng, res = run_engine(cfg64, model, tok, [t])
    pc = eng.prompts["safe"]
    rec = res[str(t)]["prompts"]["safe"]
    nodes = {n["id"]: n for n in rec["nodes"]}
    inner = [e for e in rec["edges"] if e["target"] != str(t) and nodes[e["source"]]["kind"] == "feature"]
    assert len(inner) >= 5
    resid = forward_resid_post(model, pc.ids, range(6))
    for e in inner[:8]:
        v, e_v, before, after = _ablate_source(model, pc, resid, nodes, e)
        g = [a / x for a, x in zip(v["position_attributions"], v["position_activations"])]
        change = sum(gp * float((after[p] - before[p]).double() @ e_v) for gp, p in zip(g, v["positions"]))
        assert e["weight"] == pytest.approx(-change, rel=1e-8, abs=1e-12)


def _block_out(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def _autograd_paths(model, ids, sae_v, sae_t, lu, lv, L, t_fid, contribution, v_fids):
    """Plain autograd, independent of the engine: scale a source's contribution c (T, d) to h_lu
    by alpha (1 = clean) and differentiate.

    Returns (dpre_t/dalpha, [w(source -> v) = sum_{p active} g_v[p] dpre_v[p]/dalpha for v in v_fids],
    through all active features of l_v = sum_{(p, i) active} g_i[p] dpre_i[p]/dalpha), where
    g_i[p] = <d_i, dpre_t/dh_lv[p]> and d_i = decode(one-hot i) - decode(0)."""
    alpha = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    captured = {}

    def edit(module, args, output):
        h = _block_out(output)
        new = h + (alpha - 1.0) * contribution.to(h.dtype)[None]
        return (new, *output[1:]) if isinstance(output, (tuple, list)) else new

    def grab(l):
        def hook(module, args, output):
            captured[l] = _block_out(output)
        return hook

    blocks = model.model.layers
    hs = [blocks[lu].register_forward_hook(edit), blocks[lv].register_forward_hook(grab(lv)),
          blocks[L].register_forward_hook(grab(L))]
    try:
        with torch.enable_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for h in hs:
            h.remove()
    q = ids.shape[1] - 1
    pre_t = sae_t.pre_activation(captured[L][0, q])[t_fid]
    g_h = torch.autograd.grad(pre_t, captured[lv], retain_graph=True)[0][0]  # (T, d)
    da_t = torch.autograd.grad(pre_t, alpha, retain_graph=True)[0]
    d_sae = sae_v.pre_activation(captured[lv][0, :1]).shape[1]
    zero = sae_v.decode(torch.zeros(1, d_sae, dtype=torch.float64))
    D = sae_v.decode(torch.eye(d_sae, dtype=torch.float64)) - zero  # (d_sae, d) decoder directions
    G = (g_h.double() @ D.T).detach()  # (T, d_sae): g_i[p]
    pre_v = sae_v.pre_activation(captured[lv][0])  # (T, d_sae)
    active = sae_v.encode(captured[lv][0]).detach() > 0
    active[0] = False  # BOS carries no codes
    w_v = [float(torch.autograd.grad((G[:, v] * pre_v[:, v] * active[:, v]).sum(), alpha, retain_graph=True)[0])
           for v in v_fids]
    w_all = torch.autograd.grad((G * pre_v * active).sum(), alpha)[0]
    return float(da_t), w_v, float(w_all)


def test_exact_edges_and_conservation_against_autograd(cfg64, model64):
    """Exact edge weights, error/bias-node edges and each source's out-shares, recomputed with
    plain torch autograd in float64 on the real fixture model (attention, RMSNorm, gated MLP).
    Conservation: a source's attribution = its out-edges to the graph + the rest of the next
    graph layer's active features + that layer's SAE error, to rounding."""
    from engine.sae import load_sae

    model, tok = model64
    t = target_active_on_safe(cfg64, model, tok, 5)
    eng, res = run_engine(cfg64, model, tok, [t])
    pc = eng.prompts["safe"]
    rec = res[str(t)]["prompts"]["safe"]
    nodes = {n["id"]: n for n in rec["nodes"]}
    layers = G.graph_layers(rec["nodes"])
    assert len(layers) >= 3
    saes = {l: load_sae(cfg64.sae, l) for l in range(6)}
    resid = forward_resid_post(model, pc.ids, range(6))
    q = pc.T - 1
    by_pair = {(e["source"], e["target"]): e["weight"] for e in rec["edges"]}
    checked_edges = checked_sources = 0
    worst = 0.0
    for k in range(len(layers) - 2, len(layers)):  # two layer pairs keep the test lean
        lu, lv = layers[k - 1], layers[k]
        ups = [n for n in rec["nodes"] if n["layer"] == lu and not n["is_target"]]
        ups = [n for n in ups if n["kind"] == "feature"][:2] + [n for n in ups if n["kind"] != "feature"]
        downs = [n for n in rec["nodes"] if n["layer"] == lv and n["kind"] == "feature" and not n["is_target"]][:3]
        for u in ups:
            h = resid[lu][0].double()
            n_sae = saes[lu].pre_activation(h[:1]).shape[1]
            zero = saes[lu].decode(torch.zeros(1, n_sae, dtype=torch.float64))[0]
            if u["kind"] == "feature":
                a = saes[lu].encode(h)[:, u["feature_id"]]
                onehot = torch.zeros(1, n_sae, dtype=torch.float64)
                onehot[0, u["feature_id"]] = 1.0
                d_u = saes[lu].decode(onehot)[0] - zero
                c = torch.zeros_like(h)
                for p in u["positions"]:
                    c[p] = a[p] * d_u
            elif u["kind"] == "error":
                c = h - saes[lu].decode(saes[lu].encode(h))
            else:
                c = zero.expand_as(h).clone()
            c[0] = 0.0  # BOS carries no codes
            A_ref, w_refs, w_all = _autograd_paths(model, pc.ids, saes[lv], saes[t.layer], lu, lv, t.layer,
                                                   t.feature_id, c, [v["feature_id"] for v in downs])
            # the node's own attribution, and the path through each v
            assert u["attribution"] == pytest.approx(A_ref, rel=1e-6, abs=1e-9)
            for v, w_ref in zip(downs, w_refs):
                if (u["id"], v["id"]) in by_pair:
                    w = by_pair[(u["id"], v["id"])]
                    assert w == pytest.approx(w_ref, rel=1e-5, abs=1e-9)
                    worst = max(worst, abs(w - w_ref) / max(abs(w_ref), 1e-12))
                    checked_edges += 1
            # conservation: the shares sum to 1 and the feature part matches autograd
            sh = u["out_shares"]
            assert sh["graph"] + sh["other_features"] + sh["sae_error"] == pytest.approx(1.0, abs=1e-9)
            assert (sh["graph"] + sh["other_features"]) * u["attribution"] == pytest.approx(w_all, rel=1e-5, abs=1e-9)
            assert u["out_weight"] == pytest.approx(sh["graph"] * u["attribution"], rel=1e-12)
            checked_sources += 1
    assert checked_edges >= 6 and checked_sources >= 6
    print(f"exact edges vs autograd: {checked_edges} edges, max rel. diff {worst:.1e}")
    # the top graph layer's sources reach the target whole: edge weight = attribution
    for n in rec["nodes"]:
        if n["layer"] == layers[-1] and not n["is_target"]:
            assert by_pair[(n["id"], str(t))] == n["attribution"] and n["out_shares"]["graph"] == 1.0
    # error and bias nodes hold the layer's first-order terms
    for l in layers:
        assert nodes[f"L{l}-error"]["attribution"] == rec["layer_terms"][str(l)]["error"]
        assert nodes[f"L{l}-bias"]["attribution"] == rec["layer_terms"][str(l)]["bias"]


def test_approximate_edge_weight_keeps_its_formula(cfg64):
    """edge_weight: approx keeps the old weight, raw(u -> v) * A_v / act_v, with raw exact on an
    affine model (v's pre-activation change summed over its positions)."""
    cfg = load_config(cfg64.source_path, {"model.dtype": "float64", "sae.dtype": "float64", "cache_dir": str(cfg64.cache),
                                          "pathways.n_replay": 0, "pathways.top_k_per_layer": 3,
                                          "pathways.edge_weight": "approx"})
    model = linearize(load_model(cfg.model, "cpu"), seed=1)
    tok = load_tokenizer(cfg.model)
    t = target_active_on_safe(cfg, model, tok, 4)
    eng, res = run_engine(cfg, model, tok, [t])
    pc = eng.prompts["safe"]
    rec = res[str(t)]["prompts"]["safe"]
    nodes = {n["id"]: n for n in rec["nodes"]}
    assert all(n["kind"] == "feature" for n in rec["nodes"])  # no error/bias nodes in this mode
    inner = [e for e in rec["edges"] if e["target"] != str(t)]
    assert inner
    resid = forward_resid_post(model, pc.ids, range(5))
    for e in inner[:4]:
        v, e_v, before, after = _ablate_source(model, pc, resid, nodes, e)
        change = sum(float((after[p] - before[p]).double() @ e_v) for p in v["positions"])
        assert e["raw"] == pytest.approx(-change, rel=1e-8, abs=1e-10)
        assert e["weight"] == pytest.approx(e["raw"] * v["attribution"] / v["activation"], rel=1e-12)


def test_finite_difference_on_the_real_model(cfg64, model64):
    model, tok = model64
    t = target_active_on_safe(cfg64, model, tok, 4)
    eng, res = run_engine(cfg64, model, tok, [t])
    pc = eng.prompts["risky"]
    rec = res[str(t)]["prompts"]["risky"]
    spec = eng.specs[str(t)]
    ups = sorted((n for n in rec["nodes"] if not n["is_target"] and n["kind"] == "feature"),
                 key=lambda n: -abs(n["attribution"]))[:6]
    resid = forward_resid_post(model, pc.ids, range(6))
    # Central difference: remove +eps and -eps of the feature's contribution. (RMSNorm and the
    # rotary tables compute in float32 even in a float64 model, so eps cannot be tiny.)
    eps = 3e-3
    for n in ups:
        codes = pc.layers[n["layer"]]
        u = int((codes.features == n["feature_id"]).nonzero()[0])
        _, d = replay(model, resid[n["layer"]][0:1], codes,
                      [Intervention(n["layer"], u, "zero", scale=eps), Intervention(n["layer"], u, "zero", scale=-eps)],
                      [spec], pc.T, 4)
        slope = float(d[0, 0] - d[1, 0]) / (2 * eps)
        assert slope == pytest.approx(-n["attribution"], rel=2e-3, abs=1e-6)
        # the full ablation differs from first order on this nonlinear model, but is recorded
        assert n["replay_delta"] is not None


def test_target_activation_and_codes_agree_with_the_prototype(cfg64, model64):
    model, tok = model64
    t = target_active_on_safe(cfg64, model, tok, 3)
    proto = run_prototype(cfg64, t, dict(cfg64.prompts), top_k=50)
    _, res = run_engine(cfg64, model, tok, [t])
    for prompt in ("safe", "risky"):
        rec = res[str(t)]["prompts"][prompt]
        prec = proto["prompts"][prompt]
        assert rec["target_activation"] == pytest.approx(prec["target_activation"], rel=1e-9, abs=1e-12)
        assert rec["target_pre_activation"] == pytest.approx(prec["target_pre_activation"], rel=1e-9)
        q = rec["target_position"]
        matched = 0
        for n in rec["nodes"]:
            if n["is_target"] or q not in n["positions"]:
                continue
            a_q = n["position_activations"][n["positions"].index(q)]
            top = {f["feature_id"]: f["activation"] for f in prec["top_features"][str(n["layer"])]}
            if n["feature_id"] in top:
                assert a_q == pytest.approx(top[n["feature_id"]], rel=1e-6)  # the prototype lists float32
                matched += 1
        assert matched >= 1


def test_patch_variant_matches_a_manual_patch(cfg64, model64):
    model, tok = model64
    cfg = load_config(cfg64.source_path, {**{"model.dtype": "float64", "sae.dtype": "float64"},
                                          "cache_dir": str(cfg64.cache), "pathways.replay_mode": "both",
                                          "pathways.n_replay": 5, "pathways.top_k_per_layer": 4})
    t = target_active_on_safe(cfg, model, tok, 3)
    eng, res = run_engine(cfg, model, tok, [t])
    rec = res[str(t)]["prompts"]["safe"]
    spec = eng.specs[str(t)]
    pc, other = eng.prompts["safe"], eng.prompts["risky"]
    n = next(n for n in rec["nodes"] if n.get("patch_delta") is not None)
    codes = pc.layers[n["layer"]]
    d = codes.dec[int((codes.features == n["feature_id"]).nonzero()[0])]
    q = pc.T - 1
    a_here = n["position_activations"][n["positions"].index(q)] if q in n["positions"] else 0.0
    a_other = other.last_token[n["layer"]].get(n["feature_id"], 0.0)
    resid = forward_resid_post(model, pc.ids, range(6))
    h = resid[n["layer"]][0].clone()
    h[q] += (a_other - a_here) * d
    with torch.no_grad():
        out = run_blocks(model, h[None], n["layer"] + 1, t.layer)[0, q]
    base = resid[t.layer][0, q]
    expected = float((out - base).double() @ spec.enc.double())
    assert n["patch_delta"] == pytest.approx(expected, rel=1e-7, abs=1e-10)


def test_graph_is_multi_hop_and_consistent(cfg64, model64):
    model, tok = model64
    t = target_active_on_safe(cfg64, model, tok, 5)
    _, res = run_engine(cfg64, model, tok, [t])
    for rec in res[str(t)]["prompts"].values():
        nodes = {n["id"]: n for n in rec["nodes"]}
        layers = G.graph_layers(rec["nodes"])
        assert len(layers) >= 3
        per_layer = {l: [n for n in rec["nodes"] if n["layer"] == l and n["kind"] == "feature" and not n["is_target"]]
                     for l in layers}
        assert all(1 <= len(v) <= cfg64.pathways.top_k_per_layer for v in per_layer.values())
        into_target = [e for e in rec["edges"] if e["target"] == str(t)]
        inner = [e for e in rec["edges"] if e["target"] != str(t)]
        assert inner, "not a star: edges between upstream layers exist"
        for e in into_target:
            assert nodes[e["source"]]["layer"] == layers[-1]
            assert e["weight"] == nodes[e["source"]]["attribution"]
        for e in inner:  # successive graph layers only
            lu, lv = nodes[e["source"]]["layer"], nodes[e["target"]]["layer"]
            assert layers.index(lv) == layers.index(lu) + 1
        # per layer, the kept nodes are the strongest, within the coverage rule
        for l, ns in per_layer.items():
            atts = sorted((abs(n["attribution"]) for n in ns), reverse=True)
            assert atts == sorted(atts, reverse=True)
        cov = rec["coverage"]
        assert cov["attribution_abs_in_graph"] <= cov["attribution_abs_total"] + 1e-9
        # layer terms: features + error + bias (+ bos) decompose <g, h_l>
        for l, parts in rec["layer_terms"].items():
            assert set(parts) >= {"features", "error", "bias"}


def test_a_target_that_never_fires_validates_nothing(cfg64, model64):
    """Replay verdicts are reported separately: with the target inactive before and after every
    ablation (each replay_delta_activation 0), the linear estimate can be confirmed on the
    pre-activation, but no node counts as validated (it changes nothing the target does)."""
    from engine.sae import load_sae

    model, tok = model64
    ids = tokenize(tok, cfg64.prompts["safe"], "cpu")
    h = forward_resid_post(model, ids, [4])[4][0, -1]
    pre = load_sae(cfg64.sae, 4).pre_activation(h)
    t = FeatureId(4, int(torch.argmin(pre)))  # far below its threshold: no ablation makes it fire
    _, res = run_engine(cfg64, model, tok, [t])
    rec = res[str(t)]["prompts"]["safe"]
    assert rec["target_activation"] == 0.0 and rec["target_pre_activation"] < 0
    replayed = [n for n in rec["nodes"] if n["replay_delta"] is not None]
    assert len(replayed) == cfg64.pathways.n_replay
    for n in replayed:
        assert n["replay_delta_activation"] == 0.0 and n["changes_target_activation"] is False
        assert n["validated"] is False
        # the pre-activation verdict is the documented rule, applied independently here
        big = abs(n["replay_delta"]) >= max(cfg64.pathways.validate_min_abs_delta,
                                            cfg64.pathways.validate_min_rel_delta * abs(rec["target_pre_activation"]))
        assert n["linear_confirmed"] == (big and (n["replay_delta"] > 0) == (n["attribution"] < 0))
    assert sum(n["linear_confirmed"] for n in replayed) >= 3  # the old single verdict passed these
    v = G.validation(0.5, -0.4, 0.0, 2.0, 1e-3, 0.01)
    assert v == {"linear_confirmed": True, "changes_target_activation": False, "validated": False}
    assert G.validation(0.5, -0.4, -0.4, 2.0, 1e-3, 0.01)["validated"] is True


def test_select_indices_hand_example():
    scores = [0.1, -3.0, 2.0, 0.0, 1.0, -0.4]
    # |total| = 6.5; 80% = 5.2: -3.0 (3.0), 2.0 (5.0), 1.0 (6.0) -> stop
    assert G.select_indices(scores, top_k=10, coverage=0.8) == [1, 2, 4]
    assert G.select_indices(scores, top_k=2, coverage=0.99) == [1, 2]
    assert G.select_indices([0.0, 0.0], top_k=3, coverage=0.8) == []
    assert G.is_validated(0.5, -0.4, 2.0, 1e-3, 0.01) and not G.is_validated(0.5, 0.4, 2.0, 1e-3, 0.01)
    assert not G.is_validated(0.5, -0.01, 2.0, 1e-3, 0.01)  # below 1% of |pre|
    ag = G.agreement([{"attribution": 1.0, "replay_delta": -1.0}, {"attribution": 2.0, "replay_delta": -2.5},
                      {"attribution": -1.0, "replay_delta": 0.5}, {"attribution": 0.5, "replay_delta": 0.1}])
    assert ag["n"] == 4 and ag["sign_agreement"] == 0.75
    import numpy as np

    assert ag["pearson_r"] == pytest.approx(np.corrcoef([1, 2, -1, 0.5], [1, 2.5, -0.5, -0.1])[0, 1])


def test_out_of_memory_shrinks_the_batch_and_gives_the_same_result(cfg64, model64, monkeypatch):
    """A CUDA OOM in a batched backward pass or replay halves the batch and retries."""
    from engine.pathways import compute

    model, tok = model64
    targets = [target_active_on_safe(cfg64, model, tok, 4), target_active_on_safe(cfg64, model, tok, 5)]
    _, ref = run_engine(cfg64, model, tok, targets)

    real_vjp = compute.GradGraph.vjp
    real_blocks = compute.run_blocks
    calls = {"vjp_oom": 0, "replay_oom": 0}

    def vjp(self, seeds, inputs):
        if next(iter(seeds.values())).shape[0] > 1:
            calls["vjp_oom"] += 1
            raise torch.cuda.OutOfMemoryError("simulated")
        return real_vjp(self, seeds, inputs)

    def blocks(model, h, *a, **k):
        if h.shape[0] > 2:
            calls["replay_oom"] += 1
            raise torch.cuda.OutOfMemoryError("simulated")
        return real_blocks(model, h, *a, **k)

    monkeypatch.setattr(compute.GradGraph, "vjp", vjp)
    monkeypatch.setattr(compute, "run_blocks", blocks)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    _, got = run_engine(cfg64, model, tok, targets)
    assert calls["vjp_oom"] > 0 and calls["replay_oom"] > 0
    for t in targets:
        for p in ("safe", "risky"):
            a, b = ref[str(t)]["prompts"][p], got[str(t)]["prompts"][p]
            assert [n["id"] for n in a["nodes"]] == [n["id"] for n in b["nodes"]]
            for na, nb in zip(a["nodes"], b["nodes"]):
                if na["attribution"] is not None:
                    assert nb["attribution"] == pytest.approx(na["attribution"], rel=1e-9, abs=1e-12)
                if na["replay_delta"] is not None:
                    assert nb["replay_delta"] == pytest.approx(na["replay_delta"], rel=1e-9, abs=1e-12)
            assert len(a["edges"]) == len(b["edges"])


def test_contract_matches_a_direct_sum_and_chunks_over_features():
    from engine.pathways.compute import LayerCodes, contract

    g0 = torch.Generator().manual_seed(3)
    B, T, d, U, K = 3, 9, 5, 7, 20
    g = torch.randn(B, T, d, generator=g0, dtype=torch.float64)
    pos = torch.sort(torch.randint(0, T, (K,), generator=g0))[0]
    inv = torch.randint(0, U, (K,), generator=g0)
    act = torch.rand(K, generator=g0, dtype=torch.float64)
    dec = torch.randn(U, d, generator=g0, dtype=torch.float64)
    codes = LayerCodes(0, pos, inv, act, torch.arange(U), dec, dec, torch.zeros(U), torch.zeros(T, d), torch.zeros(d), 0.0)
    want = torch.tensor([[float(act[k] * (g[b, pos[k]] @ dec[inv[k]])) for k in range(K)] for b in range(B)],
                        dtype=torch.float64)
    assert torch.allclose(contract(g, codes), want, rtol=1e-12, atol=1e-14)
    # a tiny budget forces one feature per chunk
    assert torch.allclose(contract(g, codes, max_bytes=1), want, rtol=1e-12, atol=1e-14)
