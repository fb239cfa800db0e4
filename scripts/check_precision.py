#!/usr/bin/env python
"""How much bf16 changes the pathway graphs: the engine and the naive baseline in bf16, each
against the engine in float32 on the same weights.

    python scripts/check_precision.py [--scale-down 4] [--targets 48] [--baseline-targets 8] [--write]

A model with LLaMA-3.1-8B's configuration divided by --scale-down (4: 8 layers, d_model 1024,
8,192-wide SAEs) and random weights is built in float32; its bf16 copy is the same weights
rounded. For every (target, prompt) the script compares the node lists with the float32
engine's: the five strongest nodes (same order; same set), the Jaccard index of the node sets,
and the relative error of the five strongest attributions. With --write the table goes into
docs/science.md under "Precision".
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.bench_pathways import pick_targets, random_sae, real_shape_config  # noqa: E402

HEADING = "### bf16 against float32"


def build(scale: int, threads: int):
    import torch
    from transformers import LlamaForCausalLM

    from engine.config import Config
    from engine.fixtures import load_llama3_tokenizer
    from engine.model import forward_resid_post, tokenize

    torch.set_num_threads(threads)
    cfg_m = real_shape_config(scale)
    d, n_layers, d_sae = cfg_m.hidden_size, cfg_m.num_hidden_layers, 32768 // scale
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg_m).eval().requires_grad_(False)
    tok = load_llama3_tokenizer()
    ids = tokenize(tok, Config().prompts["safe"], "cpu")
    with torch.no_grad():
        res = forward_resid_post(model, ids, range(n_layers))
    norms = {l: float(res[l][0, 1:].norm(dim=-1).mean()) for l in range(n_layers)}
    return model, tok, norms, (d, n_layers, d_sae)


def sae_factory(norms: dict, d: int, d_sae: int, dtype):
    import torch

    # drawn in float32 and rounded, so both precisions see the same SAE
    return lambda layer: random_sae(layer, d, d_sae, norms[layer], "cpu", dtype, gen_dtype=torch.float32)


def run_engine(model, tok, make_sae, targets, a) -> dict:
    from engine.config import Config
    from engine.pathways.runner import PathwayEngine

    cfg = Config()
    cfg.pathways.n_replay = a.n_replay
    cfg.pathways.top_k_per_layer = a.top_k
    cfg.pathways.replay_mode = "zero"
    eng = PathwayEngine(cfg, model, tok, "cpu")
    eng.sae_loader = make_sae
    eng.encode_prompts(["safe", "risky"], targets)
    out = {}
    for i in range(0, len(targets), 32):
        for f, r in eng.run_chunk(targets[i:i + 32]).items():
            out[f] = {p: [n for n in rec["nodes"] if not n["is_target"]] for p, rec in r["prompts"].items()}
    return out


def run_baseline(model, tok, make_sae, targets, a) -> dict:
    from benchmarks.naive_pathways import naive_pathway
    from engine.config import Config

    prompts = Config().prompts
    saes = {l: make_sae(l) for l in range(max(t.layer for t in targets) + 1)}
    return {str(t): {p: naive_pathway(model, tok, saes, t.layer, t.feature_id, prompts[p], a.top_k, 0.8,
                                      a.n_replay)["nodes"] for p in ("safe", "risky")} for t in targets}


def compare(ref: dict, got: dict) -> dict:
    """Per (target, prompt) against the reference: top-5 in the same order, top-5 as a set,
    Jaccard of the node sets, relative error of the reference's five strongest attributions."""
    def top(ns, k=5):
        return [n["id"] for n in sorted(ns, key=lambda n: -abs(n["attribution"]))[:k]]

    order = sets = 0
    jac, rel = [], []
    for f in got:
        for p in got[f]:
            r, g = ref[f][p], got[f][p]
            order += top(r) == top(g)
            sets += set(top(r)) == set(top(g))
            a, b = {n["id"] for n in r}, {n["id"] for n in g}
            jac.append(len(a & b) / max(1, len(a | b)))
            gv = {n["id"]: n["attribution"] for n in g}
            for n in sorted(r, key=lambda n: -abs(n["attribution"]))[:5]:
                if n["id"] in gv and n["attribution"] != 0:
                    rel.append(abs(gv[n["id"]] - n["attribution"]) / abs(n["attribution"]))
    pairs = sum(len(v) for v in got.values())
    return {"pairs": pairs, "top5_same_order": order, "top5_same_set": sets,
            "mean_jaccard": statistics.fmean(jac) if jac else None,
            "median_rel_err_top5": statistics.median(rel) if rel else None,
            "max_rel_err_top5": max(rel) if rel else None}


