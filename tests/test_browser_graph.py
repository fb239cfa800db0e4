"""Working with a pathway graph in a real browser (issue 14, items 1, 3, 4 and 5): Debian's
chromium through Playwright at a 1280x720 window, on the synthetic cache.

- labels: no two node labels overlap in either layout, none covers a node, no legend or axis
  label covers a node, no metric value is cut off (DOM boxes, plus a screenshot);
- a click on a node selects it (address, highlighted edges, filtered tables); Pin, a label, a
  supernode and the pinned subgraph are saved in annotations/<feature>.json and reach the
  downloads;
- the address reproduces the view in a fresh browser, and the "as shown" JSON records the
  pruning applied;
- a node of the Features preview opens on the Pathway page; Back clears a selection; a bad
  ?feature= gets one message on every page and leaves the address."""

from __future__ import annotations

import json
import re
from urllib.parse import parse_qs, urlparse

import pytest

from test_browser import CHROMIUM, click_table_row, graph_title, shot, synthetic_app, wait_app

pytestmark = pytest.mark.browser

VIEW = {"width": 1280, "height": 720}

JS_GRAPH = """() => { const all = [...document.querySelectorAll('.js-plotly-plot')];
    const plot = all.findIndex(g => g.data && g.data.some(t => t.name === 'nodes')); const gd = all[plot];
    const box = e => { const r = e.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; };
    const i = gd.data.findIndex(t => t.name === 'nodes');
    const traces = gd.querySelectorAll('.scatterlayer .trace');
    const points = [i, gd.data.findIndex(t => t.name === 'target')].flatMap(k =>
        [...traces[k].querySelectorAll('.point')].map(box));
    return {
      plot, i, ids: gd.data[i].customdata, names: gd.data.map(t => t.name),
      pinned: (gd.data.find(t => t.name === 'pinned') || {x: []}).x.length,
      selected: (gd.data.find(t => t.name === 'selected') || {x: []}).x.length,
      labels: [...gd.querySelectorAll('.annotation')].map(a => ({text: a.textContent,
                                                                 box: box(a.querySelector('.annotation-text-g'))})),
      points,
      ticks: [...gd.querySelectorAll('.xtick text, .ytick text, .g-xtitle, .g-ytitle')].map(box),
      legend: [...gd.querySelectorAll('.legend')].map(box),
    }; }"""

JS_METRICS = """() => [...document.querySelectorAll('[data-testid="stMetricValue"], [data-testid="stMetricLabel"]')]
    .map(e => { const t = e.querySelector('div, p') || e; return {text: e.textContent, cut: t.scrollWidth > t.clientWidth + 1}; })"""


def click_node(page, g: dict, node: str) -> None:
    """Scroll the node's marker into the 720 px window, then click its centre."""
    k = g["ids"].index(node)
    point = page.locator(".js-plotly-plot").nth(g["plot"]).locator(".scatterlayer .trace").nth(g["i"]).locator(".point").nth(k)
    point.scroll_into_view_if_needed()
    pb = point.bounding_box()
    page.mouse.move(pb["x"] + pb["width"] / 2, pb["y"] + pb["height"] / 2)
    page.mouse.click(pb["x"] + pb["width"] / 2, pb["y"] + pb["height"] / 2)


def overlap(a, b, gap: float = 0.0) -> bool:
    return a[0] < b[2] - gap and b[0] < a[2] - gap and a[1] < b[3] - gap and b[1] < a[3] - gap


def check_readable(page, metrics: bool = True, min_labels: int = 5) -> dict:
    """Labels pairwise apart, off the nodes; ticks and legend off the nodes; metrics whole."""
    g = page.evaluate(JS_GRAPH)
    labels = g["labels"]
    assert len(labels) >= min_labels, labels
    for k, a in enumerate(labels):
        for b in labels[k + 1:]:
            assert not overlap(a["box"], b["box"]), (a, b)
        for p in g["points"]:
            assert not overlap(a["box"], p, gap=1.0), (a, p)  # 1 px: antialiased edges
    for t in g["ticks"] + g["legend"]:
        for p in g["points"]:
            assert not overlap(t, p), (t, p)
    cut = [m["text"] for m in page.evaluate(JS_METRICS) if m["cut"]]
    assert not cut or not metrics, cut
    return g


def href(page) -> str:
    return page.evaluate("() => window.location.href")  # page.url misses Streamlit's history edits


def params(page) -> dict:
    return {k: v[0] for k, v in parse_qs(urlparse(href(page)).query).items()}


def wait_href(page, pattern: str, present: bool = True, timeout: float = 30_000) -> None:
    """Wait until the address matches (or no longer matches) a regular expression."""
    page.wait_for_function("([p, want]) => new RegExp(p).test(window.location.href) === want", arg=[pattern, present],
                           timeout=timeout)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    with synthetic_app(tmp_path_factory.mktemp("browser_graph")) as found:
        yield found


@pytest.fixture
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        errors: list[str] = []

        def new_page():
            page = b.new_context(viewport=VIEW, accept_downloads=True).new_page()  # a fresh browser profile
            page.on("pageerror", lambda e: errors.append(str(e)))
            return page

        try:
            yield new_page
        finally:
            b.close()
        assert not errors, errors


