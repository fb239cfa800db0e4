"""Shared Streamlit pieces: page setup with the sidebar (cache picker), problem messages,
metric rows and the deep-linked feature picker. The only explorer module importing streamlit."""

from __future__ import annotations

import math
import sys
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


def page_setup(title: str, icon: str) -> AppContext:
    st.set_page_config(page_title=f"{title} · SAE pathway explorer", page_icon=icon, layout="wide")
    ctx = context()
    sidebar(ctx)
    from explorer.jobs import reap

    reap()  # live jobs that ended since the last page draw leave no defunct process behind
    return ctx


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


def metric_row(items: Iterable[tuple], border: bool = True) -> None:
    """One row of metric cards: (label, value, tooltip defining the number[, small note under it])."""
    items = list(items)
    cols = st.columns(len(items))
    for col, item in zip(cols, items):
        label, value, tip = item[:3]
        note = item[3] if len(item) > 3 else None
        col.metric(label, value, delta=note, delta_color="off", delta_arrow="off", help=tip, border=border)


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


def _url_from_widget(widget_key: str, param: str) -> None:
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
    st.query_params[key] = feature


def download(label: str, data: bytes | str | None, file_name: str, mime: str, help: str, key: str) -> None:
    if data is None:
        st.button(label, disabled=True, help=help, key=key, width="stretch")
    else:
        st.download_button(label, data, file_name=file_name, mime=mime, help=help, key=key, width="stretch")


# ---------------------------------------------------------------------------
# The pathway panel (Pathway page, Features preview, Live prototype)
# ---------------------------------------------------------------------------

_VALIDATED_HELP = ("A node is validated when zero-ablating it changed the target's pre-activation with the "
                   "predicted sign (about minus its attribution) and by more than the configured minimum.")
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
    "weight": "Edge weight: the share of the target's attribution that flows from the source through the "
              "edge's downstream node, in units of the target's pre-activation (docs/science.md).",
    "coverage": "Share of the total |attribution| of all active upstream features that the graph's nodes hold.",
}


