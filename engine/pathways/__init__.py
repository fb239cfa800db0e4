"""Step 3: `python -m engine pathways` — gradient attribution + replay validation per target.

    python -m engine pathways --config FILE [--features L3-17,L5-2 | --limit N] [--shard i/n]
                              [--device cuda] [--force]

Targets come from step 1's `features/causal_features.json` unless `--features` names them.
Under `torchrun --nproc_per_node N -m engine pathways ...` each rank takes a disjoint
share of the targets (as `--shard RANK/WORLD_SIZE`) and the index merges them all.
The computation is in `runner.py` and `compute.py`; the formulas are in docs/science.md.
"""

from __future__ import annotations

import argparse

from engine.config import Config
from engine.errors import UserError
from engine.schema import CAUSAL_FEATURES, FeatureId, parse_feature_list, read_artifact


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--features", default=None, help="comma-separated targets, e.g. L3-17,L5-2 (default: step 1's selection)")
    p.add_argument("--limit", type=int, default=None, help="at most N targets (default pathways.limit)")
    p.add_argument("--shard", default=None, help="i/n: process the i-th of n disjoint shares of the targets")
    p.add_argument("--force", action="store_true", help="recompute targets that are already done")
    p.add_argument("--chunk-size", type=int, default=None, help="targets per chunk (default pathways.chunk_size)")


def selected_targets(cfg: Config) -> list[FeatureId]:
    sel = read_artifact(cfg.cache / CAUSAL_FEATURES, "feature selection",
                        rebuild="python -m engine select --config FILE")
    feats = sel.get("features")
    if not isinstance(feats, list):
        raise UserError(f"{cfg.cache / CAUSAL_FEATURES} has no 'features' list")
    out = []
    for i, f in enumerate(feats):
        try:
            out.append(FeatureId.parse(f["feature"]))
        except (KeyError, TypeError, UserError) as exc:
            raise UserError(f"{cfg.cache / CAUSAL_FEATURES}: features[{i}] has no valid feature id ({exc})") from None
    return out


def validate_targets(cfg: Config, targets: list[FeatureId]) -> None:
    """Every target must exist in the model and its SAE before any work starts."""
    from engine.model import load_config_only
    from engine.sae import sae_width

    depth = int(load_config_only(cfg.model).num_hidden_layers)
    widths: dict[int, int] = {}
    for t in targets:
        if not 0 <= t.layer < depth:
            raise UserError(f"feature {t}: layer {t.layer} is outside the model (layers 0..{depth - 1})")
        if t.layer not in widths:
            widths[t.layer] = sae_width(cfg.sae, t.layer)[1]
        if not 0 <= t.feature_id < widths[t.layer]:
            raise UserError(f"feature {t}: index {t.feature_id} is outside the SAE (0..{widths[t.layer] - 1})")


def main(args: argparse.Namespace, cfg: Config) -> int:
    import os

    from engine.manifest import fingerprint, record_step
    from engine.model import resolve_device
    from engine.pathways import index as I
    from engine.pathways.runner import parse_shard, run, shard_of
    from engine.progress import Progress

    targets = parse_feature_list(args.features) if args.features else selected_targets(cfg)
    limit = args.limit if args.limit is not None else cfg.pathways.limit
    if limit is not None:
        targets = targets[:limit]
    shard = parse_shard(args.shard)
    targets = shard_of(sorted(targets, key=lambda t: (t.layer, t.feature_id)), shard)
    if not targets:
        # an empty selection (no causal feature) or an empty shard is a result, not an error
        from engine.pathways import index as I

        index = I.rebuild(cfg.cache, cfg.export)
        print(f"pathways: no targets to process (empty selection or shard); {index['n_targets']} targets in the index")
        print(f"wrote {cfg.cache / 'pathways'}")
        return 0
    validate_targets(cfg, targets)
    device = cfg.model.device
    if os.environ.get("LOCAL_RANK") is not None and resolve_device(device).startswith("cuda"):
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    device = resolve_device(device)
    # only a run over the whole selection is the pipeline's step; shards and --features runs
    # (e.g. a live job) are recorded under their own names
    step = "pathways" if not shard else f"pathways[{shard[0]}/{shard[1]}]"
    if args.features:
        step = "pathways[features]"
    inputs = {"selection": fingerprint([cfg.cache / CAUSAL_FEATURES])} if not args.features else {"features": args.features}
    with record_step(cfg.cache, step, device=device, inputs=inputs, config_hash=cfg.hash("model", "sae", "pathways"),
                     cfg=cfg if step == "pathways" else None,
                     command="python -m engine pathways" + (f" --features {args.features}" if args.features else "")) as rec:
        with Progress(len(targets), "pathways", unit="target") as bar:
            summary = run(cfg, targets, device, force=args.force, chunk_size=args.chunk_size, progress=bar)
        index = I.rebuild(cfg.cache, cfg.export)
        rec["outputs"] = [str(cfg.cache / "pathways")]
        rec["summary"] = {k: summary[k] for k in ("requested", "skipped_done", "computed")}
    print(f"pathways: {summary['computed']} computed, {summary['skipped_done']} already done, "
          f"{index['n_targets']} targets in the index")
    print(f"wrote {cfg.cache / 'pathways'}")
    return 0
