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
import re
from dataclasses import dataclass
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


def validation_label(v, linear=None) -> str:
    """v: the node's `validated` (linear estimate confirmed and the target's activation changed);
    linear: `linear_confirmed` (the estimate held on the pre-activation)."""
    if v is True:
        return "validated by replay (target's activation changed)"
    if v is False and linear is True:
        return "linear estimate confirmed on the pre-activation only (target's activation unchanged)"
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


#: Pixel geometry of the pathway figure. Labels are placed in pixels, so the figure fixes its
#: margins (no plotly legend or automargin moves the plot area) and assumes the narrowest
#: plot area it gets: the graph column at a 1280x720 window. A wider window only spreads
#: nodes further apart, so labels that do not overlap there do not overlap anywhere.
PLOT_WIDTH = 425
COMPACT_PLOT_WIDTH = 215  # the Features page's preview column
LABEL_FONT = 11
LABEL_LINE = 13  # px per label line
LABEL_BUDGET = 60  # at most this many labels; the rest keep their hover


@dataclass(frozen=True)
class Geometry:
    height: int
    left: int
    right: int
    top: int
    bottom: int
    width: int = PLOT_WIDTH  # plot area

    @property
    def plot_height(self) -> int:
        return self.height - self.top - self.bottom


def graph_geometry(n_layers: int, x_mode: str, compact: bool = False, plot_width: int = PLOT_WIDTH) -> Geometry:
    height = max(380 if compact else 480, min(1150, 72 * n_layers + 190))
    bottom = 96 if x_mode == "position" else 12
    return Geometry(height=height + (bottom - 12), left=46, right=74, top=44, bottom=bottom, width=plot_width)


@dataclass(frozen=True)
class LabelBox:
    node: str
    text: str
    x: float  # the node, data coordinates
    y: float
    xanchor: str
    yanchor: str
    xshift: float
    yshift: float
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in plot-area pixels (origin bottom left)


def _overlap(a, b, gap: float = 1.0) -> bool:
    return a[0] < b[2] + gap and b[0] < a[2] + gap and a[1] < b[3] + gap and b[1] < a[3] + gap


def text_size(text: str, font: float = LABEL_FONT) -> tuple[float, float]:
    lines = text.split("<br>")
    w = max(len(html.unescape(re.sub(r"<[^>]+>", "", ln))) for ln in lines) * 0.6 * font + 6
    return w, len(lines) * font * 1.3 + 6


def place_labels(points: dict[str, tuple[float, float]], radii: dict[str, float], texts: dict[str, str],
                 order: list[str], xrange: tuple[float, float], yrange: tuple[float, float],
                 width: float, height: float, reserved: Iterable[tuple[float, float, float, float]] = (),
                 budget: int = LABEL_BUDGET) -> list[LabelBox]:
    """Greedy label placement in pixels: each node (most important first) takes the first of
    eight spots around its marker that stays inside the plot and clears every node marker,
    every reserved box and every label already placed; a node with no free spot keeps only
    its hover. Returns the placed labels; no two of their boxes overlap (tested)."""
    sx = width / ((xrange[1] - xrange[0]) or 1.0)
    sy = height / ((yrange[1] - yrange[0]) or 1.0)
    px = {n: ((x - xrange[0]) * sx, (y - yrange[0]) * sy) for n, (x, y) in points.items()}
    markers = [(cx - radii.get(n, 6), cy - radii.get(n, 6), cx + radii.get(n, 6), cy + radii.get(n, 6))
               for n, (cx, cy) in px.items()]
    taken: list[tuple[float, float, float, float]] = list(reserved)
    out: list[LabelBox] = []
    for n in order:
        if len(out) >= budget:
            break
        if n not in px or not texts.get(n):
            continue
        cx, cy = px[n]
        r = radii.get(n, 6) + 2
        w, h = text_size(texts[n])
        spots = [  # (x0, y0, xanchor, yanchor, xshift, yshift)
            (cx - w / 2, cy + r, "center", "bottom", 0, r),
            (cx - w / 2, cy - r - h, "center", "top", 0, -r),
            (cx + r, cy - h / 2, "left", "middle", r, 0),
            (cx - r - w, cy - h / 2, "right", "middle", -r, 0),
            (cx + r * 0.7, cy + r * 0.7, "left", "bottom", r * 0.7, r * 0.7),
            (cx - r * 0.7 - w, cy + r * 0.7, "right", "bottom", -r * 0.7, r * 0.7),
            (cx + r * 0.7, cy - r * 0.7 - h, "left", "top", r * 0.7, -r * 0.7),
            (cx - r * 0.7 - w, cy - r * 0.7 - h, "right", "top", -r * 0.7, -r * 0.7),
        ]
        for x0, y0, xa, ya, xs, ys in spots:
            box = (x0, y0, x0 + w, y0 + h)
            if box[0] < 0 or box[1] < 0 or box[2] > width or box[3] > height:
                continue
            if any(_overlap(box, b) for b in taken) or any(_overlap(box, m, 0.0) for m in markers):
                continue
            taken.append(box)
            out.append(LabelBox(n, texts[n], points[n][0], points[n][1], xa, ya, xs, ys, box))
            break
    return out


