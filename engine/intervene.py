"""`python -m engine intervene --features L3-17[,L3-20] --mode clamp|ablate [--value X] --n N
[--prompt both|safe|risky] [--seed S] [--out FILE]`: a live mini Experiment 2.

The features are set at the last prompt token, at resid_post of their layers, during the
prefill (as the demo's Experiment 2 and the study's prefill patch): h' = h + sum_i (v_i - a_i) d_i,
a_i the feature's activation on the unpatched h and d_i its decoder direction, so the SAE's
reconstruction error is kept; ablation is v = 0, clamping v = X. N continuations per prompt
are sampled with the study's decoding (temperature 0.7, top-k 50, top-p 0.9), once unpatched
and once patched, and parsed with the audit's decision parser (engine/audit/parser.py).
Both arms of a prompt draw from the same seeded random stream (common random numbers), so
a difference between them comes from the patch, not from the luck of the draw, and a rerun
with the same seed gives the same decisions. Rates over valid decisions with Wilson 95%
intervals; the patched-versus-unpatched p-value is Fisher's exact test (chi2 with Yates when
every cell has 5 or more), as the demo's Experiment 2 uses. Formulas in docs/tokens.md §6.
"""

from __future__ import annotations

import argparse
import math
import time

from engine.config import Config
from engine.errors import UserError
from engine.schema import FeatureId, atomic_write_json, parse_feature_list, with_schema

MODES = ("ablate", "clamp")
PROMPTS = ("safe", "risky")
MAX_FEATURES = 16
MAX_N = 2000
STOP_AT_NEWLINES = 3  # the parser reads the first three lines of a reply


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--features", "--feature", dest="features", required=True,
                   help="feature(s) to set, comma-separated, e.g. L3-17 or L3-17,L5-2")
    p.add_argument("--mode", choices=MODES, default="ablate", help="ablate (set to 0) or clamp (set to --value)")
    p.add_argument("--value", type=float, default=None, help="with --mode clamp: the activation to set")
    p.add_argument("--n", type=int, default=50, help="decisions sampled per prompt and arm (default 50)")
    p.add_argument("--prompt", default="both", choices=("both",) + PROMPTS, help="which study prompt(s)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (both arms share it)")
    p.add_argument("--batch-size", type=int, default=16, help="continuations sampled at once")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens generated per reply (default 32)")
    p.add_argument("--out", default=None, help="write the JSON here (default <cache>/interventions/<name>.json)")


def check_request(features: list[FeatureId], mode: str, value: float | None, n: int, prompt: str) -> float:
    """The value each feature is set to; UserError naming what is wrong."""
    if not features:
        raise UserError("no feature given: --features L3-17[,L5-2]")
    if len(features) > MAX_FEATURES:
        raise UserError(f"{len(features)} features; at most {MAX_FEATURES} at once")
    if mode not in MODES:
        raise UserError(f"mode must be ablate or clamp, got {mode!r}")
    if mode == "clamp":
        if value is None or not math.isfinite(value):
            raise UserError("--mode clamp needs a finite --value (the activation to set)")
    elif value not in (None, 0, 0.0):
        raise UserError(f"--mode ablate sets the features to 0; drop --value {value} or use --mode clamp")
    if not 1 <= n <= MAX_N:
        raise UserError(f"--n must be between 1 and {MAX_N}, got {n}")
    if prompt not in ("both",) + PROMPTS:
        raise UserError(f"--prompt must be both, safe or risky, got {prompt!r}")
    return float(value) if mode == "clamp" else 0.0


def wilson(k: int, n: int, z: float = 1.96) -> list[float | None]:
    """Wilson score interval for k successes in n trials (None when n = 0)."""
    if n == 0:
        return [None, None]
    from engine.demo.experiment import wilson_interval

    lo, hi = wilson_interval(k, n, z)
    return [max(0.0, lo), min(1.0, hi)]


def arm_stats(decisions: list[dict]) -> dict:
    """Counts, rates over valid decisions and Wilson intervals for one arm of one prompt."""
    n = len(decisions)
    valid = [d for d in decisions if d["valid"]]
    stops = sum(1 for d in valid if d["action"] == "stop")
    bets = sum(1 for d in valid if d["action"] == "bet")
    amounts = [d["bet"] for d in valid if d["action"] == "bet" and d["bet"] is not None]
    nv = len(valid)
    return {
        "n": n, "valid": nv, "invalid": n - nv, "stops": stops, "bets": bets,
        "stop_rate": stops / nv if nv else None, "stop_ci": wilson(stops, nv),
        "bet_rate": bets / nv if nv else None, "bet_ci": wilson(bets, nv),
        "valid_rate": nv / n if n else None, "valid_ci": wilson(nv, n),
        "mean_bet": sum(amounts) / len(amounts) if amounts else None, "n_amounts": len(amounts),
    }


def compare(base: dict, patched: dict) -> dict:
    from engine.demo.experiment import _two_by_two_p

    out = {}
    for what, key in (("stop", "stops"), ("bet", "bets")):
        b, p = base[f"{what}_rate"], patched[f"{what}_rate"]
        out[f"delta_{what}_rate"] = None if b is None or p is None else p - b
        out[f"{what}_p_value"] = (_two_by_two_p(patched[key], patched["valid"], base[key], base["valid"])
                                  if base["valid"] and patched["valid"] else None)
    return out