def by_depth(ref: dict, got: dict, n_layers: int) -> dict:
    half = n_layers // 2
    lo = {f: v for f, v in got.items() if int(f[1:].split("-")[0]) < half}
    hi = {f: v for f, v in got.items() if int(f[1:].split("-")[0]) >= half}
    return {f"below L{half}": compare(ref, lo) if lo else None, f"L{half} and deeper": compare(ref, hi) if hi else None}


def main() -> int:
    import torch

    from engine.schema import FeatureId

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale-down", type=int, default=4)
    ap.add_argument("--targets", type=int, default=48)
    ap.add_argument("--baseline-targets", type=int, default=8)
    ap.add_argument("--n-replay", type=int, default=0, help="replays do not change the nodes; 0 keeps it fast")
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--write", action="store_true")
    a = ap.parse_args()

    t0 = time.perf_counter()
    model32, tok, norms, (d, n_layers, d_sae) = build(a.scale_down, a.threads)
    model16 = copy.deepcopy(model32).to(torch.bfloat16)
    targets = sorted((FeatureId.parse(t) for t in pick_targets(a.targets, n_layers, d_sae, 0)),
                     key=lambda t: (t.layer, t.feature_id))
    step = max(1, len(targets) // max(1, a.baseline_targets))
    base_targets = targets[::step][:a.baseline_targets]
    s32, s16 = sae_factory(norms, d, d_sae, torch.float32), sae_factory(norms, d, d_sae, torch.bfloat16)
    eng32 = run_engine(model32, tok, s32, targets, a)
    eng16 = run_engine(model16, tok, s16, targets, a)
    base32 = run_baseline(model32, tok, s32, base_targets, a)
    base16 = run_baseline(model16, tok, s16, base_targets, a)
    sub = lambda res: {str(t): res[str(t)] for t in base_targets}  # noqa: E731
    r = {
        "shape": {"n_layers": n_layers, "d_model": d, "d_sae": d_sae, "targets": len(targets),
                  "baseline_targets": len(base_targets), "top_k": a.top_k},
        "baseline_fp32_vs_engine_fp32": compare(sub(eng32), base32),
        "engine_bf16_vs_fp32": compare(eng32, eng16),
        "engine_bf16_vs_fp32_by_depth": by_depth(eng32, eng16, n_layers),
        "engine_bf16_vs_fp32_baseline_targets": compare(sub(eng32), sub(eng16)),
        "baseline_bf16_vs_engine_fp32": compare(sub(eng32), base16),
        "baseline_bf16_vs_engine_bf16": compare(sub(eng16), base16),
        "seconds": time.perf_counter() - t0,
    }
    print(json.dumps(r, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=1))
    if a.write:
        write(r, "python scripts/check_precision.py " + " ".join(sys.argv[1:]))
    return 0


def write(r: dict, cmd: str) -> None:
    from benchmarks.doc import write_section

    def row(name, c):
        if not c:
            return ""
        return (f"| {name} | {c['pairs']} | {c['top5_same_order']} | {c['top5_same_set']} | {c['mean_jaccard']:.3f} | "
                f"{c['median_rel_err_top5']:.1e} | {c['max_rel_err_top5']:.1e} |\n")

    s = r["shape"]
    depth = r["engine_bf16_vs_fp32_by_depth"]
    text = (f"{HEADING}\n\n`{cmd}` (CPU, {r['seconds']:.0f} s): LLaMA-3.1-8B's configuration scaled down to "
            f"{s['n_layers']} layers, d_model {s['d_model']}, {s['d_sae']:,}-wide SAEs, random weights; the bf16 "
            f"model is the float32 one rounded. Reference: the engine in float32. Per (target, prompt): the five "
            f"strongest nodes in the same order / as the same set, the Jaccard index of the node sets, and the "
            f"relative error of the reference's five strongest attributions.\n\n"
            "| compared with the float32 engine | pairs | top-5 same order | top-5 same set | mean Jaccard | "
            "median rel. error | max rel. error |\n|---|---:|---:|---:|---:|---:|---:|\n"
            + row("baseline, float32", r["baseline_fp32_vs_engine_fp32"])
            + row("engine, bf16 (all targets)", r["engine_bf16_vs_fp32"])
            + "".join(row(f"engine, bf16, targets {k}", v) for k, v in depth.items())
            + row("engine, bf16 (the baseline's targets)", r["engine_bf16_vs_fp32_baseline_targets"])
            + row("baseline, bf16 (the same targets)", r["baseline_bf16_vs_engine_fp32"]) + "\n")
    write_section(HEADING, text, path=ROOT / "docs" / "science.md")


if __name__ == "__main__":
    sys.exit(main())
