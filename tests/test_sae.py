"""Each encode convention against a hand computation in numpy (float64)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from engine.config import SAEConfig
from engine.errors import UserError
from engine.sae import build_sae, load_sae, sae_width

D_MODEL, D_SAE = 16, 40
NORM_IN, NORM_OUT = 2.5, 2.5
THETA = 0.4


def write_sae(root, layer=3, *, d_model=D_MODEL, d_sae=D_SAE, seed=0, drop=None, bad_shape=False,
              norm_out=NORM_OUT):
    g = torch.Generator().manual_seed(seed)
    t = {
        "encoder.weight": torch.randn(d_sae, d_model, generator=g) * 0.5,
        "encoder.bias": torch.randn(d_sae, generator=g) * 0.3,
        "decoder.weight": torch.randn(d_model, d_sae, generator=g) * 0.7,
        "decoder.bias": torch.randn(d_model, generator=g) * 0.1,
    }
    if bad_shape:
        t["decoder.weight"] = t["decoder.weight"][:, :-1].contiguous()
    if drop:
        t.pop(drop)
    folder = root / f"Llama3_1-8B-Base-L{layer}R-8x"
    (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
    save_file(t, str(folder / "checkpoints" / "final.safetensors"))
    hp = {"d_model": d_model, "d_sae": d_sae, "jump_relu_threshold": THETA,
          "dataset_average_activation_norm": {"in": NORM_IN, "out": norm_out}}
    (folder / "hyperparams.json").write_text(json.dumps(hp))
    return {k: v.double().numpy() for k, v in t.items()}


def cfg_for(root, convention):
    return SAEConfig(source=str(root), convention=convention, dtype="float64")


@pytest.fixture
def x():
    return np.random.default_rng(1).normal(size=(5, D_MODEL)) * 3.0


def hand(w, x, convention, norm_out=NORM_OUT):
    """The formulas of engine/sae.py's docstring, written out independently."""
    WE, bE, WD, bD = w["encoder.weight"], w["encoder.bias"], w["decoder.weight"], w["decoder.bias"]
    s_in = math.sqrt(D_MODEL) / NORM_IN
    s_out = math.sqrt(D_MODEL) / norm_out
    if convention == "study":
        pre = (x * s_in) @ WE.T + bE
        a = np.where(pre > 0, pre, 0.0)
        xhat = (a @ WD.T + bD) / s_in
        d = WD / s_in
    elif convention == "jumprelu":
        WDs = WD * (s_in / s_out)
        n = np.linalg.norm(WDs, axis=0)
        z = x @ WE.T + bE / s_in
        pre = n * z
        a = np.where(pre > THETA, pre, 0.0)
        xhat = a @ (WDs / n).T + bD / s_out
        d = WDs / n
    else:  # saelens: fold s into W_enc/W_dec, threshold theta * s
        W_enc = WE.T * s_in
        W_dec = WD.T / s_in
        pre = x @ W_enc + bE
        a = np.where(pre > THETA * s_in, pre, 0.0)
        xhat = a @ W_dec + bD / s_in
        d = WD / s_in
    return pre, a, xhat, d


