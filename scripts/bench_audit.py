"""Step-0 audit vs the plan's audit_data(), side by side on the same directories.

    python scripts/bench_audit.py [--data DIR] [--work /tmp/bench_audit] [--repeats 2] [--write-doc]

Without --data, writes a full-scale Run-A directory (about 358 checkpoint files, 199 response
logs, 1.8M trial records) under --work. A half-size directory (symlinks to the files of the
first half of the processes) measures how time and memory grow. Each command runs in its
own process; wall time is measured around it and peak RSS is the largest sum of the RSS of
the process and its children (sampled every 10 ms from /proc; the audit forks two workers),
the largest over the repeats; CPU time is user + system of the process and its workers.
Rows: the baseline, our validation and counts (`audit --validate-only`), and the whole step
(re-parse, statistics, Parquet tables). Floor rows on the full directory say what no audit in
Python can beat on this machine: starting Python with the audit's imports, and reading +
decoding every file with msgspec (the typed records the validation decodes, nothing else) in
the audit's two worker processes, beside the baseline's own parse (json.load, one process).
With --write-doc the table replaces the "## Audit (step 0)" section of docs/benchmarks.md
(a "### Reading the figures" part already there is kept).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _tree_rss_kb(pid: int) -> int:
    total = 0
    pids = [pid]
    seen = set()
    while pids:
        p = pids.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            with open(f"/proc/{p}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
            with open(f"/proc/{p}/task/{p}/children") as fh:
                pids.extend(int(x) for x in fh.read().split())
        except (OSError, ValueError):
            continue
    return total


def measure(cmd: list[str], env: dict | None = None, cwd: str | None = None) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=str(cwd or ROOT))
    peak = [0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _tree_rss_kb(proc.pid))
            time.sleep(0.01)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    done.set()
    th.join()
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    rc = os.waitstatus_to_exitcode(status)
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({rc}): {err[-2000:]}")
    return {"wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime, "tree_peak_mb": peak[0] / 1024}


def _json_files(d: Path) -> list[Path]:
    return sorted(d.glob("checkpoint_L*.json")) + sorted((d / "response_logs").glob("*.json"))


def _decode_share(paths: list[str]) -> int:
    from engine.audit.checkpoints import _TOP
    from engine.audit.responses import _DECODER_CHECK, _read

    n = 0
    for p in paths:
        raw = _read(p)
        n += len(_TOP.decode(raw).results) if Path(p).name.startswith("checkpoint_") else len(_DECODER_CHECK.decode(raw))
    return n


def floor_decode(d: Path, workers: int) -> int:
    """Read and decode every file with msgspec in `workers` forked processes, nothing else."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    files = [str(p) for p in _json_files(d)]
    shares = [files[i::workers] for i in range(workers)]
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as ex:
        return sum(ex.map(_decode_share, shares))


def floor_json(d: Path) -> int:
    """Read and json.load every file in one process (the baseline's parse alone)."""
    import json

    n = 0
    for p in _json_files(d):
        with open(p) as fh:
            n += len(json.load(fh))
    return n


