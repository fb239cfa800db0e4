"""The single-feature prototype (plan step 2) on the fixture model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from engine.config import RISKY_PROMPT, SAFE_PROMPT
from helpers import run_cli


def independent_codes(fixture_dir, model, tok, text, layer):
    """Study-convention codes at the last token, from hidden_states[L+1] and raw files (numpy)."""
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
    x = hs[layer + 1][0, -1].double().numpy()
    folder = fixture_dir / "saes" / f"Llama3_1-8B-Base-L{layer}R-8x"
    w = load_file(str(folder / "checkpoints" / "final.safetensors"))
    hp = json.loads((folder / "hyperparams.json").read_text())
    s = math.sqrt(hp["d_model"]) / hp["dataset_average_activation_norm"]["in"]
    pre = (x * s) @ w["encoder.weight"].astype(np.float64).T + w["encoder.bias"]
    return np.maximum(pre, 0.0), pre, ids.shape[1]


def test_prototype_cli_writes_documented_json(fixture_dir, fixture_model, tmp_path):
    model, tok = fixture_model
    layer = 3
    codes, _, _ = independent_codes(fixture_dir, model, tok, SAFE_PROMPT, layer)
    fid = int(np.argsort(-codes)[1])  # an active feature, not the top one
    cache = tmp_path / "cache"
    r = run_cli("prototype", "--config", str(fixture_dir / "config.yaml"), "--cache", str(cache),
                "--feature", f"L{layer}-{fid}", "--top-k", "5")
    assert r.returncode == 0, r.stderr
    out = cache / "prototype" / f"L{layer}-{fid}.json"
    assert f"wrote {out}" in r.stdout
    res = json.loads(out.read_text())
    for key in ["feature", "layer", "feature_id", "encode_convention", "prompts", "upstream_candidates",
                "memory_usage_gb", "timings_s", "schema_version"]:
        assert key in res
    assert (res["feature"], res["layer"], res["feature_id"], res["encode_convention"]) == (f"L{layer}-{fid}", 3, fid, "study")
    assert set(res["prompts"]) == {"safe", "risky"}
    assert set(res["timings_s"]) >= {"load_model", "load_saes", "forward", "encode"}
    assert res["memory_usage_gb"] > 0
    for name, text in [("safe", SAFE_PROMPT), ("risky", RISKY_PROMPT)]:
        rec = res["prompts"][name]
        assert rec["text"] == text
        for l in range(layer + 1):
            codes, pre, n_tok = independent_codes(fixture_dir, model, tok, text, l)
            assert rec["n_tokens"] == n_tok
            top = rec["top_features"][str(l)]
            assert len(top) == 5
            want = np.argsort(-codes)[:5]
            assert [f["feature_id"] for f in top] == [int(i) for i in want]
            np.testing.assert_allclose([f["activation"] for f in top], codes[want], rtol=1e-4)
            if l == layer:
                assert rec["target_activation"] == pytest.approx(codes[fid], rel=1e-4)
                assert rec["target_pre_activation"] == pytest.approx(pre[fid], rel=1e-4)
    # upstream candidates: top-k of every layer below the target, for each prompt (the plan's list)
    ups = res["upstream_candidates"]
    assert len(ups) == 2 * 3 * 5
    assert {u["source_layer"] for u in ups} == {0, 1, 2}
    assert all(u["source"].startswith(f"L{u['source_layer']}-") for u in ups)


def test_prototype_custom_prompt_and_single_prompt(fixture_dir, fixture_model, tmp_path):
    _, tok = fixture_model
    out = tmp_path / "p.json"
    r = run_cli("prototype", "--config", str(fixture_dir / "config.yaml"), "--feature", "L1-3",
                "--prompt-text", "Choice: 2", "--out", str(out))
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert list(res["prompts"]) == ["custom"] and res["prompts"]["custom"]["n_tokens"] == len(tok("Choice: 2")["input_ids"])
    r = run_cli("prototype", "--config", str(fixture_dir / "config.yaml"), "--feature", "L1-3",
                "--prompt", "risky", "--out", str(out))
    assert r.returncode == 0 and list(json.loads(out.read_text())["prompts"]) == ["risky"]


@pytest.mark.parametrize(
    "feature, message",
    [
        ("L3_17", "malformed feature id 'L3_17'"),
        ("L6-1", "layer 6 is outside the model (layers 0..5)"),
        ("L2-512", "index 512 is outside the SAE (0..511)"),
    ],
)
def test_prototype_bad_feature_is_one_line_exit_2(fixture_dir, tmp_path, feature, message):
    r = run_cli("prototype", "--config", str(fixture_dir / "config.yaml"), "--cache", str(tmp_path),
                "--feature", feature)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == f"error: feature {feature}: {message}" or message in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "prototype").exists()


def test_prototype_unknown_prompt(fixture_dir, tmp_path):
    r = run_cli("prototype", "--config", str(fixture_dir / "config.yaml"), "--feature", "L1-1", "--prompt", "calm")
    assert r.returncode == 2 and "unknown prompt calm" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.gpu
def test_prototype_on_cuda(fixture_dir, tmp_path):
    r = run_cli("prototype", "--config", str(fixture_dir / "config.yaml"), "--cache", str(tmp_path),
                "--feature", "L3-5", "--device", "cuda")
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "prototype" / "L3-5.json").read_text())
    assert res["device"] == "cuda" and res["memory_kind"] == "cuda_max_memory_allocated"
