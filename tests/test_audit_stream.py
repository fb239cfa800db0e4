"""The trial stream's newest-copy rule (TrialStream) against a plain dictionary replay, with
restarts across files, repeats inside a file, trial indices that outgrow the key flags and
the sorted-array fallback."""

from __future__ import annotations

import numpy as np
import pytest

from engine.audit.run import TrialStream

C = 6


def _results(seed: int, n_files: int, max_trial: int):
    """Worker-like results for files of rank n_files-1 (newest) down to 0, in arrival order."""
    rng = np.random.default_rng(seed)
    pool = [f"L{1 + i % 3}-{i}" for i in range(12)]
    out = []
    for rank in range(n_files - 1, -1, -1):
        n = int(rng.integers(0, 40))
        names = list(rng.choice(pool, size=int(rng.integers(1, 5)), replace=False))
        f = rng.integers(0, len(names), n).astype(np.int32)
        c = rng.integers(0, C, n).astype(np.int8)
        t = rng.integers(0, max_trial + 1, n).astype(np.int32)
        if n and rank % 3 == 0:  # a repeat inside the file: the later record must win
            f[-1], c[-1], t[-1] = f[0], c[0], t[0]
        used = sorted(set(f.tolist()))
        remap = {u: i for i, u in enumerate(used)}
        f = np.array([remap[x] for x in f.tolist()], dtype=np.int32)
        zeros8 = np.zeros(n, np.int8)
        out.append({"name": f"file{rank}", "file_rank": rank, "n_records": n, "n_valid": n, "problems": [],
                    "features": [names[u] for u in used],
                    "layers": [int(names[u][1:].split("-")[0]) for u in used],
                    "feature_ids": [int(names[u].split("-")[1]) for u in used],
                    "f": f, "c": c, "t": t, "rec": np.arange(n, dtype=np.int32), "action": zeros8,
                    "bet": np.zeros(n, np.int16), "s_stop": zeros8, "s_valid": np.zeros(n, bool),
                    "s_bet": np.zeros(n, np.int32), "spool": None})
    return out


def _replay(results) -> set:
    """Winners as (rank, record): files oldest first, records in order; the last copy wins."""
    newest = {}
    for res in sorted(results, key=lambda r: r["file_rank"]):
        for i in range(res["n_valid"]):
            key = (res["features"][res["f"][i]], int(res["c"][i]), int(res["t"][i]))
            newest[key] = (res["file_rank"], int(res["rec"][i]))
    return set(newest.values())


@pytest.mark.parametrize("seed,max_trial,bitmap_max,flags_T", [
    (0, 29, None, 64),            # the usual: trials 0..29, flags
    (1, 5000, None, 8192),        # trial indices outgrow T=64: flags rebuilt with a larger T
    (2, 40, 1, None),             # flags over the limit at once: sorted array
    (3, 40, 2000, None),          # flags for the first features, the sorted array once more arrive
    (4, 900_000, None, None),     # trial indices near MAX_TRIAL: flags too big, sorted array
])
def test_stream_keeps_the_newest_copy_of_each_trial(seed, max_trial, bitmap_max, flags_T, monkeypatch):
    if bitmap_max is not None:
        monkeypatch.setattr(TrialStream, "BITMAP_MAX", bitmap_max)
    results = _results(seed, 25, max_trial)
    stream = TrialStream(C, None)
    for res in results:
        stream.add(res)
    got = {(d["rank"], int(r)) for d in stream.files for r, w in zip(d["rec"], d["win"]) if w}
    assert got == _replay(results)
    assert stream.records_read == sum(r["n_records"] for r in results)
    assert sum(int(d["win"].sum()) for d in stream.files) == len(got)
    assert (stream.seen_map is not None) == (flags_T is not None)
    if flags_T is not None:
        assert stream.T == flags_T
