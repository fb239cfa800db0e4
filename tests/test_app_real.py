"""The pages on real engine output: the realistic experiment generator's data (with every kind
of damage) through the real audit and select steps, then the home, audit and features pages.
(Pathways from the real engine are drawn in test_app_live.py.)"""

from __future__ import annotations

import json

import yaml

from explorer_fixtures import app_test, metrics, no_exception, texts
from helpers import run_cli


def test_pages_on_real_audit_and_select(monkeypatch, fixture_dir, tmp_path):
    from engine.experiment_data import generate

    data = tmp_path / "data"
    generate(data, "small", seed=3, runs="A", defects=True, config=fixture_dir / "config.yaml")
    cfg = yaml.safe_load((fixture_dir / "config.yaml").read_text())
    cfg["model"]["name_or_path"] = str(fixture_dir / "model")
    cfg["sae"]["source"] = str(fixture_dir / "saes")
    cfg["data"] = {"checkpoints_dir": str(data)}
    cfg["cache_dir"] = str(tmp_path / "cache")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    r = run_cli("run", "--config", str(config), "--only", "audit,select")
    assert r.returncode == 0, r.stderr[-2000:]
    cache = tmp_path / "cache"
    v = json.loads((cache / "audit" / "data_validation.json").read_text())
    sel = json.loads((cache / "features" / "causal_features.json").read_text())

    at = app_test(monkeypatch, config, cache).run()
    no_exception(at)
    table = at.dataframe[0].value
    table = getattr(table, "data", table)
    status = dict(zip(table["step"], table["status"]))
    assert status["0 · Audit"] == "done" and status["1 · Select causal features"] == "done"

    at = app_test(monkeypatch, config, cache, "pages/1_Audit.py").run()
    no_exception(at)
    m = metrics(at)
    assert m["Files read"] == f"{sum(v['files_read'].values()):,}"
    assert m["Valid unique trials"] == f"{v['valid_unique_trials']:,}"
    assert m["Duplicates"] == f"{v['duplicates']:,}"
    assert m["Audit"] == ("passed" if v["validated"] else "failed")
    pc = v["parser_comparison"]
    assert m["Bet/stop disagree"] == f"{100 * pc['action_disagree'] / pc['both_valid']:.1f}%"
    shown = at.dataframe[1].value
    assert len(shown) == sum(v["problem_counts"].values())

    at = app_test(monkeypatch, config, cache, "pages/2_Features.py").run()
    no_exception(at)
    if sel["features"]:
        assert metrics(at)["Causal features"] == str(len(sel["features"]))
        assert set(at.dataframe[0].value["feature"]) == {f["feature"] for f in sel["features"]}
    else:
        assert any("holds no causal features" in i for i in texts(at, "info"))