def make_half(full: Path, half: Path) -> None:
    """Symlinks to the files of the first half of the processes (by layer range)."""
    import re

    half.mkdir(parents=True, exist_ok=True)
    (half / "response_logs").mkdir(exist_ok=True)
    ranges = sorted({int(m.group(1)) for p in full.glob("checkpoint_L*.json")
                     if (m := re.match(r"checkpoint_L(\d+)_", p.name))})
    keep = set(ranges[: len(ranges) // 2])
    for src_dir, dst_dir, prefix in ((full, half, "checkpoint_L"), (full / "response_logs", half / "response_logs", "responses_L")):
        for p in src_dir.glob(prefix + "*.json"):
            m = re.match(prefix + r"(\d+)_", p.name)
            if m and int(m.group(1)) in keep and not (dst_dir / p.name).exists():
                (dst_dir / p.name).symlink_to(p)


def du_mb(d: Path) -> float:
    return sum(p.resolve().stat().st_size for p in d.rglob("*.json")) / 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None, help="a full-scale experiment directory (default: generate one)")
    ap.add_argument("--work", default="/tmp/bench_audit", help="where generated data and caches go")
    ap.add_argument("--repeats", type=int, default=2, help="runs per command (the fastest is reported)")
    ap.add_argument("--write-doc", action="store_true", help="write the table into docs/benchmarks.md")
    ap.add_argument("--before", default=None, metavar="DIR",
                    help="a checkout of an earlier version (e.g. `git archive <commit> | tar -x -C DIR`): its audit "
                         "runs interleaved with ours, as extra rows")
    ap.add_argument("--floor", choices=["decode", "json", "imports"], help=argparse.SUPPRESS)  # one floor row, run by main
    a = ap.parse_args(argv)
    if a.floor:
        if a.floor == "decode":
            floor_decode(Path(a.data), 2)
        elif a.floor == "json":
            floor_json(Path(a.data))
        else:
            import msgspec  # noqa: F401
            import numpy  # noqa: F401

            import engine.audit.run  # noqa: F401
            import engine.cli  # noqa: F401
        return 0
    load_start = os.getloadavg()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    full = Path(a.data) if a.data else work / "full"
    if not (full / "response_logs").is_dir():
        from engine.experiment_data import generate

        print(f"generating full-scale Run-A data in {full} ...", file=sys.stderr)
        generate(full, "full", seed=0, runs="A")
    half = work / "half"
    make_half(full, half)
    env = {**os.environ, "ENGINE_NO_PROGRESS": "1", "PYTHONPATH": str(ROOT)}
    env_before = env
    py = sys.executable
    results = {}
    for label, d in (("half", half), ("full", full)):
        n_files = len(list(d.glob("checkpoint_L*.json"))) + len(list((d / "response_logs").glob("*.json")))
        cmds = {
            "baseline": [py, "benchmarks/plan_audit.py", str(d), str(d / "response_logs"), str(work / f"plan_{label}.json")],
            "validate": [py, "-m", "engine", "audit", "--checkpoints", str(d), "--responses", str(d / "response_logs"),
                         "--cache", str(work / f"cache_{label}_v"), "--validate-only"],
            "audit": [py, "-m", "engine", "audit", "--checkpoints", str(d), "--responses", str(d / "response_logs"),
                      "--cache", str(work / f"cache_{label}")],
        }
        if a.before:  # the same commands on the earlier code (run from its folder), for "no slower than before"
            env_before = {**env, "PYTHONPATH": str(Path(a.before).resolve())}
            for name in ("validate", "audit"):
                c = list(cmds[name])
                c[c.index("--cache") + 1] = str(work / f"cache_{label}_{name}_before")
                cmds[f"{name}_before"] = c
        if label == "full":  # floors, full size only
            cmds.update({"floor_imports": [py, __file__, "--floor", "imports"],
                         "floor_decode": [py, __file__, "--floor", "decode", "--data", str(d)],
                         "floor_json": [py, __file__, "--floor", "json", "--data", str(d)]})
        best: dict[str, dict] = {}
        peaks: dict[str, float] = {}
        for _ in range(a.repeats):  # interleaved, so load from other processes hits all alike
            for name, cmd in cmds.items():
                m = measure(cmd, env_before, cwd=a.before) if name.endswith("_before") else measure(cmd, env)
                peaks[name] = max(peaks.get(name, 0.0), m["tree_peak_mb"])
                if name not in best or m["wall_s"] < best[name]["wall_s"]:
                    best[name] = m
        for name in best:
            best[name]["peak_mb_max"] = peaks[name]
        val = json.loads((work / f"cache_{label}" / "audit" / "data_validation.json").read_text())
        plan = json.loads((work / f"plan_{label}.json").read_text())
        results[label] = {"files": n_files, "json_mb": du_mb(d), "records": val["records_read"]["responses"],
                          "runs": best, "ours": val, "plan": plan}
    table = render(results, a.repeats, load_start, a.before)
    print(table)
    if a.write_doc:
        write_doc(table)
    return 0


def render(results: dict, repeats: int, load_start: tuple, before: str | None = None) -> str:
    load = os.getloadavg()
    cpu = platform.processor() or platform.machine()
    lines = [
        "## Audit (step 0)",
        "",
        f"`python scripts/bench_audit.py {' '.join(sys.argv[1:]) or '--write-doc'}` (generates a full-scale Run-A "
        "directory with",
        "`scripts/make_experiment_data.py --scale full --runs A` under /tmp, or `--data DIR`; half = the files of the",
        f"first half of the processes). Machine: {os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, "
        f"load average (1 min) {load_start[0]:.1f} at the start and {load[0]:.1f} at the end; "
        f"best of {repeats} interleaved runs.",
        "Peak RSS is the largest sum of RSS over the process tree, sampled every 10 ms (the audit forks 2 workers).",
        "CPU s = user + system time of the process and its workers (less sensitive than wall time to other load;",
        "CPU ratio = baseline CPU / ours: above 1 we do less work in total, and the two workers split it).",
        "",
        "| data | command | wall s | CPU s | peak RSS MB | wall speed-up | CPU ratio |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for label, r in results.items():
        base = r["runs"]["baseline"]["wall_s"]
        base_cpu = r["runs"]["baseline"]["cpu_s"]
        for name, desc in (("baseline", "plan `audit_data()` (json.load, loops)"),
                           ("validate", "ours: validation and counts (`--validate-only`)"),
                           ("validate_before", "the same, code before this round (`--before`)"),
                           ("audit", "ours: whole step (re-parse, statistics, Parquet)"),
                           ("audit_before", "the same, code before this round (`--before`)")):
            if name not in r["runs"]:
                continue
            m = r["runs"][name]
            lines.append(f"| {label}: {r['files']} files, {r['json_mb']:.0f} MB, {r['records']:,} records | {desc} | "
                         f"{m['wall_s']:.2f} | {m['cpu_s']:.2f} | {m['peak_mb_max']:.0f} | "
                         f"{base / m['wall_s']:.1f}x | {base_cpu / m['cpu_s']:.2f} |")
    f = results.get("full")
    if f and "floor_decode" in f["runs"]:
        base = f["runs"]["baseline"]
        for name, desc in (("floor_imports", "floor: start Python, import the audit (numpy, msgspec)"),
                           ("floor_decode", "floor: read + msgspec-decode every file, 2 processes"),
                           ("floor_json", "floor: read + json.load every file, 1 process (the baseline's parse)")):
            m = f["runs"][name]
            lines.append(f"| full | {desc} | {m['wall_s']:.2f} | {m['cpu_s']:.2f} | {m['peak_mb_max']:.0f} | "
                         f"{base['wall_s'] / m['wall_s']:.1f}x | {base['cpu_s'] / m['cpu_s']:.2f} |")
    f, h = results.get("full"), results.get("half")
    if f and h:
        lines += ["", "Growth from half to full size (x{:.2f} records): ".format(f["records"] / h["records"])
                  + ", ".join(f"{n} time x{f['runs'][n]['wall_s'] / h['runs'][n]['wall_s']:.2f}, "
                              f"peak RSS x{f['runs'][n]['peak_mb_max'] / h['runs'][n]['peak_mb_max']:.2f}"
                              for n in ("baseline", "validate", "audit")) + "."]
    if f:
        o, p = f["ours"], f["plan"]
        lines += ["", "Answers on the full directory: the baseline sums the cumulative checkpoints and counts "
                  f"{p['total_causal_features']:,} causal features and {p['total_trials']:,} trials; the audit keeps the newest "
                  f"checkpoint record per feature ({o['total_causal_features']:,} causal of "
                  f"{o['checkpoint_records']['unique']:,}) and the newest copy of each trial "
                  f"({o['valid_unique_trials']:,} unique, {o['duplicates']:,} restart duplicates)."]
    return "\n".join(lines) + "\n"


def write_doc(section: str) -> None:
    from benchmarks.doc import write_section

    # hand-written notes stay below the regenerated table
    write_section("## Audit (step 0)", section, keep="### Reading the figures")


if __name__ == "__main__":
    raise SystemExit(main())
