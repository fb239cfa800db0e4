"""`python -m engine status --config FILE [--json]`: the pipeline's state from the manifest.

For each step 0-5: its status (done, stale, missing, failed) and why, when it last ran, how
long it took, its peak memory (CUDA max allocated on a GPU, peak RSS on CPU) and device, and
whether `python -m engine run` would run it now (a step runs when it is not done or when an
earlier step runs). Then the command that brings the cache up to date. Importing this module
pulls in neither torch nor pandas, so the explorer can call `pipeline_status` too.
"""

from __future__ import annotations

import argparse
import json
import shlex

from engine.config import Config

STEP_TITLES = {
    "audit": "0 audit",
    "select": "1 select",
    "prototype": "2 prototype",
    "pathways": "3 pathways",
    "tokens": "4 tokens",
    "integrate": "5 integrate",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the status as JSON")


def config_arg(cfg: Config) -> str:
    """`FILE [--cache DIR]`: the config, plus the cache folder when it is not the file's own."""
    from pathlib import Path

    from engine.config import load_config

    text = shlex.quote(cfg.source_path) if cfg.source_path else "config.yaml"
    try:
        own = load_config(cfg.source_path).cache if cfg.source_path else None
    except Exception:
        own = None
    if own is None or Path(own).resolve() != Path(cfg.cache).resolve():
        text += f" --cache {shlex.quote(str(cfg.cache))}"
    return text


def default_command(cfg: Config, step: str, c: str | None = None) -> str:
    c = c or config_arg(cfg)
    if step == "prototype":  # the pipeline picks the strongest selected feature
        return f"python -m engine run --config {c} --only prototype"
    return f"python -m engine {step} --config {c}"


def pipeline_status(cfg: Config, manifest: dict | None = None) -> list[dict]:
    """One dict per step: step, status, reason, will_run, and the manifest's timing fields."""
    from engine.manifest import PIPELINE_STEPS, read_manifest, step_state

    from engine.manifest import clean_manifest

    manifest = clean_manifest(manifest) if manifest is not None else read_manifest(cfg.cache)
    c = config_arg(cfg)
    rows, cascade = [], None
    for step in PIPELINE_STEPS:
        status, reason = step_state(cfg, step, manifest)
        entry = manifest.get("steps", {}).get(step) or {}
        will_run = status != "done" or cascade is not None
        rows.append({
            "step": step,
            "status": status,
            "reason": reason if status != "done" else (f"after {cascade}" if cascade else ""),
            "will_run": will_run,
            "started": entry.get("started"),
            "seconds": entry.get("seconds"),
            "peak_memory_gb": entry.get("peak_memory_gb"),
            "memory_kind": entry.get("memory_kind"),
            "device": entry.get("device"),
            "error": entry.get("error"),
            "command": default_command(cfg, step, c),
            "recorded_command": entry.get("command"),
        })
        if will_run and cascade is None:
            cascade = step
    return rows


def next_command(cfg: Config, rows: list[dict]) -> str | None:
    first = next((r["step"] for r in rows if r["will_run"]), None)
    if first is None:
        return None
    c = config_arg(cfg)
    return f"python -m engine run --config {c}" + ("" if first == rows[0]["step"] else f" --from {first}")


def _fmt_seconds(s) -> str:
    if s is None:
        return "–"
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


def _fmt_mem(gb, kind) -> str:
    if gb is None:
        return "–"
    return f"{gb:.2f} GB {'GPU' if kind and 'cuda' in kind else 'RSS'}"


def format_status(cfg: Config, rows: list[dict], corrupt: bool = False, problem: str | None = None,
                  problems: list[str] | None = None) -> str:
    lines = [f"cache {cfg.cache}" + (f" (config {cfg.source_path})" if cfg.source_path else "")]
    if corrupt:
        lines.append("warning: the manifest could not be read" + (f" ({problem})" if problem else "")
                     + "; every step shows as missing")
    for p in problems or []:
        lines.append(f"warning: {p} (ignored)")
    header = ("step", "status", "last run", "time", "peak memory", "device", "next run")
    table = [header]
    for r in rows:
        table.append((STEP_TITLES[r["step"]], r["status"], (r["started"] or "–").replace("T", " "),
                      _fmt_seconds(r["seconds"]), _fmt_mem(r["peak_memory_gb"], r["memory_kind"]),
                      r["device"] or "–", "run" if r["will_run"] else "skip"))
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    for row in table:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    notes = [r for r in rows if r["status"] != "done"]
    if notes:
        lines.append("")
    for r in notes:
        lines.append(f"{r['step']}: {r['status']}: {r['reason']}")
        lines.append(f"  make it: {r['command']}")
    nxt = next_command(cfg, rows)
    lines.append("")
    lines.append(f"to bring everything up to date: {nxt}" if nxt else "everything is up to date")
    return "\n".join(lines)


def main(args: argparse.Namespace, cfg: Config) -> int:
    from engine.manifest import read_manifest

    manifest = read_manifest(cfg.cache)
    rows = pipeline_status(cfg, manifest)
    if getattr(args, "json", False):
        print(json.dumps({"cache": str(cfg.cache), "config": cfg.source_path, "steps": rows,
                          "next_command": next_command(cfg, rows), "manifest_corrupt": bool(manifest.get("corrupt")),
                          "manifest_problems": ([manifest["problem"]] if manifest.get("problem") else [])
                          + list(manifest.get("problems") or [])},
                         indent=1))
    else:
        print(format_status(cfg, rows, corrupt=bool(manifest.get("corrupt")), problem=manifest.get("problem"),
                            problems=manifest.get("problems")))
    return 0
