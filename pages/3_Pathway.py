"""Pathway: one target's upstream graph, click a node for its numbers; ?feature=L12-3456."""

import streamlit as st

from explorer import data, views
from explorer import graph as G
from explorer.graph import available_modes
from explorer.widgets import (HELP, empty_state, feature_picker, fmt, graph_state, load, metric_row, open_feature,
                              page_setup, pathway_panel, show_problem, stale_banner)

ctx = page_setup("Pathway", ":material/account_tree:")
st.title("Pathway")

files = data.pathway_features(ctx)
try:
    causal = {r["feature"]: r for r in data.causal_features(ctx)[1].to_dict("records")}
except data.CacheProblem:
    causal = {}

c_feat, c_prompt, c_nodes, c_edges, c_x = st.columns([1.3, 1.5, 1.2, 1.2, 1.1])
feature = feature_picker(files, where=c_feat)
prompt = c_prompt.radio("Prompt", ["safe", "risky", "difference"], horizontal=True, key="prompt",
                        bind="query-params",
                        help="The graph on the safe or the risky study prompt, or risky minus safe "
                             "(attributions and edge weights subtracted; missing counts as 0).")
node_share = c_nodes.slider("Nodes kept", 0.05, 1.0, 0.8, 0.05, key="node_share", format="%.2f", bind="query-params",
                            help="Keep the strongest nodes that together hold this share of the graph's total "
                                 "|attribution| (circuit-tracer's node threshold). 1.0 keeps every node.")
edge_share = c_edges.slider("Edges kept", 0.05, 1.0, 0.98, 0.01, key="edge_share", format="%.2f", bind="query-params",
                            help="Then keep the strongest edges holding this share of total |weight| among the "
                                 f"kept nodes, at most {ctx.cfg.app.max_plot_edges} (app.max_plot_edges).")
x_mode = c_x.radio("Horizontal axis", ["attribution", "position"], key="x_mode", bind="query-params",
                   help="attribution: within a layer, nodes ordered by attribution (negative left); position: "
                        "each node at the prompt position where its attribution is largest.")

stale_banner(ctx, "pathways", "These pathways")
if not files and feature is None:
    empty_state("No pathway graphs in this cache yet. The pathways step writes one per selected causal feature:",
                data.engine_command(ctx, "pathways"), ":material/account_tree:")

if feature is None:
    st.info("Choose a feature above, or open one from the **Features** page.", icon=":material/touch_app:")
    overview = None
    try:
        overview = data.feature_overview(ctx)
    except data.CacheProblem:
        pass
    picks = files[:6]
    if overview is not None and len(overview):
        best = overview[overview["has_pathway"]].sort_values("abs_d", ascending=False)
        picks = best["feature"].head(6).tolist() or picks
    st.caption("Strongest causal features with a pathway:")
    cols = st.columns(max(1, len(picks)))
    for col, f in zip(cols, picks):
        col.button(f, key=f"pick_{f}", on_click=open_feature, args=(f,), width="stretch")
    st.stop()

pathway = load(data.pathway, ctx, feature)
modes = [m for m in ("safe", "risky", "difference") if m in available_modes(pathway)]
if prompt not in modes:
    st.warning(f"{feature} has no {prompt!r} graph; showing {modes[0]}.", icon=":material/info:")
    prompt = modes[0]

state = graph_state(ctx, feature, G.node_ids(pathway, prompt))
for problem in state.problems:
    st.caption(f":material/info: {problem}")
try:
    bundle = views.pathway_bundle(ctx, feature, prompt, node_share, edge_share, ctx.cfg.app.max_plot_edges, x_mode,
                                  selected=state.selected, pinned=state.pinned, annotations=state.annotations,
                                  pinned_subgraph=state.subgraph)
except data.CacheProblem as exc:
    show_problem(exc)
    st.stop()

info = causal.get(feature)
sub = []
if info:
    sub.append(f"selected causal feature, **{info.get('direction')}**, Cohen's d {fmt(info.get('cohen_d'), 2, signed=True)}")
else:
    sub.append("not in the selected causal features")
meta = pathway.get("metadata") or {}
if meta.get("encode_convention"):
    sub.append(f"{meta['encode_convention']} convention")
if meta.get("dtype"):
    sub.append(f"{meta['dtype']} on {meta.get('device', '?')}")
if meta.get("created"):
    sub.append(f"computed {meta['created']}")
st.markdown(f"### {feature}  \n" + " · ".join(sub))
if views.low_precision(meta):
    st.caption(f"Computed in {meta['dtype']}: nodes with close attributions may swap places (about 2% noise in "
               "attributions; docs/science.md, Precision). The replay changes are real interventions; rerun this "
               "feature in float32 when the order matters.")

full, shown = bundle.full, bundle.shown
ta = full.info.get("target_activation")
pre = full.info.get("target_pre_activation")
if prompt == "difference":
    act_text = f"{fmt(ta.get('safe'))} → {fmt(ta.get('risky'))}"
    act_help = "Target activation on the safe prompt → on the risky prompt (last prompt token)"
    act_note = None
else:
    act_text = fmt(ta)
    act_help = ("The target feature's activation at the last prompt token; below it, its pre-activation "
                "(what attributions and replay changes are measured on)")
    act_note = f"pre {fmt(pre, signed=True)}" if pre is not None else None
cov = views.coverage_share(full.info.get("coverage"))
n_up = int((~full.nodes["is_target"].astype(bool)).sum())
n_up_shown = int((~shown.nodes["is_target"].astype(bool)).sum())
metric_row([
    ("Activation", act_text, act_help, act_note),
    ("Nodes", f"{n_up_shown} / {n_up}", "Upstream nodes shown after pruning / in the graph"),
    ("Edges", f"{len(shown.edges)} / {len(full.edges)}", "Edges shown after pruning / in the graph"),
    ("Validated", fmt(bundle.validated_fraction, pct=True), "Share of replayed nodes validated by replay. " + HELP["validated"]),
    ("Replay r", fmt(bundle.agreement["pearson_r"]) if prompt != "difference" else "–", HELP["r"]),
    ("Coverage", fmt(cov, pct=True), HELP["coverage"]),
], compact=True, key="pw_metrics")

pathway_panel(ctx, bundle, key=f"pw_{feature}_{prompt}", causal=causal, files=set(files), state=state)
