"""Features: the selected causal features by layer; click a row for its pathway."""

import streamlit as st

from explorer import data, figures, views
from explorer.widgets import (HELP, PAGES, empty_state, fmt, load, metric_row, page_setup, pathway_panel,
                              show_problem, stale_banner)

ctx = page_setup("Features", ":material/list:")
st.title("Causal features")

meta, feats = load(data.causal_features, ctx)
overview = load(data.feature_overview, ctx)
if overview.attrs.get("problem") is not None:  # the features are listed; only the pathway numbers are missing
    show_problem(data.CacheProblem(**overview.attrs["problem"]))
stale_banner(ctx, "select", "The selection")
if not len(overview):
    empty_state("The selection holds no causal features (no checkpoint record passed the verdict). "
                "Check the audit page for why, or change `select.verdict` / `select.top_n`.")

n_dir = overview["direction"].value_counts()
with_pw = int(overview["has_pathway"].sum())
metric_row([
    ("Causal features", fmt(len(overview)), f"Selected by step 1: the top {meta.get('top_n', '?')} per layer by |Cohen's d|"),
    ("Safe", fmt(int(n_dir.get("safe", 0))), "Patching toward the safe mean makes the model stop more"),
    ("Risky", fmt(int(n_dir.get("risky", 0))), "Patching toward the risky mean makes the model bet more"),
    ("Mixed", fmt(int(n_dir.get("mixed", 0))), "Effects in both directions depending on the prompt"),
    ("With a pathway", fmt(with_pw), "Features whose pathway graph is in the cache"),
])
st.caption(f"Verdict: **{meta.get('verdict', '–')}** (checkpoint: the study's own is_causal flags; recomputed: our "
           "test on the response logs).")

# --- the bar chart: click a bar to filter the table to that layer and direction ----------
bar_event = st.plotly_chart(figures.features_by_layer(overview), key="features_bars", on_select="rerun",
                            selection_mode="points", config={"displaylogo": False})
picked_bar = figures.selected_bar(bar_event)
if picked_bar and st.session_state.get("_last_bar") != picked_bar:
    st.session_state["_last_bar"] = picked_bar
    st.session_state["f_layers"] = [picked_bar[0]]
    st.session_state["f_dirs"] = [picked_bar[1]]
    st.session_state["features_table"] = {"selection": {"rows": [], "columns": []}}
elif not picked_bar:
    st.session_state.pop("_last_bar", None)


def _clear_selection() -> None:
    st.session_state["features_table"] = {"selection": {"rows": [], "columns": []}}
    if "feature" in st.query_params:
        del st.query_params["feature"]


def _on_row() -> None:
    """A row click puts its feature in the address (a history entry: Back clears it)."""
    rows = st.session_state["features_table"]["selection"]["rows"]
    shown = st.session_state.get("_features_shown") or []
    if rows and rows[0] < len(shown):
        st.query_params["feature"] = shown[rows[0]]
    elif "feature" in st.query_params:
        del st.query_params["feature"]


# --- filters ------------------------------------------------------------------
layers = sorted(overview["layer"].unique().tolist())
c1, c2, c3, c4, c5 = st.columns([1.5, 1.3, 1.2, 1.5, 1.5])
sel_layers = c1.multiselect("Layers", layers, key="f_layers", on_change=_clear_selection, placeholder="all layers")
sel_dirs = c2.multiselect("Direction", ["safe", "risky", "mixed"], key="f_dirs", on_change=_clear_selection,
                          placeholder="all directions")
dmax = float(overview["abs_d"].max() or 0.0)
min_d = c3.slider("Min |Cohen's d|", 0.0, max(round(dmax, 1), 0.1), 0.0, 0.05, key="f_min_d", on_change=_clear_selection,
                  help="Effect size of the feature's patching on the stop rate (|d|)")
only_val = c4.toggle("Validated", key="f_validated", on_change=_clear_selection,
                     help="Only features with a pathway in which replay validated at least one node")
search = c5.text_input("Search", key="f_search", on_change=_clear_selection, placeholder="e.g. L12- or risky",
                       help="Substring of the feature id, direction or source file")
table = views.filter_features(overview, sel_layers, sel_dirs, min_d, only_val, search)