def run_intervention(cfg: Config, features: list[FeatureId], mode: str, value: float | None, n: int,
                     prompt: str = "both", seed: int = 0, batch_size: int = 16, max_new_tokens: int = 32,
                     device: str | None = None) -> dict:
    import torch

    from engine.audit.parser import parse_decision
    from engine.demo.experiment import set_editor
    from engine.demo.generate import TEMPERATURE, TOP_K, TOP_P, Unembedding, generate
    from engine.model import forward_resid_post, load_model, load_tokenizer, resolve_device, tokenize
    from engine.progress import Progress
    from engine.prototype import validate_feature
    from engine.resources import Timings, peak_memory_gb, reset_peak
    from engine.sae import load_sae

    v = check_request(features, mode, value, n, prompt)
    prompts = list(PROMPTS) if prompt == "both" else [prompt]
    missing = [p for p in prompts if p not in cfg.prompts]
    if missing:
        raise UserError(f"the config has no {missing[0]!r} prompt")
    for f in features:
        validate_feature(cfg, f)
    dev = resolve_device(device or cfg.model.device)
    reset_peak(dev)
    timings = Timings()
    batch_size = max(1, int(batch_size))
    chunks = math.ceil(n / batch_size)
    names = ",".join(str(f) for f in features)
    bar = Progress(1 + len(prompts) * 2 * chunks, f"intervene {names}", unit="batch")
    by_layer: dict[int, list[FeatureId]] = {}
    for f in features:
        by_layer.setdefault(f.layer, []).append(f)
    with timings.phase("load"):
        tok = load_tokenizer(cfg.model)
        model = load_model(cfg.model, dev)
        saes = {l: load_sae(cfg.sae, l, device=dev) for l in sorted(by_layer)}
        edits = {l: set_editor(saes[l], [f.feature_id for f in fs], [v] * len(fs)) for l, fs in by_layer.items()}
        unembed = Unembedding(model)
    bar.update()

    result_prompts: dict[str, dict] = {}
    samples: dict[str, dict] = {}
    with torch.no_grad():
        for pname in prompts:
            text = cfg.prompts[pname]
            ids = tokenize(tok, text, dev)
            res = forward_resid_post(model, ids, sorted(by_layer))
            acts = {}
            for l, fs in by_layer.items():
                idx = torch.as_tensor([f.feature_id for f in fs], device=dev)
                a = saes[l].encode(res[l][0, -1].float())[idx]
                acts.update({str(f): float(x) for f, x in zip(fs, a.tolist())})
            arms = {}
            for arm, edit in (("baseline", None), ("patched", edits)):
                gen = torch.Generator().manual_seed(seed)  # the same stream for both arms
                texts = []
                with timings.phase(f"sample_{arm}"):
                    for s in range(0, n, batch_size):
                        rows = min(batch_size, n - s)
                        out = generate(model, tok, [ids[0].tolist()] * rows, generator=gen,
                                       max_new_tokens=max_new_tokens, unembed=unembed, edit=edit,
                                       stop_at_newlines=STOP_AT_NEWLINES)
                        texts += out.texts
                        bar.update()
                decisions = []
                for t in texts:
                    d = parse_decision(t, pname)
                    decisions.append({"response": t, "action": d.action, "bet": d.bet, "valid": d.valid,
                                      "rule": d.rule})
                arms[arm] = decisions
            base, patched = arm_stats(arms["baseline"]), arm_stats(arms["patched"])
            result_prompts[pname] = {"activation": acts, "baseline": base, "patched": patched,
                                     **compare(base, patched)}
            samples[pname] = arms
    bar.close()
    return with_schema({
        "kind": "intervention",
        "features": [str(f) for f in features],
        "mode": mode,
        "value": v,
        "n": n,
        "seed": seed,
        "prompts": result_prompts,
        "samples": samples,
        "site": "resid_post of each feature's layer, last prompt token, prefill only",
        "decoding": {"temperature": TEMPERATURE, "top_k": TOP_K, "top_p": TOP_P, "max_new_tokens": max_new_tokens,
                     "stop_at_newlines": STOP_AT_NEWLINES},
        "interval": "Wilson score, 95%",
        "metadata": {"model": cfg.model.name_or_path, "sae_source": cfg.sae.source, "device": dev,
                     "dtype": cfg.model.dtype, "batch_size": batch_size,
                     "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "timings_s": timings.as_dict(),
                     "memory_usage_gb": round(peak_memory_gb(dev), 4)},
    })


def main(args: argparse.Namespace, cfg: Config) -> int:
    from engine.schema import intervention_path

    features = parse_feature_list(args.features)
    doc = run_intervention(cfg, features, args.mode, args.value, args.n, args.prompt, args.seed, args.batch_size,
                           args.max_new_tokens)
    name = f"intervene-{'+'.join(doc['features'])}-{args.mode}-{time.strftime('%Y%m%d-%H%M%S')}"
    out = args.out or intervention_path(cfg.cache, name)
    atomic_write_json(out, doc)
    for pname, r in doc["prompts"].items():
        b, p = r["baseline"], r["patched"]
        print(f"{pname}: stop rate {_pct(b['stop_rate'])} -> {_pct(p['stop_rate'])} "
              f"(valid {b['valid']}/{b['n']} -> {p['valid']}/{p['n']})")
    print(f"wrote {out}")
    return 0


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"