def feature_of(info) -> str:
    files = info["pathway_features"]
    return "L3-235" if "L3-235" in files else files[-1]


def test_labels_never_overlap_in_either_layout(site, browser):
    url, _, info = site
    feature = feature_of(info)
    page = browser()
    for x_mode in ("attribution", "position"):
        page.goto(f"{url}/Pathway?feature={feature}&prompt=risky&node_share=1.0&x_mode={x_mode}")
        wait_app(page)
        graph_title(page, f"Pathway of {feature} · risky prompt")
        page.locator(".js-plotly-plot .annotation").first.wait_for()
        g = check_readable(page)
        assert any(lab["text"].startswith(feature) for lab in g["labels"])  # the target is labelled
        page.locator(".js-plotly-plot").first.scroll_into_view_if_needed()
        page.mouse.move(5, 5)
        shot(page, f"graph_labels_{x_mode}", docs=False)


def test_select_pin_label_group_subgraph_and_downloads(site, browser):
    url, cache, info = site
    feature = feature_of(info)
    page = browser()
    page.goto(f"{url}/Pathway?feature={feature}&prompt=risky&node_share=1.0")
    wait_app(page)
    graph_title(page, f"Pathway of {feature} · risky prompt")
    g = page.evaluate(JS_GRAPH)
    node, other = g["ids"][0], g["ids"][1]

    # Click: the node goes into the address, its edges light up, the tables keep only its edges.
    click_node(page, g, node)
    wait_href(page, rf"node={node}")
    wait_app(page)
    page.get_by_role("heading", name=node).wait_for()
    g = page.evaluate(JS_GRAPH)
    assert g["selected"] == 1 and any(n.startswith("selected ") for n in g["names"])
    page.get_by_text(f"Edges of {node} only").wait_for()

    # Pin it, then label it: both land in the cache's annotations file.
    page.get_by_role("button", name="Pin", exact=True).click()
    wait_href(page, rf"pinned={node}")
    wait_app(page)
    ann_path = cache / "annotations" / f"{feature}.json"
    assert json.loads(ann_path.read_text())["pinned"] == [node]
    assert page.evaluate(JS_GRAPH)["pinned"] == 1
    page.get_by_label("Label", exact=True).fill("loss words")
    page.get_by_role("button", name="Save label and note").click()
    wait_app(page)
    page.wait_for_function("() => [...document.querySelectorAll('.annotation')].some(a => a.textContent.includes('loss words'))")
    assert json.loads(ann_path.read_text())["labels"] == {node: "loss words"}
    check_readable(page)

    # A supernode of two nodes, by hand (Pins & groups tab).
    page.get_by_role("tab", name="Pins & groups").click()
    page.get_by_label("Name", exact=True).fill("drivers")
    members = page.get_by_test_id("stMultiSelect").nth(1)
    for n in (node, other):  # type to filter, Enter picks (the list may open below the window)
        members.locator("input").click()
        page.keyboard.type(n)
        page.keyboard.press("Enter")
    page.keyboard.press("Escape")
    page.get_by_role("button", name="Make supernode").click()
    wait_app(page)
    page.wait_for_function("() => [...document.querySelectorAll('.annotation')].some(a => a.textContent.includes('drivers'))")
    assert json.loads(ann_path.read_text())["supernodes"] == [{"name": "drivers", "members": [node, other]}]

    # The pinned subgraph: only the pin and the target remain.
    page.get_by_role("tab", name="Pins & groups").click()
    page.get_by_text("Pinned subgraph only").click()
    wait_href(page, r"sub=1")
    wait_app(page)
    page.wait_for_function("() => { const gd = document.querySelectorAll('.js-plotly-plot')[0];"
                           " return gd.data.find(t => t.name === 'nodes').customdata.length === 1; }")
    assert page.evaluate(JS_GRAPH)["ids"] == [node]
    shot(page, "graph_pinned_subgraph", docs=False)

    # Downloads carry the annotations and the pruning applied.
    page.get_by_role("tab", name="Downloads").click()
    with page.expect_download() as dl:
        page.get_by_role("button", name="Graph JSON (as shown)").click()
    shown = json.loads(open(dl.value.path()).read())
    assert shown["pruning"]["method"] == "pinned subgraph" and shown["pruning"]["pinned"] == [node]
    assert [n["id"] for n in shown["nodes"] if n["pinned"]] == [node]
    assert shown["annotations"]["labels"] == {node: "loss words"}
    with page.expect_download() as dl:
        page.get_by_role("button", name="Edges CSV").click()
    head = open(dl.value.path()).read().splitlines()[0]
    assert head.endswith("source_label,target_label,source_supernode,target_supernode,source_pinned,target_pinned")
    with page.expect_download() as dl:
        page.get_by_role("button", name="circuit-tracer JSON").click()
    ct = json.loads(open(dl.value.path()).read())
    # the pin plus the supernode's other member: the viewer draws supernodes from pinned nodes only
    assert len(ct["qParams"]["pinnedIds"]) == 2 and ct["qParams"]["supernodes"][0][0] == "drivers"
    assert len(ct["qParams"]["supernodes"][0]) == 3
    assert any(n.get("clerp", "").startswith("loss words") for n in ct["nodes"])


