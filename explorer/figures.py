"""Plotly figures for the explorer's pages (no streamlit here, so tests can inspect them).

Pathway graphs follow circuit-tracer's and Neuronpedia's conventions: layer on the
vertical axis, signed diverging colour centred on zero, edge width by |weight|. Edges
are drawn as a few traces binned by sign, |weight| and validation (one trace per edge
is 7x slower to build and send), with an invisible midpoint marker per edge for hover;
the node markers are the last traces so they draw on top and are the clickable ones.
"""

from __future__ import annotations

import html
import math
from typing import Iterable

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from explorer import graph as G
from explorer import style

EDGE_BINS = (0.25, 0.5, 0.75)  # of the largest |weight| shown
EDGE_WIDTHS = (0.8, 1.8, 3.2, 5.0)
EDGE_ALPHAS = (0.30, 0.45, 0.60, 0.75)
NODE_TRACE = "nodes"
TARGET_TRACE = "target"

_BASE_LAYOUT = dict(
    margin=dict(l=10, r=10, t=50, b=10),
    plot_bgcolor="white",
    paper_bgcolor="white",
    font=dict(size=13),
)


def _fmt(x, digits: int = 3) -> str:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return "–"
    if math.isnan(v):
        return "–"
    return f"{v:+.{digits}f}" if v != 0 else "0"


def validation_label(v) -> str:
    if v is True:
        return "validated by replay"
    if v is False:
        return "not confirmed by replay"
    return "not replayed"


def clean_token(tok: str | None) -> str:
    """A token as readers expect it: visible spaces and newlines, no byte-level markers."""
    if tok is None:
        return ""
    t = str(tok).replace("Ġ", " ").replace("Ċ", "\n")
    return t.replace("\n", "⏎").replace(" ", "·") if t.strip() == "" else t.replace("\n", "⏎")


# ---------------------------------------------------------------------------
# Pathway graph
# ---------------------------------------------------------------------------


