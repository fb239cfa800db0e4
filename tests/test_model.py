"""resid_post capture, hidden-state indexing, direct block runs and model loading errors."""

from __future__ import annotations

import pytest
import torch

from engine.config import RISKY_PROMPT, SAFE_PROMPT, ModelConfig
from engine.errors import UserError
from engine.model import (decoder_layers, forward_resid_post, load_config_only, load_model, resolve_device,
                          run_blocks, tokenize)


def _hook_outputs(model, ids):
    """Independent reference: every block's output recorded by plain forward hooks."""
    seen = {}
    handles = [
        blk.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, (out[0] if isinstance(out, tuple) else out).detach().clone()))
        for i, blk in enumerate(decoder_layers(model))
    ]
    try:
        with torch.no_grad():
            out = model(ids, output_hidden_states=True, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return seen, out.hidden_states


@pytest.mark.parametrize("text", [SAFE_PROMPT, RISKY_PROMPT])
def test_resid_post_is_block_output_for_every_layer(fixture_model, text):
    model, tok = fixture_model
    ids = tokenize(tok, text, "cpu")
    n = len(decoder_layers(model))
    hooked, hidden_states = _hook_outputs(model, ids)
    with torch.no_grad():
        captured = forward_resid_post(model, ids, range(n))
    assert sorted(captured) == list(range(n))
    for layer in range(n):
        assert torch.equal(captured[layer], hooked[layer]), layer
    # hidden_states[L+1] is resid_post(L) for every block but the last ...
    for layer in range(n - 1):
        assert torch.equal(hidden_states[layer + 1], captured[layer])
    # ... whose hidden_states entry is after the final norm: ours is not normed.
    last = captured[n - 1]
    assert not torch.allclose(hidden_states[n], last)
    assert torch.allclose(hidden_states[n], model.model.norm(last), atol=1e-6)
    # and the plan's hidden_states[L] is one block early
    assert not torch.allclose(hidden_states[2], captured[2])


def test_early_stop_gives_same_values_and_skips_later_blocks(fixture_model):
    model, tok = fixture_model
    ids = tokenize(tok, SAFE_PROMPT, "cpu")
    calls = []
    h = decoder_layers(model)[4].register_forward_hook(lambda *a: calls.append(1))
    try:
        with torch.no_grad():
            early = forward_resid_post(model, ids, [1, 2])
    finally:
        h.remove()
    assert calls == []  # stopped after block 2
    full = forward_resid_post(model, ids, range(6), stop_early=False)
    assert torch.equal(early[2], full[2])


def test_run_blocks_reproduces_the_forward_pass(fixture_model):
    model, tok = fixture_model
    ids = tokenize(tok, RISKY_PROMPT, "cpu")
    with torch.no_grad():
        res = forward_resid_post(model, ids, range(6))
        out = run_blocks(model, res[1], 2, 5, keep=[3])
    assert torch.allclose(out[5], res[5], atol=1e-5)
    assert torch.allclose(out[3], res[3], atol=1e-5)
    # batched rows are independent
    with torch.no_grad():
        batch = run_blocks(model, res[1].expand(3, -1, -1).clone(), 2, 4)
    assert torch.allclose(batch[2], res[4][0], atol=1e-5)


def test_dtypes(fixture_dir):
    from engine.config import load_config

    cfg = load_config(fixture_dir / "config.yaml")
    cfg.model.dtype = "bfloat16"
    model = load_model(cfg.model, "cpu")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert not any(p.requires_grad for p in model.parameters())


def test_unreachable_hub_id_is_one_clear_sentence(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = ModelConfig(name_or_path="meta-llama/Llama-3.1-8B", local_files_only=True)
    with pytest.raises(UserError) as err:
        load_config_only(cfg)
    msg = str(err.value)
    assert "meta-llama/Llama-3.1-8B" in msg and "not a local folder" in msg and "\n" not in msg
    with pytest.raises(UserError, match="model folder not found"):
        load_config_only(ModelConfig(name_or_path="./no/such/folder"))


def test_resolve_device():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA GPU"):
            resolve_device("cuda")
    with pytest.raises(UserError):
        resolve_device("tpu")


@pytest.mark.gpu
def test_resid_capture_on_cuda_matches_cpu(fixture_dir):
    from engine.config import load_config
    from engine.model import load_tokenizer

    cfg = load_config(fixture_dir / "config.yaml")
    tok = load_tokenizer(cfg.model)
    ids = tokenize(tok, SAFE_PROMPT, "cpu")
    cpu = forward_resid_post(load_model(cfg.model, "cpu"), ids, [3])[3]
    gpu = forward_resid_post(load_model(cfg.model, "cuda"), ids.cuda(), [3])[3].cpu()
    assert torch.allclose(cpu, gpu, atol=1e-4)


def _model_copy(fixture_dir, dest, replace: dict[str, bytes] | None = None):
    """The fixture model folder as symlinks, with some files replaced by the given bytes."""

    dest.mkdir()
    for f in (fixture_dir / "model").iterdir():
        if replace and f.name in replace:
            (dest / f.name).write_bytes(replace[f.name])
        else:
            (dest / f.name).symlink_to(f)
    return ModelConfig(name_or_path=str(dest), dtype="float32", device="cpu")


def _config_with(fixture_dir, **changes) -> bytes:
    import json

    conf = json.loads((fixture_dir / "model" / "config.json").read_text())
    for k, v in changes.items():
        if v is ...:
            conf.pop(k)
        else:
            conf[k] = v
    return json.dumps(conf).encode()


@pytest.mark.parametrize("changes, message", [
    ({"num_hidden_layers": "six"}, 'config.json: num_hidden_layers is "six", not an integer in 1..10000'),
    ({"hidden_size": ...}, "config.json lacks hidden_size (a LLaMA-style config.json gives it)"),
    ({"vocab_size": -1}, "config.json: vocab_size is -1, not an integer in 1..16777216"),
    ({"intermediate_size": 22.5}, "config.json: intermediate_size is 22.5, not an integer"),
    ({"num_attention_heads": True}, "config.json: num_attention_heads is true, not an integer"),
    ({"rms_norm_eps": "small"}, 'config.json: rms_norm_eps is "small", not a positive finite number'),
    ({"num_key_value_heads": 3}, "num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
])
def test_model_config_with_wrong_types_names_file_and_key(fixture_dir, tmp_path, changes, message):
    cfg = _model_copy(fixture_dir, tmp_path / "m", {"config.json": _config_with(fixture_dir, **changes)})
    for call in (load_config_only, lambda c: load_model(c, "cpu")):
        with pytest.raises(UserError) as err:
            call(cfg)
        assert message in str(err.value) and str(tmp_path / "m") in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("content, message", [
    (b"{not json", "config.json is not valid JSON: Expecting property name"),
    (b"[]", "config.json must be a JSON object, not list"),
    (b'{"model_type": "llam\xe1"}', "config.json is not UTF-8 JSON: byte 0xe1 at offset 20"),
    pytest.param(b"[" * 40000, "config.json is not valid JSON: nested too deeply", id="deep"),
])
def test_unreadable_model_config_is_one_line(fixture_dir, tmp_path, content, message):
    cfg = _model_copy(fixture_dir, tmp_path / "m", {"config.json": content})
    with pytest.raises(UserError) as err:
        load_config_only(cfg)
    assert str(err.value).startswith(f"model config {tmp_path / 'm'}/{message}")


def test_truncated_weights_and_shapes_that_disagree_name_the_file(fixture_dir, tmp_path):
    raw = (fixture_dir / "model" / "model.safetensors").read_bytes()
    cfg = _model_copy(fixture_dir, tmp_path / "t", {"model.safetensors": raw[: len(raw) // 3]})
    with pytest.raises(UserError) as err:
        load_model(cfg, "cpu")
    assert str(err.value).startswith(f"model weights {tmp_path / 't' / 'model.safetensors'} cannot be read as safetensors")
    cfg = _model_copy(fixture_dir, tmp_path / "h", {"config.json": _config_with(fixture_dir, hidden_size=32)})
    with pytest.raises(UserError, match=r"model\.embed_tokens\.weight has shape \(128256, 64\), but config\.json says "
                                        r"\(vocab_size, hidden_size\) = \(128256, 32\)"):
        load_model(cfg, "cpu")
    cfg = _model_copy(fixture_dir, tmp_path / "l", {"config.json": _config_with(fixture_dir, num_hidden_layers=5)})
    with pytest.raises(UserError, match="the weights hold 6 decoder layers, but config.json says num_hidden_layers = 5"):
        load_model(cfg, "cpu")


def test_damaged_tokenizer_is_one_line(fixture_dir, tmp_path):
    from engine.model import load_tokenizer

    cfg = _model_copy(fixture_dir, tmp_path / "k", {"tokenizer.json": b'{"version": "1.0", "model": {"type": 5}}'})
    with pytest.raises(UserError) as err:
        load_tokenizer(cfg)
    assert str(err.value).startswith(f"model folder {tmp_path / 'k'} has no readable tokenizer (") and "\n" not in str(err.value)
