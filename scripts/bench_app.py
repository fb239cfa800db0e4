"""Explorer speed on a full-size cache: every page's script run under Streamlit's AppTest.

    python scripts/bench_app.py [--cache DIR] [--runs 5] [--out FILE]

Builds the `full` synthetic cache of tests/cache_factory.py (1,550 causal features with a
pathway file each, 1.8 million audited trials) unless --cache names one. For each page it
times the first run (cold: files read, tables built) and then `--runs` warm reruns (what a
click costs), side by side with the baseline of an explorer without caches, where every
run re-reads and rebuilds everything (the explorer's caches cleared before each run).
Prints a Markdown table (and writes it to --out).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def clear_caches() -> None:
    """Forget everything the explorer cached (the no-cache baseline)."""
    from explorer import context, data, views

    for fn in (data._json_file, data._parquet, data._feature_frame, data._index_frame, data._feature_files, context._load):
        fn.cache_clear()
    data._OVERVIEW.clear()
    data._STATUS_MEMO.clear()
    views._PATHWAYS.clear()
    views._LABELS.clear()
    views._SUGGESTED.clear()
    views._DOWNLOADS.clear()
    views._AUDIT.clear()


def build(config: Path, cache: Path) -> None:
    """The full cache, written by another process so its memory does not count here."""
    import subprocess

    code = ("import sys; sys.path[:0] = [sys.argv[1], sys.argv[1] + '/tests']; from cache_factory import make_cache; "
            "from engine.config import load_config; make_cache(sys.argv[3], 'full', seed=0, cfg=load_config(sys.argv[2]))")
    subprocess.run([sys.executable, "-c", code, str(ROOT), str(config), str(cache)], check=True)


def page_runs(config: Path, cache: Path, page: str | None, params: dict, state: dict, runs: int,
              baseline: bool) -> tuple[float, list[float]]:
    from streamlit.testing.v1 import AppTest

    sys.argv = ["app.py", "--config", str(config), "--cache", str(cache)]
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    if page:
        at.switch_page(page)
    for k, v in params.items():
        at.query_params[k] = v
    clear_caches()
    t = time.perf_counter()
    at.run()
    first = time.perf_counter() - t
    if at.exception:
        raise SystemExit(f"{page}: {at.exception[0].value}")
    for k, v in state.items():  # e.g. a selected table row
        at.session_state[k] = v
    at.run()
    warm = []
    for _ in range(runs):
        if baseline:
            clear_caches()
        t = time.perf_counter()
        at.run()
        warm.append(time.perf_counter() - t)
        if at.exception:
            raise SystemExit(f"{page}: {at.exception[0].value}")
    return first, warm


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default=None, help="an existing full-size cache (default: build one in a temp folder)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", default=None, help="also write the Markdown table here")
    args = ap.parse_args()
    os.environ.setdefault("STREAMLIT_BROWSER_GATHER_USAGE_STATS", "false")

    tmp = Path(tempfile.mkdtemp(prefix="bench_app_"))
    config = tmp / "config.yaml"
    if args.cache:
        cache = Path(args.cache).resolve()
        config.write_text(f"cache_dir: {cache}\n")
        build_s = None
    else:
        cache = tmp / "cache"
        config.write_text("cache_dir: cache\n")
        t = time.perf_counter()
        build(config, cache)
        build_s = time.perf_counter() - t

    import json

    feats = json.loads((cache / "features" / "causal_features.json").read_text())["features"]
    deepest = max(feats, key=lambda f: (f["layer"], f["feature_id"]))["feature"]
    first_tok = sorted(p.stem for p in (cache / "tokens").glob("L*-*.json"))[0]
    n_trials = None
    try:
        import pyarrow.parquet as pq

        n_trials = pq.ParquetFile(cache / "audit" / "trials.parquet").metadata.num_rows
    except OSError:
        pass
    size_mb = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file()) / 1e6
    deep = json.loads((cache / "pathways" / f"{deepest}.json").read_text())["prompts"]
    deep_size = ", ".join(f"{k} {len(r['nodes']) - 1} nodes / {len(r['edges'])} edges" for k, r in deep.items())
    n_pw = len(list((cache / "pathways").glob("L*-*.json")))
    safe_nodes = sorted((n for n in deep["safe"]["nodes"] if not n.get("is_target")), key=lambda n: -abs(n["attribution"]))
    picked, pins = safe_nodes[0]["id"], ",".join(n["id"] for n in safe_nodes[1:4])
    cases = [
        ("Home", None, {}, {}),
        ("Audit", "pages/1_Audit.py", {}, {}),
        ("Features", "pages/2_Features.py", {}, {}),
        ("Features, row selected", "pages/2_Features.py", {},
         {"features_table": {"selection": {"rows": [len(feats) - 1], "columns": []}}}),
        (f"Pathway {deepest} (deepest, default pruning)", "pages/3_Pathway.py", {"feature": deepest}, {}),
        (f"Pathway {deepest}, all nodes", "pages/3_Pathway.py", {"feature": deepest}, {"node_share": 1.0}),
        (f"Pathway {deepest}, risky − safe", "pages/3_Pathway.py", {"feature": deepest, "prompt": "difference"}, {}),
        (f"Pathway {deepest}, node selected, 3 pinned, position layout", "pages/3_Pathway.py",
         {"feature": deepest, "node": picked, "pinned": pins, "x_mode": "position"}, {}),
        ("Tokens", "pages/4_Tokens.py", {"feature": first_tok}, {}),
        ("Live prototype (idle)", "pages/5_Live_prototype.py", {"feature": deepest}, {}),
    ]
    rows = []
    for name, page, params, state in cases:
        first, warm = page_runs(config, cache, page, params, state, args.runs, baseline=False)
        _, base = page_runs(config, cache, page, params, state, args.runs, baseline=True)
        w, b = statistics.median(warm), statistics.median(base)
        rows.append((name, first, w, max(warm), b, b / w))
        print(f"{name}: first {first:.3f}s, warm median {w:.3f}s (max {max(warm):.3f}s), no-cache {b:.3f}s",
              file=sys.stderr)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    lines = [
        f"Cache: {len(feats):,} causal features, {n_pw:,} pathway files, "
        + (f"{n_trials:,} trials, " if n_trials else "") + f"{size_mb:,.0f} MB on disk"
        + (f" (built in {build_s:.0f} s)" if build_s else "") + ".",
        f"Largest graph: {deepest} ({deep_size}); graphs are pruned to app.max_plot_edges before plotting.",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}; {args.runs} warm runs per page (median, max), AppTest in-process.",
        "",
        "| page | first run (s) | warm run, median (s) | warm run, max (s) | no-cache baseline (s) | speed-up |",
        "|---|---|---|---|---|---|",
    ]
    for name, first, w, mx, b, ratio in rows:
        lines.append(f"| {name} | {first:.2f} | {w:.3f} | {mx:.3f} | {b:.3f} | {ratio:.1f}x |")
    lines.append("")
    lines.append(f"Peak RSS of the benchmark process (the UI's own memory, all pages loaded): {peak:.2f} GB.")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
