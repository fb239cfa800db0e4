"""Cost of the tokens step's graph-node views (issue 14 item 2), side by side in one run.

`python scripts/bench_node_views.py --cache DIR [--config FILE] [--repeats 2] [--write]`

DIR is a cache with a selection and pathways (e.g. a copy of the demo's). Each side runs
`engine.tokens.run.run_tokens` in its own child process with one torch thread, alternating:
"selected only" with pathways/nodes.parquet moved aside (what the step did before), and "with
graph nodes" with tokens/nodes/ emptied first (so every node is computed, none skipped). Reports
the step's own wall time (model loading included) and the compute phases (load phases excluded).
--write puts the table into docs/benchmarks.md under "Tokens (step 4)".
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD = """
import json, sys, time, torch
torch.set_num_threads(1)
from engine.config import load_config
from engine.tokens.run import run_tokens
cfg = load_config(sys.argv[1], {"cache_dir": sys.argv[2]})
t = time.perf_counter()
run_tokens(cfg)
wall = time.perf_counter() - t
meta = json.load(open(cfg.cache / "tokens" / "index.json"))["metadata"]
print(json.dumps({"wall": wall, "timings": meta["timings_s"], "nodes": meta.get("graph_nodes", 0)}))
"""
LOAD = {"load_tokenizer", "load_saes", "load_model"}


def one(config: Path, cache: Path, with_nodes: bool) -> dict:
    nodes = cache / "pathways" / "nodes.parquet"
    aside = cache / "pathways" / ".nodes.parquet.aside"
    shutil.rmtree(cache / "tokens" / "nodes", ignore_errors=True)
    if not with_nodes:
        nodes.rename(aside)
    try:
        out = subprocess.run([sys.executable, "-c", CHILD, str(config), str(cache)], cwd=str(ROOT), check=True,
                             capture_output=True, text=True, env={"ENGINE_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1",
                                                                   "PATH": "/usr/bin:/bin"}).stdout
    finally:
        if aside.exists():
            aside.rename(nodes)
    r = json.loads(out.strip().splitlines()[-1])
    r["compute"] = sum(v for k, v in r["timings"].items() if k not in LOAD)
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", required=True)
    ap.add_argument("--config", default=None, help="default: <cache>/demo/config.yaml")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--write", action="store_true")
    a = ap.parse_args()
    cache = Path(a.cache).resolve()
    config = Path(a.config or cache / "demo" / "config.yaml").resolve()
    runs = {False: [], True: []}
    for _ in range(a.repeats):
        for side in (False, True):
            runs[side].append(one(config, cache, side))
    best = {s: min(r, key=lambda x: x["compute"]) for s, r in runs.items()}
    n_sel = len(json.loads((cache / "features" / "causal_features.json").read_text())["features"])
    n_nodes = best[True]["nodes"]
    rows = [("selected features only (before)", best[False], n_sel), ("selected + every graph node", best[True],
                                                                       n_sel + n_nodes)]
    table = ["| | features with views | step wall time | compute phases |", "|---|---|---|---|"]
    for name, r, n in rows:
        table.append(f"| {name} | {n} | {r['wall']:.2f} s | {r['compute']:.2f} s |")
    ratio_c = best[True]["compute"] / best[False]["compute"]
    ratio_w = best[True]["wall"] / best[False]["wall"]
    text = (f"### Graph-node views\n\n`python scripts/bench_node_views.py --cache {a.cache} --repeats {a.repeats}` "
            f"on {platform.machine()} (2 shared cores, one torch thread), {time.strftime('%Y-%m-%d')}: "
            f"{n_sel} selected features whose pathways hold {n_nodes} other nodes; best of {a.repeats} alternating "
            "runs per side, each in its own child process.\n\n" + "\n".join(table) +
            f"\n\nWith every graph node the compute phases take {ratio_c:.2f}x and the whole step {ratio_w:.2f}x "
            "the time of the selected features alone: the nodes reuse the step's forward passes (prompts and "
            "sampled responses) and add only their encoder rows to each layer's bank, their rows to the "
            "logit-lens product and one small JSON each; interventions and behavioural words stay per "
            "selected feature. The step's wall time is mostly loading the 128k-token tokenizer and the model, "
            "and varies with the other jobs on the machine more than with the nodes.\n")
    print(text)
    if a.write:
        from benchmarks.doc import write_section

        write_section("Graph-node views", text, parent="Tokens (step 4)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
