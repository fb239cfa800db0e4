"""The live prototype page end to end: AppTest clicks Run on the fixture model (CPU), the page
polls the job to the end, shows the engine's numbers (checked against an independent numpy
encoding) and the pathway it computed, and saves the result into the cache."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from engine.config import SAFE_PROMPT
from explorer_fixtures import app_test, metrics, no_exception, plotly_specs, texts
from test_prototype import independent_codes


@pytest.mark.slow
def test_live_prototype_with_pathway(monkeypatch, fixture_dir, fixture_model, tmp_path):
    model, tok = fixture_model
    codes, _, _ = independent_codes(fixture_dir, model, tok, SAFE_PROMPT, 2)
    fid = int(np.argsort(-codes)[0])
    feature = f"L2-{fid}"
    cache = tmp_path / "cache"
    at = app_test(monkeypatch, fixture_dir / "config.yaml", cache, "pages/5_Live_prototype.py", timeout=60,
                  feature=feature).run()
    at.radio(key="live_prompt").set_value("safe").run()
    at.checkbox(key="live_pathway").check().run()
    no_exception(at)
    assert not texts(at, "error")
    at.button(key="live_run").click().run()
    no_exception(at)
    assert at.get("progress"), "a running job shows a progress bar"
    assert any(b.label == "Cancel" for b in at.button)
    assert at.button(key="live_run").disabled  # one job per feature
    deadline = time.time() + 240
    while time.time() < deadline and not (texts(at, "success") or texts(at, "error")):
        time.sleep(0.5)
        at.run()
    no_exception(at)
    assert any(t.startswith("Done in") for t in texts(at, "success")), (texts(at, "error"), texts(at, "code"))
    print(texts(at, "success"), texts(at, "code")[-1][-3000:])
    m = metrics(at)
    assert m["Activation · safe"] == f"{codes[fid]:.3f}"
    assert m["Rank · safe"] == "1"
    job = next(p for p in (cache / "jobs").iterdir() if p.is_dir())
    result = json.loads((job / "result.json").read_text())
    assert result["feature"] == feature and list(result["prompts"]) == ["safe"]
    # The pathway step ran for this one feature and is drawn like on the Pathway page.
    pathway = json.loads((cache / "pathways" / f"{feature}.json").read_text())
    titles = [s["layout"]["title"]["text"] for s in plotly_specs(at)]
    assert f"Pathway of {feature} · safe prompt" in titles
    n_edges = len(pathway["prompts"]["safe"]["edges"])
    shown = [c for c in texts(at, "caption") if c.endswith(f" edges shown of {n_edges}, strongest first.")]
    assert shown and 0 < int(shown[0].split()[0]) <= n_edges, texts(at, "caption")
    # Saving copies the result into the cache as the prototype of the feature.
    save = next(b for b in at.button if b.label == "Save into the cache")
    save.click().run()
    no_exception(at)
    saved = cache / "prototype" / f"{feature}.json"
    assert json.loads(saved.read_text()) == result
    assert any("Saved prototype/" in t for t in texts(at, "success"))


@pytest.mark.slow
def test_live_intervention_runs_shows_rates_and_saves(monkeypatch, fixture_dir, tmp_path):
    """The Intervention tab: Run starts `python -m engine intervene` as a job, the page polls it to
    the end, the table is the result file's numbers, Save writes interventions/<job>.json."""
    from explorer import views

    cache = tmp_path / "cache"
    at = app_test(monkeypatch, fixture_dir / "config.yaml", cache, "pages/5_Live_prototype.py", timeout=60,
                  feature="L2-5,L3-7").run()
    at.radio(key="int_mode").set_value("clamp").run()
    at.number_input(key="int_value_L2-5").set_value(2.5).run()
    at.number_input(key="int_n").set_value(2).run()
    at.radio(key="int_prompt").set_value("safe").run()
    at.number_input(key="int_tokens").set_value(6).run()
    no_exception(at)
    assert not texts(at, "error")
    at.button(key="int_run").click().run()
    no_exception(at)
    assert at.button(key="int_run").disabled  # one intervention per feature set at a time
    deadline = time.time() + 240
    while time.time() < deadline and not (texts(at, "success") or texts(at, "error")):
        time.sleep(0.5)
        at.run()
    assert any(t.startswith("Done in") for t in texts(at, "success")), (texts(at, "error"), texts(at, "code"))
    job = next(p for p in (cache / "jobs").iterdir() if p.is_dir())
    assert job.name.startswith("intervene-L2-5+L3-7-")
    result = json.loads((job / "result.json").read_text())
    assert (result["features"], result["mode"], result["value"], result["n"]) == (["L2-5", "L3-7"], "clamp", 2.5, 2)
    assert list(result["prompts"]) == ["safe"]
    shown = next(d.value for d in at.dataframe if "stop 95% CI" in d.value.columns)
    assert shown.astype(str).to_dict("records") == views.intervention_table(result).astype(str).to_dict("records")
    log = (job / "log.txt").read_text()
    assert "-m engine intervene" in log and "--value 2.5" in log and "--max-new-tokens 6" in log
    assert all(len(r["response"]) < 200 for r in result["samples"]["safe"]["baseline"])
    save = next(b for b in at.button if b.key == f"int_save_{job.name}")
    save.click().run()
    no_exception(at)
    saved = cache / "interventions" / f"{job.name}.json"
    assert json.loads(saved.read_text()) == result