def pathway_figure(view: G.View, x_mode: str = "attribution", title: str | None = None,
                   value_label: str = "attribution", compact: bool = False) -> go.Figure:
    g = G.to_networkx(view)
    pos = G.layout(g, x_mode, view.target_position)
    traces: list[go.Scatter] = []
    edges = view.edges
    wmax = float(np.nanmax(np.abs(edges["weight"].to_numpy()))) if len(edges) else 0.0
    shown_legend: set[str] = set()
    if len(edges) and wmax > 0:
        w = edges["weight"].to_numpy(dtype=float)
        rel = np.abs(np.nan_to_num(w)) / wmax
        bins = np.digitize(rel, EDGE_BINS, right=True)
        sign = np.where(w >= 0, 1, -1)
        valid = edges["validated"].astype(bool).to_numpy()
        src = edges["source"].to_numpy()
        dst = edges["target"].to_numpy()
        for s in (1, -1):
            for v in (True, False):
                for b in range(len(EDGE_WIDTHS)):
                    idx = np.nonzero((sign == s) & (valid == v) & (bins == b))[0]
                    if not len(idx):
                        continue
                    xs: list = []
                    ys: list = []
                    for i in idx:
                        (x0, y0), (x1, y1) = pos[src[i]], pos[dst[i]]
                        xs += [x0, x1, None]
                        ys += [y0, y1, None]
                    name = ("positive" if s > 0 else "negative") + (" edge" if v else " edge, unvalidated source")
                    traces.append(go.Scatter(
                        x=xs, y=ys, mode="lines", hoverinfo="skip", name=name, legendgroup=name,
                        showlegend=name not in shown_legend,
                        line=dict(color=style.signed_rgba(s, EDGE_ALPHAS[b]), width=EDGE_WIDTHS[b],
                                  dash="solid" if v else "dot"),
                    ))
                    shown_legend.add(name)
        mx = [(pos[a][0] + pos[c][0]) / 2 for a, c in zip(src, dst)]
        my = [(pos[a][1] + pos[c][1]) / 2 for a, c in zip(src, dst)]
        text = [f"{a} → {c}<br>weight {_fmt(x)}" for a, c, x in zip(src, dst, w)]
        traces.append(go.Scatter(x=mx, y=my, mode="markers", marker=dict(size=9, opacity=0), hovertext=text,
                                 hoverinfo="text", showlegend=False, name="edges"))

    nodes = view.nodes
    up = nodes[~nodes["is_target"].astype(bool)]
    tgt = nodes[nodes["is_target"].astype(bool)]
    attr = up["attribution"].to_numpy(dtype=float)
    amax = float(np.nanmax(np.abs(attr))) if len(attr) and np.isfinite(attr).any() else 1.0
    amax = amax or 1.0
    act = up["activation"].to_numpy(dtype=float)
    actmax = float(np.nanmax(act)) if len(act) and np.isfinite(act).any() else 1.0
    sizes = 10 + 26 * np.sqrt(np.clip(np.nan_to_num(act) / (actmax or 1.0), 0, 1))
    vals = up["validated"].tolist()
    symbols = ["circle" if v is not False else "circle-x" for v in vals]
    line_w = [3.0 if v is True else (1.0 if v is False else 0.6) for v in vals]
    line_c = ["#111111" if v is True else "#777777" for v in vals]
    hover = [_node_hover(r, view) for r in up.to_dict("records")]
    traces.append(go.Scatter(
        x=[pos[i][0] for i in up["id"]], y=[pos[i][1] for i in up["id"]], mode="markers", name=NODE_TRACE,
        customdata=up["id"].tolist(), hovertext=hover, hoverinfo="text", showlegend=False,
        marker=dict(color=np.nan_to_num(attr).tolist(), colorscale=style.DIVERGING, cmid=0, cmin=-amax, cmax=amax,
                    size=sizes.tolist(), symbol=symbols, line=dict(width=line_w, color=line_c),
                    colorbar=dict(title=dict(text=value_label, side="right"), thickness=12, len=0.7)),
        selected=dict(marker=dict(opacity=1.0)), unselected=dict(marker=dict(opacity=0.55)),
    ))
    traces.append(go.Scatter(
        x=[pos[i][0] for i in tgt["id"]], y=[pos[i][1] for i in tgt["id"]], mode="markers+text", name=TARGET_TRACE,
        customdata=tgt["id"].tolist(), text=tgt["id"].tolist(), textposition="top center",
        hovertext=[_node_hover(r, view) for r in tgt.to_dict("records")], hoverinfo="text", showlegend=False,
        marker=dict(color=style.TARGET, size=30, symbol="star", line=dict(width=1.5, color="#333333")),
        selected=dict(marker=dict(opacity=1.0)), unselected=dict(marker=dict(opacity=0.8)),
    ))
    # Legend entries for the node rings (markers of the real traces vary per point).
    for label, symbol, width in (("validated by replay", "circle", 3.0), ("not confirmed by replay", "circle-x", 1.0),
                                 ("not replayed", "circle", 0.6)):
        traces.append(go.Scatter(x=[None], y=[None], mode="markers", name=label, hoverinfo="skip",
                                 marker=dict(color="#dddddd", size=12, symbol=symbol,
                                             line=dict(width=width, color="#111111" if width == 3.0 else "#777777"))))
    layers = sorted({int(v) for v in nodes["layer"]})
    fig = go.Figure(data=traces)
    xaxis = dict(visible=False)
    if x_mode == "position" and view.tokens:
        used = sorted({int(round(p[0])) for p in pos.values()})
        xaxis = dict(visible=True, tickvals=used, ticktext=[f"{clean_token(G.token_at(view.tokens, p))}·{p}" for p in used],
                     tickangle=-50, title="token position (strongest attribution)", showgrid=True, gridcolor="#f0f0f0")
    fig.update_layout(
        **_BASE_LAYOUT,
        title=dict(text=title or f"Pathway of {view.feature} ({view.mode})", x=0.01),
        height=max(360 if compact else 460, min(1100, 70 * len(layers) + 160)),
        showlegend=not compact,
        xaxis=xaxis,
        yaxis=dict(title="layer", tickvals=layers, ticktext=[f"L{l}" for l in layers], zeroline=False,
                   showgrid=True, gridcolor="#f0f0f0", range=[min(layers, default=0) - 0.6, max(layers, default=0) + 0.8]),
        legend=dict(orientation="h", yanchor="bottom", y=-0.12, x=0, font=dict(size=11)),
        hoverlabel=dict(align="left"),
        dragmode="pan",
    )
    return fig


