"""Issue 14 items 2 and 7 in a real browser (Debian's chromium through Playwright, as
tests/test_browser.py): on a cache the engine computed for the fixture model (a selection of one
feature, its pathway, the tokens step with every graph node), a click on an upstream node shows
its meaning (logit lens, histogram, distinct top contexts); on the Live prototype page an
intervention runs to the end with its rates, is saved, and a second one is cancelled.

Screenshots go to test-artifacts/screenshots/ (live_*.png)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from test_browser import (_need_browser, browser_page, click_node, graph_nodes, graph_title, no_error_boxes,
                          park_mouse, shot, streamlit_app, wait_app)

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def live_site(fixture_dir, fixture_model, tmp_path_factory):
    """A cache with one selected feature of layer 3, its pathway and the tokens step (with node
    views), all computed by the engine; the app on it."""
    _need_browser()
    import torch

    from engine.config import load_config
    from engine.model import forward_resid_post
    from engine.sae import load_sae
    from engine.schema import atomic_write_json, atomic_write_parquet, with_schema
    from engine.tokens.run import run_tokens
    from helpers import run_cli
    from test_tokens_views import make_trials

    model, tok = fixture_model
    cfg0 = load_config(fixture_dir / "config.yaml")
    layer = 3
    ids = torch.tensor([tok(cfg0.prompts["safe"])["input_ids"]])
    codes = load_sae(cfg0.sae, layer).encode(forward_resid_post(model, ids, [layer])[layer][0, -1].float())
    feature = f"L{layer}-{int(torch.argmax(codes))}"
    cache = tmp_path_factory.mktemp("browser_live") / "cache"
    atomic_write_json(cache / "features" / "causal_features.json", with_schema({
        "verdict": "checkpoint", "top_n": 1, "n_features": 1, "features": [
            {"feature": feature, "layer": layer, "feature_id": int(feature.split("-")[1]), "direction": "risky",
             "cohen_d": 0.9}]}))
    trials = make_trials(2)
    trials["feature"] = feature
    atomic_write_parquet(cache / "audit" / "trials.parquet", trials)
    config = fixture_dir / "config.yaml"
    res = run_cli("pathways", "--config", str(config), "--cache", str(cache), "--features", feature,
                  "--set", "pathways.n_replay=4", env={"OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    cfg = load_config(config, {"cache_dir": str(cache), "tokens.sample_size": 10, "tokens.batch_size": 5,
                               "tokens.top_examples": 4, "tokens.context_tokens": 3})
    run_tokens(cfg)
    nodes = {p.stem: json.loads(p.read_text()) for p in (cache / "tokens" / "nodes").glob("*.json")}
    assert nodes, "the tokens step wrote no graph-node views"
    with streamlit_app(config, cache, tmp_path_factory.mktemp("browser_live_app")) as url:
        yield url, cache, feature, nodes


def test_upstream_node_card_shows_its_meaning(live_site):
    from playwright.sync_api import expect

    url, cache, feature, nodes = live_site
    with browser_page() as page:
        page.goto(f"{url}/Pathway?feature={feature}")
        wait_app(page)
        graph_title(page, f"Pathway of {feature}")
        shown = graph_nodes(page)
        node = next(n for n in shown["ids"] if n in nodes)  # an upstream node, not a selected feature
        click_node(page, shown, node)
        wait_app(page)
        expect(page.get_by_role("heading", name=node)).to_be_visible(timeout=30_000)
        doc = nodes[node]
        card = page.get_by_test_id("stMain")
        expect(card.get_by_text("Output tokens", exact=True)).to_be_visible()
        expect(card.locator(".gtitle", has_text="Activation over sampled response tokens")).to_be_visible()
        hist = doc["activation_histogram"]
        active = hist["total"] - hist["zero"]
        expect(card.get_by_text(f"{active:,} of {hist['total']:,} tokens active")).to_be_visible()
        top = doc["top_activating"]
        if top:
            expect(card.get_by_text("Top activating contexts")).to_be_visible()
            first = card.get_by_text(f"{top[0]['activation']:.2f}", exact=True).first
            expect(first).to_be_visible()
            keys = {(tuple(t["context_tokens"]), t["center"]) for t in top}
            assert len(keys) == len(top) and min(t["activation"] for t in top) > 0  # distinct, firing
        no_error_boxes(page)
        park_mouse(page)
        if top:
            card.get_by_text("Top activating contexts").scroll_into_view_if_needed()
        shot(page, "live_node_card", docs=False)


def set_number(page, label: str, value: int) -> None:
    """Type a value into the number input with this label and let the app rerun."""
    box = page.get_by_test_id("stNumberInput").filter(has_text=label).locator("input")
    box.fill(str(value))
    box.press("Enter")
    wait_app(page)


def test_intervention_runs_saves_and_cancels(live_site):
    from playwright.sync_api import expect

    url, cache, feature, _ = live_site
    with browser_page() as page:
        page.goto(f"{url}/Live_prototype?feature={feature}")
        wait_app(page)
        page.get_by_role("tab", name="Intervention").click()
        wait_app(page)
        page.get_by_role("radiogroup", name="Prompts").get_by_text("safe", exact=True).click()
        wait_app(page)
        set_number(page, "Decisions per prompt", 3)
        set_number(page, "Tokens per reply", 6)
        page.get_by_role("button", name="Run intervention").click()
        expect(page.get_by_role("button", name="Cancel")).to_be_visible(timeout=30_000)
        expect(page.get_by_test_id("stProgress")).to_be_visible()
        shot(page, "live_intervention_running", docs=False)
        expect(page.get_by_text("Done in")).to_be_visible(timeout=300_000)
        wait_app(page)
        job = next(p for p in (cache / "jobs").iterdir() if p.name.startswith(f"intervene-{feature}-"))
        result = json.loads((job / "result.json").read_text())
        assert (result["mode"], result["n"], list(result["prompts"])) == ("ablate", 3, ["safe"])
        expect(page.locator(".annotation-text", has_text="Stop rate")).to_be_visible()
        base = result["prompts"]["safe"]["baseline"]
        if base["valid"] == 0:  # the random fixture model rarely writes a decision
            expect(page.get_by_text("No reply the parser could read as a bet or a stop on safe (unpatched)")).to_be_visible()
        expect(page.get_by_text(f"Activation at the last prompt token before the patch: {feature}:")).to_be_visible()
        no_error_boxes(page)
        park_mouse(page)
        shot(page, "live_intervention_done", docs=False)
        page.get_by_role("button", name="Save into the cache").click()
        expect(page.get_by_text(f"Saved interventions/{job.name}.json")).to_be_visible(timeout=30_000)
        assert json.loads((cache / "interventions" / f"{job.name}.json").read_text()) == result
        assert base["n"] == 3 and base["valid"] + base["invalid"] == 3
        # a long run, cancelled: the page says so and the job is recorded as cancelled
        set_number(page, "Decisions per prompt", 400)
        page.get_by_role("button", name="Run intervention").click()
        expect(page.get_by_role("button", name="Cancel")).to_be_visible(timeout=30_000)
        page.get_by_role("button", name="Cancel").click()
        expect(page.get_by_text("The intervention was cancelled.")).to_be_visible(timeout=60_000)
        states = sorted(json.loads((p / "job.json").read_text())["state"] for p in (cache / "jobs").iterdir()
                        if p.name.startswith("intervene-"))
        assert states == ["cancelled", "done"]
