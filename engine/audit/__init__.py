"""Step 0: audit every checkpoint file and response log (`python -m engine audit`).

Reads the study's checkpoints (three record schemas, cumulative: newest copy wins) and
response logs (not cumulative; restart duplicates: newest copy wins), checks every file and
record without sampling or stopping at the first error, re-parses every response with our
decision parser, recomputes each feature's patching effects, and writes
`<cache>/audit/{data_validation.json, problems.parquet, trials.parquet,
feature_conditions.parquet, feature_effects.parquet, checkpoint_records.parquet, complete.json}`
(built in a temporary folder and swapped in whole, so a failed audit leaves the previous one).
A damaged file is that file's problem rows, never the run's failure. Rules and formulas: docs/audit.md.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoints", default=None, metavar="DIR", help="checkpoint folder (overrides data.checkpoints_dir)")
    p.add_argument("--responses", default=None, metavar="DIR", help="response-log folder (overrides data.responses_dir)")
    p.add_argument("--run", default=None, help="use one run only: its id as printed (e.g. 20251014-20251021), "
                                               "its first date, or its number (1 = oldest)")
    p.add_argument("--since", default=None, help="only files saved at or after this time (YYYYMMDD[_HHMMSS])")
    p.add_argument("--until", default=None, help="only files saved at or before this time (YYYYMMDD[_HHMMSS])")
    p.add_argument("--validate-only", action="store_true",
                   help="only check and count (no re-parse, statistics or tables); writes data_validation.json")


def _print_summary(s: dict, path) -> None:
    rr = s["records_read"]
    print(f"audit: {s['files_read']['checkpoints']} checkpoint files ({rr['checkpoint']} records, "
          f"{s['checkpoint_records']['unique']} unique features), {s['files_read']['responses']} response logs "
          f"({rr['responses']} records)")
    print(f"  valid unique trials {s['valid_unique_trials']}, duplicates {s['duplicates']}, "
          f"invalid records {s['invalid_records']}")
    print(f"  causal (checkpoint verdict) {s['total_causal_features']}, in logs {s['total_response_features']}, "
          f"joinable {s['joinable_features']} ({s['join_rate_percent']:.1f}%)")
    if s.get("recomputed"):
        r = s["recomputed"]
        print(f"  recomputed causal {r['causal']} of {r['tested_features']} "
              f"(safe {r['by_direction']['safe']}, risky {r['by_direction']['risky']}, mixed {r['by_direction']['mixed']}); "
              f"agrees with the checkpoint on {r['agree']} of {r['compared_with_checkpoint']}")
    pc = s.get("parser_comparison")
    if pc:
        print(f"  parser: ours valid {pc['ours_valid']}, study valid {pc['study_valid']}, "
              f"bet/stop disagree on {pc['action_disagree']} of {pc['both_valid']} both-valid trials")
    if len(s.get("runs_found", [])) > 1:
        print("  runs: " + ", ".join(f"{i}: {r['run_id']}" for i, r in enumerate(s["runs_found"], start=1))
              + (f" (using {s['run_selected']})" if s.get("run_selected") else " (mixed: pick one with --run)"))
    if s["problem_counts"]:
        print("  problems: " + ", ".join(f"{k} {v}" for k, v in s["problem_counts"].items()))
    print(f"  validated: {s['validated']}")
    print(path)


def main(args: argparse.Namespace, cfg) -> int:
    from engine.manifest import fingerprint, record_step
    from engine.schema import AUDIT_DIR, AUDIT_VALIDATION

    from engine.audit.run import run_audit

    ck_dir = args.checkpoints or cfg.data.checkpoints_dir
    rs_dir = args.responses or cfg.data.responses_dir
    run = args.run if args.run is not None else cfg.data.run
    since = args.since if args.since is not None else cfg.data.since
    until = args.until if args.until is not None else cfg.data.until
    inputs = {"checkpoints": fingerprint([ck_dir], cfg.data.checkpoint_patterns),
              "responses": fingerprint([rs_dir], cfg.data.response_patterns)}
    cmd = "python -m engine audit" + "".join(
        f" --{k} {v}" for k, v in (("checkpoints", ck_dir), ("responses", rs_dir), ("run", run), ("since", since),
                                   ("until", until)) if v)
    with record_step(cfg.cache, "audit", device="cpu", cfg=cfg, inputs=inputs, config_hash=cfg.hash("data", "audit"),
                     command=cmd) as rec:
        s = run_audit(cfg, checkpoints_dir=ck_dir, responses_dir=rs_dir, run=run, since=since, until=until,
                      full=not args.validate_only)
        rec["outputs"] = [str(cfg.cache / AUDIT_DIR)]
        rec["summary"] = {k: s[k] for k in ("valid_unique_trials", "duplicates", "total_causal_features",
                                            "joinable_features", "validated")}
        rec["summary"]["problems"] = sum(s["problem_counts"].values())
    _print_summary(s, cfg.cache / AUDIT_VALIDATION)
    return 0
