"""Step 4: `python -m engine tokens --config FILE [--features L3-17,...] [--out DIR]`.

Three views per selected feature (formulas in docs/tokens.md):
- output tokens: the logit lens (decoder direction x final RMSNorm weight through the
  unembedding) and the change in decision-token log-probabilities when the feature is
  patched at the last prompt token;
- input tokens: the activation on every prompt token, and the top-activating response
  tokens (with context) over a seeded sample of logged responses;
- behavioural words: log-odds ratios with an informative Dirichlet prior, z, p and BH q
  for each patched condition against its baseline.

Writes `<cache>/tokens/<feature>.json`, `tokens/index.json` and one Parquet table per view.
Torch is imported only inside `main` (the CLI parser imports this module).
"""

from __future__ import annotations

import argparse

from engine.config import Config


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--features", default=None,
                   help="only these features (comma-separated, need not be selected); writes their JSON only")
    p.add_argument("--out", default=None, help="with --features: write the JSON files here instead of <cache>/tokens/")


def main(args: argparse.Namespace, cfg: Config) -> int:
    from engine.errors import UserError
    from engine.manifest import record_step
    from engine.schema import parse_feature_list
    from engine.tokens.run import run_tokens

    only = parse_feature_list(args.features) if getattr(args, "features", None) else None
    if getattr(args, "out", None) and not only:
        raise UserError("--out needs --features (the full step always writes into the cache)")
    if only:  # a live or partial run: per-feature JSON only, no tables, no manifest entry
        res = run_tokens(cfg, only=only, out_dir=args.out, write_tables=False)
    else:
        with record_step(cfg.cache, "tokens", device=cfg.model.device, cfg=cfg,
                         command=f"python -m engine tokens --config {cfg.source_path or 'FILE'}") as rec:
            res = run_tokens(cfg)
            rec["outputs"] = res["files"][-6:] if len(res["files"]) > 6 else res["files"]
            rec["summary"] = {"n_features": res["n_features"], "tables": res.get("tables", {})}
    print(f"tokens: {res['n_features']} feature(s)")
    for f in res["files"][-7:]:
        print(f"wrote {f}")
    if len(res["files"]) > 7:
        print(f"(and {len(res['files']) - 7} more in {res['out_dir']})")
    return 0