def _node_hover(r: dict, view: G.View) -> str:
    lines = [f"<b>{r['id']}</b>" + (" (target)" if r.get("is_target") else "")]
    lines.append(f"activation {_fmt(r.get('activation'))}")
    if not r.get("is_target"):
        label = "attribution (risky − safe)" if view.mode == "difference" else "attribution"
        lines.append(f"{label} {_fmt(r.get('attribution'))}")
        lines.append(f"replay change {_fmt(r.get('replay_delta'))}")
        lines.append(validation_label(r.get("validated")))
    p = G.strongest_position(r, view.target_position)
    if p is not None and view.tokens:
        lines.append(f"position {p}: {html.escape(repr(clean_token(G.token_at(view.tokens, p))))}")
    return "<br>".join(lines)


def node_trace_indices(fig: go.Figure | dict) -> set[int]:
    """Curve numbers of the clickable node traces (for reading a plotly selection)."""
    data = fig["data"] if isinstance(fig, dict) else fig.data
    return {i for i, t in enumerate(data) if (t["name"] if isinstance(t, dict) else t.name) in (NODE_TRACE, TARGET_TRACE)}


def selected_nodes(event, node_traces: set[int]) -> list[str]:
    """Node ids from a `st.plotly_chart(on_select=...)` event (dict access works for both
    the live PlotlyState and the plain dict a test injects)."""
    try:
        points = event["selection"]["points"]
    except (KeyError, TypeError, IndexError):
        return []
    out = []
    for p in points or []:
        if p.get("curve_number") in node_traces and p.get("customdata") is not None:
            cd = p["customdata"]
            out.append(str(cd[0] if isinstance(cd, (list, tuple)) else cd))
    return out


def agreement_figure(view: G.View) -> go.Figure:
    """Attribution against the replay change; a perfect first-order estimate lies on y = -x."""
    up = view.nodes[~view.nodes["is_target"].astype(bool)]
    up = up[np.isfinite(up["attribution"].astype(float)) & np.isfinite(up["replay_delta"].astype(float))]
    fig = go.Figure()
    colours = {True: style.POSITIVE, False: style.NEUTRAL}
    for v in (True, False):
        sub = up[up["validated"].eq(True) == v]
        if len(sub):
            fig.add_trace(go.Scatter(
                x=sub["attribution"], y=sub["replay_delta"], mode="markers", name=validation_label(v),
                customdata=sub["id"], hovertemplate="%{customdata}<br>attribution %{x:.3f}<br>replay change %{y:.3f}<extra></extra>",
                marker=dict(size=9, color=colours[v], line=dict(width=1, color="white"))))
    if len(up):
        lim = float(max(np.abs(up["attribution"]).max(), np.abs(up["replay_delta"]).max())) * 1.1 or 1.0
        fig.add_trace(go.Scatter(x=[-lim, lim], y=[lim, -lim], mode="lines", name="replay = −attribution",
                                 line=dict(color="#888888", dash="dash", width=1), hoverinfo="skip"))
    fig.update_layout(**_BASE_LAYOUT, height=380, title=dict(text="Attribution vs replay change", x=0.01),
                      xaxis=dict(title="attribution (first-order estimate)", zeroline=True, zerolinecolor="#cccccc"),
                      yaxis=dict(title="replay change of the target", zeroline=True, zerolinecolor="#cccccc"),
                      legend=dict(orientation="h", y=-0.25))
    return fig