# --- table (left) and the selected feature (right) ---------------------------
left, right = st.columns([1.3, 1], gap="medium")
cols = ["feature", "layer", "direction", "cohen_d", "nodes", "validated", "agreement_r"]
# The address is the truth: the table's selection follows ?feature= (a link, Back, Forward).
wanted = st.query_params.get("feature")
url_rows = table.index[table["feature"] == wanted].tolist()[:1] if wanted else []
st.session_state["_features_shown"] = table["feature"].tolist()
current = list((st.session_state.get("features_table") or {}).get("selection", {}).get("rows", []))
if current != st.session_state.get("_features_synced", []) and current != url_rows and current and current[0] < len(table):
    # A selection no callback saw (set through session state): it is the pick.
    wanted = table["feature"].iloc[current[0]]
    st.query_params["feature"] = wanted
    url_rows = current
if current != url_rows:
    st.session_state["features_table"] = {"selection": {"rows": url_rows, "columns": []}}
st.session_state["_features_synced"] = url_rows
with left:
    st.dataframe(
        table[cols], key="features_table", on_select=_on_row, selection_mode="single-row", hide_index=True,
        width="stretch", height=min(640, 38 + 35 * max(1, len(table))),
        column_config={
            "feature": st.column_config.TextColumn(help="L<layer>-<SAE index>"),
            "direction": st.column_config.TextColumn(help="safe: patching makes the model stop more; risky: bet more"),
            "cohen_d": st.column_config.NumberColumn("Cohen's d", format="%+.2f",
                                                     help="Experiment 1's Cohen's d of the feature's activation, bankrupt "
                                                          "games minus voluntarily stopped games (from the checkpoint)"),
            "n_trials": st.column_config.NumberColumn("trials", help="Valid trials of the feature over all conditions"),
            "nodes": st.column_config.NumberColumn("nodes", format="%d", help="Upstream nodes of its pathway (largest prompt)"),
            "validated": st.column_config.ProgressColumn("validated", min_value=0.0, max_value=1.0, format="percent",
                                                         help="Share of replayed nodes validated, mean over prompts"),
            "agreement_r": st.column_config.NumberColumn("r", format="%.2f", help=HELP["r"] + " Mean over prompts."),
            "act_safe": st.column_config.NumberColumn("act. safe", format="%.2f",
                                                      help="Target activation on the safe prompt (last token)"),
            "act_risky": st.column_config.NumberColumn("act. risky", format="%.2f",
                                                       help="Target activation on the risky prompt (last token)"),
        },
    )
    st.caption(f"{len(table)} of {len(overview)} features · click a row to see its pathway.")

rows = url_rows
with right:
    if not rows or rows[0] >= len(table):
        st.info("Click a feature in the table to preview its pathway here. Click a bar above to filter by "
                "layer and direction.", icon=":material/touch_app:")
        st.stop()
    rec = table.iloc[rows[0]]
    feature = rec["feature"]
    st.markdown(f"### {feature}")
    st.caption(f"{rec['direction']} · Cohen's d {fmt(rec['cohen_d'], 2, signed=True)} · layer {rec['layer']}")
    prompt = views.preview_prompt(rec)
    st.page_link(PAGES["pathway"], label="Open pathway", icon=":material/account_tree:",
                 query_params={"feature": feature, "prompt": prompt})
    b2, b3 = st.columns(2)
    b2.page_link(PAGES["tokens"], label="Token views", icon=":material/text_fields:", query_params={"feature": feature})
    b3.page_link(PAGES["live"], label="Run live", icon=":material/play_circle:", query_params={"feature": feature})
    if not rec["has_pathway"]:
        st.info(f"No pathway for {feature} yet:", icon=":material/account_tree:")
        st.code(data.pathway_command(ctx, feature), language="bash")
        st.stop()
    try:
        bundle = views.pathway_bundle(ctx, feature, prompt, 0.8, 0.98, min(400, ctx.cfg.app.max_plot_edges),
                                      compact=True)
    except data.CacheProblem as exc:
        show_problem(exc)
        st.stop()
    clicked = pathway_panel(ctx, bundle, key=f"preview_{feature}", causal={}, files=set(), compact=True)
    if clicked:  # a node of the preview opens on the Pathway page, selected there
        st.switch_page(PAGES["pathway"], query_params={"feature": feature, "prompt": prompt, "node": clicked})
    st.caption(f"Strongest nodes (80% of |attribution|) on the {prompt} prompt (where the feature is more active); "
               "click a node to open it on the Pathway page, with its card, edges and downloads.")
