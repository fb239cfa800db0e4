"""Step 2: the single-feature prototype.

For one target feature `L{L}-{i}` and each chosen prompt: one forward pass (stopped
after block L), resid_post of blocks first_layer..L at the last prompt token encoded
by each layer's SAE (loaded one at a time and freed), the target's activation, the
top-k active features per layer, and the plan's upstream candidates (top-k of every
layer below L). Writes `<cache>/prototype/L{L}-{i}.json`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from engine.config import Config
from engine.errors import UserError
from engine.schema import FeatureId, atomic_write_json, prototype_path, with_schema


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--feature", required=True, help="target feature, e.g. L3-17")
    p.add_argument("--prompt", default="both",
                   help="safe, risky, both (the configured prompts), or any prompt name in the config")
    p.add_argument("--prompt-text", default=None, help="custom prompt text (run as prompt 'custom')")
    p.add_argument("--top-k", type=int, default=None, help="features kept per layer (default prototype.top_k)")
    p.add_argument("--out", default=None, help="write the JSON here instead of <cache>/prototype/")


def prompt_texts(cfg: Config, which: str, custom: str | None) -> dict[str, str]:
    if custom is not None:
        if not custom.strip():
            raise UserError("--prompt-text is empty")
        return {"custom": custom}
    if which in ("both", "all"):
        return dict(cfg.prompts)
    names = [w.strip() for w in which.split(",") if w.strip()]
    missing = [n for n in names if n not in cfg.prompts]
    if missing:
        raise UserError(f"unknown prompt {', '.join(missing)}: choose from {', '.join(cfg.prompts)} or both")
    return {n: cfg.prompts[n] for n in names}


def validate_feature(cfg: Config, feature: FeatureId) -> tuple[int, int]:
    """Check the feature against the model depth and the SAE width before loading weights."""
    from engine.model import load_config_only
    from engine.sae import sae_width

    mcfg = load_config_only(cfg.model)
    depth = int(getattr(mcfg, "num_hidden_layers"))
    if not 0 <= feature.layer < depth:
        raise UserError(f"feature {feature}: layer {feature.layer} is outside the model (layers 0..{depth - 1})")
    d_model, d_sae = sae_width(cfg.sae, feature.layer)
    if not 0 <= feature.feature_id < d_sae:
        raise UserError(f"feature {feature}: index {feature.feature_id} is outside the SAE (0..{d_sae - 1})")
    hidden = int(getattr(mcfg, "hidden_size"))
    if d_model != hidden:
        raise UserError(f"SAE for layer {feature.layer} has d_model {d_model}, the model has {hidden}")
    return depth, d_sae


def run_prototype(cfg: Config, feature: FeatureId, prompts: dict[str, str], top_k: int | None = None,
                  device: str | None = None) -> dict:
    import torch

    from engine.model import forward_resid_post, load_model, load_tokenizer, resolve_device, tokenize
    from engine.progress import Progress
    from engine.resources import Timings, peak_memory_gb, reset_peak
    from engine.sae import load_sae

    top_k = top_k or cfg.prototype.top_k
    depth, _ = validate_feature(cfg, feature)
    dev = resolve_device(device or cfg.model.device)
    reset_peak(dev)
    timings = Timings()
    first = max(0, min(cfg.prototype.first_layer, feature.layer))
    layers = list(range(first, feature.layer + 1))
    bar = Progress(2 + len(layers), f"prototype {feature}", unit="step")

    with timings.phase("load_model"):
        tok = load_tokenizer(cfg.model)
        model = load_model(cfg.model, dev)
    bar.update()

    # One forward pass per prompt, stopped after the target block; keep the last token only.
    last: dict[str, dict[int, torch.Tensor]] = {}
    n_tokens: dict[str, int] = {}
    with timings.phase("forward"), torch.no_grad():
        for name, text in prompts.items():
            ids = tokenize(tok, text, dev)
            n_tokens[name] = int(ids.shape[1])
            resid = forward_resid_post(model, ids, layers)
            last[name] = {l: resid[l][0, -1].cpu() for l in layers}
            del resid
    bar.update()
    del model
    if dev.startswith("cuda"):
        torch.cuda.empty_cache()

    per_prompt = {
        name: {"text": text, "n_tokens": n_tokens[name], "top_features": {}, "sae_stats": {}}
        for name, text in prompts.items()
    }
    for layer in layers:
        with timings.phase("load_saes"):
            sae = load_sae(cfg.sae, layer, device=dev)
        with timings.phase("encode"), torch.no_grad():
            for name in prompts:
                x = last[name][layer].to(dev)
                pre = sae.pre_activation(x)
                acts = sae.gate(pre)
                recon = sae.decode(acts)
                rec = per_prompt[name]
                active = int((acts > 0).sum())
                rel_err = float((x - recon.to(x.dtype)).norm() / x.norm().clamp_min(1e-12))
                rec["sae_stats"][str(layer)] = {"l0": active, "relative_error": round(rel_err, 6)}
                k = min(top_k, active)
                vals, idx = torch.topk(acts.float(), k) if k > 0 else (acts[:0], acts[:0].long())
                rec["top_features"][str(layer)] = [
                    {"feature_id": int(i), "feature": f"L{layer}-{int(i)}", "activation": float(v)}
                    for v, i in zip(vals.cpu(), idx.cpu())
                ]
                if layer == feature.layer:
                    rec["target_activation"] = float(acts[feature.feature_id])
                    rec["target_pre_activation"] = float(pre[feature.feature_id])
                    rec["target_rank"] = (
                        int((acts > acts[feature.feature_id]).sum()) + 1 if acts[feature.feature_id] > 0 else None
                    )
        del sae
        if dev.startswith("cuda"):
            torch.cuda.empty_cache()
        bar.update()
    bar.close()

    upstream = []
    for name, rec in per_prompt.items():
        for layer in layers[:-1]:
            for f in rec["top_features"][str(layer)]:
                upstream.append(
                    {"source": f["feature"], "source_layer": layer, "activation": f["activation"], "prompt": name}
                )
    return with_schema(
        {
            "feature": str(feature),
            "layer": feature.layer,
            "feature_id": feature.feature_id,
            "encode_convention": cfg.sae.convention,
            "model": cfg.model.name_or_path,
            "sae_source": cfg.sae.source,
            "device": dev,
            "dtype": cfg.model.dtype,
            "top_k": top_k,
            "position": "last prompt token",
            "layers": layers,
            "prompts": per_prompt,
            "upstream_candidates": upstream,
            "memory_usage_gb": round(peak_memory_gb(dev), 4),
            "memory_kind": "cuda_max_memory_allocated" if dev.startswith("cuda") else "peak_rss",
            "timings_s": timings.as_dict(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
    )


def summary(result: dict) -> str:
    lines = [f"{result['feature']} ({result['encode_convention']} convention, {result['device']})"]
    for name, rec in result["prompts"].items():
        top = rec["top_features"].get(str(result["layer"]), [])[:3]
        tops = ", ".join(f"{f['feature']}={f['activation']:.3f}" for f in top) or "none active"
        lines.append(
            f"  {name:>6}: {rec['n_tokens']} tokens, target activation {rec['target_activation']:.4f} "
            f"(pre {rec['target_pre_activation']:.4f}); top at L{result['layer']}: {tops}"
        )
    lines.append(f"  upstream candidates: {len(result['upstream_candidates'])}")
    t = result["timings_s"]
    lines.append(
        "  time: " + ", ".join(f"{k} {v:.2f}s" for k, v in t.items())
        + f"; peak memory {result['memory_usage_gb']:.2f} GB ({result['memory_kind']})"
    )
    return "\n".join(lines)


def main(args: argparse.Namespace, cfg: Config) -> int:
    from engine.manifest import record_step

    feature = FeatureId.parse(args.feature)
    prompts = prompt_texts(cfg, args.prompt, args.prompt_text)
    out = Path(args.out) if args.out else prototype_path(cfg.cache, feature)
    if args.out:  # a live job writing elsewhere does not touch the cache manifest
        result = run_prototype(cfg, feature, prompts, top_k=args.top_k)
        atomic_write_json(out, result)
    else:
        with record_step(cfg.cache, "prototype", device=cfg.model.device, cfg=cfg, config_hash=cfg.hash("model", "sae", "prototype"),
                         command=f"python -m engine prototype --feature {feature}") as rec:
            result = run_prototype(cfg, feature, prompts, top_k=args.top_k)
            atomic_write_json(out, result)
            rec["outputs"].append(out)
            rec["summary"] = {"feature": str(feature)}
    print(summary(result))
    print(f"wrote {out}")
    return 0