# ---------------------------------------------------------------------------
# Features page
# ---------------------------------------------------------------------------


def features_by_layer(df: pd.DataFrame) -> go.Figure:
    """Stacked bars: causal features per layer, split by direction (one trace per direction)."""
    fig = go.Figure()
    layers = sorted(df["layer"].unique().tolist()) if len(df) else []
    counts = df.groupby(["layer", "direction"]).size() if len(df) else pd.Series(dtype=int)
    for d in ("safe", "risky", "mixed"):
        ys = [int(counts.get((l, d), 0)) for l in layers]
        if any(ys):
            fig.add_trace(go.Bar(x=layers, y=ys, name=d, marker_color=style.direction_colour(d),
                                 customdata=[d] * len(layers),
                                 hovertemplate=f"layer %{{x}}<br>{d}: %{{y}} features<extra></extra>"))
    fig.update_layout(**_BASE_LAYOUT, barmode="stack", height=300, title=dict(text="Causal features per layer", x=0.01),
                      xaxis=dict(title="layer", dtick=1 if len(layers) <= 32 else None), yaxis=dict(title="features"),
                      legend=dict(orientation="h", y=1.12, x=1, xanchor="right"))
    return fig


def selected_bar(event) -> tuple[int, str] | None:
    try:
        points = event["selection"]["points"]
    except (KeyError, TypeError):
        return None
    for p in points or []:
        cd = p.get("customdata")
        if cd is not None and p.get("x") is not None:
            return int(p["x"]), str(cd[0] if isinstance(cd, (list, tuple)) else cd)
    return None


# ---------------------------------------------------------------------------
# Audit page
# ---------------------------------------------------------------------------


def coverage_heatmap(cov: pd.DataFrame) -> go.Figure:
    """cov: index layer, columns condition, values = share of the layer's features with trials."""
    z = cov.to_numpy(dtype=float) * 100
    fig = go.Figure(go.Heatmap(
        z=z, x=list(cov.columns), y=[f"L{l}" for l in cov.index], colorscale="Greens", zmin=0, zmax=100,
        colorbar=dict(title="% features", thickness=12),
        hovertemplate="%{y} · %{x}<br>%{z:.1f}% of the layer's features have all their trials<extra></extra>"))
    fig.update_layout(**_BASE_LAYOUT, height=max(260, 22 * len(cov) + 120),
                      title=dict(text="Condition coverage (features with every expected trial)", x=0.01),
                      xaxis=dict(side="bottom"), yaxis=dict(autorange="reversed"))
    return fig


def trial_histogram(counts: pd.Series, expected: int | None) -> go.Figure:
    fig = go.Figure(go.Histogram(x=counts, marker_color=style.NEUTRAL, nbinsx=min(60, max(10, int(counts.max() or 1) + 1)),
                                 hovertemplate="%{x} trials: %{y} feature-conditions<extra></extra>", name="observed"))
    if expected:
        fig.add_vline(x=expected, line=dict(color=style.RISKY, dash="dash"), annotation_text=f"expected {expected}",
                      annotation_position="top left")
    xaxis: dict = dict(title="trials")
    if len(counts):
        lo, hi = int(counts.min()), int(counts.max())
        if expected:
            lo, hi = min(lo, expected), max(hi, expected)
        if hi - lo < 10:  # counts are whole trials: whole-number ticks, not 49.6 .. 50.4 around one bar
            xaxis.update(range=[lo - 2.5, hi + 2.5], dtick=1)
    fig.update_layout(**_BASE_LAYOUT, height=300, bargap=0.05, title=dict(text="Trials per feature × condition", x=0.01),
                      xaxis=xaxis, yaxis=dict(title="feature × condition pairs"), showlegend=False)
    return fig