def auto_label(tokens_rec: dict | None) -> str | None:
    """A node's short auto-label from its token views: its top two logit-lens output tokens
    ("→ win, stop"), else its top activating input token ("“Round”")."""
    if not isinstance(tokens_rec, dict):
        return None
    lens = (tokens_rec.get("logit_lens") or {}).get("promoted") or []
    out = [clean_token(t.get("token")).strip() or clean_token(t.get("token")) for t in lens[:2]
           if isinstance(t, dict) and t.get("token") is not None]
    if out:
        return "→ " + ", ".join(out)
    for t in tokens_rec.get("top_activating") or []:
        if isinstance(t, dict) and t.get("token") is not None:
            return f"“{clean_token(t['token']).strip() or clean_token(t['token'])}”"
    return None


def label_text(node: str, auto: str | None = None, user: str | None = None) -> str:
    """Feature id on the first line; the researcher's label, else the auto-label, under it."""
    sub = (user or "").strip() or (auto or "").strip()
    if len(sub) > 18:
        sub = sub[:17] + "…"
    return html.escape(node) + (f"<br><i>{html.escape(sub)}</i>" if sub else "")


#: ring of a node whose linear estimate held on the pre-activation but whose ablation left the
#: target's activation unchanged (e.g. the target does not fire)
PRE_ONLY_RING = "#3b6db3"
#: marker of the per-layer SAE-error and decoder-bias nodes (features are circles)
KIND_SYMBOL = {"error": "square", "bias": "diamond"}


