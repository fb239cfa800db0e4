"""The explorer in a real browser: `streamlit run app.py` on a free localhost port, driven by
Debian's chromium through Playwright (never a downloaded browser).

The main test runs on the shortened demo's cache (the session fixture `demo_cache`, shared with
tests/test_demo.py; `ENGINE_TEST_DEMO_CACHE=DIR` reuses any finished demo, the full one
included): Home with its demo banner, Audit, a click on a causal feature, its pathway graph,
deep links, Tokens and the live prototype. When the graph holds a node with its own pathway (the
shortened demo's 8 causal features usually give one) the walk to it and Back runs here too; the
synthetic cache's tests always walk it.

Screenshots of every page go to test-artifacts/screenshots/; with UPDATE_SCREENSHOTS=1 the
demo's are also copied to docs/screenshots/ (the README shows those)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
from helpers import stop_process

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = ROOT / "test-artifacts" / "screenshots"
DOCS = ROOT / "docs" / "screenshots"

pytestmark = pytest.mark.browser


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _need_browser() -> None:
    pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (scripts/test.sh installs it)")


@contextmanager
def streamlit_app(config: Path, cache: Path, workdir: Path):
    """`streamlit run app.py -- --config ... --cache ...` until the block ends; yields its URL."""
    port = free_port()
    log_path = workdir / "streamlit.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), "--server.headless", "true",
         "--server.port", str(port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false",
         "--server.fileWatcherType", "none", "--", "--config", str(config), "--cache", str(cache)],
        cwd=str(workdir), stdout=log, stderr=subprocess.STDOUT)  # another working directory than the repository
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                    break
            except OSError:
                pass
            if time.time() > deadline or proc.poll() is not None:
                raise AssertionError("streamlit did not start: " + log_path.read_text()[-2000:])
            time.sleep(0.25)
        yield url
    finally:
        stop_process(proc)
        log.close()


@contextmanager
def browser_page():
    """A chromium page; fails the test on any uncaught page error."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        page = browser.new_page(viewport={"width": 1440, "height": 1800})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        try:
            yield page
        finally:
            browser.close()
        assert not errors, errors


def wait_app(page, timeout: float = 30_000) -> None:
    page.wait_for_selector("[data-testid='stApp'][data-test-connection-state='CONNECTED']", timeout=timeout)
    page.wait_for_selector("[data-test-script-state='notRunning']", timeout=timeout)
    page.wait_for_function("() => document.querySelectorAll('[data-testid=\"stSkeleton\"]').length === 0",
                           timeout=timeout)


def no_error_boxes(page) -> None:
    """No st.exception (a traceback) and no st.error box on the page."""
    from playwright.sync_api import expect

    expect(page.get_by_test_id("stException")).to_have_count(0)
    expect(page.locator("[data-testid='stAlertContentError']")).to_have_count(0)


def shot(page, name: str, docs: bool = True) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.wait_for_timeout(600)  # let plotly and the grids paint
    page.screenshot(path=str(path), full_page=True)
    if docs and os.environ.get("UPDATE_SCREENSHOTS") == "1":
        DOCS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, DOCS / f"{name}.png")


def graph_title(page, text: str, timeout: float = 30_000) -> None:
    page.locator(".gtitle", has_text=text).first.wait_for(state="visible", timeout=timeout)


def click_table_row(page, row: int) -> None:
    """Click the row-marker cell of a row of the first st.dataframe (a canvas grid: 35 px rows),
    scrolling the grid first when the row is below its visible part (the default demo's table)."""
    grid = page.get_by_test_id("stDataFrame").first
    grid.scroll_into_view_if_needed()
    box = grid.bounding_box()
    scroller = grid.locator(".dvn-scroller").first
    top = 0
    if 35 + 35 * (row + 1) > box["height"] and scroller.count():
        top = scroller.evaluate("(el, y) => { el.scrollTop = y; return el.scrollTop; }", 35 * row)
        page.wait_for_timeout(300)  # the canvas redraws on the scroll event
    page.mouse.click(box["x"] + 12, box["y"] + 35 + 35 * row - top + 17)


JS_NODES = """() => { const gd = document.querySelectorAll('.js-plotly-plot')[0];
    const i = gd.data.findIndex(t => t.name === 'nodes');
    return {i, ids: gd.data[i].customdata}; }"""


def graph_nodes(page) -> dict:
    return page.evaluate(JS_NODES)