def parse_bars(rows: list[tuple[str, int, int]]) -> go.Figure:
    """rows: (label, valid, total) per parser."""
    fig = go.Figure(go.Bar(
        x=[r[0] for r in rows], y=[100 * r[1] / r[2] if r[2] else 0 for r in rows],
        marker_color=[style.NEUTRAL, style.MIXED][: len(rows)],
        text=[f"{100 * r[1] / r[2]:.1f}%" if r[2] else "–" for r in rows], textposition="outside",
        hovertemplate="%{x}: %{y:.1f}% of trials parse as valid<extra></extra>"))
    fig.update_layout(**_BASE_LAYOUT, height=280, title=dict(text="Valid parses", x=0.01),
                      yaxis=dict(title="% of trials", range=[0, 110]))
    return fig


# ---------------------------------------------------------------------------
# Tokens page
# ---------------------------------------------------------------------------


def logit_lens_figure(promoted: list[dict], suppressed: list[dict], n: int = 15) -> go.Figure:
    rows = [(clean_token(r.get("token")), float(r.get("value", 0.0))) for r in (promoted or [])[:n]]
    rows += [(clean_token(r.get("token")), float(r.get("value", 0.0))) for r in (suppressed or [])[:n]]
    rows.sort(key=lambda r: r[1])
    fig = go.Figure(go.Bar(
        x=[r[1] for r in rows], y=[repr(r[0]) for r in rows], orientation="h",
        marker_color=[style.POSITIVE if r[1] > 0 else style.NEGATIVE for r in rows],
        hovertemplate="%{y}: %{x:.3f}<extra></extra>"))
    fig.update_layout(**_BASE_LAYOUT, height=max(300, 18 * len(rows) + 80),
                      title=dict(text="Logit lens", x=0.01),
                      xaxis=dict(title="logit effect (decoder direction · unembedding)"),
                      yaxis=dict(automargin=True, type="category"))  # tokens such as '130' are labels, not numbers
    return fig


def token_highlight_html(tokens: Iterable[str], activations: Iterable[float], colour: str = style.RISKY) -> str:
    """Prompt tokens with a background whose opacity is the activation (max = full colour).

    Tokens may carry visible whitespace (the engine shows a space as "␣" and a newline as
    "⏎"); lines break after newline tokens and may wrap between any two tokens."""
    toks = list(tokens)
    acts = [float(a) if a is not None else 0.0 for a in activations]
    amax = max(acts + [0.0]) or 1.0
    r, g, b = int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16)
    spans = []
    for t, a in zip(toks, acts):
        alpha = max(0.0, min(1.0, a / amax))
        raw = str(t).replace("Ġ", " ").replace("Ċ", "\n")
        newline = "\n" in raw or "⏎" in raw
        text = html.escape(raw.replace("\n", "⏎"))
        spans.append(f'<span title="activation {a:.3f}" style="background:rgba({r},{g},{b},{alpha:.2f});'
                     f'border-radius:3px;padding:1px 0">{text}</span>' + ("<br>" if newline else "&#8203;"))
    return ('<div style="font-family:ui-monospace,monospace;font-size:0.85rem;line-height:1.9;'
            'overflow-wrap:anywhere;border:1px solid #e6e6e6;border-radius:6px;padding:10px">'
            + "".join(spans) + "</div>")


# ---------------------------------------------------------------------------
# Live prototype
# ---------------------------------------------------------------------------