def test_the_address_reproduces_the_view_in_a_fresh_browser(site, browser):
    url, _, info = site
    feature = feature_of(info)
    page = browser()
    page.goto(f"{url}/Pathway?feature={feature}&prompt=safe")
    wait_app(page)
    graph_title(page, f"Pathway of {feature} · safe prompt")
    # Change the pruning and the layout with the widgets; select a node; pin another by address.
    slider = page.get_by_test_id("stSlider").first
    slider.get_by_role("slider").focus()
    page.keyboard.press("End")
    wait_href(page, r"node_share=1")
    wait_app(page)
    page.get_by_text("position", exact=True).click()
    wait_href(page, r"x_mode=position")
    wait_app(page)
    g = page.evaluate(JS_GRAPH)
    click_node(page, g, g["ids"][-1])
    wait_href(page, r"node=")
    wait_app(page)
    shared = page.url
    before = page.evaluate(JS_GRAPH)
    q = params(page)
    # (a bound widget at its default value, like the safe prompt, leaves the address)
    assert q["feature"] == feature and q.get("prompt", "safe") == "safe" and float(q["node_share"]) == 1.0 and q["x_mode"] == "position"

    fresh = browser()  # another profile: nothing in common but the address
    fresh.goto(shared)
    wait_app(fresh)
    graph_title(fresh, f"Pathway of {feature} · safe prompt")
    after = fresh.evaluate(JS_GRAPH)
    assert after["ids"] == before["ids"] and after["selected"] == 1
    assert [lab["text"] for lab in after["labels"]] == [lab["text"] for lab in before["labels"]]
    fresh.get_by_role("heading", name=q["node"]).wait_for()
    fresh.get_by_role("tab", name="Downloads").click()
    with fresh.expect_download() as dl:
        fresh.get_by_role("button", name="Graph JSON (as shown)").click()
    shown = json.loads(open(dl.value.path()).read())
    assert shown["pruning"]["node_share"] == 1.0 and shown["pruning"]["edge_share"] == 0.98
    assert shown["pruning"]["layout"] == "position" and shown["pruning"]["nodes_shown"] == len(after["ids"]) + 1
    # Back undoes the selection.
    page.go_back()
    wait_href(page, r"node=", present=False)
    wait_app(page)
    # the rerun after Back may redraw the graph a moment after the app reports idle
    page.wait_for_function(f"() => {{ try {{ return ({JS_GRAPH})().selected === 0; }} catch (e) {{ return false; }} }}",
                           timeout=30_000)
    assert page.evaluate(JS_GRAPH)["selected"] == 0


def test_features_preview_node_opens_it_and_back_clears_the_row(site, browser):
    url, _, info = site
    from explorer import views
    from explorer.context import build_context
    from explorer import data

    page = browser()
    page.goto(f"{url}/Features")
    wait_app(page)
    ctx = build_context(None, str(site[1]))
    overview = views.filter_features(data.feature_overview(ctx))
    row = int(overview.index[overview["has_pathway"]][0])
    feature = overview["feature"].iloc[row]
    click_table_row(page, row)
    wait_href(page, rf"feature={feature}")
    wait_app(page)
    graph_title(page, f"Pathway of {feature}")
    # Back clears the selection (the address is the truth).
    page.go_back()
    wait_href(page, r"feature=", present=False)
    wait_app(page)
    page.get_by_text("Click a feature in the table to preview its pathway here").wait_for()
    page.go_forward()
    wait_href(page, rf"feature={feature}")
    wait_app(page)
    graph_title(page, f"Pathway of {feature}")
    page.locator(".js-plotly-plot .annotation").first.wait_for()
    g = check_readable(page, metrics=False, min_labels=2)  # the preview's labels too
    node = g["ids"][0]
    click_node(page, g, node)
    wait_href(page, rf"/Pathway\?.*node={node}")
    wait_app(page)
    page.get_by_role("heading", name=node).wait_for()
    assert params(page)["feature"] == feature


@pytest.mark.parametrize("value, why", [
    ("nonsense", "it is not a feature id (L<layer>-<index>, e.g. L12-3456)"),
    ("L99-1", "the model has layers 0 to 31"),
    ("L1-99999999", "the layer-1 SAE has features 0 to 32,767"),
])
def test_bad_feature_links_one_message_everywhere(site, browser, value, why):
    url, _, _ = site
    page = browser()
    message = f"Ignored the link's feature {value}: {why}. It has been removed from the address."
    for path in ("", "/Audit", "/Features", "/Pathway", "/Tokens", "/Live_prototype"):
        page.goto(f"{url}{path}?feature={value}")
        wait_app(page)
        alert = page.get_by_test_id("stAlert").filter(has_text="Ignored the link's feature")
        alert.wait_for()
        assert alert.inner_text().strip().replace("\n", " ").endswith(message.split(": ", 1)[1]), alert.inner_text()
        assert value in alert.inner_text()
        wait_href(page, r"feature=", present=False)