def keep_every_node(page, title: str) -> None:
    """Move the 'Nodes kept' slider to 1.0."""
    slider = page.get_by_test_id("stSlider").first
    slider.get_by_role("slider").focus()
    page.keyboard.press("End")
    wait_app(page)
    graph_title(page, title)


def park_mouse(page) -> None:
    """Move the pointer to an empty corner: no hover label or grid toolbar in the screenshot."""
    page.mouse.move(1430, 1790)


def click_node(page, nodes: dict, node: str) -> None:
    k = nodes["ids"].index(node)
    point = page.locator(".js-plotly-plot").first.locator(".scatterlayer .trace").nth(nodes["i"]).locator(".point").nth(k)
    pb = point.bounding_box()
    page.mouse.move(pb["x"] + pb["width"] / 2, pb["y"] + pb["height"] / 2)
    page.mouse.click(pb["x"] + pb["width"] / 2, pb["y"] + pb["height"] / 2)


def open_a_node_card(page, feature: str, pathway_features) -> tuple[str, bool]:
    """Click a node of the shown graph other than `feature` (one with its own pathway when there is
    one) and wait for its card: (the node, whether it has its own pathway)."""
    from playwright.sync_api import expect

    nodes = graph_nodes(page)
    own = [n for n in nodes["ids"] if n != feature and n in pathway_features]
    target = own[0] if own else next(n for n in nodes["ids"] if n != feature)
    click_node(page, nodes, target)
    expect(page.get_by_role("heading", name=target)).to_be_visible(timeout=20_000)
    park_mouse(page)
    no_error_boxes(page)
    return target, bool(own)


# ---------------------------------------------------------------------------
# The demo's cache
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_site(demo_cache, tmp_path_factory):
    """The app on the demo's cache, and what the cache holds (read here, not from the page)."""
    _need_browser()
    from engine.schema import DEMO_MARKER, read_json
    from explorer import data, views
    from explorer.context import build_context

    marker = read_json(demo_cache / DEMO_MARKER, "demo marker")
    config = demo_cache / marker["config"]
    ctx = build_context(str(config), str(demo_cache))
    overview = views.filter_features(data.feature_overview(ctx))  # the Features table, in its order
    with_pathway = overview[overview["has_pathway"]]
    assert len(with_pathway), "the demo's pipeline wrote no pathway"
    strongest = marker["experiment_2"].get("strongest_feature")
    feature = strongest if strongest in set(with_pathway["feature"]) else with_pathway["feature"].iloc[0]
    info = {
        "marker": marker,
        "features": overview["feature"].tolist(),
        "feature": feature,
        "row": overview.index[overview["feature"] == feature][0],
        "direction": overview.loc[overview["feature"] == feature, "direction"].iloc[0],
        # the prompt the preview and its link open: where the feature is more active
        "preview_prompt": views.preview_prompt(overview.loc[overview["feature"] == feature].iloc[0].to_dict()),
        "pathway_features": data.pathway_features(ctx),
        "token_features": data.token_features(ctx),
    }
    with streamlit_app(config, demo_cache, tmp_path_factory.mktemp("browser_demo")) as url:
        yield url, info