def prototype_figure(result: dict) -> go.Figure:
    """The strongest features of each layer at the last token, per prompt, layer on y."""
    fig = go.Figure()
    prompts = result.get("prompts", {})
    offsets = {name: (k - (len(prompts) - 1) / 2) * 0.22 for k, name in enumerate(prompts)}
    target = result.get("feature")
    for name, rec in prompts.items():
        xs, ys, ids, acts = [], [], [], []
        for layer, feats in (rec.get("top_features") or {}).items():
            for rank, f in enumerate(feats):
                xs.append(rank + 1)
                ys.append(int(layer) + offsets[name])
                ids.append(f.get("feature"))
                acts.append(float(f.get("activation", 0.0)))
        amax = max(acts + [1e-9])
        fig.add_trace(go.Scatter(
            x=xs, y=ys, mode="markers", name=name, customdata=ids,
            marker=dict(color=style.prompt_colour(name), size=[8 + 18 * math.sqrt(a / amax) for a in acts],
                        line=dict(width=[3 if i == target else 0.5 for i in ids], color="#111111")),
            hovertemplate="%{customdata}<br>activation %{text}<extra>" + name + "</extra>",
            text=[f"{a:.3f}" for a in acts]))
    layers = result.get("layers") or []
    fig.update_layout(**_BASE_LAYOUT, height=max(320, 40 * len(layers) + 140),
                      title=dict(text=f"Most active features per layer at the last token ({target})", x=0.01),
                      xaxis=dict(title="rank within the layer", dtick=1),
                      yaxis=dict(title="layer", tickvals=layers, ticktext=[f"L{l}" for l in layers]),
                      legend=dict(orientation="h", y=1.08, x=1, xanchor="right"))
    return fig


# ---------------------------------------------------------------------------
# Intervention runs (python -m engine intervene) and node activation histograms
# ---------------------------------------------------------------------------

ARM_COLOURS = {"baseline": style.NEUTRAL, "patched": style.MIXED}


def intervention_figure(result: dict) -> go.Figure:
    """Stop and bet rates with Wilson 95% intervals, unpatched versus patched, per prompt."""
    from plotly.subplots import make_subplots

    prompts = list((result.get("prompts") or {}).keys())
    fig = make_subplots(rows=1, cols=2, subplot_titles=("Stop rate", "Bet rate"), horizontal_spacing=0.12)
    label = {"baseline": "unpatched", "patched": _arm_label(result)}
    for col, what in enumerate(("stop", "bet"), start=1):
        for k, arm in enumerate(("baseline", "patched")):
            xs, ys, lo, hi, text = [], [], [], [], []
            for p in prompts:
                s = (result["prompts"][p] or {}).get(arm) or {}
                rate, ci = s.get(f"{what}_rate"), s.get(f"{what}_ci") or [None, None]
                if rate is None:
                    continue
                xs.append(p)
                ys.append(rate)
                lo.append(rate - ci[0])
                hi.append(ci[1] - rate)
                text.append(f"{s.get(what + 's', 0)}/{s.get('valid', 0)} valid ({s.get('invalid', 0)} invalid)<br>"
                            f"95% CI {ci[0]:.2f}–{ci[1]:.2f}")
            fig.add_trace(go.Scatter(
                x=xs, y=ys, mode="markers", name=label[arm], legendgroup=arm, showlegend=col == 1,
                marker=dict(size=13, color=ARM_COLOURS[arm], symbol="circle" if arm == "baseline" else "diamond"),
                error_y=dict(type="data", symmetric=False, array=hi, arrayminus=lo, thickness=2, width=8),
                offsetgroup=arm, customdata=text,
                hovertemplate=f"{label[arm]} · %{{x}}: %{{y:.2f}}<br>%{{customdata}}<extra></extra>"), row=1, col=col)
    fig.update_layout(**_BASE_LAYOUT, height=340, scattermode="group", scattergap=0.6,
                      legend=dict(orientation="h", y=-0.15, x=0.5, xanchor="center"))
    fig.update_layout(margin=dict(l=10, r=10, t=40, b=10))
    fig.update_yaxes(range=[-0.03, 1.03], tickformat=".0%", gridcolor="#eee", zeroline=False)
    fig.update_xaxes(type="category", categoryorder="array", categoryarray=prompts)
    return fig


