"""Fuzz the audit: Hypothesis generates study-shaped corpora (both checkpoint schemas and
response logs), damages one file in an arbitrary way and checks the property of
tests/audit_fuzz.py (no crash, the damaged file named, every other file counted as on the
clean corpus). Prints how many corruptions were tried, by kind, and how many failed;
`--write-doc` records them in docs/benchmarks.md ("Audit fuzzing").

    python scripts/fuzz_audit.py --examples 2000 [--seed N] [--write-doc]
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("ENGINE_NO_PROGRESS", "1")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=None, help="fixed seed (default: random)")
    ap.add_argument("--write-doc", action="store_true")
    args = ap.parse_args(argv)

    from hypothesis import given, seed, settings
    from hypothesis import strategies as st

    import audit_fuzz as AF

    tried: collections.Counter = collections.Counter()
    failures: list[str] = []
    work = Path(tempfile.mkdtemp(prefix="fuzz-audit-"))
    n = [0]

    @settings(settings.get_profile("audit-fuzz"), max_examples=args.examples, database=None)
    @given(st.data())
    def prop(data):
        corpus = data.draw(AF.corpora())
        damage = data.draw(AF.damages(corpus))
        n[0] += 1
        tried[damage.kind] += 1
        try:
            AF.check(corpus, damage, work / "ex")
        except BaseException as exc:
            failures.append(f"{damage.kind}: {damage.what}: {type(exc).__name__}: {exc}"[:400])
            raise

    if args.seed is not None:
        prop = seed(args.seed)(prop)
    t0 = time.perf_counter()
    ok = True
    try:
        prop()
    except BaseException as exc:  # noqa: BLE001 - reported below
        ok = False
        print(f"FAILED: {type(exc).__name__}: {str(exc)[:2000]}", file=sys.stderr)
    secs = time.perf_counter() - t0
    total = sum(tried.values())
    print(f"fuzz_audit: {total} generated corruptions tried in {secs:.0f} s; "
          f"{len(failures)} broke the property" + ("" if ok else " (the first is shrunk and shown above)"))
    for k in AF.KINDS:
        print(f"  {k:13s} {tried[k]:5d}")
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    if args.write_doc and ok:
        from benchmarks.doc import write_section

        rows = "\n".join(f"| {k} | {AF.KIND_TEXT[k]} | {tried[k]} |" for k in AF.KINDS)
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        write_section("### Audit fuzzing", f"""### Audit fuzzing

`python scripts/fuzz_audit.py --examples {args.examples}` ({dt.date.today().isoformat()}, {platform.machine()},
{os.cpu_count()} cores, Python {platform.python_version()}, load average {load:.1f}): Hypothesis generated
{total} study-shaped corpora (1-3 processes, Run A flat or Run B nested checkpoints, cumulative saves,
response logs) and damaged one file of each in one of the ways below (`tests/audit_fuzz.py`). **None
crashed** and none broke the property: the audit finished and wrote a complete folder, the damaged
file was named in the problems (or, for edits that may be harmless, its counts were unchanged), and
every other file's records and valid records were counted exactly as on the clean corpus.
{secs:.0f} s in all. CI runs the same property on a fixed-seed profile (`audit-ci`, 40 examples, derandomized).

| damage | what | corruptions tried |
|---|---|---:|
{rows}
| **all** | | **{total}** |
""", parent="## Audit (step 0)")
        print("wrote docs/benchmarks.md")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
