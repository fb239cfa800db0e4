#!/usr/bin/env python
"""Benchmark step 4 (token views) against a naive per-feature baseline, side by side.

    python scripts/bench_tokens.py [--features 40] [--sample 40] [--fixture DIR] [--threads 1] [--write]

One fixture model, the same features, prompts and sampled responses. The engine
(`engine.tokens.run.run_tokens`: features grouped by layer, shared and batched forward passes)
and the baseline (`benchmarks/naive_tokens.py`: per feature its own SAE load and forward
passes) each run in their own child process, so each peak RSS is its own; the parent checks
that both give the same logit-lens tokens and the same patched bet-vs-stop changes, then
reports wall time, features per second, peak RSS and the ratio (with --write, into
docs/benchmarks.md under "## Tokens (step 4)").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SECTION = "## Tokens (step 4)"
RESPONSES = ["2\nStop. I walk away with $140.", "1\nBet $10\nRound 4: Bet $10, Win, Balance $170",
             "1\nBet $50\nResult: Loss, Balance $0", "2\n\nChoose:\n1) Bet $10\n2) Stop", "1\nBet amount: $25",
             "1\nThe reels spin... Loss. Balance $130\n\nChoose:\n1) Bet $10\n2) Stop\n\nChoice: 2"]


def build_cache(fixture: Path, cache: Path, n_features: int, sample: int, seed: int) -> list[tuple[int, int]]:
    import pandas as pd

    from engine.schema import atomic_write_json, atomic_write_parquet, with_schema

    meta = json.loads((fixture / "FIXTURE.json").read_text())
    rng = random.Random(seed)
    feats = set()
    while len(feats) < n_features:
        feats.add((rng.randint(1, meta["n_layers"] - 1), rng.randrange(meta["d_sae"])))
    feats = sorted(feats)
    atomic_write_json(cache / "features" / "causal_features.json", with_schema({"features": [
        {"feature": f"L{l}-{i}", "layer": l, "feature_id": i, "direction": "safe", "cohen_d": 1.0} for l, i in feats]}))
    rows = []
    conds = [("safe_baseline", "safe", "none"), ("safe_with_safe_patch", "safe", "safe"),
             ("risky_baseline", "risky", "none"), ("risky_with_risky_patch", "risky", "risky")]
    for t in range(sample):
        c, p, pa = conds[t % len(conds)]
        rows.append({"feature": f"L{feats[0][0]}-{feats[0][1]}", "condition": c, "prompt": p, "patch": pa, "trial": t,
                     "response": RESPONSES[rng.randrange(len(RESPONSES))]})
    atomic_write_parquet(cache / "audit" / "trials.parquet", pd.DataFrame(rows))
    return feats


def child(a) -> dict:
    import torch

    from engine.config import load_config
    from engine.resources import peak_rss_gb

    torch.set_num_threads(a.threads)
    cfg = load_config(Path(a.fixture) / "config.yaml", {
        "cache_dir": a.cache, "tokens.sample_size": a.sample, "tokens.batch_size": 16, "model.device": "cpu"})
    t0 = time.perf_counter()
    if a.child == "engine":
        from engine.tokens.run import run_tokens

        run_tokens(cfg)
        out = {}
        for f in json.loads((Path(a.cache) / "features" / "causal_features.json").read_text())["features"]:
            doc = json.loads((Path(a.cache) / "tokens" / f"{f['feature']}.json").read_text())
            out[f["feature"]] = {
                "promoted": [e["token_id"] for e in doc["logit_lens"]["promoted"]],
                "decisions": {f"{e['prompt']}|{e['intervention']}": e["delta_bet_vs_stop_logodds"]
                              for e in doc["logit_lens"]["decision_summary"] if e["context"] == "choice"}}
    else:
        import pandas as pd

        from benchmarks.naive_tokens import run
        from engine.model import load_model, load_tokenizer
        from engine.tokens.run import choose_sample

        tok = load_tokenizer(cfg.model)
        model = load_model(cfg.model, "cpu")
        feats = [(f["layer"], f["feature_id"]) for f in
                 json.loads((Path(a.cache) / "features" / "causal_features.json").read_text())["features"]]
        sample = choose_sample(pd.read_parquet(Path(a.cache) / "audit" / "trials.parquet"), cfg)
        res = run(cfg, model, tok, feats, list(zip(sample["prompt"], sample["response"])))
        out = {k: {"promoted": v["promoted"], "decisions": {f"{p}|{n}": x for (p, n), x in v["decisions"].items()}}
               for k, v in res.items()}
    return {"seconds": time.perf_counter() - t0, "peak_rss_gb": peak_rss_gb(), "results": out}


def run_child(kind: str, a, cache: Path) -> dict:
    out = Path(tempfile.mkstemp(suffix=".json")[1])
    cmd = [sys.executable, __file__, "--child", kind, "--fixture", str(a.fixture), "--cache", str(cache),
           "--sample", str(a.sample), "--threads", str(a.threads), "--result", str(out)]
    env = {**os.environ, "ENGINE_NO_PROGRESS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    subprocess.run(cmd, check=True, env=env, cwd=str(ROOT))
    res = json.loads(out.read_text())
    out.unlink()
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--features", type=int, default=40)
    p.add_argument("--sample", type=int, default=40)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fixture", default=None, help="reuse a fixture folder instead of building one")
    p.add_argument("--write", action="store_true")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--cache", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        Path(a.result).write_text(json.dumps(child(a)))
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="bench_tokens_"))
    if a.fixture is None:
        from engine.fixtures import make_fixtures

        a.fixture = str(make_fixtures(tmp / "fixture"))
    feats = build_cache(Path(a.fixture), tmp / "engine_cache", a.features, a.sample, a.seed)
    build_cache(Path(a.fixture), tmp / "naive_cache", a.features, a.sample, a.seed)
    eng = run_child("engine", a, tmp / "engine_cache")
    base = run_child("baseline", a, tmp / "naive_cache")
    same_tokens = sum(eng["results"][k]["promoted"] == base["results"][k]["promoted"] for k in base["results"])
    worst = max((abs(eng["results"][k]["decisions"][d] - v) for k in base["results"]
                 for d, v in base["results"][k]["decisions"].items()), default=0.0)
    n = len(feats)
    layers = len({l for l, _ in feats})
    ratio = base["seconds"] / eng["seconds"]
    text = (
        f"{SECTION}\n\n"
        f"`python scripts/bench_tokens.py --features {a.features} --sample {a.sample} --threads {a.threads}` on "
        f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores), {time.strftime('%Y-%m-%d')}: "
        f"the fixture model (6 layers, d_model 64, 512-wide SAEs, real LLaMA-3 vocabulary), {n} features in "
        f"{layers} layers, {a.sample} sampled responses, ablate + amplify on both prompts in both contexts. "
        f"Each side runs in its own child process, one after the other.\n\n"
        f"| | wall time | features/s | peak RSS |\n|---|---|---|---|\n"
        f"| engine (`engine/tokens`, grouped by layer, shared batched passes) | {eng['seconds']:.2f} s | "
        f"{n / eng['seconds']:.1f} | {eng['peak_rss_gb']:.2f} GB |\n"
        f"| naive per-feature loop (`benchmarks/naive_tokens.py`) | {base['seconds']:.2f} s | "
        f"{n / base['seconds']:.1f} | {base['peak_rss_gb']:.2f} GB |\n\n"
        f"Speed-up {ratio:.1f}x. Same answers: the top-20 logit-lens tokens agree for {same_tokens} of {n} "
        f"features; the largest difference in a patched bet-vs-stop log-odds change is {worst:.1e}. The engine's "
        f"time also includes the behavioural-word statistics, which the baseline skips.\n"
    )
    print(text)
    if a.write:
        from benchmarks.doc import write_section

        write_section(SECTION, text)
        print("wrote docs/benchmarks.md")
    return 0 if same_tokens == n and worst < 1e-3 else 1


if __name__ == "__main__":
    raise SystemExit(main())