def _arm_label(result: dict) -> str:
    feats = "+".join(result.get("features") or [])
    if result.get("mode") == "clamp":
        return f"{feats} clamped to {_fmt(result.get('value'), 3)}"
    return f"{feats} ablated"


def activation_histogram_figure(hist: dict, title: str | None = None) -> go.Figure | None:
    """Bars of a node's activation histogram over the sampled response tokens (log-spaced bins,
    tokens where the feature is 0 stated in the title)."""
    edges = hist.get("edges") or []
    counts = hist.get("counts") or []
    if len(edges) != len(counts) + 1 or not any(counts):
        return None
    lo, hi = np.asarray(edges[:-1], float), np.asarray(edges[1:], float)
    keep = np.nonzero(np.asarray(counts) > 0)[0]
    first, last = int(keep.min()), int(keep.max())
    sl = slice(first, last + 1)
    centres = np.sqrt(lo[sl] * hi[sl])
    widths = hi[sl] - lo[sl]
    fig = go.Figure(go.Bar(
        x=centres, y=counts[sl], width=widths, marker=dict(color=style.MIXED, line=dict(width=0)),
        customdata=np.stack([lo[sl], hi[sl]], axis=1),
        hovertemplate="%{customdata[0]:.3g}–%{customdata[1]:.3g}: %{y} tokens<extra></extra>"))
    zeros, total = hist.get("zero", 0), hist.get("total", 0)
    head = title or "Activation over sampled response tokens"
    sub = f"{total - zeros:,} of {total:,} tokens active" if total else ""
    fig.update_layout(**_BASE_LAYOUT, height=200, bargap=0.05, showlegend=False,
                      title=dict(text=f"{head}<br><sup>{sub}</sup>", font=dict(size=13), x=0, xanchor="left"))
    fig.update_layout(margin=dict(l=10, r=10, t=55, b=10))
    fig.update_xaxes(type="log", dtick=1, title=dict(text="activation (log scale)", font=dict(size=11)), gridcolor="#eee")
    fig.update_yaxes(title=dict(text="tokens", font=dict(size=11)), gridcolor="#eee")
    return fig


def context_snippets_html(examples: list[dict], colour: str = style.MIXED, limit: int = 5) -> str:
    """Top activating contexts, one line each: the activation, then the window of tokens shaded by
    activation with the strongest token underlined; repeats of the same response noted."""
    lines = []
    for ex in examples[:limit]:
        toks = [str(t) for t in ex.get("context_tokens") or []]
        acts = [float(a) if a is not None else 0.0 for a in ex.get("context_activations") or []]
        amax = max(acts + [0.0]) or 1.0
        r, g, b = int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16)
        spans = []
        for k, (t, a) in enumerate(zip(toks, acts)):
            alpha = max(0.0, min(1.0, a / amax))
            deco = "text-decoration:underline;font-weight:600;" if k == ex.get("center") else ""
            spans.append(f'<span title="activation {a:.3f}" style="background:rgba({r},{g},{b},{alpha:.2f});{deco}'
                         f'border-radius:3px">{html.escape(t)}</span>')
        rep = int(ex.get("repeats") or 1)
        note = f' <span style="color:#888">×{rep}</span>' if rep > 1 else ""
        src = html.escape(str(ex.get("prompt") or ""))
        lines.append(f'<div style="margin:2px 0"><span style="color:#666;display:inline-block;min-width:3.6em">'
                     f'{float(ex.get("activation") or 0):.2f}</span>{"&#8203;".join(spans)}{note}'
                     f'<span style="color:#aaa;font-size:0.75rem"> {src}</span></div>')
    return ('<div style="font-family:ui-monospace,monospace;font-size:0.8rem;line-height:1.7;overflow-wrap:anywhere;'
            'border:1px solid #e6e6e6;border-radius:6px;padding:6px 8px">' + "".join(lines) + "</div>")
