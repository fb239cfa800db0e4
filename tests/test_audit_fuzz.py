"""Property-based: the audit on generated study-shaped corpora with one damaged file
(tests/audit_fuzz.py has the strategies and the property). A fixed-seed profile here;
scripts/fuzz_audit.py runs the long random one."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

import audit_fuzz as AF

_n = itertools.count()


@settings(settings.get_profile("audit-ci"), max_examples=6)
@given(AF.corpora())
def test_clean_corpora_count_every_record(tmp_path_factory, corpus):
    root = tmp_path_factory.mktemp("clean")
    corpus.write(root)
    s = AF.audit(root, root / "cache")
    assert AF.per_file(s) == AF.clean_counts(corpus)
    assert s["invalid_records"] == 0 and s["problem_counts_by_severity"].get("error", 0) == 0
    assert s["valid_unique_trials"] == sum(len(r) for r in corpus.responses.values())


@settings(settings.get_profile("audit-ci"))
@given(st.data())
def test_one_damaged_file_is_that_files_problem(tmp_path_factory, data):
    corpus = data.draw(AF.corpora(), label="corpus")
    damage = data.draw(AF.damages(corpus), label="damage")
    AF.check(corpus, damage, tmp_path_factory.getbasetemp() / f"fuzz-{next(_n)}")


def test_every_reproduced_cause_in_one_run(tmp_path):
    """Issue 12's reproduced causes, each in its own file of one generated study folder: the
    command exits 0 with its report, each damaged file is named with its kind, every other file
    is counted as on the clean folder, and `engine select` runs on the result."""
    import json
    import os
    import re
    import shutil

    import pandas as pd

    from engine.experiment_data import generate
    from helpers import run_cli

    clean = tmp_path / "clean"
    generate(clean, "tiny", seed=5, runs="A")
    bad = tmp_path / "bad"
    shutil.copytree(clean, bad)
    logs = sorted((bad / "response_logs").glob("*.json"))
    cks = sorted(bad.glob("checkpoint_*.json"))

    def edit(p, old, new, count=1):
        b = p.read_bytes()
        assert old in b
        p.write_bytes(b.replace(old, new, count))

    expect = {}  # damaged file -> a kind that must name it
    edit(logs[0], b'"response": "', b'"response": "\xff', 1)
    expect[logs[0].name] = "invalid_utf8"
    edit(logs[1], b'"response": "', b'"response": "\\udcff', 1)
    expect[logs[1].name] = "lone_surrogate"
    edit(logs[2], b'"response": "', b'"response": "caf\xe9 ', 1)
    expect[logs[2].name] = "invalid_utf8"
    logs[3].write_bytes(re.sub(rb'"bet": \d+', b'"bet": 1' + b"0" * 30, logs[3].read_bytes(), count=1))
    expect[logs[3].name] = "absurd_bet"
    edit(logs[4], b'"response": "', b'"x": ' + b"[" * 10000 + b"]" * 10000 + b', "response": "')
    expect[logs[4].name] = "too_deep"
    edit(cks[-1], b'"feature": "', b'"feature": "\xff')
    expect[cks[-1].name] = "invalid_utf8"
    edit(cks[-2], b'"feature": "', b'"feature": "\\udcff')
    expect[cks[-2].name] = "lone_surrogate"
    body = json.loads(cks[-3].read_text())
    r0 = body["results"][0]
    r0["layer"] += 1  # disagrees with its name: kept under the name, flagged
    cks[-3].write_text(json.dumps(body))
    expect[cks[-3].name] = "layer_mismatch"
    rd = bad / "response_logs"
    extra = {"responses_L9_9_x_20251014_070001.json": "dir", "responses_L9_9_x_20251014_070002.json": "loop",
             "responses_L9_9_x_20251014_070003.json": "fifo", "responses_L9_9_x_20251014_070004.json": "dangling"}
    (rd / "responses_L9_9_x_20251014_070001.json").mkdir()
    os.symlink("responses_L9_9_x_20251014_070002.json", rd / "responses_L9_9_x_20251014_070002.json")
    os.mkfifo(rd / "responses_L9_9_x_20251014_070003.json")
    os.symlink(tmp_path / "gone.json", rd / "responses_L9_9_x_20251014_070004.json")
    expect.update({n: "not_a_file" for n in extra})
    (rd / "responses_L9_9_x_20251014_070005.json").write_bytes(b"[" * 10000 + b"]" * 10000)
    (rd / "responses_L9_9_x_20251014_070006.json").write_bytes(b"[" * 10000)
    expect["responses_L9_9_x_20251014_070005.json"] = "corrupt_json"
    expect["responses_L9_9_x_20251014_070006.json"] = "truncated_file"

    ref = AF.audit(clean, tmp_path / "cache-clean")
    cache = tmp_path / "cache"
    r = run_cli("audit", "--checkpoints", str(bad), "--responses", str(rd), "--cache", str(cache),
                "--set", "audit.workers=2")
    assert r.returncode == 0, r.stderr
    assert "internal error" not in r.stderr and str(cache / "audit/data_validation.json") in r.stdout
    s = json.loads((cache / "audit/data_validation.json").read_text())
    p = pd.read_parquet(cache / "audit/problems.parquet")
    for name, kind in expect.items():
        assert ((p.file == name) & (p.kind == kind)).any(), (name, kind, p[p.file == name].kind.tolist())
    before, after = AF.per_file(ref), AF.per_file(s)
    damaged = set(expect)
    assert {k: v for k, v in after.items() if k[1] not in damaged} == \
        {k: v for k, v in before.items() if k[1] not in damaged}
    # one bad byte costs at most its record: the 0xFF, surrogate, Latin-1 and huge-bet logs keep all
    for log in logs[:4]:
        assert after[("responses", log.name)] == before[("responses", log.name)]
    assert after[("responses", logs[4].name)][1] == before[("responses", logs[4].name)][1] - 1
    # the mismatched checkpoint record is kept under its feature name
    ckr = pd.read_parquet(cache / "audit/checkpoint_records.parquet")
    assert r0["feature"] in set(ckr.feature)
    sel = run_cli("select", "--cache", str(cache))
    assert sel.returncode == 0, sel.stderr


def test_one_file_failing_is_isolated(tmp_path, monkeypatch):
    """An unreadable log gives its own row (not KeyError 'file_rank'); an unexpected exception
    on the fast path retries the file record by record (`read_failed`, records still counted);
    one on both paths leaves that file with no records and the others untouched."""
    import json
    import os

    from engine.audit import responses as R
    from engine.schema import REAL_CONDITIONS

    recs = [{"feature": "L3-7", "condition": "safe_baseline", "trial": t, "response": "1", "parsed": {"bet": 10}}
            for t in range(4)]
    good = tmp_path / "good.json"
    good.write_text(json.dumps(recs))
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)

    def task(p, rank):
        return R.ResponseTask(str(p), p.name, rank, "r", "20251014_000000", tuple(REAL_CONDITIONS), 5, 100, None, True)

    res = R.audit_response_file(task(fifo, 7))  # opened without blocking, refused as not a regular file
    assert res["file_rank"] == 7 and res["n_records"] == 0 and [p[0] for p in res["problems"]] == ["unreadable_file"]

    real = R._run_codes
    calls = []

    def flaky(values):  # fails once (on the fast path), then works
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("boom")
        return real(values)

    monkeypatch.setattr(R, "_run_codes", flaky)
    res = R.audit_response_file(task(good, 1))
    assert res["n_valid"] == 4 and [p[0] for p in res["problems"]] == ["read_failed"]
    assert "ValueError: boom" in res["problems"][0][5]
    monkeypatch.setattr(R, "_run_codes", lambda values: (_ for _ in ()).throw(RuntimeError("always")))
    res = R.audit_response_file(task(good, 2))
    assert (res["n_records"], res["n_valid"], res["file_rank"]) == (0, 0, 2)
    assert [p[0] for p in res["problems"]] == ["read_failed"] and "always" in res["problems"][0][5]