def pathway_figure(view: G.View, x_mode: str = "attribution", title: str | None = None,
                   value_label: str = "attribution", compact: bool = False,
                   auto_labels: dict[str, str] | None = None, user_labels: dict[str, str] | None = None,
                   selected: str | None = None, pinned: Iterable[str] = (), supernodes: Iterable[dict] = (),
                   plot_width: int | None = None) -> go.Figure:
    """The pruned graph with labelled nodes. `selected` highlights a node's edges (the others
    fade); `pinned` nodes get a gold halo; `supernodes` ({name, members}) a named box."""
    g = G.to_networkx(view)
    pos = G.layout(g, x_mode, view.target_position)
    auto_labels, user_labels = auto_labels or {}, user_labels or {}
    pinned = [p for p in pinned if p in pos]
    if selected not in pos:
        selected = None
    traces: list[go.Scatter] = []
    edges = view.edges
    wmax = float(np.nanmax(np.abs(edges["weight"].to_numpy()))) if len(edges) else 0.0
    if len(edges) and wmax > 0:
        w = edges["weight"].to_numpy(dtype=float)
        rel = np.abs(np.nan_to_num(w)) / wmax
        bins = np.digitize(rel, EDGE_BINS, right=True)
        sign = np.where(w >= 0, 1, -1)
        valid = edges["validated"].astype(bool).to_numpy()
        src = edges["source"].to_numpy()
        dst = edges["target"].to_numpy()
        hot = (src == selected) | (dst == selected) if selected else np.zeros(len(w), bool)
        for h in (False, True):
            for s in (1, -1):
                for v in (True, False):
                    for b in range(len(EDGE_WIDTHS)):
                        idx = np.nonzero((hot == h) & (sign == s) & (valid == v) & (bins == b))[0]
                        if not len(idx):
                            continue
                        xs: list = []
                        ys: list = []
                        for i in idx:
                            (x0, y0), (x1, y1) = pos[src[i]], pos[dst[i]]
                            xs += [x0, x1, None]
                            ys += [y0, y1, None]
                        name = ("positive" if s > 0 else "negative") + (" edge" if v else " edge, unvalidated source")
                        alpha = EDGE_ALPHAS[b] if not selected else (0.95 if h else EDGE_ALPHAS[b] * 0.3)
                        traces.append(go.Scatter(
                            x=xs, y=ys, mode="lines", hoverinfo="skip", name=("selected " if h else "") + name,
                            showlegend=False,
                            line=dict(color=style.signed_rgba(s, alpha), width=EDGE_WIDTHS[b] + (1.0 if h else 0.0),
                                      dash="solid" if v else "dot"),
                        ))
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
    size_of = dict(zip(up["id"], sizes.tolist()))
    size_of.update({t: 30.0 for t in tgt["id"]})
    # Halos under the nodes: gold for pinned, dark for the selected node (not clickable).
    for ids, colour, width, name in ((pinned, style.TARGET, 3.5, "pinned"),
                                     ([selected] if selected else [], "#111111", 3.0, "selected")):
        if ids:
            traces.append(go.Scatter(
                x=[pos[i][0] for i in ids], y=[pos[i][1] for i in ids], mode="markers", name=name,
                hoverinfo="skip", showlegend=False,
                marker=dict(symbol="circle-open", size=[size_of.get(i, 12) + 10 for i in ids],
                            line=dict(width=width, color=colour), color=colour)))
    vals = up["validated"].tolist()
    lin = up["linear_confirmed"].tolist() if "linear_confirmed" in up else [None] * len(vals)
    kinds = up["kind"].tolist() if "kind" in up else ["feature"] * len(vals)
    pre_only = [v is False and x is True for v, x in zip(vals, lin)]  # estimate held, target did not move
    symbols = [KIND_SYMBOL.get(k) or ("circle" if (v is not False or p) else "circle-x")
               for k, v, p in zip(kinds, vals, pre_only)]
    line_w = [3.0 if v is True else (2.0 if p else (1.0 if v is False else 0.6)) for v, p in zip(vals, pre_only)]
    line_c = ["#111111" if v is True else (PRE_ONLY_RING if p else "#777777") for v, p in zip(vals, pre_only)]
    hover = [_node_hover(r, view, auto_labels.get(r["id"]), user_labels.get(r["id"])) for r in up.to_dict("records")]
    traces.append(go.Scatter(
        x=[pos[i][0] for i in up["id"]], y=[pos[i][1] for i in up["id"]], mode="markers", name=NODE_TRACE,
        customdata=up["id"].tolist(), hovertext=hover, hoverinfo="text", showlegend=False,
        marker=dict(color=np.nan_to_num(attr).tolist(), colorscale=style.DIVERGING, cmid=0, cmin=-amax, cmax=amax,
                    size=sizes.tolist(), symbol=symbols, line=dict(width=line_w, color=line_c),
                    colorbar=dict(title=dict(text=value_label, side="right"), thickness=10, len=0.6,
                                  x=1.0, xpad=8, xanchor="left", y=0.5, yanchor="middle")),
        selected=dict(marker=dict(opacity=1.0)), unselected=dict(marker=dict(opacity=0.9)),
    ))
    traces.append(go.Scatter(
        x=[pos[i][0] for i in tgt["id"]], y=[pos[i][1] for i in tgt["id"]], mode="markers", name=TARGET_TRACE,
        customdata=tgt["id"].tolist(),
        hovertext=[_node_hover(r, view, auto_labels.get(r["id"]), user_labels.get(r["id"])) for r in tgt.to_dict("records")],
        hoverinfo="text", showlegend=False,
        marker=dict(color=style.TARGET, size=30, symbol="star", line=dict(width=1.5, color="#333333")),
        selected=dict(marker=dict(opacity=1.0)), unselected=dict(marker=dict(opacity=0.9)),
    ))
    layers = sorted({int(v) for v in nodes["layer"]})
    geo = graph_geometry(len(layers), x_mode, compact, plot_width or (COMPACT_PLOT_WIDTH if compact else PLOT_WIDTH))
    xs_all = [p[0] for p in pos.values()] or [0.0]
    span = (max(xs_all) - min(xs_all)) or 2.0
    xrange = (min(xs_all) - 0.1 * span, max(xs_all) + 0.1 * span)
    yrange = (min(layers, default=0) - 0.6, max(layers, default=0) + 0.75)

    # Labels: target, selected, pinned, then by |attribution|.
    texts = {n: label_text(n, auto_labels.get(n), user_labels.get(n)) for n in pos}
    rank = sorted(up.to_dict("records"), key=lambda r: -abs(_num(r.get("attribution"))))
    order = list(dict.fromkeys(list(tgt["id"]) + ([selected] if selected else []) + pinned + [r["id"] for r in rank]))
    reserved, shapes, annotations = _supernode_boxes(supernodes, pos, size_of, xrange, yrange, geo)
    # Marker radii in px: half the size plus the ring; plotly's star reaches ~1.3x its size.
    radii = {n: (s / 2 + 2) for n, s in size_of.items()}
    radii.update({t: 21.0 for t in tgt["id"]})
    placed = place_labels(pos, radii, texts, order, xrange, yrange,
                          geo.width, geo.plot_height, reserved)
    for lb in placed:
        annotations.append(dict(
            x=lb.x, y=lb.y, text=lb.text, showarrow=False, xanchor=lb.xanchor, yanchor=lb.yanchor,
            xshift=lb.xshift, yshift=lb.yshift, font=dict(size=LABEL_FONT, color="#222222"),
            bgcolor="rgba(255,255,255,0.78)", borderpad=1, align="center", captureevents=False,
            name=f"label:{lb.node}"))

    fig = go.Figure(data=traces)
    xaxis = dict(visible=False, range=list(xrange), fixedrange=False, automargin=False)
    if x_mode == "position" and view.tokens:
        used = _thin_ticks(sorted({G.position_of(d, view.target_position) for _, d in g.nodes(data=True)}),
                           xrange, geo.width)
        xaxis = dict(visible=True, range=list(xrange), tickvals=used, automargin=False,
                     ticktext=[f"{_short(clean_token(G.token_at(view.tokens, p)), 8)}·{p}" for p in used],
                     tickangle=-50, tickfont=dict(size=10), title=None, showgrid=True, gridcolor="#f0f0f0")
    fig.update_layout(
        **{k: v for k, v in _BASE_LAYOUT.items() if k != "margin"},
        margin=dict(l=geo.left, r=geo.right, t=geo.top, b=geo.bottom, autoexpand=False),
        title=dict(text=title or f"Pathway of {view.feature} ({view.mode})", x=0.01, y=0.985, yanchor="top"),
        height=geo.height,
        showlegend=False,
        xaxis=xaxis,
        yaxis=dict(title=None, tickvals=layers, ticktext=[f"L{l}" for l in layers], zeroline=False, automargin=False,
                   showgrid=True, gridcolor="#f0f0f0", range=list(yrange)),
        hoverlabel=dict(align="left"),
        dragmode="pan",
        annotations=annotations,
        shapes=shapes,
        meta={"plot_width": geo.width, "plot_height": geo.plot_height, "labels": [lb.node for lb in placed]},
    )
    return fig


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _thin_ticks(ticks: list[int], xrange: tuple[float, float], width: float, min_px: float = 15.0) -> list[int]:
    """Drop ticks closer than `min_px` to the previous kept one (their labels would overlap)."""
    scale = width / ((xrange[1] - xrange[0]) or 1.0)
    out: list[int] = []
    for t in ticks:
        if not out or (t - out[-1]) * scale >= min_px:
            out.append(t)
    return out


