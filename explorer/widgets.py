"""Shared Streamlit pieces: page setup with the sidebar (cache picker), problem messages,
metric rows and the deep-linked feature picker. The only explorer module importing streamlit."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, TypeVar

import pandas as pd
import streamlit as st

from engine import schema
from engine.errors import UserError
from explorer.context import AppContext, build_context, parse_app_args
from explorer.data import CacheProblem, manifest

T = TypeVar("T")

PAGES = {
    "home": "app.py",
    "audit": "pages/1_Audit.py",
    "features": "pages/2_Features.py",
    "pathway": "pages/3_Pathway.py",
    "tokens": "pages/4_Tokens.py",
    "live": "pages/5_Live_prototype.py",
}

_KIND_ICON = {"missing": ":material/folder_off:", "empty": ":material/draft:", "corrupt": ":material/broken_image:",
              "schema": ":material/rule:", "stale": ":material/history:"}


def context() -> AppContext:
    config, cache = parse_app_args(sys.argv[1:])
    override = st.session_state.get("_cache_override")
    return build_context(config, override or cache)


NAV = [
    ("home", "Home", ":material/hub:"),
    ("audit", "Audit", ":material/fact_check:"),
    ("features", "Features", ":material/list:"),
    ("pathway", "Pathway", ":material/account_tree:"),
    ("tokens", "Tokens", ":material/text_fields:"),
    ("live", "Live prototype", ":material/play_circle:"),
]
#: Pages that show one feature: the sidebar links carry the current ?feature= to them.
FEATURE_PAGES = {"pathway", "tokens", "live", "features"}


def page_setup(title: str, icon: str, many_features: bool = False) -> AppContext:
    """`many_features`: the page takes a comma-separated list in ?feature= (the Live page's
    intervention on a set), each id checked like a single one."""
    st.set_page_config(page_title=f"{title} · SAE pathway explorer", page_icon=icon, layout="wide")
    ctx = context()
    sidebar(ctx)
    check_feature_link(ctx, many_features)
    from explorer.jobs import reap

    reap()  # live jobs that ended since the last page draw leave no defunct process behind
    return ctx


def feature_link_problem(cfg, value: str) -> str | None:
    """Why `value` (from ?feature=) is not a feature of the configured model, or None."""
    import re

    m = re.fullmatch(r"L(\d{1,12})-(\d{1,12})", value.strip())
    if not m:
        return "it is not a feature id (L<layer>-<index>, e.g. L12-3456)"
    from explorer import jobs

    layer, index = int(m.group(1)), int(m.group(2))
    depth = jobs.model_depth(cfg)
    if depth is not None and not 0 <= layer < depth:
        return f"the model has layers 0 to {depth - 1}"
    try:
        width = jobs.sae_width(cfg, layer)
    except UserError:
        return f"there is no SAE for layer {layer}"
    if width is not None and not 0 <= index < width:
        return f"the layer-{layer} SAE has features 0 to {width - 1:,}"
    try:
        schema.FeatureId.parse(value)
    except UserError:
        return "it is not a feature id (L<layer>-<index>, e.g. L12-3456)"
    return None


def bad_link_message(value: str, why: str) -> str:
    shown = value if len(value) <= 40 else value[:39] + "…"
    return f"Ignored the link's feature `{shown}`: {why}. It has been removed from the address."


def check_feature_link(ctx: AppContext, many: bool = False) -> None:
    """Every page: a ?feature= that is not a feature of this model gets one message (the
    same on every page) and leaves the address, so the page opens as if it had no link."""
    raw = st.query_params.get("feature")
    if raw is None:
        return
    parts = [p.strip() for p in raw.split(",")] if many else [raw]
    bad = next(((p, w) for p in parts if (w := feature_link_problem(ctx.cfg, p))), None)
    if bad is None:
        return
    raw, why = bad  # the message names the id that is wrong
    del st.query_params["feature"]
    st.session_state.pop("_bad_link", None)
    st.warning(bad_link_message(raw, why), icon=":material/link_off:")


def navigation() -> None:
    """Page links with titles and icons (the automatic file-name navigation is switched off in
    .streamlit/config.toml); the feature on screen follows to the other feature pages."""
    feature = _valid_feature(st.query_params.get("feature"))
    for page, label, icon in NAV:
        qp = {"feature": feature} if feature and page in FEATURE_PAGES else None
        st.page_link(PAGES[page], label=label, icon=icon, query_params=qp)


def _apply_cache() -> None:
    value = (st.session_state.get("_cache_input") or "").strip()
    st.session_state["_cache_override"] = value or None


def _reset_cache() -> None:
    st.session_state["_cache_override"] = None


def recorded_steps(steps: dict) -> int:
    """Pipeline steps recorded as done; the manifest also holds partial runs (`pathways[features]`
    from a live job, shards), which are not pipeline steps."""
    return sum(1 for name in schema.STEPS if isinstance(steps.get(name), dict) and steps[name].get("status") == "done")


def sidebar(ctx: AppContext) -> None:
    with st.sidebar:
        st.markdown("**SAE pathway explorer**")
        navigation()
        st.divider()
        st.text_input("Cache folder", value=str(ctx.cache), key="_cache_input", on_change=_apply_cache,
                      help="The folder the engine wrote (`cache_dir` in the config, or `--cache`). "
                           "Change it to compare runs; the change lasts for this browser tab.")
        if not ctx.cache.is_dir():
            st.warning("This folder does not exist yet: the engine's steps create it.", icon=":material/folder_off:")
        elif not (ctx.cache / schema.MANIFEST).is_file():
            st.caption(":material/info: No manifest.json here yet: no step has run in this cache.")
        else:
            steps = manifest(ctx).get("steps", {})
            done = recorded_steps(steps)
            st.caption(f":material/check_circle: {done} of {len(schema.STEPS)} steps recorded")
        if st.session_state.get("_cache_override"):
            st.button("Back to the default cache", on_click=_reset_cache, width="stretch")
        cfg = ctx.config_path or "built-in defaults"
        st.caption(f"Config: `{cfg}`")
        if ctx.config_error:
            st.warning(f"Config not loaded: {ctx.config_error}", icon=":material/warning:")


def show_problem(problem: CacheProblem | UserError, where: Any = None) -> None:
    where = where or st
    if isinstance(problem, CacheProblem):
        where.warning(problem.message, icon=_KIND_ICON.get(problem.kind, ":material/warning:"))
        if problem.command:
            where.caption("Run this to (re)build it:")
            where.code(problem.command, language="bash")
    else:
        where.error(str(problem), icon=":material/error:")


def empty_state(text: str, command: str | None = None, icon: str = ":material/info:", stop: bool = True) -> None:
    """What is missing and, when a command makes it, that command; then stop the page."""
    st.info(text, icon=icon)
    if command:
        st.code(command, language="bash")
    if stop:
        st.stop()


def stale_banner(ctx: AppContext, step: str, what: str) -> None:
    """A warning when the engine considers `step` out of date, with the command that refreshes it."""
    from explorer.data import stale_note

    if stale := stale_note(ctx, step):
        st.warning(f"{what} may be out of date: {stale.note}.", icon=":material/history:")
        if stale.command:
            st.code(stale.command, language="bash")


def load(fn: Callable[..., T], *args, stop: bool = True, where: Any = None) -> T | None:
    """Call a loader; on CacheProblem show it (and stop the page unless stop=False)."""
    try:
        return fn(*args)
    except (CacheProblem, UserError) as exc:
        show_problem(exc, where)
        if stop:
            st.stop()
        return None


def fmt(x: Any, digits: int = 3, pct: bool = False, signed: bool = False) -> str:
    if x is None:
        return "–"
    try:
        v = float(x)
    except (TypeError, ValueError):
        return str(x)
    if math.isnan(v):
        return "–"
    if pct:
        return f"{100 * v:.1f}%"
    if isinstance(x, int) or (hasattr(x, "dtype") and getattr(x.dtype, "kind", "") in "iu"):
        return f"{int(v):+,}" if signed else f"{int(v):,}"
    return f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"


def metric_row(items: Iterable[tuple], border: bool = True, compact: bool = False, key: str | None = None) -> None:
    """One row of metric cards: (label, value, tooltip defining the number[, small note under it]).
    Cards wrap onto more rows rather than cut a label or value off; `compact` uses smaller
    type so that more fit on one row (needs a `key`, which scopes the style)."""
    items = list(items)
    box = st.container(key=key) if key else st.container()
    if compact and key:
        box.html(f"<style>.st-key-{key} [data-testid='stMetricValue'] {{font-size: 1.5rem;}}</style>")
    with box:
        for row in metric_rows(items, compact=compact and bool(key)):
            cols = st.columns(len(row))
            for col, item in zip(cols, row):
                label, value, tip = item[:3]
                note = item[3] if len(item) > 3 else None
                col.metric(label, value, delta=note, delta_color="off", delta_arrow="off", help=tip, border=border)


#: Width of the main column at a 1280 px window with the sidebar open.
CONTENT_WIDTH = 820


def metric_card_width(label: str, value: str, compact: bool = False) -> float:
    """Pixels a card needs: its value (36 px type, 1.5rem compact) or its label (14 px type)
    with the help icon, plus the bordered card's padding."""
    per_char = 12.7 if compact else 20.5  # measured in chromium: "100.0%" is 76 px at 1.5rem
    return max(per_char * len(str(value)), 6.6 * len(str(label)) + 22) + 34


