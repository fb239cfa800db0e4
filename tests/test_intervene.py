"""engine.intervene (issue 14 item 7): the patch changes resid_post by exactly the decoded
contribution, rates and Wilson intervals match a hand computation, runs are seeded."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from engine import intervene
from engine.errors import UserError
from engine.schema import FeatureId


def test_wilson_and_rates_match_a_hand_computation():
    decisions = ([{"valid": True, "action": "stop", "bet": 0}] * 3
                 + [{"valid": True, "action": "bet", "bet": b} for b in (10, 10, 20, 50, 5)]
                 + [{"valid": False, "action": "invalid", "bet": None}] * 2)
    s = intervene.arm_stats(decisions)
    assert (s["n"], s["valid"], s["invalid"], s["stops"], s["bets"]) == (10, 8, 2, 3, 5)
    assert s["stop_rate"] == 3 / 8 and s["bet_rate"] == 5 / 8 and s["mean_bet"] == 95 / 5
    # Wilson 95% for 3/8 by hand: centre (p + z^2/2n)/(1 + z^2/n), half-width z sqrt(p q/n + z^2/4n^2)/(1 + z^2/n)
    z, p, n = 1.96, 3 / 8, 8
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    assert s["stop_ci"] == pytest.approx([centre - half, centre + half], abs=1e-12)
    assert s["stop_ci"] == pytest.approx([0.1368, 0.6943], abs=1e-4)  # the published value for 3 of 8
    assert s["bet_ci"] == pytest.approx([1 - 0.6943, 1 - 0.1368], abs=1e-4)  # 5/8 mirrors 3/8
    assert intervene.wilson(0, 0) == [None, None]
    assert intervene.wilson(0, 10)[0] == 0.0 and intervene.wilson(10, 10)[1] == 1.0
    empty = intervene.arm_stats([{"valid": False, "action": "invalid", "bet": None}])
    assert empty["stop_rate"] is None and empty["stop_ci"] == [None, None]


@pytest.mark.parametrize("args, message", [
    (([], "ablate", None, 10, "both"), "no feature given"),
    (([FeatureId(1, 2)], "clamp", None, 10, "both"), "needs a finite --value"),
    (([FeatureId(1, 2)], "clamp", float("nan"), 10, "both"), "needs a finite --value"),
    (([FeatureId(1, 2)], "ablate", 3.0, 10, "both"), "drop --value 3.0"),
    (([FeatureId(1, 2)], "boost", 1.0, 10, "both"), "mode must be ablate or clamp"),
    (([FeatureId(1, 2)], "ablate", None, 0, "both"), "--n must be between 1 and"),
    (([FeatureId(1, 2)], "ablate", None, 5, "custom"), "--prompt must be both, safe or risky"),
])
def test_bad_requests_name_the_value(args, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        intervene.check_request(*args)


def test_set_editor_adds_exactly_the_decoded_change(fixture_model, fixture_dir):
    """h' - h = sum_i (v_i - a_i) d_i, with a_i from the SAE's full encode and d_i = decode(e_i) - decode(0)."""
    from engine.config import load_config
    from engine.demo.experiment import set_editor
    from engine.model import forward_resid_post
    from engine.sae import load_sae

    model, tok = fixture_model
    cfg = load_config(fixture_dir / "config.yaml")
    layer = 2
    sae = load_sae(cfg.sae, layer)
    ids = tok([cfg.prompts["safe"], cfg.prompts["risky"]], add_special_tokens=True)["input_ids"]
    h = torch.stack([forward_resid_post(model, torch.tensor([i]), [layer])[layer][0, -1] for i in ids]).float()
    codes = sae.encode(h)
    active = [int(i) for i in torch.nonzero(codes[0] > 0)[:, 0][:2]]
    feats = active + [int(torch.nonzero(codes[0] == 0)[0, 0])]  # two active features and an inactive one
    zero = sae.decode(torch.zeros(1, codes.shape[1]))[0]
    d = torch.stack([sae.decode(torch.nn.functional.one_hot(torch.tensor([f]), codes.shape[1]).float())[0] - zero
                     for f in feats])
    for v in (0.0, 4.5):
        got = set_editor(sae, feats, [v] * len(feats))(h)
        want = h + (v - codes[:, feats]) @ d
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # ablating an inactive feature alone changes nothing
    assert torch.equal(set_editor(sae, feats[-1:], [0.0])(h), h)


def test_generate_patches_resid_post_at_the_last_prompt_token_only(fixture_model, fixture_dir):
    """Inside generate, block L+1 sees block L's output with the ablated features' contribution
    removed at the last prompt token, everything else as unpatched, and only in the prefill."""
    from engine.config import load_config
    from engine.demo.experiment import set_editor
    from engine.demo.generate import generate
    from engine.model import decoder_layers
    from engine.sae import load_sae

    model, tok = fixture_model
    cfg = load_config(fixture_dir / "config.yaml")
    layer = 1
    sae = load_sae(cfg.sae, layer)
    ids = tok(cfg.prompts["risky"], add_special_tokens=True)["input_ids"]
    seen = []
    hook = decoder_layers(model)[layer + 1].register_forward_pre_hook(lambda m, a, kw: seen.append(
        (kw.get("hidden_states", a[0] if a else None)).detach().clone()), with_kwargs=True)
    try:
        generate(model, tok, [ids], generator=torch.Generator().manual_seed(0), max_new_tokens=2, share_prefix=False)
        base = seen[0][0].float()
        codes = sae.encode(base[-1:])[0]
        feats = [int(i) for i in torch.topk(codes, 2).indices]
        assert codes[feats].min() > 0
        edit = {layer: set_editor(sae, feats, [0.0, 0.0])}
        seen.clear()
        generate(model, tok, [ids], generator=torch.Generator().manual_seed(0), max_new_tokens=2, edit=edit,
                 share_prefix=False)
        full = list(seen)
        seen.clear()  # the shared-prefix prefill: the prompt's first T-1 tokens, then the last one
        generate(model, tok, [ids], generator=torch.Generator().manual_seed(0), max_new_tokens=2, edit=edit)
        shared = list(seen)
    finally:
        hook.remove()
    patched, later = full[0][0].float(), full[1][0].float()
    d = sae.decoder_rows(torch.tensor(feats)).float()
    torch.testing.assert_close(patched[:-1], base[:-1], atol=0, rtol=0)
    torch.testing.assert_close(patched[-1], base[-1] - codes[feats] @ d, atol=1e-5, rtol=1e-5)
    assert later.shape[0] == 1  # the generated token's own pass is not patched (it sees the cache)
    prefix, last = shared[0][0].float(), shared[1][0].float()
    assert prefix.shape[0] == len(ids) - 1 and last.shape[0] == 1
    torch.testing.assert_close(prefix, base[:-1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(last[0], base[-1] - codes[feats] @ d, atol=1e-5, rtol=1e-5)
    assert shared[2][0].shape[0] == 1  # then the generated token, unpatched


def test_run_is_seeded_and_rates_are_recomputed_from_the_samples(fixture_config):
    cfg = fixture_config
    run = lambda seed: intervene.run_intervention(cfg, [FeatureId(2, 5)], "clamp", 3.0, 3, "safe", seed=seed,
                                                  batch_size=2, max_new_tokens=4)
    a, b = run(7), run(7)
    strip = lambda doc: {k: v for k, v in doc.items() if k != "metadata"}
    assert strip(a) == strip(b)
    assert a["features"] == ["L2-5"] and a["value"] == 3.0 and a["prompts"].keys() == {"safe"}
    for arm in ("baseline", "patched"):
        rows = a["samples"]["safe"][arm]
        assert len(rows) == 3
        assert a["prompts"]["safe"][arm] == intervene.arm_stats(rows)
    with pytest.raises(UserError, match="layer 9 is outside the model"):
        intervene.run_intervention(cfg, [FeatureId(9, 5)], "ablate", None, 3)


def test_on_the_demo_model_rates_are_the_parsed_replies_and_a_zero_patch_changes_nothing(demo_cache):
    """On the demo's trained model (it plays the game, so replies parse): ablating a feature that is
    0 at the last token leaves every reply as it was (same seed, zero delta); every rate and interval
    is recomputed from the replies with the audit parser and a hand-written Wilson formula; the
    activation reported before the patch is the SAE's on an independent forward pass; reruns agree."""
    from engine.audit.parser import parse_decision
    from engine.config import load_config
    from engine.model import forward_resid_post, load_model, load_tokenizer
    from engine.sae import load_sae

    cfg = load_config(demo_cache / "demo" / "config.yaml", {"cache_dir": str(demo_cache)})
    model, tok = load_model(cfg.model, "cpu"), load_tokenizer(cfg.model)
    layer = 2
    sae = load_sae(cfg.sae, layer)
    codes = {}
    for p in ("safe", "risky"):
        ids = torch.tensor([tok(cfg.prompts[p])["input_ids"]])
        codes[p] = sae.encode(forward_resid_post(model, ids, [layer])[layer][0, -1].float())
    inactive = int(torch.nonzero((codes["safe"] == 0) & (codes["risky"] == 0))[0, 0])
    active = int(torch.argmax(codes["risky"]))
    kw = dict(n=6, prompt="both", seed=3, batch_size=6, max_new_tokens=12)
    zero = intervene.run_intervention(cfg, [FeatureId(layer, inactive)], "ablate", None, **kw)
    for p in ("safe", "risky"):
        assert zero["prompts"][p]["activation"] == {f"L{layer}-{inactive}": 0.0}
        assert zero["samples"][p]["patched"] == zero["samples"][p]["baseline"]
    assert sum(zero["prompts"][p]["baseline"]["valid"] for p in ("safe", "risky")) > 0, "the demo model wrote no decision"
    z = 1.96
    for p, rec in zero["prompts"].items():
        for arm in ("baseline", "patched"):
            parsed = [parse_decision(r["response"], p) for r in zero["samples"][p][arm]]
            valid = [d for d in parsed if d.valid]
            stops = sum(d.action == "stop" for d in valid)
            bets = sum(d.action == "bet" for d in valid)
            s = rec[arm]
            assert (s["n"], s["valid"], s["stops"], s["bets"]) == (6, len(valid), stops, bets)
            if valid:
                n = len(valid)
                for k, rate, ci in ((stops, s["stop_rate"], s["stop_ci"]), (bets, s["bet_rate"], s["bet_ci"])):
                    q = k / n
                    centre = (q + z * z / (2 * n)) / (1 + z * z / n)
                    half = z * math.sqrt(q * (1 - q) / n + z * z / (4 * n * n)) / (1 + z * z / n)
                    assert rate == q and ci == pytest.approx([max(0, centre - half), min(1, centre + half)], abs=1e-12)
        assert rec["delta_stop_rate"] in (0.0, None)
    again = intervene.run_intervention(cfg, [FeatureId(layer, inactive)], "ablate", None, **kw)
    assert {k: v for k, v in again.items() if k != "metadata"} == {k: v for k, v in zero.items() if k != "metadata"}
    clamp = intervene.run_intervention(cfg, [FeatureId(layer, active)], "clamp", 25.0, n=2, prompt="risky", seed=3,
                                       batch_size=2, max_new_tokens=4)
    assert clamp["prompts"]["risky"]["activation"][f"L{layer}-{active}"] == pytest.approx(float(codes["risky"][active]),
                                                                                         rel=1e-5)