def _num(x) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return 0.0
    return 0.0 if math.isnan(v) else v


def _supernode_boxes(supernodes, pos, size_of, xrange, yrange, geo):
    """A dashed box around each supernode's members with its name on top; the name's box is
    reserved so that node labels avoid it."""
    sx = geo.width / (xrange[1] - xrange[0])
    sy = geo.plot_height / (yrange[1] - yrange[0])
    reserved, shapes, annotations = [], [], []
    for k, sn in enumerate(supernodes or []):
        members = [m for m in sn.get("members", []) if m in pos]
        if not members:
            continue
        pad = max(size_of.get(m, 12) for m in members) / 2 + 5
        x0 = min(pos[m][0] for m in members) - pad / sx
        x1 = max(pos[m][0] for m in members) + pad / sx
        y0 = min(pos[m][1] for m in members) - pad / sy
        y1 = max(pos[m][1] for m in members) + pad / sy
        colour = SUPERNODE_COLOURS[k % len(SUPERNODE_COLOURS)]
        shapes.append(dict(type="rect", x0=x0, x1=x1, y0=y0, y1=y1, layer="below", line=dict(color=colour, width=1.5,
                                                                                            dash="dash"),
                           fillcolor=colour.replace("rgb", "rgba").replace(")", ",0.07)"), name=f"supernode:{sn['name']}"))
        text = html.escape(str(sn.get("name", "")))[:24]
        w, h = text_size(text)
        bx0 = (x0 - xrange[0]) * sx
        by0 = (y1 - yrange[0]) * sy
        reserved.append((bx0, by0, bx0 + w, by0 + h))
        annotations.append(dict(x=x0, y=y1, text=f"<b>{text}</b>", showarrow=False, xanchor="left", yanchor="bottom",
                                font=dict(size=LABEL_FONT, color=colour), captureevents=False,
                                bgcolor="rgba(255,255,255,0.85)", borderpad=1,
                                name=f"supernode:{sn['name']}"))
    return reserved, shapes, annotations