@pytest.mark.parametrize("convention", ["study", "jumprelu", "saelens"])
def test_encode_decode_match_hand_computation(tmp_path, x, convention):
    w = write_sae(tmp_path)
    sae = load_sae(cfg_for(tmp_path, convention), 3)
    pre, a, xhat, d = hand(w, x, convention)
    xt = torch.tensor(x)
    np.testing.assert_allclose(sae.pre_activation(xt).numpy(), pre, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(sae.encode(xt).numpy(), a, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(sae.decode(torch.tensor(a)).numpy(), xhat, rtol=1e-10, atol=1e-12)
    # decoder directions in residual units: x_hat = sum a_i d_i + bias
    idx = torch.arange(D_SAE)
    np.testing.assert_allclose(sae.decoder_rows(idx).numpy(), d.T, rtol=1e-10, atol=1e-12)
    # encoder rows: pre = e . x + b
    e, b = sae.encoder_rows(idx)
    np.testing.assert_allclose((xt @ e.T + b).numpy(), pre, rtol=1e-10, atol=1e-12)
    # the gate is strict and leaves +0.0 where inactive
    enc = sae.encode(xt)
    assert not torch.signbit(enc[enc == 0]).any()
    assert 0 < int((enc > 0).sum()) < enc.numel()


def test_conventions_differ_as_documented(tmp_path, x):
    write_sae(tmp_path)
    xt = torch.tensor(x)
    study = load_sae(cfg_for(tmp_path, "study"), 3)
    saelens = load_sae(cfg_for(tmp_path, "saelens"), 3)
    # same pre-activation; saelens only drops what lies under theta * s_in
    assert torch.allclose(study.pre_activation(xt), saelens.pre_activation(xt))
    s_in = math.sqrt(D_MODEL) / NORM_IN
    a_s, a_l = study.encode(xt), saelens.encode(xt)
    assert torch.equal(a_l, torch.where(a_s > THETA * s_in, a_s, torch.zeros_like(a_s)))
    assert int((a_l > 0).sum()) < int((a_s > 0).sum())


def test_jumprelu_with_different_in_out_norms(tmp_path, x):
    w = write_sae(tmp_path, norm_out=4.0)
    sae = load_sae(cfg_for(tmp_path, "jumprelu"), 3)
    pre, a, xhat, d = hand(w, x, "jumprelu", norm_out=4.0)
    xt = torch.tensor(x)
    np.testing.assert_allclose(sae.encode(xt).numpy(), a, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(sae.decode(sae.encode(xt)).numpy(), xhat, rtol=1e-10, atol=1e-12)


def test_dtype_is_configurable(tmp_path):
    write_sae(tmp_path)
    sae = load_sae(SAEConfig(source=str(tmp_path), dtype="bfloat16"), 3)
    assert sae.W_enc.dtype == torch.bfloat16 and sae.dec_gain.dtype == torch.bfloat16
    assert sae_width(SAEConfig(source=str(tmp_path)), 3) == (D_MODEL, D_SAE)


def test_missing_file_key_and_shape_name_the_file(tmp_path):
    with pytest.raises(UserError, match=r"Llama3_1-8B-Base-L7R-8x/hyperparams.json not found"):
        load_sae(cfg_for(tmp_path, "study"), 7)
    write_sae(tmp_path / "a", drop="decoder.bias")
    with pytest.raises(UserError, match=r"final\.safetensors lack decoder\.bias"):
        load_sae(cfg_for(tmp_path / "a", "study"), 3)
    write_sae(tmp_path / "b", bad_shape=True)
    with pytest.raises(UserError, match=r"final\.safetensors: decoder\.weight has shape \(16, 39\), expected \(16, 40\)"):
        load_sae(cfg_for(tmp_path / "b", "study"), 3)
    # a file that is not safetensors
    folder = tmp_path / "c" / "Llama3_1-8B-Base-L3R-8x"
    write_sae(tmp_path / "c")
    (folder / "checkpoints" / "final.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match=r"cannot be read as safetensors"):
        load_sae(cfg_for(tmp_path / "c", "study"), 3)


def test_hub_repository_unreachable_is_one_sentence(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = SAEConfig(source="fnlp/Llama3_1-8B-Base-LXR-8x", local_files_only=True)
    with pytest.raises(UserError) as err:
        load_sae(cfg, 12)
    msg = str(err.value)
    assert "Llama3_1-8B-Base-L12R-8x/hyperparams.json" in msg and "\n" not in msg


def test_build_sae_rejects_unknown_convention():
    z = torch.zeros(4, 2)
    with pytest.raises(UserError, match="unknown SAE encode convention"):
        build_sae(z, torch.zeros(4), z.T, torch.zeros(2), {"dataset_average_activation_norm": {"in": 1.0}},
                  layer=0, convention="topk")


def _hp_path(root, layer=3):
    return root / f"Llama3_1-8B-Base-L{layer}R-8x" / "hyperparams.json"


@pytest.mark.parametrize("change, message", [
    ({"d_sae": "forty"}, 'hyperparams.json: d_sae is "forty", not a positive integer'),
    ({"d_model": -16}, "hyperparams.json: d_model is -16, not a positive integer"),
    ({"d_model": True}, "hyperparams.json: d_model is true, not a positive integer"),
    ({"d_sae": 1e400}, "hyperparams.json: d_sae is Infinity, not a positive integer"),
    ({"dataset_average_activation_norm": {"in": "x"}}, 'dataset_average_activation_norm.in is "x", not a number'),
    ({"dataset_average_activation_norm": {"in": 2.5, "out": 0}}, "dataset_average_activation_norm.out is 0, not a positive"),
    ({"dataset_average_activation_norm": [1]}, "lack dataset_average_activation_norm.in (it is [1])"),
    ({"jump_relu_threshold": None}, "jump_relu_threshold is null, not a number"),
])
def test_hyperparams_with_wrong_types_name_the_key(tmp_path, change, message):
    write_sae(tmp_path)
    hp = json.loads(_hp_path(tmp_path).read_text())
    hp.update(change)
    _hp_path(tmp_path).write_text(json.dumps(hp))
    with pytest.raises(UserError) as err:
        load_sae(cfg_for(tmp_path, "jumprelu"), 3)
    assert message in str(err.value) and str(_hp_path(tmp_path)) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("content, message", [
    (b"{", "are not valid JSON: Expecting property name"),
    (b"[1, 2]", "must be a JSON object, not list"),
    (b'{"d_sae": "caf\xe9"}', "are not UTF-8 JSON: byte 0xe9 at offset 14"),
    pytest.param(b"[" * 50000, "are not valid JSON: nested too deeply", id="deep"),
])
def test_unreadable_hyperparams_are_one_line(tmp_path, content, message):
    write_sae(tmp_path)
    _hp_path(tmp_path).write_bytes(content)
    for call in (lambda: load_sae(cfg_for(tmp_path, "study"), 3), lambda: sae_width(cfg_for(tmp_path, "study"), 3)):
        with pytest.raises(UserError) as err:
            call()
        assert str(err.value).startswith(f"SAE hyperparameters {_hp_path(tmp_path)} {message}")
        assert "\n" not in str(err.value)


def test_truncated_or_odd_safetensors_name_the_file(tmp_path):
    write_sae(tmp_path)
    w = tmp_path / "Llama3_1-8B-Base-L3R-8x" / "checkpoints" / "final.safetensors"
    raw = w.read_bytes()
    w.write_bytes(raw[:-7])  # truncated by a few bytes
    with pytest.raises(UserError) as err:
        load_sae(cfg_for(tmp_path, "study"), 3)
    assert str(err.value).startswith(f"SAE weights {w} cannot be read as safetensors: ") and "\n" not in str(err.value)
    # widths from the weights when hyperparams lack them: a truncated file is named there too
    hp = json.loads(_hp_path(tmp_path).read_text())
    del hp["d_sae"]
    _hp_path(tmp_path).write_text(json.dumps(hp))
    with pytest.raises(UserError, match="cannot be read as safetensors"):
        sae_width(cfg_for(tmp_path, "study"), 3)
    # integer tensors and a 3-d encoder are refused with the key named
    save_file({"encoder.weight": torch.zeros(D_SAE, D_MODEL, dtype=torch.int8), "encoder.bias": torch.zeros(D_SAE),
               "decoder.weight": torch.zeros(D_MODEL, D_SAE), "decoder.bias": torch.zeros(D_MODEL)}, str(w))
    with pytest.raises(UserError, match=r"final\.safetensors: encoder\.weight holds int8, not floating-point numbers"):
        load_sae(cfg_for(tmp_path, "study"), 3)
    save_file({"encoder.weight": torch.zeros(2, D_SAE, D_MODEL), "encoder.bias": torch.zeros(D_SAE),
               "decoder.weight": torch.zeros(D_MODEL, D_SAE), "decoder.bias": torch.zeros(D_MODEL)}, str(w))
    with pytest.raises(UserError, match=r"encoder\.weight has shape \(2, 40, 16\), expected 2 dimensions"):
        load_sae(cfg_for(tmp_path, "study"), 3)
    with pytest.raises(UserError, match=r"encoder\.weight has shape \(2, 40, 16\), expected \(d_sae, d_model\)"):
        sae_width(cfg_for(tmp_path, "study"), 3)