def test_demo_pages_clicks_and_deep_links(demo_site):
    from playwright.sync_api import expect

    url, info = demo_site
    feature, marker = info["feature"], info["marker"]
    with browser_page() as page:
        # Home says plainly that this is the demo model, with what it learned.
        page.goto(url)
        wait_app(page)
        expect(page.get_by_role("heading", name="SAE pathway explorer")).to_be_visible()
        expect(page.get_by_role("heading", name="This is the embedded demo, not LLaMA-3.1-8B")).to_be_visible()
        verdict = "It learned the gamble" if marker["learned"]["ok"] else "The model did NOT learn the gamble"
        expect(page.get_by_text(verdict)).to_be_visible()
        expect(page.get_by_role("heading", name="Pointing the tool at real data")).to_be_visible()
        expect(page.get_by_text("random model")).to_have_count(0)
        expect(page.get_by_test_id("stSidebar").get_by_text("Live prototype")).to_be_visible()  # titles, not file names
        if marker["learned"]["ok"]:
            no_error_boxes(page)
        shot(page, "home")

        page.goto(f"{url}/Audit")
        wait_app(page)
        expect(page.get_by_role("heading", name="Data audit")).to_be_visible()
        no_error_boxes(page)
        shot(page, "audit")

        # Features: click the causal feature's row; the preview shows its pathway.
        page.goto(f"{url}/Features")
        wait_app(page)
        click_table_row(page, info["row"])
        wait_app(page)
        graph_title(page, f"Pathway of {feature}")
        expect(page.get_by_role("heading", name=feature)).to_be_visible()
        page.wait_for_url(f"**/Features?feature={feature}*")  # the selection is in the address
        park_mouse(page)
        no_error_boxes(page)
        shot(page, "features")

        # Its "Open pathway" link opens the Pathway page on that feature and the prompt it is more active on.
        page.get_by_role("link", name="Open pathway").click()
        page.wait_for_url(f"**/Pathway?feature={feature}*")
        wait_app(page)
        prompt = info["preview_prompt"]
        graph_title(page, f"Pathway of {feature} · {prompt} prompt")
        # the README's picture: the prompt the feature is active on, with a node's card open
        target, own = open_a_node_card(page, feature, info["pathway_features"])
        shot(page, "pathway")

        # A deep link to the other prompt; a click on a node shows its card: a node with its own
        # pathway when the graph holds one.
        other = "safe" if prompt == "risky" else "risky"
        page.goto(f"{url}/Pathway?feature={feature}&prompt={other}")
        wait_app(page)
        title = f"Pathway of {feature} · {other} prompt"
        graph_title(page, title)
        target, own = open_a_node_card(page, feature, info["pathway_features"])
        shot(page, "pathway_other_prompt", docs=False)
        if own:
            page.get_by_role("button", name=f"Open the pathway of {target}").click()
            page.wait_for_url(f"**/Pathway?feature={target}*")
            wait_app(page)
            graph_title(page, f"Pathway of {target}")
            page.go_back()
            page.wait_for_url(f"**feature={feature}*")
            wait_app(page)
            graph_title(page, title)
        page.reload()
        wait_app(page)
        graph_title(page, title)

        page.goto(f"{url}/Tokens?feature={feature}")
        wait_app(page)
        expect(page.get_by_role("heading", name="Output tokens")).to_be_visible()
        no_error_boxes(page)
        shot(page, "tokens")

        page.goto(f"{url}/Live_prototype?feature={feature}")
        wait_app(page)
        expect(page.get_by_role("button", name="Run")).to_be_enabled()
        shot(page, "live_prototype")


# ---------------------------------------------------------------------------
# The synthetic cache: many causal features, so a graph holds nodes with their own pathway
# ---------------------------------------------------------------------------


@contextmanager
def synthetic_app(root: Path):
    """The explorer on a small synthetic cache built in `root`: (url, cache folder, cache info)."""
    _need_browser()
    from cache_factory import make_cache
    from engine.config import load_config

    config = root / "config.yaml"
    config.write_text("cache_dir: cache\n")
    info = make_cache(root / "cache", "small", seed=0, cfg=load_config(config))
    with streamlit_app(config, root / "cache", root) as url:
        yield url, root / "cache", info


@pytest.fixture(scope="module")
def synthetic_site(tmp_path_factory):
    with synthetic_app(tmp_path_factory.mktemp("browser")) as (url, _, info):
        yield url, info


def test_node_with_its_own_pathway_opens_it_and_back_returns(synthetic_site):
    from playwright.sync_api import expect

    url, info = synthetic_site
    files = info["pathway_features"]
    deep = "L3-235" if "L3-235" in files else files[-1]
    title = f"Pathway of {deep} · risky prompt"
    with browser_page() as page:
        page.goto(f"{url}/Pathway?feature={deep}&prompt=risky")
        wait_app(page)
        graph_title(page, title)
        page.get_by_text("Nodes kept").wait_for()
        nodes = graph_nodes(page)
        target = next((n for n in nodes["ids"] if n in files and n != deep), None)
        if target is None:  # not among the strongest: show them all
            keep_every_node(page, title)
            nodes = graph_nodes(page)
            target = next(n for n in nodes["ids"] if n in files and n != deep)
        click_node(page, nodes, target)
        expect(page.get_by_role("heading", name=target)).to_be_visible(timeout=20_000)
        shot(page, "synthetic_pathway_node", docs=False)
        page.get_by_role("button", name=f"Open the pathway of {target}").click()
        page.wait_for_url(f"**/Pathway?feature={target}*")
        wait_app(page)
        graph_title(page, f"Pathway of {target}")
        page.go_back()
        page.wait_for_url(f"**feature={deep}*")
        wait_app(page)
        graph_title(page, title)