SUPERNODE_COLOURS = ("rgb(117,112,179)", "rgb(27,158,119)", "rgb(231,41,138)", "rgb(102,166,30)", "rgb(166,118,29)")


def legend_markdown() -> str:
    """The graph's key, drawn under it (a plotly legend would take plot area and cover nodes)."""
    return ("<span style='color:#b2182b'>━</span> positive edge · <span style='color:#2166ac'>━</span> negative edge · "
            "┈ dotted: source not validated · ◉ thick ring: validated by replay (target's activation changed) · "
            f"<span style='color:{PRE_ONLY_RING}'>◉</span> blue ring: pre-activation only (estimate held, "
            "target's activation unchanged) · ⊗ replay did not confirm · ■ SAE error · ◆ decoder bias · "
            "<span style='color:#f2b701'>◯</span> pinned · ◯ dark halo: selected")


def _node_hover(r: dict, view: G.View, auto: str | None = None, user: str | None = None) -> str:
    lines = [f"<b>{r['id']}</b>" + (" (target)" if r.get("is_target") else "")]
    if user:
        lines.append(f"<i>{html.escape(user)}</i>")
    if auto:
        lines.append(f"auto-label: {html.escape(auto)}")
    lines.append(f"activation {_fmt(r.get('activation'))}")
    if not r.get("is_target"):
        label = "attribution (risky − safe)" if view.mode == "difference" else "attribution"
        lines.append(f"{label} {_fmt(r.get('attribution'))}")
        lines.append(f"replay change {_fmt(r.get('replay_delta'))}")
        lines.append(validation_label(r.get("validated"), r.get("linear_confirmed")))
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
    valid = up["validated"].eq(True)
    lin = up["linear_confirmed"].eq(True) if "linear_confirmed" in up else valid
    groups = [(valid, True, None, style.POSITIVE), (~valid & lin, False, True, PRE_ONLY_RING),
              (~valid & ~lin, False, False, style.NEUTRAL)]
    for mask, v, x, colour in groups:
        sub = up[mask]
        if len(sub):
            fig.add_trace(go.Scatter(
                x=sub["attribution"], y=sub["replay_delta"], mode="markers", name=validation_label(v, x),
                customdata=sub["id"], hovertemplate="%{customdata}<br>attribution %{x:.3f}<br>replay change %{y:.3f}<extra></extra>",
                marker=dict(size=9, color=colour, line=dict(width=1, color="white"))))
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
