"""The explorer in a real browser: `streamlit run app.py` on a free localhost port, driven by
Debian's chromium through Playwright (never a downloaded browser).

Screenshots of every page go to test-artifacts/screenshots/; with UPDATE_SCREENSHOTS=1 they
are also copied to docs/screenshots/ (the README shows those)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from cache_factory import make_cache

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = ROOT / "test-artifacts" / "screenshots"
DOCS = ROOT / "docs" / "screenshots"

pytestmark = pytest.mark.browser


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (scripts/test.sh installs it)")
    from engine.config import load_config

    root = tmp_path_factory.mktemp("browser")
    config = root / "config.yaml"
    config.write_text("cache_dir: cache\n")
    info = make_cache(root / "cache", "small", seed=0, cfg=load_config(config))
    port = free_port()
    log = open(root / "streamlit.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), "--server.headless", "true",
         "--server.port", str(port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false",
         "--server.fileWatcherType", "none", "--", "--config", str(config), "--cache", str(root / "cache")],
        cwd=str(root), stdout=log, stderr=subprocess.STDOUT)  # another working directory than the repository
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
                raise AssertionError("streamlit did not start: " + (root / "streamlit.log").read_text()[-2000:])
            time.sleep(0.25)
        yield url, info
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def wait_app(page, timeout: float = 30_000) -> None:
    page.wait_for_selector("[data-testid='stApp'][data-test-connection-state='CONNECTED']", timeout=timeout)
    page.wait_for_selector("[data-test-script-state='notRunning']", timeout=timeout)
    page.wait_for_function("() => document.querySelectorAll('[data-testid=\"stSkeleton\"]').length === 0",
                           timeout=timeout)


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.wait_for_timeout(600)  # let plotly and the grids paint
    page.screenshot(path=str(path), full_page=True)
    if os.environ.get("UPDATE_SCREENSHOTS") == "1":
        DOCS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, DOCS / f"{name}.png")


def graph_title(page, text: str, timeout: float = 30_000) -> None:
    page.locator(".gtitle", has_text=text).first.wait_for(state="visible", timeout=timeout)


def test_pages_clicks_and_deep_links(server):
    from playwright.sync_api import expect, sync_playwright

    url, info = server
    feats = [f["feature"] for f in info["features"]]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        page = browser.new_page(viewport={"width": 1440, "height": 1800})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))

        page.goto(url)
        wait_app(page)
        expect(page.get_by_role("heading", name="SAE pathway explorer")).to_be_visible()
        expect(page.get_by_test_id("stSidebar").get_by_text("Live prototype")).to_be_visible()  # titles, not file names
        shot(page, "home")

        page.goto(f"{url}/Audit")
        wait_app(page)
        expect(page.get_by_role("heading", name="Data audit")).to_be_visible()
        shot(page, "audit")

        # Features: click a row of the table; the preview shows that feature's pathway.
        page.goto(f"{url}/Features")
        wait_app(page)
        row = 3
        feature = feats[row]
        assert feature in info["pathway_features"]
        grid = page.get_by_test_id("stDataFrame").first
        grid.scroll_into_view_if_needed()
        box = grid.bounding_box()
        page.mouse.click(box["x"] + 12, box["y"] + 35 + 35 * row + 17)  # the row-marker column
        wait_app(page)
        graph_title(page, f"Pathway of {feature}")
        expect(page.get_by_role("heading", name=feature)).to_be_visible()
        shot(page, "features")

        # Its "Open pathway" link opens the Pathway page on that feature.
        page.get_by_role("link", name="Open pathway").click()
        page.wait_for_url(f"**/Pathway?feature={feature}*")
        wait_app(page)
        direction = next(f["direction"] for f in info["features"] if f["feature"] == feature)
        graph_title(page, f"Pathway of {feature} · {'risky' if direction == 'risky' else 'safe'} prompt")

        # A deep link, then a click on a node that has its own pathway, then Back.
        deep = "L3-235" if "L3-235" in info["pathway_features"] else info["pathway_features"][-1]
        page.goto(f"{url}/Pathway?feature={deep}&prompt=risky")
        wait_app(page)
        graph_title(page, f"Pathway of {deep} · risky prompt")
        page.get_by_text("Nodes kept").wait_for()
        # Keep every node so the planted causal features are on screen, then click one.
        js_nodes = """() => { const gd = document.querySelectorAll('.js-plotly-plot')[0];
            const i = gd.data.findIndex(t => t.name === 'nodes');
            return {i, ids: gd.data[i].customdata, x: gd.data[i].x, y: gd.data[i].y}; }"""
        nodes = page.evaluate(js_nodes)
        target = next((n for n in nodes["ids"] if n in info["pathway_features"]), None)
        if target is None:  # not among the strongest: show them all
            slider = page.get_by_test_id("stSlider").first
            slider.get_by_role("slider").focus()
            page.keyboard.press("End")
            wait_app(page)
            graph_title(page, f"Pathway of {deep} · risky prompt")
            nodes = page.evaluate(js_nodes)
            target = next(n for n in nodes["ids"] if n in info["pathway_features"])
        k = nodes["ids"].index(target)
        point = page.locator(".js-plotly-plot").first.locator(".scatterlayer .trace").nth(nodes["i"]).locator(".point").nth(k)
        pb = point.bounding_box()
        page.mouse.move(pb["x"] + pb["width"] / 2, pb["y"] + pb["height"] / 2)
        page.mouse.click(pb["x"] + pb["width"] / 2, pb["y"] + pb["height"] / 2)
        expect(page.get_by_role("heading", name=target)).to_be_visible(timeout=20_000)
        shot(page, "pathway")
        page.get_by_role("button", name=f"Open the pathway of {target}").click()
        page.wait_for_url(f"**/Pathway?feature={target}*")
        wait_app(page)
        graph_title(page, f"Pathway of {target}")
        page.go_back()
        page.wait_for_url(f"**feature={deep}*")
        wait_app(page)
        graph_title(page, f"Pathway of {deep} · risky prompt")
        page.reload()
        wait_app(page)
        graph_title(page, f"Pathway of {deep} · risky prompt")

        page.goto(f"{url}/Tokens?feature={info['token_features'][0]}")
        wait_app(page)
        expect(page.get_by_role("heading", name="Output tokens")).to_be_visible()
        shot(page, "tokens")

        page.goto(f"{url}/Live_prototype?feature={feats[0]}")
        wait_app(page)
        expect(page.get_by_role("button", name="Run")).to_be_enabled()
        shot(page, "live_prototype")
        assert not errors, errors
        browser.close()