def pathway_panel(ctx: AppContext, bundle, key: str, causal: dict[str, dict], files: set[str],
                  compact: bool = False) -> str | None:
    """Graph (click a node) beside the node card, then edges, agreement and downloads.
    Returns the clicked node id, if any."""
    from explorer import figures
    from explorer import graph as G

    view = bundle.shown
    if compact:
        event = st.plotly_chart(bundle.figure, key=f"{key}_graph", on_select="rerun", selection_mode="points",
                                config={"displaylogo": False})
        picked = figures.selected_nodes(event, bundle.node_traces)
        return picked[0] if picked else None
    left, right = st.columns([2.1, 1.1], gap="medium")
    with left:
        event = st.plotly_chart(bundle.figure, key=f"{key}_graph", on_select="rerun", selection_mode="points",
                                config={"displaylogo": False, "toImageButtonOptions": {"filename": f"pathway_{view.feature}"}})
        dropped = []
        if view.dropped_nodes:
            dropped.append(f"{view.dropped_nodes} weaker nodes")
        if view.dropped_edges:
            dropped.append(f"{view.dropped_edges} edges")
        st.caption("Layer on the vertical axis; node colour = attribution (red raises the target, blue lowers it); "
                   "size = activation; thick dark ring = validated by replay, crossed = replay did not confirm; "
                   "dotted edges leave unreplayed or unconfirmed nodes."
                   + (f" Pruned: {', '.join(dropped)} hidden." if dropped else ""))
    picked = figures.selected_nodes(event, bundle.node_traces)
    node = picked[0] if picked else None
    with right:
        node_card(ctx, bundle, node or view.feature, causal, files, key, clicked=node is not None)
    t_edges, t_agree, t_nodes, t_down = st.tabs(["Edges", "Attribution vs replay", "Nodes", "Downloads"])
    with t_edges:
        edges = view.edges.copy()
        edges["|weight|"] = edges["weight"].abs()
        edges = edges.sort_values("|weight|", ascending=False).drop(columns="|weight|")
        cols = [c for c in ("source", "target", "weight", "weight_safe", "weight_risky", "raw", "validated")
                if c in edges.columns]
        st.dataframe(edges[cols], hide_index=True, width="stretch", height=min(420, 38 + 35 * max(1, len(edges))),
                     column_config={
                         "weight": st.column_config.NumberColumn(format="%+.4f", help=HELP["weight"]),
                         "weight_safe": st.column_config.NumberColumn("weight (safe)", format="%+.4f"),
                         "weight_risky": st.column_config.NumberColumn("weight (risky)", format="%+.4f"),
                         "raw": st.column_config.NumberColumn(
                             format="%+.4f", help="Attribution of the source to the downstream node's pre-activation"),
                         "validated": st.column_config.CheckboxColumn(
                             "source validated", help="Replay confirmed the source node (edges are not replayed)"),
                     })
        st.caption(f"{len(edges)} edges shown of {len(bundle.full.edges)}, strongest first.")
    with t_agree:
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
    with t_nodes:
        nodes = bundle.full.nodes.drop(columns=["positions", "position_activations", "position_attributions"],
                                       errors="ignore")
        nodes = nodes.assign(validated=nodes["validated"].map({True: "yes", False: "no"}).fillna("not replayed"))
        st.dataframe(nodes, hide_index=True, width="stretch", height=min(420, 38 + 35 * max(1, len(nodes))),
                     column_config={
                         "activation": st.column_config.NumberColumn(format="%.4f", help=HELP["activation"]),
                         "attribution": st.column_config.NumberColumn(format="%+.4f", help=HELP["attribution"]),
                         "replay_delta": st.column_config.NumberColumn("replay change", format="%+.4f",
                                                                       help=HELP["replay"]),
                         "patch_delta": st.column_config.NumberColumn("patch change", format="%+.4f"),
                         "validated": st.column_config.TextColumn(help=HELP["validated"]),
                     })
    with t_down:
        from explorer import data as D

        pruning = {"node_share": None, "edge_share": None}
        c1, c2, c3, c4 = st.columns(4)
        with c1:
            download("Graph JSON (as shown)", G.graph_json(view, pruning), f"{view.feature}.{view.mode}.graph.json",
                     "application/json", "The nodes and edges drawn above, after pruning", f"{key}_dl_graph")
        with c2:
            ct = D.pathway_export(ctx, view.feature, view.mode) if view.mode != "difference" else None
            download("circuit-tracer JSON", ct, f"{view.feature}.{view.mode}.circuit_tracer.json", "application/json",
                     "The graph in the shape circuit-tracer's and Neuronpedia's graph viewers read"
                     + ("" if ct else " (not available for this view)"), f"{key}_dl_ct")
        with c3:
            download("Edges CSV", G.edges_csv(view), f"{view.feature}.{view.mode}.edges.csv", "text/csv",
                     "The edges drawn above", f"{key}_dl_csv")
        with c4:
            raw = None
            try:
                from engine.schema import pathway_path

                raw = pathway_path(ctx.cache, view.feature).read_bytes()
            except OSError:
                pass
            download("Full pathway file", raw, f"{view.feature}.json", "application/json",
                     "The engine's pathway file with every prompt", f"{key}_dl_full")
    return node


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
            rows.append({"prompt": prompt, "act": rec["activation"],
                         "attr": None if is_target else rec["attribution"],
                         "replay": None if is_target else rec["replay_delta"],
                         "valid": "" if is_target else ("yes" if v is True else ("no" if v is False else "–"))})
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


def _demo_causal(info) -> None:
    st.markdown("**Experiment 2**: which features change the decision")
    tested = f" of {info.features_tested} tested" if info.features_tested is not None else ""
    trials = f", {info.n_trials} trials per condition" if info.n_trials is not None else ""
    rule = info.rule_name or "the demo's rule"
    st.metric(f"Causal features{tested}", fmt(info.n_causal), help=info.rule, border=True)
    if info.n_causal == 0:
        st.warning(f"No feature was causal by {rule}: the Features and Pathway pages have nothing to show.",
                   icon=":material/search_off:")
    elif info.n_causal is None:
        st.warning("The record does not say how many features were causal.", icon=":material/help:")
    else:
        shown = ", ".join(f"`{f}`" for f in info.causal_features) or "–"
        st.markdown(f"By **{rule}**{trials} (patched to the stop-game vs the bankrupt-game mean): {shown}.",
                    help=info.rule)
    if info.n_causal_run_b is not None:
        b = ", ".join(f"`{f}`" for f in info.causal_features_run_b)
        st.caption(f"By the study's final rule (Run B): {info.n_causal_run_b}" + (f" ({b})" if b else "") +
                   ". The checkpoints record Run A's verdict, which the selection step reads.", help=info.rule_run_b)