def metric_rows(items: list[tuple], width: float = CONTENT_WIDTH, compact: bool = False) -> list[list[tuple]]:
    """Split metric cards into rows of equal columns, each wide enough for its label and
    value (so that neither is cut off with an ellipsis at a 1280 px window)."""
    for n in range(len(items), 0, -1):
        k = -(-len(items) // n)  # rows needed; then spread the cards evenly over them
        n = -(-len(items) // k)
        gap = 16 * (n - 1)
        if all((width - gap) / n >= metric_card_width(it[0], it[1], compact) for it in items):
            return [items[i:i + n] for i in range(0, len(items), n)]
    return [[it] for it in items]


def feature_picker(options: list[str], *, key: str = "feature", label: str = "Feature",
                   help: str | None = None, where: Any = None) -> str | None:
    """A selectbox whose value lives in the page address (?feature=...), so links, reloads
    and the Back button keep it. A valid id in the URL without a file is still offered, so
    the page can say what would produce it.

    The URL is the single source of truth: the widget's key includes the URL value (a new
    address remounts it at that value) and a choice writes the URL, which pushes a browser
    history entry. (A widget bound with bind="query-params" under the same key on every page
    carries its value across page switches and then ignores a link's ?feature=.)"""
    where = where or st
    wanted = _valid_feature(st.query_params.get(key))
    opts = list(options)
    if wanted is not None and wanted not in opts:
        opts.append(wanted)
    widget_key = f"_pick_{key}_{wanted or ''}"
    where.selectbox(label, opts, index=opts.index(wanted) if wanted is not None else None, key=widget_key,
                    on_change=_url_from_widget, args=(widget_key, key), placeholder="Choose a feature",
                    help=help or "Feature id L<layer>-<index>. The choice is kept in the page address "
                                 "(?feature=...), so links, reloads and the Back button keep it.")
    return wanted


#: Address parameters that belong to one feature's graph: a new feature drops them.
GRAPH_PARAMS = ("node", "pinned", "sub")


def _drop_graph_params() -> None:
    for k in GRAPH_PARAMS:
        if k in st.query_params:
            del st.query_params[k]


def _url_from_widget(widget_key: str, param: str) -> None:
    if param == "feature":
        _drop_graph_params()
    value = st.session_state.get(widget_key)
    if value:
        st.query_params[param] = value
    elif param in st.query_params:
        del st.query_params[param]


def feature_text_input(*, key: str = "feature", label: str = "Feature", help: str | None = None,
                       where: Any = None) -> str:
    """Free text for any feature id, kept in ?feature= like `feature_picker`."""
    where = where or st
    wanted = st.query_params.get(key) or ""
    widget_key = f"_text_{key}_{wanted}"
    where.text_input(label, value=wanted, key=widget_key, on_change=_url_from_widget, args=(widget_key, key),
                     placeholder="L12-3456", help=help)
    return wanted


def open_feature(feature: str, key: str = "feature") -> None:
    """Callback: show another feature on the current page (the URL follows, Back returns)."""
    if key == "feature":
        _drop_graph_params()
    st.query_params[key] = feature


def download(label: str, data: bytes | str | Callable[[], bytes] | None, file_name: str, mime: str, help: str,
             key: str) -> None:
    if data is None:
        st.button(label, disabled=True, help=help, key=key, width="stretch")
    else:
        st.download_button(label, data, file_name=file_name, mime=mime, help=help, key=key, width="stretch")


# ---------------------------------------------------------------------------
# The pathway panel (Pathway page, Features preview, Live prototype)
# ---------------------------------------------------------------------------

_VALIDATED_HELP = ("Replay reports two verdicts. Linear estimate confirmed: zero-ablating the node changed the "
                   "target's pre-activation with the predicted sign (about minus its attribution) and by more than "
                   "the configured minimum. Validated: that, and the target's activation (after its gate) changed "
                   "the same way; a target that does not fire is never validated, only 'pre-activation only'.")
HELP = {
    "activation": "The node's SAE activation summed over the prompt positions where it is active.",
    "attribution": "First-order effect of the node on the target's pre-activation: activation times the "
                   "gradient along its decoder direction, summed over positions (gradient × activation).",
    "replay": "Measured change of the target's pre-activation when the node is zero-ablated (after minus "
              "before). To first order it is minus the attribution.",
    "validated": _VALIDATED_HELP,
    "r": "Pearson correlation of attribution with minus the replay change, over the replayed nodes "
         "(1 = the gradient estimate ranks effects exactly as real ablations do).",
    "sign": "Share of replayed nodes whose attribution and minus-replay-change have the same sign.",
    "weight": "Edge weight: the first-order effect on the target's pre-activation of the source acting through "
              "the downstream node's activation at every position where it is active (docs/science.md). Per "
              "layer, SAE-error and bias nodes carry what the features do not.",
    "coverage": "Share of the total |attribution| of all active upstream features that the graph's nodes hold.",
}


@dataclass
class GraphState:
    """What the Pathway page shows of one graph beyond the pruning: the selected node and
    the pinned set (both in the address, so a link reproduces the view), whether only the
    pinned nodes are drawn, and the feature's saved annotations."""
    feature: str
    selected: str | None = None
    pinned: tuple[str, ...] = ()
    subgraph: bool = False
    annotations: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def effective_annotations(self) -> dict:
        """The saved annotations with the pins on screen (a link's pins win over the file's)."""
        return {**self.annotations, "pinned": list(self.pinned)}


def _url_list(value: str | None) -> list[str]:
    return [v for v in (value or "").split(",") if v]


def graph_state(ctx: AppContext, feature: str, ids: set[str]) -> GraphState:
    """Read ?node=, ?pinned= and ?sub= (checked against the graph's node ids) and the saved
    annotations; a bad node or pin in the address is dropped from it."""
    from explorer import annotations as A

    try:
        ann, problems = A.load(ctx.cache, feature)
    except UserError as exc:
        ann, problems = A.empty(feature), [str(exc)]
    node = st.query_params.get("node")
    if node is not None and node not in ids:
        problems.append(f"the link's node `{node[:40]}` is not in this graph; it was removed from the address")
        del st.query_params["node"]
        node = None
    if "pinned" in st.query_params:
        raw = _url_list(st.query_params.get("pinned"))
        pinned = [p for p in raw if p in ids]
        if len(pinned) != len(raw):
            problems.append("pins not in this graph were removed from the address")
            _set_pins_in_url(pinned)
    else:
        pinned = [p for p in ann.get("pinned", []) if p in ids]
    sub = st.query_params.get("sub") == "1" and bool(pinned)
    return GraphState(feature, node, tuple(dict.fromkeys(pinned)), sub, ann, problems)


def _set_pins_in_url(pins: list[str]) -> None:
    if pins:
        st.query_params["pinned"] = ",".join(pins)
    elif "pinned" in st.query_params:
        del st.query_params["pinned"]


def _on_graph_select(chart_key: str, traces: set[int]) -> None:
    """Graph click: the clicked node goes into the address (Back undoes it); an emptied
    selection (double click) clears it."""
    from explorer import figures

    picked = figures.selected_nodes(st.session_state.get(chart_key), traces)
    if picked:
        st.query_params["node"] = picked[0]
    elif "node" in st.query_params:
        del st.query_params["node"]


def clear_node() -> None:
    if "node" in st.query_params:
        del st.query_params["node"]


def _save_annotations(ctx: AppContext, feature: str, change) -> None:
    from explorer import annotations as A

    try:
        A.update(ctx.cache, feature, change)
    except (OSError, UserError) as exc:
        st.session_state["_ann_error"] = f"Could not save the annotations of {feature}: {exc}"


def _toggle_pin(ctx: AppContext, state: GraphState, node: str) -> None:
    pins = list(state.pinned)
    pins = [p for p in pins if p != node] if node in pins else pins + [node]
    _set_pins_in_url(pins)
    from explorer import annotations as A

    _save_annotations(ctx, state.feature, lambda ann: A.set_pinned(ann, pins))


def _set_pins(ctx: AppContext, state: GraphState, widget_key: str) -> None:
    from explorer import annotations as A

    pins = list(st.session_state.get(widget_key) or [])
    _set_pins_in_url(pins)
    if not pins and "sub" in st.query_params:
        del st.query_params["sub"]
    _save_annotations(ctx, state.feature, lambda ann: A.set_pinned(ann, pins))


def _toggle_subgraph(widget_key: str) -> None:
    if st.session_state.get(widget_key):
        st.query_params["sub"] = "1"
    elif "sub" in st.query_params:
        del st.query_params["sub"]


def _save_node_text(ctx: AppContext, feature: str, node: str, label_key: str, note_key: str) -> None:
    from explorer import annotations as A

    label = st.session_state.get(label_key) or ""
    note = st.session_state.get(note_key) or ""
    _save_annotations(ctx, feature, lambda ann: A.set_text(A.set_text(ann, "labels", node, label), "notes", node, note))


def _add_group(ctx: AppContext, feature: str, name: str, members: list[str]) -> None:
    from explorer import annotations as A

    try:
        _save_annotations(ctx, feature, lambda ann: A.add_supernode(ann, name, members))
    except UserError as exc:
        st.session_state["_ann_error"] = str(exc)


def _add_group_from_form(ctx: AppContext, feature: str, name_key: str, members_key: str) -> None:
    from explorer import annotations as A

    name = st.session_state.get(name_key) or ""
    members = list(st.session_state.get(members_key) or [])
    try:
        A.add_supernode(A.empty(feature), name, members)  # check before writing
    except UserError as exc:
        st.session_state["_ann_error"] = f"Supernode not made: {exc}."
        return
    _add_group(ctx, feature, name, members)


def _remove_group(ctx: AppContext, feature: str, name: str) -> None:
    from explorer import annotations as A

    _save_annotations(ctx, feature, lambda ann: A.remove_supernode(ann, name))


def node_tools(ctx: AppContext, state: GraphState, node: str, key: str) -> None:
    """Pin, label and note one node (saved in the cache's annotations of the feature)."""
    pinned = node in state.pinned
    with st.container(border=True):
        c1, c2 = st.columns([1, 1])
        c1.button("Unpin" if pinned else "Pin", key=f"{key}_pin_{node}", on_click=_toggle_pin,
                  args=(ctx, state, node), icon=":material/push_pin:", width="stretch",
                  help="Pinned nodes stay in the graph whatever the pruning, get a gold ring, travel in the "
                       "address and make the subgraph (Pins & groups tab)")
        if state.selected == node:
            c2.button("Clear", key=f"{key}_clear", on_click=clear_node, icon=":material/close:",
                      width="stretch", help="Show every edge and the full tables again (Back does the same)")
        label_key, note_key = f"{key}_label_{node}", f"{key}_note_{node}"
        with st.form(f"{key}_text_{node}", border=False):
            st.text_input("Label", value=state.annotations.get("labels", {}).get(node, ""), key=label_key,
                          max_chars=80, placeholder="e.g. 'loss aversion'",
                          help="Your name for this node: drawn under its id in the graph, and the clerp of the "
                               "circuit-tracer export")
            st.text_area("Note", value=state.annotations.get("notes", {}).get(node, ""), key=note_key, height=80,
                         max_chars=4000, placeholder="What you found about this node")
            st.form_submit_button("Save label and note", on_click=_save_node_text,
                                  args=(ctx, state.feature, node, label_key, note_key), icon=":material/save:")


def pathway_panel(ctx: AppContext, bundle, key: str, causal: dict[str, dict], files: set[str],
                  compact: bool = False, state: GraphState | None = None) -> str | None:
    """Graph (click a node) beside the node card, then edges, agreement and downloads.
    With a GraphState (the Pathway page) the selected node lives in the address, its edges
    are highlighted and the tables filtered to them, and pins, groups, labels and notes can
    be edited. Returns the clicked or selected node id, if any."""
    from explorer import figures
    from explorer import graph as G

    view = bundle.shown
    chart_key = f"{key}_graph"
    if compact:
        event = st.plotly_chart(bundle.figure, key=chart_key, on_select="rerun", selection_mode="points",
                                config={"displaylogo": False})
        picked = figures.selected_nodes(event, bundle.node_traces)
        return picked[0] if picked else None
    if st.session_state.get("_ann_error"):
        st.error(st.session_state.pop("_ann_error"), icon=":material/error:")
    left, right = st.columns([2.5, 1.1], gap="medium")
    with left:
        on_select = (lambda: _on_graph_select(chart_key, bundle.node_traces)) if state else "rerun"
        event = st.plotly_chart(bundle.figure, key=chart_key, on_select=on_select, selection_mode="points",
                                config={"displaylogo": False, "toImageButtonOptions": {"filename": f"pathway_{view.feature}"}})
        dropped = []
        if view.dropped_nodes:
            dropped.append(f"{view.dropped_nodes} weaker nodes")
        if view.dropped_edges:
            dropped.append(f"{view.dropped_edges} edges")
        st.caption(figures.legend_markdown(), unsafe_allow_html=True)
        st.caption("Layer on the vertical axis; node colour = attribution (red raises the target, blue lowers it); "
                   "size = activation; labels: feature id and its top logit-lens output tokens (→) or top "
                   "activating token (“”) where the tokens step covered it, or your label."
                   + (f" Pruned: {', '.join(dropped)} hidden." if dropped else "")
                   + (" Showing the pinned nodes only." if state and state.subgraph else ""))
    if state is not None:
        node = state.selected
    else:
        picked = figures.selected_nodes(event, bundle.node_traces)
        node = picked[0] if picked else None
    with right:
        node_card(ctx, bundle, node or view.feature, causal, files, key, clicked=node is not None)
        if state is not None:
            node_tools(ctx, state, node or view.feature, key)
    tabs = ["Edges", "Nodes", "Attribution vs replay"] + (["Pins & groups"] if state else []) + ["Downloads"]
    tab = dict(zip(tabs, st.tabs(tabs)))
    edges_all, nodes_all = G.incident(view, node) if state is not None else (view.edges, view.nodes)
    with tab["Edges"]:
        edges = edges_all.copy()
        edges["|weight|"] = edges["weight"].abs()
        edges = edges.sort_values("|weight|", ascending=False).drop(columns="|weight|")
        cols = [c for c in ("source", "target", "weight", "weight_safe", "weight_risky", "raw", "validated")
                if c in edges.columns and not (c == "raw" and edges[c].isna().all())]  # raw: edge_weight approx only
        if state is not None and node:
            st.caption(f"Edges of **{node}** only (click another node, or Clear on its card for all).")
        st.dataframe(edges[cols], hide_index=True, width="stretch", height=min(420, 38 + 35 * max(1, len(edges))),
                     key=f"{key}_edges_{node}",
                     column_config={
                         "weight": st.column_config.NumberColumn(format="%+.4f", help=HELP["weight"]),
                         "weight_safe": st.column_config.NumberColumn("weight (safe)", format="%+.4f"),
                         "weight_risky": st.column_config.NumberColumn("weight (risky)", format="%+.4f"),
                         "raw": st.column_config.NumberColumn(
                             format="%+.4f", help="Approximation mode only: attribution of the source to the downstream "
                                                 "node's pre-activation summed over its positions"),
                         "validated": st.column_config.CheckboxColumn(
                             "source validated", help="Replay confirmed the source node (edges are not replayed)"),
                     })
        st.caption(f"{len(edges)} edges shown of {len(bundle.full.edges)}, strongest first.")
    with tab["Attribution vs replay"]:
        if view.mode == "difference":
            st.info("Agreement is a per-prompt figure: switch to the safe or risky prompt.", icon=":material/info:")
        else:
            a = bundle.agreement
            metric_row([
                ("Pearson r", fmt(a["pearson_r"]), HELP["r"]),
                ("Sign agreement", fmt(a["sign_agreement"], pct=True), HELP["sign"]),
                ("Replayed nodes", fmt(a["n"]), "Nodes whose effect was measured by ablation"),
            ])
            st.plotly_chart(figures.agreement_figure(bundle.full), key=f"{key}_agree", config={"displaylogo": False})
    with tab["Nodes"]:
        base = nodes_all if (state is not None and node) else bundle.full.nodes
        nodes = base.drop(columns=["positions", "position_activations", "position_attributions"], errors="ignore")
        pre_only = nodes["validated"].eq(False) & nodes.get("linear_confirmed", nodes["validated"]).eq(True)
        nodes = nodes.assign(validated=nodes["validated"].map({True: "yes", False: "no"}).fillna("not replayed")
                             .where(~pre_only, "pre-activation only"))
        if state is not None:
            ann = state.annotations
            groups = {m: sn["name"] for sn in ann.get("supernodes") or [] for m in sn["members"]}
            nodes.insert(1, "label", [ann.get("labels", {}).get(i) or bundle.auto_labels.get(i) or "" for i in nodes["id"]])
            nodes.insert(2, "pinned", [i in state.pinned for i in nodes["id"]])
            nodes.insert(3, "supernode", [groups.get(i, "") for i in nodes["id"]])
            if node:
                st.caption(f"**{node}** and its neighbours in the graph shown.")
        st.dataframe(nodes, hide_index=True, width="stretch", height=min(420, 38 + 35 * max(1, len(nodes))),
                     key=f"{key}_nodes_{node}",
                     column_config={
                         "activation": st.column_config.NumberColumn(format="%.4f", help=HELP["activation"]),
                         "attribution": st.column_config.NumberColumn(format="%+.4f", help=HELP["attribution"]),
                         "replay_delta": st.column_config.NumberColumn("replay change", format="%+.4f",
                                                                       help=HELP["replay"]),
                         "patch_delta": st.column_config.NumberColumn("patch change", format="%+.4f"),
                         "validated": st.column_config.TextColumn(help=HELP["validated"]),
                         "label": st.column_config.TextColumn(help="Your label, else the auto-label from the tokens step"),
                     })
    if state is not None:
        with tab["Pins & groups"]:
            pins_and_groups(ctx, bundle, state, key)
    with tab["Downloads"]:
        downloads(ctx, bundle, key, state)
    return node


def pins_and_groups(ctx: AppContext, bundle, state: GraphState, key: str) -> None:
    """Pinned set and pinned-only subgraph; supernodes by hand and suggested by co-attribution."""
    from explorer import annotations as A

    ids = bundle.full.nodes["id"].tolist()
    c1, c2 = st.columns([2, 1])
    pins_key = f"{key}_pins_{','.join(state.pinned)}"
    c1.multiselect("Pinned nodes", ids, default=list(state.pinned), key=pins_key, on_change=_set_pins,
                   args=(ctx, state, pins_key), placeholder="Pin nodes (or use Pin on a node's card)",
                   help="Saved in the cache (annotations/<feature>.json) and kept in the page address")
    sub_key = f"{key}_sub_{state.subgraph}"
    c2.toggle("Pinned subgraph only", value=state.subgraph, key=sub_key, on_change=_toggle_subgraph, args=(sub_key,),
              disabled=not state.pinned,
              help="Draw only the pinned nodes and the target, with every edge of the full graph between them")
    st.markdown("**Supernodes**")
    groups = state.annotations.get("supernodes") or []
    if groups:
        for sn in groups:
            g1, g2 = st.columns([5, 1])
            g1.markdown(f"**{sn['name']}**: " + ", ".join(f"`{m}`" for m in sn["members"]))
            g2.button("Remove", key=f"{key}_rm_{sn['name']}", on_click=_remove_group, args=(ctx, state.feature, sn["name"]),
                      width="stretch")
    else:
        st.caption("No supernodes yet. A supernode is a named group of nodes with one role; it is drawn as a box "
                   "around its members and exported to circuit-tracer's viewer.")
    with st.form(f"{key}_group_form", border=True, clear_on_submit=True):
        f1, f2 = st.columns([1, 2])
        name_key, members_key = f"{key}_group_name", f"{key}_group_members"
        f1.text_input("Name", key=name_key, max_chars=A.MAX_NAME, placeholder="e.g. loss words")
        f2.multiselect("Members", ids, key=members_key, placeholder="Two or more nodes")
        st.form_submit_button("Make supernode", on_click=_add_group_from_form,
                              args=(ctx, state.feature, name_key, members_key), icon=":material/workspaces:")
    in_group = {m for sn in groups for m in sn["members"]}
    from explorer import views

    suggested = views.suggested_supernodes(ctx, bundle, in_group)
    st.markdown("**Suggested by co-attribution**", help=(
        "Nodes of one layer whose signed edge weights to and from every other node of this graph point the "
        "same way (cosine similarity of the edge profiles, average linkage, at least 0.9): they feed the same "
        "nodes and are fed by the same nodes. Computed from the graph's edges, without the SAE's decoder."))
    if not suggested:
        st.caption("No group of nodes shares its edges closely enough (cosine ≥ 0.9) in this graph.")
    for k, sn in enumerate(suggested[:8]):
        s1, s2 = st.columns([5, 1])
        s1.markdown(f"{sn['name']}: " + ", ".join(f"`{m}`" for m in sn["members"]))
        s2.button("Add", key=f"{key}_sugg_{k}", on_click=_add_group, args=(ctx, state.feature, sn["name"], sn["members"]),
                  width="stretch")


def downloads(ctx: AppContext, bundle, key: str, state: GraphState | None) -> None:
    """The four downloads (built once per view and annotations)."""
    from explorer import views
    from engine.schema import pathway_path

    view = bundle.shown
    ann = state.effective_annotations() if state else None
    graph_bytes, edges_bytes, ct = views.download_bytes(ctx, bundle, ann)
    c1, c2, c3, c4 = st.columns(4)
    with c1:
        download("Graph JSON (as shown)", graph_bytes,
                 f"{view.feature}.{view.mode}.graph.json", "application/json",
                 "The nodes and edges drawn above, with the pruning applied and your annotations", f"{key}_dl_graph")
    with c2:
        # named <slug>.json: circuit-tracer's viewer fetches exactly that name
        download("circuit-tracer JSON", ct, f"{view.feature}.{view.mode}.json", "application/json",
                 "circuit-tracer 0.5.0's graph JSON with your pins (pinnedIds), supernodes and labels (clerp); its "
                 "local viewer opens it from a folder with a graph-metadata.json listing, as in the cache's "
                 "pathways/circuit_tracer/ (docs/cache_format.md)" + ("" if ct else " (not available for this view)"),
                 f"{key}_dl_ct")
    with c3:
        download("Edges CSV", edges_bytes, f"{view.feature}.{view.mode}.edges.csv", "text/csv",
                 "The edges drawn above, with each end's label, supernode and pin", f"{key}_dl_csv")
    with c4:
        path = pathway_path(ctx.cache, view.feature)
        download("Full pathway file", path.read_bytes() if path.is_file() else None, f"{view.feature}.json",
                 "application/json", "The engine's pathway file with every prompt", f"{key}_dl_full")


def node_card(ctx: AppContext, bundle, node_id: str, causal: dict[str, dict], files: set[str], key: str,
              clicked: bool = True) -> None:
    from explorer import data as D
    from explorer import figures
    from explorer import graph as G
    from explorer import views as V

    det = G.node_details(bundle.pathway, node_id)
    with st.container(border=True):
        is_target = det.get("is_target", node_id == bundle.full.feature)
        st.markdown(f"#### {node_id}" + (" · target" if is_target else ""))
        if not clicked:
            st.caption("Click a node in the graph to see its numbers here.")
        info = causal.get(node_id)
        if info:
            st.caption(f"Selected causal feature: {info.get('direction', '?')}, Cohen's d {fmt(info.get('cohen_d'), 2, signed=True)}")
        rows = []
        for prompt, rec in det["prompts"].items():
            v = rec["validated"]
            pre_only = v is False and rec.get("linear_confirmed") is True
            rows.append({"prompt": prompt, "act": rec["activation"],
                         "attr": None if is_target else rec["attribution"],
                         "replay": None if is_target else rec["replay_delta"],
                         "valid": "" if is_target else ("yes" if v is True else (
                             "pre-act. only" if pre_only else ("no" if v is False else "–")))})
        if rows:
            cols = ["prompt", "act"] if is_target else ["prompt", "act", "attr", "replay", "valid"]
            shown = V.numbers_as_text(pd.DataFrame(rows)[cols], {"act": "{:.3f}", "attr": "{:+.3f}", "replay": "{:+.3f}"})
            st.dataframe(shown, hide_index=True, width="stretch", column_config={  # "–": not replayed, not "None"
                "prompt": st.column_config.TextColumn(width="small"),
                "act": st.column_config.TextColumn("activation", help=HELP["activation"]),
                "attr": st.column_config.TextColumn("attrib.", help=HELP["attribution"]),
                "replay": st.column_config.TextColumn("replay", help=HELP["replay"]),
                "valid": st.column_config.TextColumn("valid.", width="small",
                                                     help=HELP["validated"] + " '–' = not replayed."),
            })
        prompt = bundle.shown.mode if bundle.shown.mode in det["prompts"] else next(iter(det["prompts"]), None)
        if prompt:
            pos = det["prompts"][prompt]["positions"]
            if pos:
                st.markdown(f"**Positions** ({prompt} prompt)")
                st.dataframe(pd.DataFrame([{"pos": p["position"], "token": figures.clean_token(p["token"]),
                                            "act": p["activation"], "attr": p["attribution"]} for p in pos]),
                             hide_index=True, width="stretch", column_config={
                                 "pos": st.column_config.NumberColumn("pos.", width="small",
                                                                      help="Token position in the prompt (0 = BOS)"),
                                 "token": st.column_config.TextColumn(width="small"),
                                 "act": st.column_config.NumberColumn("activation", format="%.3f",
                                                                      help="Activation at this position"),
                                 "attr": st.column_config.NumberColumn("attrib.", format="%+.3f",
                                                                       help="Attribution from this position")})
        try:
            toks, kind = D.node_meaning(ctx, node_id)
        except D.CacheProblem as exc:
            toks, kind = None, None
            st.caption(f":material/warning: {exc.message}")
        if toks:
            _node_meaning(toks, node_id, key)
            if kind == "full":
                st.page_link(PAGES["tokens"], label=f"Token views of {node_id}", icon=":material/text_fields:",
                             query_params={"feature": node_id})
        elif kind is None:
            st.caption(f"No token views of {node_id} yet: `python -m engine tokens` gives every graph node its "
                       "logit lens, activation histogram and top contexts.")
        if not is_target and node_id in files:
            st.button(f"Open the pathway of {node_id}", key=f"{key}_open_{node_id}", on_click=open_feature,
                      args=(node_id,), icon=":material/account_tree:", width="stretch")
        elif not is_target and info is not None:
            st.caption(f"{node_id} is a selected causal feature without a pathway yet:")
            st.code(D.pathway_command(ctx, node_id), language="bash")


def _node_meaning(toks: dict, node_id: str, key: str) -> None:
    """What a node means: logit-lens tokens, where it fires on the prompts, its activation
    histogram and its distinct top activating contexts (tokens step, node or selected feature)."""
    from explorer import figures

    lens = toks.get("logit_lens") or {}
    promoted = [figures.clean_token(t.get("token")) for t in (lens.get("promoted") or [])[:8]]
    suppressed = [figures.clean_token(t.get("token")) for t in (lens.get("suppressed") or [])[:5]]
    if promoted:
        st.markdown("**Output tokens** (logit lens): " + ", ".join(f"`{t}`" for t in promoted))
    if suppressed:
        st.caption("suppresses: " + ", ".join(f"`{t}`" for t in suppressed))
    inputs = []
    for pname, pv in (toks.get("prompt_activations") or {}).items():
        arg = pv.get("argmax_position")
        tk = pv.get("tokens") or []
        if arg is not None and 0 <= arg < len(tk) and (pv.get("max") or 0) > 0:
            inputs.append(f"`{figures.clean_token(tk[arg])}` ({pname}, {fmt(pv.get('max'))})")
    if inputs:
        st.markdown("**Strongest on the prompts**: " + ", ".join(inputs))
    hist = toks.get("activation_histogram")
    fig = figures.activation_histogram_figure(hist) if hist else None
    if fig is not None:
        st.plotly_chart(fig, key=f"{key}_hist_{node_id}", config={"displayModeBar": False})
    top = toks.get("top_activating") or []
    if top:
        st.markdown("**Top activating contexts** (distinct, sampled responses)")
        st.html(figures.context_snippets_html(top))
    elif hist is None:
        st.caption("No sampled responses: the audit's trials table was missing when the tokens step ran.")


def _valid_feature(value: Any) -> str | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return str(schema.FeatureId.parse(value))
    except UserError:
        return None


# ---------------------------------------------------------------------------
# The embedded demo (home page)
# ---------------------------------------------------------------------------


def _p_text(p: float | None) -> str:
    return "–" if p is None else f"{p:.2g}"


def demo_panel(info) -> None:
    """Say plainly that the cache holds the embedded demo (explorer.demo.DemoInfo): what its
    model is, what it learned, which features were causal, the build's times, and how to
    point the tool at real data instead."""
    from explorer.demo import REAL_DATA_COMMANDS, REAL_DATA_YAML

    arch = f" ({info.architecture})" if info.architecture else ""
    with st.container(border=True):
        st.markdown("#### :material/science: This is the embedded demo, not LLaMA-3.1-8B")
        st.markdown(
            f"The cache holds the output of `python -m engine demo`: a small LLaMA-architecture model{arch} "
            "trained to play the study's slot-machine game, residual SAEs trained on its activations, and a "
            "miniature of Experiments 1 and 2 run on it, in the study's file formats, through the whole pipeline. "
            "Every page shows that small model's results. `docs/demo.md` says how it is built.")
        if info.problem:
            st.warning(f"The demo's record {info.problem}; rebuild it with `python -m engine demo --force`.",
                       icon=":material/broken_image:")
        else:
            if not info.complete:
                st.warning("The demo's build did not finish; `python -m engine demo` resumes it.",
                           icon=":material/hourglass_top:")
            if info.later_model:
                st.warning(f"A later `python -m engine run` with the model `{info.later_model}` wrote this cache's "
                           "results: the pages show those, and the demo's own files stay in `demo/`.",
                           icon=":material/swap_horiz:")
            c1, c2, c3 = st.columns([2.6, 1.6, 1], gap="medium")
            with c1:
                _demo_learned(info)
            with c2:
                _demo_causal(info)
            with c3:
                st.markdown("**Build time**")
                st.dataframe(_demo_stages(info), hide_index=True, width="stretch",
                             column_config={"seconds": st.column_config.NumberColumn("wall s", format="%.1f")})
                bits = [f"seed {info.seed}" if info.seed is not None else None,
                        f"`--minutes {info.minutes:g}`" if info.minutes is not None else None]
                st.caption(" · ".join(b for b in bits if b))
    with st.container(border=True):
        st.markdown("#### :material/database: Pointing the tool at real data")
        st.markdown("In the repository's `config.yaml` (every key is documented there) set `model.name_or_path` "
                    "to LLaMA-3.1-8B, `sae.source` to the LlamaScope SAEs and `data.checkpoints_dir` / "
                    "`data.responses_dir` to the study's folders:")
        st.code(REAL_DATA_YAML, language="yaml")
        st.markdown("Then run the pipeline (the pathway step wants a GPU) and open the explorer on its results:")
        st.code(REAL_DATA_COMMANDS, language="bash")


def _demo_stages(info) -> pd.DataFrame:
    from explorer.demo import stage_table

    return stage_table(info)


def _demo_learned(info) -> None:
    st.markdown("**What the model learned**: its answers to the study's two prompts")
    if info.rates is None:
        st.info("The record holds no decision rates.", icon=":material/info:")
    else:
        t = info.rates
        frame = pd.DataFrame({
            "model": t["model"],
            "stop_safe": [fmt(v, 2) for v in t["stop_safe"]],
            "stop_risky": [fmt(v, 2) for v in t["stop_risky"]],
            "valid": [f"{fmt(r['valid_n_safe'])}/{fmt(r['n_safe'])} · {fmt(r['valid_n_risky'])}/{fmt(r['n_risky'])}"
                      for _, r in t.iterrows()],
            "mean_bet_risky": [f"${v:.2f}" if v is not None and v == v else "–" for v in t["mean_bet_risky"]],
        })
        # Text cells: a rate over no valid answer shows "–", not "None".
        st.dataframe(frame, hide_index=True, width="stretch", column_config={
            "model": st.column_config.TextColumn(help="trained: the demo model; untrained: the same architecture "
                                                      "with its initial weights"),
            "stop_safe": st.column_config.TextColumn(
                "stop, safe", help="Share of valid answers that stop, on the safe prompt ($140 after a win, "
                                   "fixed $10 bets)"),
            "stop_risky": st.column_config.TextColumn(
                "stop, risky", help="Share of valid answers that stop, on the risky prompt ($20 after a $100 loss, "
                                    "variable bets)"),
            "valid": st.column_config.TextColumn(
                "valid (safe · risky)", help="Answers in the game's format (a choice, then a bet or a stop), of "
                                             "those sampled"),
            "mean_bet_risky": st.column_config.TextColumn("bet, risky",
                                                          help="Mean stated bet of the valid betting answers on "
                                                               "the risky prompt"),
        })
    p = _p_text(info.learned_p)
    trained = info.rates[info.rates["model"] == "trained"] if info.rates is not None else None
    if trained is not None and len(trained):
        r = trained.iloc[0]
        what = (f"stop rate {fmt(r['stop_safe'], 2)} on the safe prompt vs {fmt(r['stop_risky'], 2)} on the risky "
                f"prompt (one-sided Fisher's exact test, p = {p})")
    else:
        what = f"p = {p}"
    if info.learned_ok is True:
        st.success(f"It learned the gamble: {what}.", icon=":material/check_circle:")
    elif info.learned_ok is False:
        st.error(f"The model did NOT learn the gamble: {what}; at least 80% valid answers on both prompts and "
                 "p < 0.01 are needed. The features below come from a model that does not gamble.",
                 icon=":material/error:")
    else:
        st.warning("The record does not say whether the model learned the gamble.", icon=":material/help:")


DEMO_DIRECTIONS = (
    "**safe** = patching the feature to its stop-game mean (the *safe patch*) raises stopping; "
    "**risky** = patching it to its bankrupt-game mean (the *risky patch*) lowers stopping, i.e. raises betting; "
    "**mixed** = both, or an effect against the patch's own direction. Run A's `classified_as` in the "
    "checkpoints means something else: it compares the two patches with each other, `safe` when stopping is "
    "higher under the safe patch than under the risky one (the feature pushes the way its group does, whichever "
    "patch does the work), `risky` when the reverse.")


def _demo_causal(info) -> None:
    st.markdown("**Experiment 2**: which features change the decision")
    tested = f" of {info.features_tested}" if info.features_tested is not None else ""
    trials = f", {info.n_trials} trials per condition" if info.n_trials is not None else ""
    rule = info.rule_name or "the demo's rule"
    m1, m2 = st.columns(2)
    with m1:
        st.metric(f"Engine verdict (BH){tested}", fmt(info.n_causal_bh), border=True,
                  help=(info.rule_bh or "The engine's recomputed verdict") + (f". Source: {info.bh_source}."
                                                                              if info.bh_source else ""))
    with m2:
        st.metric(f"Run A's rule{tested}", fmt(info.n_causal), border=True,
                  help=(info.rule or "") + " Uncorrected: no multiple-testing correction.")
    if info.n_causal_bh == 0 and not info.n_causal:
        st.warning("No feature was causal by either rule: the Features and Pathway pages have nothing to show.",
                   icon=":material/search_off:")
    elif info.n_causal is None and info.n_causal_bh is None:
        st.warning("The record does not say how many features were causal.", icon=":material/help:")
    if info.n_causal_bh is not None:
        d = info.bh_by_direction
        dirs = ", ".join(f"{d.get(k, 0)} {k}" for k in ("safe", "risky", "mixed"))
        both = ""
        if info.bh_raises_stopping is not None and info.bh_raises_betting is not None:
            both = (f"; {info.bh_raises_stopping} raise stopping (safe patch), {info.bh_raises_betting} raise "
                    "betting (risky patch)")
        exp = f" The power plan expected {info.expected_bh:.1f}." if info.expected_bh is not None else ""
        st.markdown(f"**{fmt(info.n_causal_bh)}** survive the engine's own verdict{trials} (each patch against "
                    f"its prompt's baseline, Benjamini-Hochberg over every test): {dirs}{both}.{exp} These are the "
                    "features with pathways and token views.", help=info.rule_bh)
    if info.n_causal is not None:
        shown = ", ".join(f"`{f}`" for f in info.causal_features[:12]) or "–"
        more = f" and {len(info.causal_features) - 12} more" if len(info.causal_features) > 12 else ""
        st.caption(f"By **{rule}** (uncorrected, the checkpoints' verdict: the two patches against each other, "
                   f"p < 0.05 per feature): {info.n_causal}: {shown}{more}.", help=info.rule)
    st.caption("Directions: " + DEMO_DIRECTIONS)
    if info.n_causal_run_b is not None:
        st.caption(f"By the study's final rule (Run B): {info.n_causal_run_b}.", help=info.rule_run_b)
