"""All-or-nothing audit outputs: a failed audit leaves the previous one intact, a killed swap
is undone, and `engine select` refuses an audit that did not finish."""

from __future__ import annotations

import json
import os

import pytest

from engine.audit import outputs as O
from engine.audit import run as audit_run
from engine.audit.run import run_audit
from engine.config import load_config
from engine.experiment_data import generate
from helpers import run_cli


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("exp")
    generate(d, "tiny", seed=3, runs="A")
    return d


def _audit(cfg, data):
    return run_audit(cfg, checkpoints_dir=str(data), responses_dir=str(data / "response_logs"), show_progress=False)


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_failed_audit_leaves_the_previous_one_and_select_still_works(data, tmp_path, monkeypatch):
    cfg = load_config(None, {"cache_dir": str(tmp_path / "c"), "audit.workers": 1})
    first = _audit(cfg, data)
    audit = cfg.cache / "audit"
    assert set(_snapshot(audit)) == {"data_validation.json", "problems.parquet", "trials.parquet",
                                     "feature_conditions.parquet", "feature_effects.parquet",
                                     "checkpoint_records.parquet", "complete.json"}
    marker = json.loads((audit / "complete.json").read_text())
    assert marker["tables"]["feature_effects.parquet"] == (audit / "feature_effects.parquet").stat().st_size
    before = _snapshot(audit)

    def boom(folder, state, problems):  # the table-writing step dies half-way (after one table)
        from engine.schema import atomic_write_parquet
        atomic_write_parquet(folder / "feature_conditions.parquet", state["fc"].head(1))
        raise RuntimeError("disk full")

    monkeypatch.setattr(audit_run, "_write_tables", boom)
    with pytest.raises(RuntimeError):
        _audit(cfg, data)
    assert _snapshot(audit) == before  # byte for byte
    assert sorted(p.name for p in cfg.cache.iterdir()) == ["audit"]  # no temporary folder left
    monkeypatch.undo()
    # a second full audit replaces the first in one swap; same answers
    again = _audit(cfg, data)
    assert again["valid_unique_trials"] == first["valid_unique_trials"]
    assert sorted(p.name for p in cfg.cache.iterdir()) == ["audit"]
    r = run_cli("select", "--cache", str(cfg.cache))
    assert r.returncode == 0, r.stderr


def test_select_refuses_an_unfinished_or_mixed_audit(data, tmp_path):
    cfg = load_config(None, {"cache_dir": str(tmp_path / "c"), "audit.workers": 1})
    _audit(cfg, data)
    audit = cfg.cache / "audit"
    fe = audit / "feature_effects.parquet"
    fe.write_bytes(fe.read_bytes() + b"\0")  # a table from another audit (size differs)
    r = run_cli("select", "--cache", str(cfg.cache))
    assert r.returncode == 2 and "a mix of two audits" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    (audit / "complete.json").unlink()  # as an audit stopped before its end (or an older version) leaves it
    r = run_cli("select", "--cache", str(cfg.cache))
    assert r.returncode == 2 and r.stderr.startswith("error: the audit in") and "did not finish" in r.stderr


def test_a_swap_killed_half_way_is_undone(tmp_path):
    cache = tmp_path / "c"
    (cache / "audit").mkdir(parents=True)
    (cache / "audit" / "x").write_text("previous")
    dead = 2 ** 22 + 12345  # above the default pid_max of small machines: no such process
    assert not O._alive(dead)
    # killed between "audit -> .audit-old" and ".audit-tmp -> audit"
    os.rename(cache / "audit", cache / f".audit-old-{dead}")
    (cache / f".audit-tmp-{dead}").mkdir()
    work = O.staging_dir(cache)
    assert (cache / "audit" / "x").read_text() == "previous"
    assert sorted(p.name for p in cache.iterdir()) == sorted(["audit", work.name])
    (work / "y").write_text("new")
    O.swap_in(work, cache)
    assert sorted(p.name for p in (cache / "audit").iterdir()) == ["y"]
    assert sorted(p.name for p in cache.iterdir()) == ["audit"]
